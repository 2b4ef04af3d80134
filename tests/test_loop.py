"""The loop's settings each do what they say: the LR schedule, gradient clipping, label
smoothing, early stopping, the clean train pass, the metrics on every split, and exact evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from visionpoc.compare import load_data, run_compare
from visionpoc.config import TrainConfig, load_config
from visionpoc.data import augment
from visionpoc.evaluate import evaluate
from visionpoc.optim import make_scheduler
from visionpoc.serving.predict import Predictor
from visionpoc.step import StepParts, train_step


def _lrs(t: TrainConfig, lr: float, steps_per_epoch: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_scheduler(opt, t, lr, steps_per_epoch)
    out = []
    for step in range(t.epochs * steps_per_epoch + 1):  # the loop calls step_update(step) after each update
        sched.step_update(step)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_schedule_warms_up_linearly_then_cosines_down_to_min_lr() -> None:
    lrs = _lrs(TrainConfig(epochs=4, warmup_epochs=1.0, min_lr=1e-6), 1e-3, steps_per_epoch=10)
    assert lrs[0] == pytest.approx(1e-5)  # warm-up starts at lr / 100
    assert np.allclose(np.diff(lrs[:11]), (1e-3 - 1e-5) / 10)  # linear over the first epoch's 10 steps
    assert lrs[10] == pytest.approx(1e-3)  # the peak, once
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # then only down
    assert lrs[25] == pytest.approx((1e-3 + 1e-6) / 2, rel=0.02)  # cosine: half-way down at mid-decay
    assert lrs[-1] == pytest.approx(1e-6)  # and at min_lr when the run ends, not later
    # a warm-up as long as the run still ends at the peak's last value without error
    assert max(_lrs(TrainConfig(epochs=1, warmup_epochs=3.0), 1e-3, 5)) <= 1e-3


def _parts(model: nn.Module, grad_clip: float | None) -> StepParts:
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = make_scheduler(opt, TrainConfig(epochs=1, warmup_epochs=0.0), 1.0, 10)
    return StepParts(model, opt, sched, nn.CrossEntropyLoss(), torch.device("cpu"), None, grad_clip, False)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_gradient_clipping_bounds_the_update(clip: float | None) -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    x, y = torch.randn(16, 8) * 1000, torch.randint(0, 3, (16,))  # a huge gradient
    train_step(_parts(model, clip), x, y, {"epoch": 1, "step": 0})
    update = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm().item()
    if clip is None:
        assert update > 10  # SGD at lr 1: the raw gradient
    else:
        assert update == pytest.approx(clip, rel=1e-4)  # clipped to the norm, and SGD at lr 1 moves by it


def test_label_smoothing_reaches_the_loss() -> None:
    logits, y = torch.tensor([[30.0, -30.0, -30.0]]), torch.tensor([0])
    assert augment.loss_for("basic", 0.0)(logits, y).item() < 1e-6  # confident and right: no loss
    smoothed = augment.loss_for("basic", 0.3)(logits, y).item()
    assert smoothed == pytest.approx(0.2 * 60, rel=1e-3)  # 0.3/3 of the target on each wrong class
    _, soft = augment.batch_augment("strong", 3, 0.3, torch.device("cpu"))(
        torch.zeros(2, 3, 8, 8), torch.tensor([0, 1])
    )
    assert soft.min().item() >= 0.1 - 1e-6  # the soft targets of mixup carry the smoothing too


def test_evaluation_counts_every_sample_exactly_once() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    batches = [(torch.randn(3, 3, 2, 2), torch.tensor([0, 1, 0])) for _ in range(2)]
    assert evaluate(model, batches, torch.device("cpu"), 2, expected_n=6).n == 6
    with pytest.raises(AssertionError, match="evaluated 6 samples, expected exactly 7"):
        evaluate(model, batches, torch.device("cpu"), 2, expected_n=7)


def test_early_stop_clean_train_pass_and_metrics_on_every_split(mini_dogs: Path, tmp_path: Path) -> None:
    """lr 0 and a frozen backbone (BatchNorm statistics too): validation never improves after epoch 1, so patience 1 stops after epoch 2 of 5. With
    mixup the running train accuracy is on mixed images; the reported one is the clean pass, which an
    independent prediction over the train files reproduces."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data: {{root: '{mini_dogs}', val_fraction: 0.2, num_workers: 0, download: false}}\n"
        "models:\n  - {label: cnn, timm: test_resnet, pretrained: false, img_size: 32, finetune: head}\n"
        "train: {epochs: 5, batch_size: 8, lr: 0.0, min_lr: 0.0, warmup_epochs: 0, early_stop_patience: 1,\n"
        "        augment: strong}\n"
        "probe: {cache: false}\n"  # the head through the loop, not the cached probe
    )
    out = tmp_path / "run"
    (m,) = run_compare(load_config(cfg), out).models
    assert m.status == "ok", m.error
    assert m.epochs == 5 and m.epochs_run == 2 and m.best_epoch == 1
    assert len(json.loads((out / "cnn" / "history.json").read_text())) == 2
    # the clean train pass: the best weights over the train images through the eval transform
    saved = json.loads((out / "results.json").read_text())["models"][0]
    _, splits = load_data(load_config(out / "config.yaml"))
    train = splits.train
    rows = Predictor(out).predict_paths([train.path(i) for i in range(len(train))], top=1)
    top1 = np.array([r["models"][0]["top"][0]["index"] for r in rows])
    assert saved["train_accuracy"] == pytest.approx((top1 == train.labels).mean())
    # top-1, top-5, macro-F1 and per-class accuracy on train, validation and test
    for split in ("train", "val", "test"):
        per_class = saved[f"{split}_per_class_accuracy"]
        assert len(per_class) == 3 and saved[f"{split}_top5_accuracy"] == 1.0  # 3 classes
        assert 0.0 <= saved[f"{split}_macro_f1"] <= 1.0
    # per-class accuracy weighted by each class's train count gives the train accuracy back
    counts = np.bincount(train.labels, minlength=3)
    per = np.nan_to_num(np.asarray(saved["train_per_class_accuracy"], dtype=float))
    assert (per * counts).sum() / counts.sum() == pytest.approx(saved["train_accuracy"])


def test_training_time_excludes_evaluation_and_the_first_step(
    mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train_time_s is the steady training steps only: a slow first step (compilation) lands in
    warmup_s, and slow evaluations land in neither. The loop reads a controlled clock: each step takes
    exactly 0.01 s, the first one 2 s more, each evaluation 1 s."""
    from types import SimpleNamespace

    from visionpoc import train

    real_step, real_eval = train.train_step, train.evaluate_split
    clock = SimpleNamespace(now=0.0)
    calls = {"steps": 0, "evals": 0}

    def timed_step(*a, **k):  # type: ignore[no-untyped-def]
        calls["steps"] += 1
        out = real_step(*a, **k)
        clock.now += 0.01 + (2.0 if calls["steps"] == 1 else 0.0)  # the first: as a compilation would
        return out

    def timed_eval(*a, **k):  # type: ignore[no-untyped-def]
        calls["evals"] += 1
        out = real_eval(*a, **k)
        clock.now += 1.0
        return out

    monkeypatch.setattr(train, "train_step", timed_step)
    monkeypatch.setattr(train, "evaluate_split", timed_eval)
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data: {{root: '{mini_dogs}', val_fraction: 0.2, num_workers: 0, download: false}}\n"
        "models:\n  - {label: vit, timm: vit_tiny_patch16_224, pretrained: false, img_size: 32, "
        "model_kwargs: {depth: 1}}\n"
        "train: {epochs: 2, batch_size: 4}\n"
    )
    (m,) = run_compare(load_config(cfg), tmp_path / "run").models
    assert m.status == "ok", m.error
    assert calls["steps"] > 2 and calls["evals"] >= 5  # 2 validations, then train, val and test scored
    assert m.warmup_s == pytest.approx(2.01)  # the first step, timed apart
    assert m.train_time_s == pytest.approx(0.01 * (calls["steps"] - 1))  # no first step, no evaluation
    assert m.history[-1].cumulative_train_time_s == pytest.approx(m.train_time_s + m.warmup_s)
