"""Interruptions (SIGTERM + --resume), corrupt checkpoints, CUDA-OOM fallback, atomic writes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
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

from dogs_fixture import TINY_VIT, make_mini_dogs
from visionpoc import models, step
from visionpoc.cli import main
from visionpoc.config import ModelConfig
from visionpoc.results import load_predictions
from visionpoc.runfiles import atomic_write_text


def _config(
    path: Path,
    root: Path,
    epochs: int,
    models: list[dict] | None = None,
    workers: int = 0,
    **train_kw: object,
) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "source": "stanford_dogs",
                    "root": str(root),
                    "val_fraction": 0.2,
                    "num_workers": workers,
                    "download": False,
                },
                "models": models or [TINY_VIT],
                "train": {
                    "epochs": epochs,
                    "batch_size": 4,
                    "lr": 1e-3,
                    "warmup_epochs": 0.5,
                    "deterministic": True,
                    "device": "cpu",
                    **train_kw,
                },
                "inference": {"enabled": False},  # the price is not what these runs are about
            }
        )
    )
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
    return {k: m[k] for k in keep} | {
        "losses": [h["train_loss"] for h in m["history"]],
        "val": [h["val_accuracy"] for h in m["history"]],
    }


@pytest.mark.slow
def test_sigterm_to_the_process_group_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """`timeout`, Slurm and `kill -- -PGID` signal every process of the group, DataLoader workers included:
    the run checkpoints where it stopped, exits with 130 and the resume command (no worker crash), and the
    resumed run ends with the uninterrupted run's exact numbers."""
    root = make_mini_dogs(tmp_path / "dogs", train_per_class=30, test_per_class=4, size=(64, 48))
    cfg = _config(tmp_path / "c.yaml", root, epochs=4, workers=1)  # DataLoader workers: exact all the same
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    cmd = [sys.executable, "-m", "visionpoc", "compare", "--config", str(cfg), "--no-report"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*cmd, "--out", str(interrupted)], stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        while not (interrupted / "vit" / "history.json").exists():  # the first epoch is done: workers are busy
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first epoch was saved"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)  # the session's group: the main process and its worker
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
        proc.wait(timeout=30)
    assert proc.returncode == 130, err
    assert "Resume with: visionpoc compare --resume" in err and "Traceback" not in err
    assert "checkpoint saved in" in err and "DataLoader worker" not in err, err  # the clean stop, not a crash
    stop = re.search(r"stopped in epoch (\d+) after (\d+) batches|stopped after epoch (\d+)", err)
    assert stop, err
    where = (int(stop[1]), int(stop[2])) if stop[1] else (int(stop[3]) + 1, 0)
    state = torch.load(interrupted / "vit" / "last_state.pt", weights_only=True)
    assert (state["epoch"], state["progress"]["batches"]) == where  # saved at the stop
    assert state["epoch"] < 4 or state["progress"]["batches"] > 0, "stopped before the last epoch ended"
    assert not (interrupted / "results.json").exists()  # the model did not finish: nothing claims it did

    resumed = subprocess.run(
        [sys.executable, "-m", "visionpoc", "compare", "--resume", str(interrupted), "--no-report"],
        capture_output=True,
        text=True,
        env=env,
    )
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
    other = {**TINY_VIT, "label": "vit3", "model_kwargs": {"depth": 3}}
    cfg = _config(tmp / "c.yaml", root, epochs=1, models=[TINY_VIT, other])
    assert main(["compare", "--config", str(cfg), "--out", str(tmp / "run"), "--no-report"]) == 0
    return tmp / "run"


def _unfinish(src: Path, dst: Path, label: str) -> Path:
    """A copy of a run in which model `label` has not finished (as after a crash)."""
    shutil.copytree(src, dst)
    res = json.loads((dst / "results.json").read_text())
    res["models"] = [m for m in res["models"] if m["label"] != label]
    (dst / "results.json").write_text(json.dumps(res))
    return dst


@pytest.mark.slow
def test_truncated_checkpoint_is_a_clear_error(
    two_model_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
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


@pytest.mark.slow
def test_mismatched_checkpoint_is_a_clear_error(
    two_model_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _unfinish(two_model_run, tmp_path / "run", "vit3")
    shutil.copy(run / "vit" / "last.safetensors", run / "vit3" / "last.safetensors")  # another model's weights
    assert main(["compare", "--resume", str(run), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "vit3" in err and "wrong run or model" in err and "Traceback" not in err


@pytest.mark.slow
def test_resume_keeps_finished_models(two_model_run: Path, tmp_path: Path) -> None:
    run = _unfinish(two_model_run, tmp_path / "run", "vit3")
    before = json.loads((run / "results.json").read_text())["models"][0]
    assert main(["compare", "--resume", str(run), "--no-report"]) == 0
    after = json.loads((run / "results.json").read_text())["models"]
    assert [m["label"] for m in after] == ["vit", "vit3"] and after[0] == before
    assert after[1]["status"] == "ok" and after[1]["resumed_from_epoch"] == 2  # the epoch-1 checkpoint was used


def test_injected_oom_halves_the_micro_batch(
    mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_step = step._step

    def step_that_fits_two(p: step.StepParts, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
        if (p.micro_batch or len(y)) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(p, x, y)

    monkeypatch.setattr(step, "_step", step_that_fits_two)
    cfg = _config(tmp_path / "c.yaml", mini_dogs, epochs=1, batch_size=8)
    with caplog.at_level(logging.WARNING, logger="visionpoc.step"):
        assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-report"]) == 0
    logged = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(logged) == 2 and "micro-batch 8 -> 4" in logged[0] and "micro-batch 4 -> 2" in logged[1]
    m = json.loads((tmp_path / "run" / "results.json").read_text())["models"][0]
    assert m["status"] == "ok" and m["batch_size"] == 8 and m["micro_batch_size"] == 2
    assert [e["micro_batch"] for e in m["oom_events"]] == [4, 2] and m["oom_events"][0]["step"] == 0


def test_a_batch_that_never_fits_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def never_fits(p: step.StepParts, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(step, "_step", never_fits)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    parts = step.StepParts(
        model,
        opt,
        timm.scheduler.CosineLRScheduler(opt, t_initial=10),
        torch.nn.CrossEntropyLoss(),
        torch.device("cpu"),
        None,
        None,
        False,
    )
    with pytest.raises(torch.OutOfMemoryError, match="even with a micro-batch of 1 image.*lower img_size"):
        step.train_step(parts, torch.randn(4, 4), torch.tensor([0, 1, 2, 0]), {"epoch": 1, "step": 0})
    assert [e["micro_batch"] for e in parts.oom_events] == [2, 1]  # halved down to one image first


def test_micro_batches_give_the_same_update_as_the_whole_batch() -> None:
    def parts(micro: int | None) -> step.StepParts:
        torch.manual_seed(0)
        model = models.create_model(ModelConfig(**TINY_VIT), num_classes=3)  # type: ignore[arg-type]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = timm.scheduler.CosineLRScheduler(opt, t_initial=10)
        return step.StepParts(
            model, opt, sched, torch.nn.CrossEntropyLoss(), torch.device("cpu"), None, 1.0, False, micro_batch=micro
        )

    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    whole, split = parts(None), parts(2)
    la, ca = step._step(whole, x, y)
    lb, cb = step._step(split, x, y)
    assert torch.allclose(la, lb, atol=1e-5) and ca == cb
    for pa, pb in zip(whole.model.parameters(), split.model.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path: Path) -> None:
    """A team shares run folders: results are not left private (mkstemp's 0600) to whoever ran it."""
    (tmp_path / "plain.json").write_text("{}")
    atomic_write_text(tmp_path / "results.json", "{}")
    mode = (tmp_path / "results.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.json").stat().st_mode & 0o777


def test_atomic_write_leaves_the_old_file_on_a_crash(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    atomic_write_text(target, '{"ok": 1}')

    class Boom(Exception):
        pass

    def crash(tmp: Path) -> None:
        tmp.write_text('{"half": ')
        raise Boom

    from visionpoc.runfiles import atomic_write

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
    err = capsys.readouterr().err
    assert "stopped after epoch 1" in err and f"Resume with: visionpoc compare --resume {run}" in err
    assert torch.load(run / "vit" / "last_state.pt", weights_only=True)["epoch"] == 2
    monkeypatch.setattr(train, "evaluate_split", real)
    assert main(["compare", "--resume", str(run), "--no-report"]) == 0
    m = json.loads((run / "results.json").read_text())["models"][0]
    assert [h["epoch"] for h in m["history"]] == [1, 2] and m["resumed_from_epoch"] == 2


def test_a_signal_while_scoring_or_writing_the_report_says_how_to_go_on(
    mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Outside the loop's step boundaries (the final scoring, the report) SIGTERM is no silent exit 143:
    exit code 130, and the command that continues from what is saved."""
    import visionpoc.report
    from visionpoc import train

    real = train.evaluate_split

    def evaluate_or_sigterm(*args, **kwargs):  # type: ignore[no-untyped-def]
        if any(str(a).endswith("train (clean)") for a in args):  # the final scoring, after the last checkpoint
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode: it must not be reached
            raise AssertionError("SIGTERM did not interrupt the scoring")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate_split", evaluate_or_sigterm)
    run = tmp_path / "run"
    cfg = _config(tmp_path / "c.yaml", mini_dogs, epochs=1)
    assert main(["compare", "--config", str(cfg), "--out", str(run)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted: the last checkpoint stands. Resume with: visionpoc compare --resume {run}\n" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was put back
    monkeypatch.setattr(train, "evaluate_split", real)

    def report_then_sigterm(run_dir: Path, explain: bool = True) -> Path:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        raise AssertionError("SIGTERM did not interrupt the report")

    monkeypatch.setattr(visionpoc.report, "write_report", report_then_sigterm)
    assert main(["compare", "--resume", str(run)]) == 130
    err = capsys.readouterr().err
    assert f"the results are saved: write it with: visionpoc report {run}" in err
    m = json.loads((run / "results.json").read_text())["models"][0]
    assert m["status"] == "ok" and m["epochs_run"] == 1 and m["test_accuracy"] is not None
    assert main(["report", str(run)]) == 130  # any command: not Python's silent exit 143
    assert capsys.readouterr().err == "interrupted\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ------------------------------------------------------------------ exact resume, in process (fast)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory, mini_dogs: Path) -> Path:
    tmp = tmp_path_factory.mktemp("straight")
    cfg = _config(tmp / "c.yaml", mini_dogs, epochs=2)
    assert main(["compare", "--config", str(cfg), "--out", str(tmp / "run"), "--no-report"]) == 0
    return tmp / "run"


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "resume_workers"), [(0, 0), (2, 1)])
def test_a_run_stopped_mid_epoch_resumes_exactly(
    straight_run: Path,
    mini_dogs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    workers: int,
    resume_workers: int,
) -> None:
    """Stopped in epoch 2 after its first batches (DataLoader workers or not), resumed with another
    worker count: the same metrics and predictions as a run never stopped (which had no workers)."""
    from visionpoc import train

    real = train.train_step
    steps_per_epoch = 3  # 15 training images in batches of 4, the partial one dropped (checked below)

    def step_then_sigterm(p, x, y, where):  # type: ignore[no-untyped-def]
        out = real(p, x, y, where)
        if where["step"] == steps_per_epoch:  # the first batch of epoch 2: stop at the next boundary
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(train, "train_step", step_then_sigterm)
    run = tmp_path / "run"
    cfg = _config(tmp_path / "c.yaml", mini_dogs, epochs=2, workers=workers)
    assert main(["train", "--config", str(cfg), "--model", "vit", "--out", str(run)]) == 130
    assert f"Resume with: visionpoc train --resume {run} --model vit" in capsys.readouterr().err
    state = torch.load(run / "vit" / "last_state.pt", weights_only=True)
    assert (state["epoch"], state["progress"]["batches"]) == (2, 1)  # mid-epoch: the hard case
    monkeypatch.setattr(train, "train_step", real)
    resume = ["train", "--resume", str(run), "--model", "vit", "--set", f"data.num_workers={resume_workers}"]
    assert main(resume) == 0
    assert _metrics(run) == _metrics(straight_run)
    a = load_predictions(run / "vit" / "test_predictions.npz")["probs"]
    assert np.array_equal(a, load_predictions(straight_run / "vit" / "test_predictions.npz")["probs"])


def test_resume_refuses_overrides_that_change_the_training(
    straight_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(straight_run / "config.yaml", run / "config.yaml")
    args = [
        "compare",
        "--resume",
        str(run),
        "--no-report",
        "--set",
        "train.lr=0.5",
        "--set",
        "models.0.finetune=head",
        "--set",
        "tracking.experiment=other",
        "--set",
        "data.num_workers=1",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "models.0.finetune, train.lr" in err and "start a new run" in err
    assert "experiment" not in err.split("of the interrupted run")[0]  # allowed keys are not named
    assert not (run / "results.json").exists()  # refused before any training
    from visionpoc.recovery import resume_config

    cfg = resume_config(run, ["tracking.experiment=other", "data.num_workers=1", "train.device=cpu"])
    assert cfg.tracking.experiment == "other" and cfg.data.num_workers == 1


def test_tune_has_no_resume_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["tune", "--model", "vit", "--resume", "runs/x"])
    assert e.value.code == 2 and "unrecognized arguments: --resume" in capsys.readouterr().err


def test_resume_hint_names_the_command() -> None:
    from visionpoc.recovery import resume_hint

    assert resume_hint("compare", Path("runs/a"), None, 1) == "visionpoc compare --resume runs/a"
    assert resume_hint("train", Path("runs/a"), "vit", 1) == "visionpoc train --resume runs/a --model vit"
    assert resume_hint("compare", Path("runs/a"), None, 2).startswith("torchrun ")


# --------------------------------------------------------------- crashes while writing, failing models


def _results(tmp_path: Path, label: str):  # type: ignore[no-untyped-def]
    from visionpoc.results import DatasetInfo, ModelResult, RunResults, environment

    return RunResults(
        DatasetInfo("folder", str(tmp_path), 1, 0, 1, 1, ["a"]),
        [ModelResult(label=label, timm="t", finetune="full", pretrained=False)],
        environment("cpu", 0),
        {},
        "now",
    )


def test_a_crash_while_saving_results_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visionpoc import runfiles
    from visionpoc.results import load_results, save_results

    save_results(_results(tmp_path, "first"), tmp_path)
    real_dumps = json.dumps

    def half_then_crash(obj, **kw):  # type: ignore[no-untyped-def]
        text = real_dumps(obj, **kw)
        raise OSError(f"disk full after {len(text) // 2} bytes")

    monkeypatch.setattr(runfiles.json, "dumps", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_results(_results(tmp_path, "second"), tmp_path)
    monkeypatch.undo()

    def replace_crashes(src: str, dst: str) -> None:  # killed between the write and the rename
        raise OSError("killed")

    monkeypatch.setattr(runfiles.os, "replace", replace_crashes)
    with pytest.raises(OSError, match="killed"):
        save_results(_results(tmp_path, "second"), tmp_path)
    monkeypatch.undo()
    assert [m.label for m in load_results(tmp_path).models] == ["first"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json"]  # no temp files


def test_a_crash_while_checkpointing_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionpoc import checkpoint

    model = torch.nn.Linear(3, 2)
    meta = {"timm": "t", "step": "1"}
    checkpoint.save_weights(model, tmp_path / "last.safetensors", meta)
    checkpoint.save_state(tmp_path / "last_state.pt", {"step": 1})
    real_save_file, real_save = checkpoint.save_file, checkpoint.torch.save

    def save_file_half(state, filename, metadata):  # type: ignore[no-untyped-def]
        real_save_file(state, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:40])  # half-written, then the crash
        raise OSError("killed mid-write")

    def save_half(obj, f):  # type: ignore[no-untyped-def]
        real_save(obj, f)
        Path(f).write_bytes(Path(f).read_bytes()[:40])
        raise OSError("killed mid-write")

    monkeypatch.setattr(checkpoint, "save_file", save_file_half)
    monkeypatch.setattr(checkpoint.torch, "save", save_half)
    with torch.no_grad():
        model.weight.fill_(7.0)
    with pytest.raises(OSError):
        checkpoint.save_weights(model, tmp_path / "last.safetensors", {**meta, "step": "2"})
    with pytest.raises(OSError):
        checkpoint.save_state(tmp_path / "last_state.pt", {"step": 2})
    monkeypatch.undo()
    fresh = torch.nn.Linear(3, 2)
    checkpoint.load_weights(fresh, tmp_path / "last.safetensors", {"timm": "t"})
    assert not torch.equal(fresh.weight, model.weight)  # the step-1 weights, intact
    assert checkpoint.read_meta(tmp_path / "last.safetensors")["step"] == "1"
    assert checkpoint.load_state(tmp_path / "last_state.pt") == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors", "last_state.pt"]


def test_one_checkpoint_file_missing_or_from_another_step_is_a_clear_error(tmp_path: Path) -> None:
    from visionpoc import checkpoint, recovery
    from visionpoc.errors import CheckpointError

    model, meta = torch.nn.Linear(3, 2), {"timm": "t"}
    assert recovery.load_resume(tmp_path, model, meta) is None  # nothing saved: a fresh start
    checkpoint.save_weights(model, tmp_path / checkpoint.LAST, {**meta, "step": "4"})
    with pytest.raises(CheckpointError, match="last_state.pt is missing"):
        recovery.load_resume(tmp_path, model, meta)
    checkpoint.save_state(tmp_path / checkpoint.STATE, {"step": 3})
    with pytest.raises(CheckpointError, match="from different steps"):
        recovery.load_resume(tmp_path, model, meta)
    (tmp_path / checkpoint.LAST).unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        recovery.load_resume(tmp_path, model, meta)


def test_a_model_failing_during_training_is_recorded_and_the_next_runs(
    mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionpoc import train

    real = train.train_step

    def fails_for_the_two_block_model(p, x, y, where):  # type: ignore[no-untyped-def]
        if len(checkpoint_unwrap(p.model).blocks) == 2 and where["epoch"] == 1 and where["step"] == 1:
            raise RuntimeError("loss is NaN (simulated)")
        return real(p, x, y, where)

    monkeypatch.setattr(train, "train_step", fails_for_the_two_block_model)
    other = {**TINY_VIT, "label": "vit3", "model_kwargs": {"depth": 3}}
    cfg = _config(tmp_path / "c.yaml", mini_dogs, epochs=1, models=[TINY_VIT, other])
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-report"]) == 1
    vit, vit3 = json.loads((tmp_path / "run" / "results.json").read_text())["models"]
    assert vit["status"] == "failed" and vit["error"] == "RuntimeError: loss is NaN (simulated)"
    assert vit3["status"] == "ok" and vit3["test_accuracy"] is not None


def checkpoint_unwrap(model: torch.nn.Module) -> torch.nn.Module:
    from visionpoc.checkpoint import unwrap

    return unwrap(model)


def test_results_state_how_the_lr_relates_to_the_batch(straight_run: Path) -> None:
    m = json.loads((straight_run / "results.json").read_text())["models"][0]
    assert m["lr_scaling"].startswith("none: lr is the peak LR for the global batch")


def test_checkpoint_writer_snapshots_then_writes_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The training goes on while the files are written: what is saved is the state at the call."""
    from safetensors.torch import load_file

    from visionpoc import checkpoint

    model = torch.nn.Linear(3, 2)
    meta = {"timm": "lin", "num_classes": "2", "step": "1"}
    with checkpoint.Writer() as ckpt:
        ckpt.weights(model, tmp_path / "best.safetensors", meta)
        ckpt.copy(tmp_path / "best.safetensors", tmp_path / "last.safetensors")  # after the write above
        ckpt.state(tmp_path / "last_state.pt", {"w": model.weight, "step": 1})
        before = model.weight.detach().clone()
        with torch.no_grad():
            model.weight.add_(1.0)  # the next training step, while the writes may still be running
    saved = load_file(tmp_path / "last.safetensors")
    assert torch.equal(saved["weight"], before) and os.path.samefile(
        tmp_path / "best.safetensors", tmp_path / "last.safetensors"
    )
    assert torch.equal(checkpoint.load_state(tmp_path / "last_state.pt")["w"], before)

    class DiskFull(OSError):
        pass

    def full(*a: object, **k: object) -> None:
        raise DiskFull("no space left (simulated)")

    monkeypatch.setattr(checkpoint, "save_state", full)
    ckpt = checkpoint.Writer()
    ckpt.state(tmp_path / "last_state.pt", {"step": 2})
    with pytest.raises(DiskFull):  # a failed write is not lost in the thread
        ckpt.wait()
    with pytest.raises(KeyError), checkpoint.Writer() as ckpt:  # a stop in flight is not masked by it
        ckpt.state(tmp_path / "last_state.pt", {"step": 3})
        raise KeyError("the run's own error")
    assert checkpoint.load_state(tmp_path / "last_state.pt")["step"] == 1  # the old file, whole
