"""What the user sees while work runs: progress inside a pass (a log line about every `PROGRESS_LOG_S`
seconds when stderr is not a terminal, a bar in a terminal, nothing from other processes), a line for
each phase after training, each result of `predict` and `export` shown once, `predict`'s latency
without the first forward's one-off costs, and `tune`'s output in the log's own format.

No test here waits for a clock: the interval is set to 0 (a line every step) or to a day (none).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from visionpoc import timing
from visionpoc.cli import main
from visionpoc.config import TrainConfig
from visionpoc.evaluate import evaluate
from visionpoc.optim import make_scheduler
from visionpoc.recovery import StopRequest
from visionpoc.serving.predict import Predictor
from visionpoc.step import StepParts
from visionpoc.train import EpochProgress, train_one_epoch

LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")  # the CLI's log format


@pytest.fixture
def log_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a terminal (as under nohup or CI), and a progress line at every step."""
    monkeypatch.setattr(timing, "_terminal", lambda: False)
    monkeypatch.setattr(timing, "PROGRESS_LOG_S", 0.0)


def _parts() -> StepParts:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = make_scheduler(opt, TrainConfig(epochs=1, warmup_epochs=0.0), 0.1, 8)
    return StepParts(model, opt, sched, nn.CrossEntropyLoss(), torch.device("cpu"), None, None, False)


def _batches(n: int, size: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(n)
    return [(torch.randn(size, 3, 2, 2, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def _progress(caplog: pytest.LogCaptureFixture, desc: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{desc}: ")]


def test_an_epoch_logs_step_n_of_total_rate_and_eta(log_lines: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    train_one_epoch(_parts(), _batches(4), 2, 0, EpochProgress(), StopRequest(), desc="[m] epoch 2/3")
    lines = _progress(caplog, "[m] epoch 2/3")
    pattern = r"\[m\] epoch 2/3: batch (\d)/4 \(\d+%\), [\d.]+ img/s, loss [\d.]+, acc [\d.]+, about \d+s left"
    assert [int(re.fullmatch(pattern, m).group(1)) for m in lines] == [1, 2, 3, 4], lines  # type: ignore[union-attr]


def test_a_resumed_epoch_counts_from_where_it_stopped(log_lines: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    done = EpochProgress(batches=3)  # three of the epoch's five batches were trained before the stop
    train_one_epoch(_parts(), _batches(2), 1, 3, done, StopRequest(), desc="[m] epoch 1/1")
    assert [m.split(",")[0] for m in _progress(caplog, "[m] epoch 1/1")] == [
        "[m] epoch 1/1: batch 4/5 (80%)",
        "[m] epoch 1/1: batch 5/5 (100%)",
    ]


def test_no_line_and_no_sync_before_the_interval(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With a day between lines nothing is logged mid-epoch, and the running sums are read from the
    device (`.item()`, a sync on CUDA) the same number of times for 3 batches as for 12: never per step."""
    monkeypatch.setattr(timing, "_terminal", lambda: False)
    monkeypatch.setattr(timing, "PROGRESS_LOG_S", 86400.0)
    caplog.set_level(logging.INFO)
    real_item, calls = torch.Tensor.item, [0]

    def counted(t: torch.Tensor) -> object:
        calls[0] += 1
        return real_item(t)

    monkeypatch.setattr(torch.Tensor, "item", counted)
    reads = []
    for n in (3, 12):
        calls[0] = 0
        train_one_epoch(_parts(), _batches(n), 1, 0, EpochProgress(), StopRequest(), desc="[m] epoch 1/1")
        reads.append(calls[0])
    assert reads[0] == reads[1], reads
    assert _progress(caplog, "[m] epoch 1/1") == []


def test_evaluation_shows_progress_on_the_main_process_only(log_lines: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    model, cpu = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), torch.device("cpu")
    evaluate(model, _batches(3), cpu, 3, expected_n=6, desc="[m] test")
    assert [m.split(",")[0] for m in _progress(caplog, "[m] test")] == [
        f"[m] test: batch {k}/3 ({p}%)" for k, p in ((1, 33), (2, 67), (3, 100))
    ]
    caplog.clear()
    evaluate(model, _batches(3), cpu, 3, expected_n=6, desc="[m] test", show=False)  # another rank
    assert _progress(caplog, "[m] test") == []


def test_a_terminal_gets_a_bar_with_n_of_total_rate_and_eta(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(timing, "_terminal", lambda: True)
    monkeypatch.setattr(timing, "PROGRESS_LOG_S", 0.0)  # a bar replaces the log lines, whatever the interval
    caplog.set_level(logging.INFO)
    p = timing.Progress(range(20), "[m] epoch 1/1")
    due = []
    for _ in p:
        due.append(p.step(4))
        if due[-1]:
            p.show(loss="0.500")
        if p.n == 10:
            shown = str(p.bar)
    p.close()
    assert [i + 1 for i, d in enumerate(due) if d] == [10, 20]  # figures every BAR_EVERY steps, not each step
    assert "10/20" in shown and "<" in shown and "img_s=" in shown and "loss=0.500" in shown, shown  # n/N, ETA
    assert not caplog.records


def test_each_phase_after_training_is_announced(
    mini_dogs: Path, tmp_path: Path, log_lines: None, caplog: pytest.LogCaptureFixture, one_thread: None
) -> None:
    from visionpoc.compare import run_compare
    from visionpoc.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data: {{root: '{mini_dogs}', val_fraction: 0.2, num_workers: 0, download: false}}\n"
        "models:\n  - {label: cnn, timm: test_resnet, pretrained: false, img_size: 32}\n"
        "train: {epochs: 1, batch_size: 4, device: cpu}\n"
    )
    caplog.set_level(logging.INFO)
    run_compare(load_config(cfg), tmp_path / "run")
    said = [r.getMessage() for r in caplog.records]
    assert "[cnn] epoch 1/1: batch 1/3 (33%)" in [m.split(",")[0] for m in said]  # 15 train images, batches of 4
    phases = [m for m in said if m.startswith("[cnn] scoring") or m.startswith("[cnn] writing")]
    assert phases == [
        "[cnn] scoring the best weights on train (clean): 15 images",
        "[cnn] scoring the best weights on val: 3 images",
        "[cnn] scoring the best weights on test: 9 images",
        f"[cnn] writing the test predictions (9 images) to {tmp_path / 'run' / 'cnn'}",
    ]
    assert any(m.startswith("[cnn] test: batch 1/") for m in said)  # the scoring passes show progress too


# ---------------------------------------------------------------------------------------------- results once


def _said(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> str:
    """Everything the user sees: stdout, stderr and the log (the CLI's log goes to stderr)."""
    out = capsys.readouterr()
    return out.out + out.err + "\n".join(r.getMessage() for r in caplog.records)


def test_predict_shows_each_result_once(
    run_dir: Path, mini_dogs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    photo = next((mini_dogs / "Images").rglob("*.jpg"))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["predict", str(run_dir), str(photo), str(tmp_path / "broken.jpg")]) == 1
    said = _said(capsys, caplog)
    assert said.count(str(photo)) == 1
    assert said.count("cannot decode image") == 1, said
    assert said.count("ms: one forward pass at batch 1") == 1


def test_export_shows_each_result_once(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert main(["export", str(run_dir), "--format", "onnx", "--model", "cnn", "--out", str(tmp_path)]) == 0
    said = _said(capsys, caplog)
    assert said.count("onnx check [cnn]") == 1, said
    assert said.count(str(tmp_path / "cnn" / "model.onnx")) == 1, said
    assert main(["export", str(run_dir), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    said = _said(capsys, caplog)
    for label in ("cnn", "vit"):
        assert said.count(str(tmp_path / "st" / label / "model.safetensors")) == 1, said


def test_report_shows_its_path_once(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    run = shutil.copytree(run_dir, tmp_path / "run")
    caplog.set_level(logging.INFO)
    assert main(["report", str(run)]) == 0
    said = _said(capsys, caplog)
    assert said.count(str(run / "report.html")) == 1, said


class _SlowFirstCall(nn.Module):
    """The model, with the first forward 0.5 s slower: the one-off costs of a process's first forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            time.sleep(0.5)
        return self.model(x)


@pytest.mark.slow
def test_predict_latency_leaves_the_first_forward_out(run_dir: Path, mini_dogs: Path) -> None:
    from visionpoc.data.images import load_rgb

    predictor = Predictor(run_dir)
    for tm in predictor.models:
        tm.model = _SlowFirstCall(tm.model)
    image = load_rgb(next((mini_dogs / "Images").rglob("*.jpg")))
    first = predictor.predict_image(image, top=1)
    assert all(a["latency_ms"] < 500 for a in first), first  # the slow first forward was the warm-up
    predictor.predict_image(image, top=1)
    assert [tm.model.calls for tm in predictor.models] == [3, 3]  # one warm-up per model, then one per image


# ---------------------------------------------------------------------------------------------- tune's output

TUNE = """
import sys, warnings
from visionpoc.cli import main
from visionpoc.tuning import search
real = search.write_outputs
def write_outputs(*args, **kwargs):  # a library warning, as Optuna's importance plot gives when trials tie
    warnings.warn("parameter importances will be equal", UserWarning)
    return real(*args, **kwargs)
search.write_outputs = write_outputs
real_objective = search.objective
def objective(trial, *args, **kwargs):  # trials that differ: a study whose trials tie ends in an error
    return real_objective(trial, *args, **kwargs) - 0.01 * trial.number
search.objective = objective
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_tune_output_is_in_the_log_format(mini_dogs: Path, tmp_path: Path) -> None:
    """Optuna's own lines ("[I 2026-...] Trial 0 finished ...") and Python's two-line warnings become
    lines of the log, in its format (a bar would only show in a terminal)."""
    cfg = tmp_path / "c.yaml"
    vit = {"label": "vit", "timm": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32}
    data = {"root": str(mini_dogs), "val_fraction": 0.2, "num_workers": 0, "download": False}
    tune = {"epochs": 1, "trials": 2, "startup_trials": 2}
    cfg.write_text(
        yaml.safe_dump(
            {
                "data": data,
                "models": [{**vit, "model_kwargs": {"depth": 1}}],
                "train": {"epochs": 1, "batch_size": 8, "device": "cpu"},
                "tune": tune,
            }
        )
    )
    argv = ["tune", "--config", str(cfg), "--model", "vit", "--out", str(tmp_path / "t")]
    done = subprocess.run(
        [sys.executable, "-c", TUNE, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert [line for line in lines if not LINE.match(line)] == [], done.stderr
    assert any(" INFO optuna." in line and "Trial 1 finished" in line for line in lines)
    assert any(" WARNING py.warnings: UserWarning: parameter importances will be equal" in line for line in lines)
