"""Prediction with a finished run: output format, and the same top-1 as the run's own test evaluation.

The run (`run_dir`, two tiny models) and its `predictor` are session fixtures in conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from visionpoc.errors import VisionpocError
from visionpoc.results import load_predictions
from visionpoc.serving.predict import LATENCY_NOTE, Predictor, format_predictions, image_files

LABELS = ["cnn", "vit"]


def test_top1_matches_the_runs_test_predictions(predictor: Predictor, run_dir: Path, mini_dogs: Path) -> None:
    for label in LABELS:
        saved = load_predictions(run_dir / label / "test_predictions.npz")
        paths = [mini_dogs / "Images" / f for f in saved["files"]]
        rows = predictor.predict_paths(paths, top=3)
        assert [r["image"] for r in rows] == [str(p) for p in paths]
        answers = [next(a for a in r["models"] if a["model"] == label) for r in rows]
        np.testing.assert_array_equal([a["top"][0]["index"] for a in answers], saved["preds"])
        top1 = np.array([a["top"][0]["probability"] for a in answers])
        np.testing.assert_allclose(top1, saved["probs"].max(1), atol=1e-4)


def test_output_format(predictor: Predictor, mini_dogs: Path) -> None:
    folder = mini_dogs / "Images" / "n02085620-Chihuahua"
    rows = predictor.predict_paths([folder], top=5)
    assert len(rows) == len(image_files([folder])) == 9
    row = rows[0]
    assert [a["model"] for a in row["models"]] == LABELS
    for a in row["models"]:
        assert len(a["top"]) == 3  # top 5 clipped to the 3 classes
        probs = [t["probability"] for t in a["top"]]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
        assert {t["label"] for t in a["top"]} == {"Chihuahua", "Shih-Tzu", "Afghan hound"}
        assert a["latency_ms"] > 0
    json.dumps(rows)  # the CLI's --json
    text = format_predictions(rows[:2])
    lines = text.splitlines()
    assert lines[0] == row["image"] and "cnn (" in lines[1] and "vit (" in lines[1] and " ms)" in lines[1]
    assert lines[2].startswith("  1  ") and "%" in lines[2]
    assert text.count("\n\n") == 2 and lines[-1] == LATENCY_NOTE  # two tables, then what the ms measure


def test_bad_files_and_paths(predictor: Predictor, tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("skipped: not an image extension")
    rows = predictor.predict_paths([tmp_path])
    assert len(rows) == 1 and "broken.jpg" in rows[0]["error"]
    assert "error: cannot decode" in format_predictions(rows)
    with pytest.raises(VisionpocError, match="not found"):
        predictor.predict_paths([tmp_path / "absent.jpg"])
    with pytest.raises(VisionpocError, match="choose from cnn, vit"):
        Predictor(predictor.run_dir, labels=["nope"])


def test_explanations(predictor: Predictor, mini_dogs: Path) -> None:
    from PIL import Image

    image = Image.open(next((mini_dogs / "Images").rglob("*.jpg")))
    maps = predictor.explain_image(image, size=64)
    assert {k: m for k, (m, _) in maps.items()} == {"cnn": "Grad-CAM", "vit": "attention rollout"}
    assert all(min(img.size) >= 64 and img.mode == "RGB" for _, img in maps.values())


def test_extreme_aspect_ratio_is_a_per_file_error(predictor: Predictor, mini_dogs: Path, tmp_path: Path) -> None:
    """A strip is refused (its row says why) and the other images are still predicted. 21:1 is just over
    the limit and still cheap to resize, so without the check it would be predicted."""
    from PIL import Image

    from visionpoc.serving.predict import MAX_ASPECT_RATIO, ImageShapeError

    photo = next((mini_dogs / "Images").rglob("*.jpg"))
    (tmp_path / "a_photo.jpg").write_bytes(photo.read_bytes())
    Image.new("RGB", (21 * 30, 30)).save(tmp_path / "b_wide.png")
    Image.new("RGB", (30, 21 * 30)).save(tmp_path / "c_tall.png")
    Image.new("RGB", (MAX_ASPECT_RATIO * 30, 30)).save(tmp_path / "d_at_the_limit.png")
    rows = predictor.predict_paths([tmp_path], top=2)
    assert [Path(r["image"]).name for r in rows] == [
        "a_photo.jpg",
        "b_wide.png",
        "c_tall.png",
        "d_at_the_limit.png",
    ]
    assert "models" in rows[0] and "models" in rows[3]
    assert "630x30 pixels" in rows[1]["error"] and "630" in rows[2]["error"]
    assert all(f"more than {MAX_ASPECT_RATIO} times" in r["error"] for r in rows[1:3])
    assert "error: image " in format_predictions(rows)
    with pytest.raises(ImageShapeError, match="100000x1"):
        predictor.predict_image(Image.new("RGB", (100_000, 1)))  # refused before the resize to gigapixels


@pytest.mark.parametrize("top", ["0", "-3", "two"])
def test_top_must_be_a_positive_count(
    run_dir: Path, mini_dogs: Path, top: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from visionpoc.cli import main

    photo = next((mini_dogs / "Images").rglob("*.jpg"))
    with pytest.raises(SystemExit) as usage:
        main(["predict", str(run_dir), str(photo), "--top", top])
    assert usage.value.code == 2
    assert "argument --top:" in capsys.readouterr().err


def test_predict_command_json(run_dir: Path, mini_dogs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from visionpoc.cli import main

    photo = next((mini_dogs / "Images").rglob("*.jpg"))
    assert main(["predict", str(run_dir), str(photo), "--top", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [a["model"] for a in rows[0]["models"]] == LABELS
    assert all(len(a["top"]) == 2 for a in rows[0]["models"])
