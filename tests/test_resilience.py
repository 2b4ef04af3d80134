"""Issue 7: interruptions (SIGTERM + --resume), corrupt checkpoints, CUDA-OOM fallback, atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm.scheduler
import torch
import yaml

from dogs_fixture import make_mini_dogs
from visionpoc import models, step
from visionpoc.atomic import atomic_write_text
from visionpoc.cli import main
from visionpoc.config import ModelConfig
from visionpoc.results import load_predictions

VIT = {"label": "vit", "timm": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32,
       "model_kwargs": {"depth": 2}}  # fmt: skip


def _config(
    path: Path, root: Path, epochs: int, models: list[dict] | None = None, **train_kw: object
) -> Path:
    path.write_text(yaml.safe_dump({
        "data": {"source": "stanford_dogs", "root": str(root), "val_fraction": 0.2, "num_workers": 0,
                 "download": False},
        "models": models or [VIT],
        "train": {"epochs": epochs, "batch_size": 4, "lr": 1e-3, "warmup_epochs": 0.5, "deterministic": True,
                  "device": "cpu", **train_kw},
    }))  # fmt: skip
    return path


def _metrics(run: Path) -> dict:
    m = json.loads((run / "results.json").read_text())["models"][0]
    keep = (
        "train_accuracy",
        "val_accuracy",
        "test_accuracy",
        "test_top5_accuracy",
        "test_macro_f1",
        "best_epoch",
    )
    return {k: m[k] for k in keep} | {"losses": [h["train_loss"] for h in m["history"]],
                                      "val": [h["val_accuracy"] for h in m["history"]]}  # fmt: skip


@pytest.mark.slow
def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    root = make_mini_dogs(tmp_path / "dogs", train_per_class=30, test_per_class=4, size=(64, 48))
    cfg = _config(tmp_path / "c.yaml", root, epochs=4)
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    cmd = [sys.executable, "-m", "visionpoc", "compare", "--config", str(cfg), "--no-report"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*cmd, "--out", str(interrupted)], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (interrupted / "vit" / "history.json").exists():  # the first epoch is done
        assert proc.poll() is None and time.time() < deadline, (
            "the run ended before its first epoch was saved"
        )
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Resume with: visionpoc compare --resume" in err and "Traceback" not in err
    state = torch.load(interrupted / "vit" / "last_state.pt", weights_only=True)
    assert state["epoch"] < 4 or state["progress"]["batches"] > 0, "stopped before the last epoch ended"
    assert not (interrupted / "results.json").exists()  # the model did not finish: nothing claims it did

    resumed = subprocess.run([sys.executable, "-m", "visionpoc", "compare", "--resume", str(interrupted),
                              "--no-report"], capture_output=True, text=True, env=env)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at epoch" in resumed.stderr
    subprocess.run([*cmd, "--out", str(straight)], check=True, capture_output=True)
    assert _metrics(interrupted) == _metrics(straight)
    a = load_predictions(interrupted / "vit" / "test_predictions.npz")["probs"]
    b = load_predictions(straight / "vit" / "test_predictions.npz")["probs"]
    assert np.array_equal(a, b)


@pytest.fixture(scope="module")
def two_model_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("twomodels")
    root = make_mini_dogs(tmp / "dogs")
    other = {**VIT, "label": "vit3", "model_kwargs": {"depth": 3}}
    cfg = _config(tmp / "c.yaml", root, epochs=1, models=[VIT, other])
    assert main(["compare", "--config", str(cfg), "--out", str(tmp / "run"), "--no-report"]) == 0
    return tmp / "run"


def _unfinish(src: Path, dst: Path, label: str) -> Path:
    """A copy of a run in which model `label` has not finished (as after a crash)."""
    shutil.copytree(src, dst)
    res = json.loads((dst / "results.json").read_text())
    res["models"] = [m for m in res["models"] if m["label"] != label]
    (dst / "results.json").write_text(json.dumps(res))
    return dst


def test_truncated_checkpoint_is_a_clear_error(two_model_run: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    run = _unfinish(two_model_run, tmp_path / "run", "vit3")
    weights = run / "vit3" / "last.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["compare", "--resume", str(run), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "last.safetensors" in err and "truncated" in err and "Traceback" not in err
    state = run / "vit3" / "last_state.pt"
    shutil.copy(two_model_run / "vit3" / "last.safetensors", weights)
    state.write_bytes(state.read_bytes()[:100])
    assert main(["compare", "--resume", str(run), "--no-report"]) == 2
    assert "last_state.pt is unreadable" in capsys.readouterr().err


def test_mismatched_checkpoint_is_a_clear_error(two_model_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    run = _unfinish(two_model_run, tmp_path / "run", "vit3")
    shutil.copy(
        run / "vit" / "last.safetensors", run / "vit3" / "last.safetensors"
    )  # another model's weights
    assert main(["compare", "--resume", str(run), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "vit3" in err and "wrong run or model" in err and "Traceback" not in err


def test_resume_keeps_finished_models(two_model_run: Path, tmp_path: Path) -> None:
    run = _unfinish(two_model_run, tmp_path / "run", "vit3")
    before = json.loads((run / "results.json").read_text())["models"][0]
    assert main(["compare", "--resume", str(run), "--no-report"]) == 0
    after = json.loads((run / "results.json").read_text())["models"]
    assert [m["label"] for m in after] == ["vit", "vit3"] and after[0] == before
    assert (
        after[1]["status"] == "ok" and after[1]["resumed_from_epoch"] == 2
    )  # the epoch-1 checkpoint was used


def test_injected_oom_halves_the_micro_batch(mini_dogs: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    real_step = step._step

    def step_that_fits_two(p: step.StepParts, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
        if (p.micro_batch or len(y)) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(p, x, y)

    monkeypatch.setattr(step, "_step", step_that_fits_two)
    cfg = _config(tmp_path / "c.yaml", mini_dogs, epochs=1, batch_size=8)
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-report"]) == 0
    m = json.loads((tmp_path / "run" / "results.json").read_text())["models"][0]
    assert m["status"] == "ok" and m["batch_size"] == 8 and m["micro_batch_size"] == 2
    assert [e["micro_batch"] for e in m["oom_events"]] == [4, 2] and m["oom_events"][0]["step"] == 0


def test_micro_batches_give_the_same_update_as_the_whole_batch() -> None:
    def parts(micro: int | None) -> step.StepParts:
        torch.manual_seed(0)
        model = models.create_model(ModelConfig(**VIT), num_classes=3)  # type: ignore[arg-type]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = timm.scheduler.CosineLRScheduler(opt, t_initial=10)
        return step.StepParts(model, opt, sched, torch.nn.CrossEntropyLoss(), torch.device("cpu"), None, 1.0,
                               False, micro_batch=micro)  # fmt: skip

    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    whole, split = parts(None), parts(2)
    la, ca = step._step(whole, x, y)
    lb, cb = step._step(split, x, y)
    assert torch.allclose(la, lb, atol=1e-5) and ca == cb
    for pa, pb in zip(whole.model.parameters(), split.model.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_atomic_write_leaves_the_old_file_on_a_crash(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    atomic_write_text(target, '{"ok": 1}')

    class Boom(Exception):
        pass

    def crash(tmp: Path) -> None:
        tmp.write_text('{"half": ')
        raise Boom

    from visionpoc.atomic import atomic_write

    with pytest.raises(Boom):
        atomic_write(target, crash)
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind


def test_a_signal_during_validation_stops_after_that_epoch(
    mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from visionpoc import train

    real = train.evaluate_split
    sent: list[int] = []

    def evaluate_then_sigterm(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not sent:  # the first validation pass: as if the user pressed Ctrl-C there
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate_split", evaluate_then_sigterm)
    run = tmp_path / "run"
    cfg = _config(tmp_path / "c.yaml", mini_dogs, epochs=2)
    assert main(["compare", "--config", str(cfg), "--out", str(run), "--no-report"]) == 130
    assert "stopped after epoch 1" in capsys.readouterr().err
    assert torch.load(run / "vit" / "last_state.pt", weights_only=True)["epoch"] == 2
    monkeypatch.setattr(train, "evaluate_split", real)
    assert main(["compare", "--resume", str(run), "--no-report"]) == 0
    m = json.loads((run / "results.json").read_text())["models"][0]
    assert [h["epoch"] for h in m["history"]] == [1, 2] and m["resumed_from_epoch"] == 2
