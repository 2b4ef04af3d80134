"""The feature commands through the CLI, as a user types them: predict, export, models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from visionpoc.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, mini_dogs: Path) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tmp / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data": {"root": str(mini_dogs), "val_fraction": 0.2, "num_workers": 0, "download": False},
                "models": [
                    {
                        "label": "vit",
                        "timm": "vit_tiny_patch16_224",
                        "pretrained": False,
                        "img_size": 32,
                        "model_kwargs": {"depth": 2},
                    }
                ],
                "train": {"epochs": 1, "batch_size": 8, "device": "cpu"},
            }
        )
    )
    assert main(["compare", "--config", str(cfg), "--out", str(tmp / "run"), "--no-report"]) == 0
    return tmp / "run"


def test_predict_command(run: Path, mini_dogs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = mini_dogs / "Images" / "n02085620-Chihuahua"
    assert main(["predict", str(run), str(folder), "--top", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 9 and all(r["image"].endswith(".jpg") for r in rows)
    for r in rows:
        (m,) = r["models"]
        assert m["model"] == "vit" and len(m["top"]) == 2 and m["top"][0]["probability"] >= m["top"][1]["probability"]
    assert main(["predict", str(run), str(folder / "n02085620_1.jpg")]) == 0
    assert "vit" in capsys.readouterr().out
    assert main(["predict", str(run), str(folder / "nope.jpg")]) == 2


def test_export_command_prints_the_onnx_check(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "onnx check [vit]" in out and "OK" in out and (tmp_path / "vit" / "classes.json").is_file()
    assert main(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0


def test_models_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--family", "vit", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["timm"] for r in rows] == ["vit_base_patch16_224.orig_in21k"] and rows[0]["license"]
    assert main(["models", "--family", "nonexistent"]) == 2


@pytest.mark.slow
def test_tune_then_compare_tuned(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = run / "config.yaml"
    tune_out = tmp_path / "tune"
    sets = ["--set", "tune.epochs=1", "--set", "tune.batch_size=[4, 8]", "--set", "tune.pruner=none"]
    assert main(["tune", "--config", str(cfg), "--model", "vit", "--trials", "2", "--out", str(tune_out), *sets]) == 0
    assert "use them with: visionpoc compare --tuned" in capsys.readouterr().out
    assert main(["tune", "--config", str(cfg), "--model", "vit", "--trials", "3", "--out", str(tune_out), *sets]) == 0
    assert "3 trials in study 'vit'" in capsys.readouterr().out  # the second run topped the study up to 3
    tuned = yaml.safe_load((tune_out / "tuned" / "vit.yaml").read_text())
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(cfg), "--tuned", str(tune_out), "--out", str(out), "--no-report"]) == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())["models"][0]
    assert resolved["tuned_from"] and resolved["lr"] == pytest.approx(tuned["model"]["lr"])


def test_a_run_folder_is_never_reused_by_a_new_run(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new run into a folder that holds one would mix its results and checkpoints with the old ones
    (and a later --resume would read the old ones): refused, with the two ways out."""
    out = tmp_path / "again"
    out.mkdir()
    (out / "config.yaml").write_text((run / "config.yaml").read_text())
    before = (out / "config.yaml").read_text()
    assert main(["compare", "--config", str(run / "config.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a run" in err and f"--resume {out}" in err and "Traceback" not in err
    assert (out / "config.yaml").read_text() == before and sorted(p.name for p in out.iterdir()) == ["config.yaml"]
    (tmp_path / "a_file").write_text("")
    assert main(["compare", "--config", str(run / "config.yaml"), "--out", str(tmp_path / "a_file" / "x")]) == 2
    assert "cannot create the folder" in capsys.readouterr().err


def test_unreadable_results_and_bad_arguments_are_user_errors(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    text = (broken / "results.json").read_text()
    for damaged in (text[: len(text) // 2], '{"models": 5}'):  # cut short by a full disk; edited by hand
        (broken / "results.json").write_text(damaged)
        for argv in (
            ["report", str(broken)],
            ["predict", str(broken), str(tmp_path)],
            ["compare", "--resume", str(broken)],
        ):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert "is not a readable visionpoc results file" in err and "Traceback" not in err, argv
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(run), str(tmp_path / "empty")]) == 2  # not a silent success
    assert "no image files" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    assert main(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        main(["serve", str(run), "--port", "99999"])
    assert e.value.code == 2 and "port number from 0 to 65535" in capsys.readouterr().err
