"""Checks before anything trains, the dry run's plan, config errors before torch, the quick `models`
table, and a class-folder tree read as Stanford Dogs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from visionpoc import preflight
from visionpoc.cli import main
from visionpoc.compare import download_due, load_data, run_compare
from visionpoc.config import load_config, save_config
from visionpoc.data.loaders import stream_loader
from visionpoc.data.sources import read_dataset
from visionpoc.errors import DataError
from visionpoc.optim import default_lr
from visionpoc.presets import facts

CNN = {"label": "cnn", "timm": "test_resnet", "pretrained": False, "img_size": 32, "lr": 0.003}


def write_config(path: Path, root: Path, models: list[dict[str, Any]], **train: object) -> Path:
    data = {"source": "stanford_dogs", "root": str(root), "val_fraction": 0.2, "num_workers": 0, "download": False}
    path.write_text(yaml.safe_dump({"data": data, "models": models, "train": {"epochs": 2, "batch_size": 4, **train}}))
    return path


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------ everything before training


def test_a_typo_in_the_second_model_stops_the_run_before_the_first_trains(
    tmp_path: Path, mini_dogs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lite0 = {"label": "lite0", "timm": "tf_efficientnet_lite_0", "pretrained": False}
    cfg = write_config(tmp_path / "c.yaml", mini_dogs, [CNN, lite0])
    out = tmp_path / "run"
    assert main(["compare", "--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "models.1 (lite0)" in err and "'tf_efficientnet_lite_0'" in err
    assert "did you mean 'tf_efficientnet_lite0'" in err and "--set models.1.timm=NAME" in err
    assert not out.exists()  # no run folder, no model folder: the first model never trained
    assert main(["train", "--config", str(cfg), "--model", "lite0", "--out", str(out)]) == 2
    assert not out.exists()


def test_tune_checks_the_model_before_its_first_trial(
    tmp_path: Path, mini_dogs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lite0 = {"label": "lite0", "timm": "tf_efficientnet_lite_0", "pretrained": False}
    cfg = write_config(tmp_path / "c.yaml", mini_dogs, [CNN, lite0])
    out = tmp_path / "tune"
    assert main(["tune", "--config", str(cfg), "--model", "lite0", "--trials", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "models.1 (lite0)" in err and "did you mean 'tf_efficientnet_lite0'" in err
    assert not out.exists()  # no study, no trial folder


def test_every_problem_of_every_model_is_said_at_once(
    tmp_path: Path, mini_dogs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truncated = tmp_path / "cut.safetensors"
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((64, 64), dtype=np.float32)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    models = [
        CNN,
        {"label": "a", "timm": "resnet_18", "pretrained": False},
        {"label": "b", "timm": "vit_tiny_patch16_224.augreg_in22k", "pretrained": False},
        {"label": "c", "timm": "test_resnet", "pretrained_path": str(tmp_path / "absent.safetensors")},
        {"label": "d", "timm": "test_resnet", "pretrained_path": str(truncated)},
    ]
    cfg = write_config(tmp_path / "c.yaml", mini_dogs, models)
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "4 problems, found before training" in err
    assert "models.1 (a): timm has no model 'resnet_18'; did you mean 'resnet18'" in err
    assert "models.2 (b): timm's 'vit_tiny_patch16_224' has no pretrained tag 'augreg_in22k'" in err
    assert "did you mean 'vit_tiny_patch16_224.augreg_in21k'" in err
    assert f"models.3 (c): pretrained_path {tmp_path / 'absent.safetensors'} not found" in err
    assert f"models.4 (d): pretrained_path {truncated} is not a readable safetensors file" in err
    assert not (tmp_path / "run").exists()


def test_a_data_error_is_said_with_the_model_problems(
    tmp_path: Path, fresh_dogs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (fresh_dogs / "test_list.mat").unlink()
    cfg = write_config(tmp_path / "c.yaml", fresh_dogs, [CNN, {"label": "a", "timm": "resnet_18"}])
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "'resnet_18'" in err and "data: test_list.mat not found" in err


def test_weights_files_are_checked_without_loading_them(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    good = tmp_path / "w.safetensors"
    save_file({"w": np.ones(3, dtype=np.float32)}, str(good))
    pth = tmp_path / "w.pth"
    torch.save({"w": torch.ones(3)}, pth)
    (tmp_path / "notes.pth").write_text("not weights")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "fake.safetensors").write_text("{}")
    assert preflight.weights_problem(good) is None and preflight.weights_problem(pth) is None
    assert "neither a safetensors file nor a torch.save" in str(preflight.weights_problem(tmp_path / "notes.pth"))
    assert "is empty" in str(preflight.weights_problem(tmp_path / "empty.pth"))
    assert "not a readable safetensors" in str(preflight.weights_problem(tmp_path / "fake.safetensors"))
    assert "is a folder" in str(preflight.weights_problem(tmp_path))


def test_timm_names_the_code_accepts_still_pass() -> None:
    for p in facts.load_presets().values():
        assert preflight.timm_name_problem(p.model.timm) is None, p.name
    for name in ("vit_base_patch16_224.orig_in21k", "legacy_xception", "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"):
        assert preflight.timm_name_problem(name) is None, name
    assert "does not exist" in str(preflight.timm_name_problem("local-dir:/no/such/folder"))
    assert "not a timm model name" in str(preflight.timm_name_problem("timm/vit_tiny_patch16_224"))


def test_preset_and_policy_errors_come_before_torch_and_timm(tmp_path: Path) -> None:
    """Config errors (a misspelt key, an unknown preset or policy) exit 2 with the key's name, and neither
    torch nor timm has been imported by then."""
    bad_policy = tmp_path / "policy.yaml"
    bad_policy.write_text("models:\n  - {preset: vit_b16, policy: production}\n")
    bad_preset = tmp_path / "preset.yaml"
    bad_preset.write_text("models:\n  - {preset: vit_b61}\n")
    cases = {
        "train.epocs": ["compare", "--set", "train.epocs=3"],
        "has no policy 'production'": ["compare", "--config", str(bad_policy), "--dry-run"],
        "no preset 'vit_b61'": ["train", "--config", str(bad_preset), "--model", "vit_b61"],
    }
    code = (
        "import sys; from visionpoc.cli import main\n"
        f"for argv in {list(cases.values())!r}:\n"
        "    print(main(argv), 'torch' in sys.modules, 'timm' in sys.modules)\n"
    )
    done = run_python(code, tmp_path)
    assert done.stdout.split("\n")[:3] == ["2 False False"] * 3, (done.stdout, done.stderr)
    for said in cases:
        assert said in done.stderr, done.stderr
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------- the dry run


def test_dry_run_prints_the_plan_and_writes_nothing(
    tmp_path: Path, mini_dogs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = [CNN, {"label": "vit", "timm": "vit_tiny_patch16_224", "pretrained": False, "batch_size": 8}]
    cfg = write_config(tmp_path / "c.yaml", mini_dogs, [*models, {"preset": "xception"}], epochs=3)
    out = tmp_path / "run"
    assert main(["compare", "--config", str(cfg), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert "data: stanford_dogs in" in text and "15 train / 3 val / 9 test images, 3 classes" in text
    assert "cnn: test_resnet, finetune full" in text and "lr 0.003 (from the config), batch 4" in text
    assert "3 epochs x 3 steps = 9 optimizer steps" in text  # 15 images // 4 (the last partial batch dropped)
    assert f"lr {default_lr('full', 8):.3g} (the policy's default for this batch), batch 8" in text
    assert "3 epochs x 1 step = 3 optimizer steps" in text  # 15 // 8
    assert "xception: legacy_xception.tf_in1k, policy production (finetune top_fraction)" in text
    assert "lr 0.001 (the preset's policy)" in text and "time: no estimate" in text
    assert "input: stream on cpu: each image decoded and augmented every epoch" in text
    prepared = ["--set", "data.pipeline=prepared", "--set", "data.prepared_size=64"]
    stores = set(mini_dogs.rglob("store-*"))
    assert main(["compare", "--config", str(cfg), "--out", str(out), "--dry-run", *prepared]) == 0
    text = capsys.readouterr().out  # 27 images of the three splits, 3 x 64 x 64 bytes each: 0.3 MiB
    assert "input: prepared store on cpu: 27 images decoded once at 64 px, 0.3 MiB on disk" in text
    assert set(mini_dogs.rglob("store-*")) == stores  # the dry run builds nothing
    assert main(["train", "--config", str(cfg), "--model", "vit", "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "1 model(s)" in text and "vit: vit_tiny_patch16_224" in text and "cnn:" not in text
    assert not out.exists()


@pytest.mark.parametrize("batch_size", [4, 15, 32])
def test_planned_steps_are_the_loops(tmp_path: Path, mini_dogs: Path, batch_size: int) -> None:
    cfg = load_config(write_config(tmp_path / "c.yaml", mini_dogs, [CNN], batch_size=batch_size))
    _, splits = load_data(cfg)
    loader = stream_loader(splits.train, None, batch_size, True, cfg, torch.device("cpu"))
    (m,) = preflight.plan("compare", cfg, tmp_path / "run", None, splits, resume=False).models
    assert m.steps_per_epoch == len(loader) and m.steps == 2 * len(loader)


def test_the_plan_matches_what_the_run_does(tmp_path: Path, mini_dogs: Path, one_thread: None) -> None:
    probe = {"label": "probe", "timm": "test_resnet", "pretrained": False, "img_size": 32, "finetune": "linear_probe"}
    path = write_config(tmp_path / "c.yaml", mini_dogs, [CNN, probe], epochs=1)
    cfg = load_config(path, ["probe.min_steps=12"])
    _, splits = load_data(cfg)
    planned = {m.label: m for m in preflight.plan("compare", cfg, tmp_path / "run", None, splits, False).models}
    done = {m.label: m for m in run_compare(cfg, tmp_path / "run").models}
    for label in ("cnn", "probe"):
        assert done[label].status == "ok", done[label].error
        assert planned[label].steps == done[label].optimizer_steps, label
        assert planned[label].epochs == done[label].epochs, label
    assert planned["probe"].lr.startswith("a grid of 6 x 3") and planned["cnn"].lr == f"{done['cnn'].lr:.3g}"


def test_a_resumed_run_is_estimated_from_its_own_epochs(tmp_path: Path, mini_dogs: Path) -> None:
    vit = {"label": "vit", "timm": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32}
    cfg = load_config(write_config(tmp_path / "c.yaml", mini_dogs, [CNN, vit], epochs=4))
    run = tmp_path / "run"
    (run / "vit").mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    (run / "results.json").write_text(json.dumps({"models": [{"label": "cnn", "status": "ok"}]}))
    epoch = {"epoch": 1, "train_img_s": 100.0}
    (run / "vit" / "history.json").write_text(json.dumps([epoch, {**epoch, "epoch": 2, "train_img_s": 50.0}]))
    _, splits = load_data(cfg)
    cnn, planned = preflight.plan("compare", cfg, run, None, splits, resume=True).models
    assert cnn.status == "finished (kept)" and cnn.estimate_s is None
    assert planned.status == "continues after epoch 2"
    assert planned.estimate_s == pytest.approx(2 * 3 * 4 / 75.0)  # 2 epochs left x 3 steps x 4 images at 75 img/s
    text = preflight.format_plan(preflight.plan("compare", cfg, run, None, splits, resume=True))
    assert "time: about 0 s of training at this run's measured img/s" in text and "no estimate" not in text


def test_a_dry_run_never_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visionpoc import compare

    monkeypatch.setattr(compare, "load_data", lambda cfg: pytest.fail("the dry run read or downloaded the data"))
    cfg = load_config(None, [f"data.root={tmp_path / 'dogs'}", "data.download=true"])
    plan = compare.dry_run("compare", cfg, tmp_path / "run", False, None)
    assert "the run downloads it first" in plan.data and plan.models[0].steps is None
    assert "? steps" in preflight.format_plan(plan) and not (tmp_path / "dogs").exists()


# ----------------------------------------------------------------------------------- visionpoc models


def test_models_is_quick_and_narrow_by_default(tmp_path: Path) -> None:
    code = "import sys; from visionpoc.cli import main; main(['models']); print('torch' in sys.modules)"
    done = run_python(code, tmp_path)
    lines = done.stdout.splitlines()
    assert lines[-1] == "False", done.stderr  # no model built: neither torch nor timm imported
    table = lines[:-1]
    assert all(len(line) <= facts.NARROW for line in table), max(table, key=len)
    assert all(name in done.stdout for name in facts.load_presets()) and "params (M)" not in done.stdout
    assert "cc-by-nc-4.0 [NC]" in done.stdout and "--wide" in done.stdout


def test_models_wide_has_every_column(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(facts, "model_figures", lambda mcfg: (12_300_000, 4.5, (3, 224, 224)))
    assert main(["models", "--wide"]) == 0
    text = capsys.readouterr().out
    assert "params (M)" in text and "GFLOPs" in text and "pretrain data" in text and " 12.3 " in text
    assert "production 0.001, full 0.0001, linear_probe grid" in text  # every policy's lr
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(r["params"] == 12_300_000 and r["gflops"] == 4.5 for r in rows)


def test_the_quick_table_shows_timms_licences() -> None:
    """The default table takes each licence from presets.yaml (timm is not imported): it is timm's."""
    for p in facts.load_presets().values():
        timm_licence, _ = facts.timm_licence(p.model.timm)
        assert timm_licence in (None, p.license), p.name


# ----------------------------------------------------------------------------------- folder layout


def _class_folders(root: Path, split: bool) -> Path:
    for c in ("cat", "dog"):
        d = root / "train" / c if split else root / c
        d.mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (8, 8), (40 * k, 80, 120)).save(d / f"{k}.jpg")
        if split:
            (root / "test" / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / "test" / c / "0.jpg")
    return root


@pytest.mark.parametrize("split", [True, False])
def test_a_class_folder_tree_read_as_stanford_dogs_says_source_folder(
    tmp_path: Path, split: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _class_folders(tmp_path / "photos", split)
    with pytest.raises(DataError, match="not Stanford Dogs' official layout") as e:
        read_dataset("stanford_dogs", root)
    assert "--set data.source=folder" in str(e.value) and "--source folder" in str(e.value)
    assert "data download" not in str(e.value)
    cfg = load_config(None, [f"data.root={root}", "data.download=true"])
    assert not download_due(cfg)  # never a download into the user's own images
    assert main(["data", "check", "--root", str(root)]) == 2
    assert "--source folder" in capsys.readouterr().err
    if split:
        assert main(["data", "check", "--root", str(root), "--source", "folder"]) == 0
