"""`visionpoc compare` / `train` / `data` end to end on the miniature Stanford Dogs, through the CLI."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from dogs_fixture import make_mini_dogs, pack_official_tars
from visionpoc.cli import main
from visionpoc.results import load_predictions

TINY_MODELS = [
    {
        "label": "xception",
        "timm": "legacy_xception",
        "pretrained": False,
        "finetune": "top_fraction",
        "fraction": 0.1,
        "img_size": 64,
        "lr": 1e-3,
    },
    {
        "label": "vit",
        "timm": "vit_tiny_patch16_224",
        "pretrained": False,
        "finetune": "full",
        "img_size": 32,
        "model_kwargs": {"depth": 2},
    },
]


def write_config(path: Path, root: Path, models: list[dict] | None = None, **train: object) -> Path:
    cfg = {
        "data": {
            "source": "stanford_dogs",
            "root": str(root),
            "val_fraction": 0.2,
            "num_workers": 0,
            "download": False,
        },
        "models": models or TINY_MODELS,
        "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 0.5, **train},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


MODEL_FIELDS = {
    "label",
    "timm",
    "finetune",
    "epochs",
    "train_time_s",
    "train_accuracy",
    "val_accuracy",
    "test_accuracy",
    "test_top5_accuracy",
    "test_macro_f1",
    "params",
    "trainable_params",
    "fwd_gflops",
    "train_img_s",
    "eval_img_s",
    "peak_memory_gib",
    "history",
    "warmup_s",
    "latency_ms_b1",
}


@pytest.mark.slow
def test_compare_end_to_end(tmp_path: Path, mini_dogs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert (
        main(
            [
                "compare",
                "--config",
                str(write_config(tmp_path / "c.yaml", mini_dogs)),
                "--out",
                str(out),
                "--no-report",
                "--set",
                "train.epochs=2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "train time (s)" in printed and "xception" in printed and "vit" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == {
        "source": "stanford_dogs",
        "root": str(mini_dogs),
        "train_size": 15,
        "val_size": 3,
        "test_size": 9,
        "num_classes": 3,
        "class_names": ["Chihuahua", "Shih-Tzu", "Afghan hound"],
        "test_root": str(mini_dogs / "Images"),
    }
    assert set(res["environment"]) >= {"torch", "timm", "device", "git_commit", "seed"}
    assert res["environment"]["device"] == "cpu" and res["environment"]["seed"] == 0
    for m in res["models"]:
        assert MODEL_FIELDS <= set(m), MODEL_FIELDS - set(m)
        assert m["status"] == "ok" and m["epochs"] == 2 and len(m["history"]) == 2
        assert m["history"][0]["epoch"] == 1 and {"train_loss", "val_accuracy"} <= set(m["history"][0])
        for key in ("train_accuracy", "val_accuracy", "test_accuracy", "test_top5_accuracy", "test_macro_f1"):
            assert 0.0 <= m[key] <= 1.0
        assert m["test_top5_accuracy"] == 1.0  # 3 classes: the top 5 always holds the truth
        assert m["train_time_s"] > 0 and m["train_img_s"] > 0 and m["eval_img_s"] > 0 and m["fwd_gflops"] > 0
        assert 0 < m["trainable_params"] <= m["params"]
        d = out / m["label"]
        for f in (
            "best.safetensors",
            "last.safetensors",
            "last_state.pt",
            "history.json",
            "test_predictions.npz",
        ):
            assert (d / f).is_file(), f
        # the best epoch's weights are written once: LAST is a link to BEST when they are the same epoch
        assert os.path.samefile(d / "best.safetensors", d / "last.safetensors") == (m["best_epoch"] == 2)
        preds = load_predictions(d / "test_predictions.npz")
        assert preds["probs"].shape == (9, 3) and len(set(preds["files"].tolist())) == 9  # each test image once
        assert np.isclose((preds["preds"] == preds["targets"]).mean(), m["test_accuracy"])
    xc, vit = res["models"]
    assert xc["trainable_params"] < xc["params"] / 2 and vit["trainable_params"] == vit["params"]
    assert (out / "results.csv").read_text().splitlines()[0].startswith("label,timm,finetune")
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 2


def test_train_one_model_and_a_failing_model(tmp_path: Path, mini_dogs: Path) -> None:
    # a model that passes the checks made before training (its timm name exists) and fails when built
    broken = {
        "label": "broken",
        "timm": "vit_tiny_patch16_224",
        "pretrained": False,
        "model_kwargs": {"no_such_abc": 1},
    }
    cfg = write_config(tmp_path / "c.yaml", mini_dogs, models=[broken, TINY_MODELS[1]], epochs=1)
    out = tmp_path / "run"
    assert main(["compare", "--config", str(cfg), "--out", str(out), "--no-report"]) == 1
    res = json.loads((out / "results.json").read_text())
    broken, vit = res["models"]
    assert broken["status"] == "failed" and "no_such_abc" in broken["error"]
    assert vit["status"] == "ok" and vit["test_accuracy"] is not None  # the other model still ran
    out2 = tmp_path / "one"
    assert main(["train", "--config", str(cfg), "--model", "vit", "--out", str(out2)]) == 0
    assert [m["label"] for m in json.loads((out2 / "results.json").read_text())["models"]] == ["vit"]
    assert main(["train", "--config", str(cfg), "--model", "nope", "--out", str(out2)]) == 2


def test_data_check(mini_dogs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", "--root", str(mini_dogs), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["train"], got["test"], got["classes"]) == (18, 9, 3)
    assert main(["data", "check", "--root", str(mini_dogs)]) == 0
    assert "18 train / 9 test images, 3 classes" in capsys.readouterr().out


def test_data_check_names_the_problem(fresh_dogs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (fresh_dogs / "train_list.mat").unlink()
    assert main(["data", "check", "--root", str(fresh_dogs)]) == 2
    err = capsys.readouterr().err
    assert "train_list.mat not found" in err and "Traceback" not in err


@pytest.mark.parametrize("workers", [0, 1])
def test_undecodable_image_stops_with_its_name(
    tmp_path: Path, fresh_dogs: Path, workers: int, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = fresh_dogs / "Images" / "n02085620-Chihuahua" / "n02085620_3.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    cfg = write_config(tmp_path / "c.yaml", fresh_dogs, models=[TINY_MODELS[1]], epochs=1)
    code = main(
        [
            "compare",
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "r"),
            "--no-report",
            "--set",
            f"data.num_workers={workers}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"cannot decode image {bad}" in err and "Traceback" not in err
    assert "`visionpoc data check --decode` lists every such file" in err  # all of them, before a rerun
    assert f"continue the run with: visionpoc compare --resume {tmp_path / 'r'}" in err  # once it is fixed


@pytest.mark.slow
def test_a_data_error_before_training_leaves_the_folder_free(
    tmp_path: Path, fresh_dogs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "no_dogs_here", models=[TINY_MODELS[1]], epochs=1)
    out = tmp_path / "r"
    assert main(["compare", "--config", str(cfg), "--out", str(out), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "no_dogs_here" in err and "--resume" not in err  # nothing started: nothing to resume
    assert not (out / "config.yaml").exists()
    fixed = ["--set", f"data.root={fresh_dogs}"]  # the same command, fixed: the folder is free to use
    assert main(["compare", "--config", str(cfg), "--out", str(out), "--no-report", *fixed]) == 0
    (m,) = json.loads((out / "results.json").read_text())["models"]
    assert m["warmup_s"] > 0 and m["train_img_s"] is None  # one step, the warm-up: no rate, not "0 img/s"


def test_data_check_decode_lists_every_bad_file(fresh_dogs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", "--root", str(fresh_dogs), "--decode", "--workers", "2"]) == 0
    assert "decoded every image: 0 failed" in capsys.readouterr().out
    bad = [
        fresh_dogs / "Images" / "n02085620-Chihuahua" / "n02085620_3.jpg",
        fresh_dogs / "Images" / "n02086240-Shih-Tzu" / "n02086240_1.jpg",
    ]
    bad[0].write_bytes(b"\xff\xd8\xff garbage")
    bad[1].write_bytes(b"")
    assert main(["data", "check", "--root", str(fresh_dogs), "--decode", "--json"]) == 2  # found: a failure
    found = json.loads(capsys.readouterr().out)["undecodable"]
    assert len(found) == 2 and all(any(str(b) in e for e in found) for b in bad)  # both, not the first


def test_python_dash_m_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "visionpoc", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("data", "compare", "train", "report"):
        assert cmd in out.stdout


@pytest.fixture
def dogs_server(tmp_path: Path) -> Iterator[str]:
    """The official tars of a miniature dataset, served over loopback HTTP."""
    tars = pack_official_tars(make_mini_dogs(tmp_path / "src"), tmp_path / "tars")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tars))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_compare_downloads_the_dataset_when_absent(
    tmp_path: Path, dogs_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VISIONPOC_DOGS_URL", dogs_server)
    root = tmp_path / "fresh"
    cfg = write_config(tmp_path / "c.yaml", root, models=[TINY_MODELS[1]], epochs=1)
    assert (
        main(
            [
                "compare",
                "--config",
                str(cfg),
                "--out",
                str(tmp_path / "r"),
                "--no-report",
                "--set",
                "data.download=true",
            ]
        )
        == 0
    )
    assert (root / "Images").is_dir() and json.loads((tmp_path / "r" / "results.json").read_text())["models"]
    assert main(["data", "download", "--root", str(tmp_path / "again"), "--base-url", dogs_server]) == 0
    assert main(["data", "check", "--root", str(tmp_path / "again")]) == 0


def test_imagenet_overlap_warning(caplog: pytest.LogCaptureFixture) -> None:
    from visionpoc.compare import warn_imagenet_overlap
    from visionpoc.config import Config, ModelConfig

    with caplog.at_level("WARNING"):
        flagged = warn_imagenet_overlap(
            [
                *Config().models,  # legacy_xception.tf_in1k and vit_base_patch16_224.orig_in21k
                ModelConfig(label="untagged", timm="legacy_xception"),  # timm's default tag: tf_in1k
                ModelConfig(label="scratch", timm="vit_base_patch16_224.orig_in21k", pretrained=False),
                ModelConfig(label="webli", timm="vit_base_patch16_siglip_224.v2_webli"),  # overlap undocumented
                ModelConfig(label="vit_hf", hf="google/vit-base-patch16-224-in21k"),  # the seed's, on the HF hub
                ModelConfig(label="own_hf", hf="/models/our-vit"),  # a folder that does not say
            ]
        )
    assert flagged == ["xception", "vit_b16", "untagged", "vit_hf"]
    assert "Stanford Dogs is built from ImageNet" in caplog.text and "vit_b16" in caplog.text
