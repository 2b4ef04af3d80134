"""Evaluation: one pass in eval mode under inference_mode, and the metrics (top-1, top-5, macro-F1,
per-class accuracy). The number of evaluated samples is checked against the split size. A long pass
shows its progress (`timing.Progress`). `learning` says whether a model learned at all: test accuracy
at chance level, or one class answered for most images."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visionpoc.timing import Progress

log = logging.getLogger(__name__)


@dataclass
class EvalStats:
    n: int
    loss: float
    accuracy: float
    top5_accuracy: float
    macro_f1: float
    per_class_accuracy: list[float]  # NaN for classes absent from the split
    time_s: float
    img_s: float
    targets: np.ndarray  # (N,)
    probs: np.ndarray  # (N, C) float32


def topk_correct(targets: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    """(N,) bool: the truth is among the `k` most probable classes (all of them with fewer than `k`)."""
    k = min(k, probs.shape[1])
    topk = np.argpartition(-probs, kth=k - 1, axis=1)[:, :k]  # (N, k), unordered
    return (topk == targets[:, None]).any(axis=1)


def topk_accuracy(targets: np.ndarray, probs: np.ndarray, k: int) -> float:
    return float(topk_correct(targets, probs, k).mean()) if len(targets) else float("nan")


def per_class_accuracy(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> list[float]:
    correct = np.bincount(targets, weights=(preds == targets), minlength=num_classes)
    total = np.bincount(targets, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (correct / total).tolist()  # NaN where a class has no sample


def metrics(targets: np.ndarray, probs: np.ndarray) -> dict[str, float | list[float]]:
    from sklearn.metrics import f1_score  # 1 s to import: not paid by the processes that never score

    preds = probs.argmax(1)
    labels = np.unique(targets)  # macro-F1 over the classes present in the split
    return {
        "accuracy": float((preds == targets).mean()) if len(targets) else float("nan"),
        "top5_accuracy": topk_accuracy(targets, probs, 5),
        "macro_f1": float(f1_score(targets, preds, labels=labels, average="macro", zero_division=0)),
        "per_class_accuracy": per_class_accuracy(targets, preds, probs.shape[1]),
    }


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    num_classes: int,
    expected_n: int,
    amp_dtype: torch.dtype | None = None,
    desc: str = "eval",
    show: bool = True,
) -> EvalStats:
    """Run `model` over `batches` and compute metrics; asserts exactly `expected_n` samples were seen.
    `desc` names the pass in its progress display, shown when `show` (the main process).

    The time (`time_s`, `img_s`) is the pass's synchronized wall time, input included. On CUDA a batch
    shape met for the first time (the first batch, a smaller last one) is run once untimed before its
    timed run, so cuDNN's autotuning and kernel selection for it are not counted as evaluation."""
    model.eval()
    probs: list[torch.Tensor] = []  # kept on the device: one copy at the end, no sync per batch
    targets: list[torch.Tensor] = []
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, untimed, shapes = time.perf_counter(), 0.0, set()
    bar = Progress(batches, desc, show=show, logger=log)
    for x, y in bar:
        x = x.to(device, non_blocking=True)  # (B, C, H, W)
        y = y.to(device, non_blocking=True)  # (B,)
        if device.type == "cuda" and x.shape not in shapes:
            shapes.add(x.shape)
            torch.cuda.synchronize(device)
            t_warm = time.perf_counter()
            with autocast:
                model(x)
            torch.cuda.synchronize(device)
            untimed += time.perf_counter() - t_warm
        with autocast:
            logits = model(x)  # (B, num_classes)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        probs.append(logits.softmax(1))
        targets.append(y)
        if bar.step(len(y)):  # the host's view of the rate: no sync
            bar.show()
    bar.close()
    p = torch.cat(probs).cpu().numpy() if probs else np.zeros((0, num_classes), np.float32)
    t = torch.cat(targets).cpu().numpy() if targets else np.zeros(0, np.int64)
    dt = time.perf_counter() - t0 - untimed  # the copy to the host above synchronized the device
    if len(t) != expected_n:
        raise AssertionError(f"evaluated {len(t)} samples, expected exactly {expected_n}")
    return summarize(t, p.astype(np.float32), loss_sum.item() / max(1, len(t)), dt)


def summarize(targets: np.ndarray, probs: np.ndarray, loss: float, time_s: float) -> EvalStats:
    """EvalStats of predictions `probs` (N, C) for `targets` (N,)."""
    m = metrics(targets, probs)
    return EvalStats(
        n=len(targets),
        loss=loss,
        accuracy=float(m["accuracy"]),  # type: ignore[arg-type]
        top5_accuracy=float(m["top5_accuracy"]),  # type: ignore[arg-type]
        macro_f1=float(m["macro_f1"]),  # type: ignore[arg-type]
        per_class_accuracy=m["per_class_accuracy"],  # type: ignore[arg-type]
        time_s=time_s,
        img_s=len(targets) / time_s if time_s > 0 else float("nan"),
        targets=targets,
        probs=probs,
    )


# ------------------------------------------------------------------------------------------ training flags

MIN_STEPS = {"full": 300, "top_fraction": 200, "head": 100}
"""Optimizer steps below which a policy is flagged as likely under-trained: rules of thumb for a pretrained
backbone on a new dataset (a new linear head converges in a few hundred AdamW steps; layers that move
need more). They name a risk, not a certainty."""
STILL_RISING = 0.005  # a last epoch that beats every earlier one by this much (accuracy) is still rising
LOSS_FALLING = 0.05  # a training loss still falling by this share in the last epoch has not plateaued


def training_flags(
    history: list[dict[str, Any]], best_epoch: int | None, steps: int | None, finetune: str
) -> list[dict[str, str]]:
    """Diagnoses of one model's training from its per-epoch history (EpochRecord fields): each a
    `{code, message}` with code still_improving, loss_not_plateaued, too_few_steps or overfits_early."""
    flags: list[dict[str, str]] = []
    if not history:
        return flags
    n = len(history)
    val = [h.get("val_accuracy") for h in history]
    loss = [h["train_loss"] for h in history]
    if best_epoch == n and None not in val:
        earlier = max((v for v in val[:-1] if v is not None), default=None)
        if earlier is None or val[-1] - earlier >= STILL_RISING:  # one epoch cannot show a plateau
            rise = "" if earlier is None else f", {100 * (val[-1] - earlier):+.1f} points over the earlier best"
            flags.append(
                _flag(
                    "still_improving",
                    f"validation accuracy was still rising at the last epoch (best epoch {n} of {n}{rise})",
                )
            )
    if n >= 2 and loss[-2] > 0 and (loss[-2] - loss[-1]) / loss[-2] >= LOSS_FALLING:
        drop = 100 * (loss[-2] - loss[-1]) / loss[-2]
        flags.append(
            _flag(
                "loss_not_plateaued",
                f"the training loss was still falling ({drop:.0f}% in the last epoch, "
                f"{loss[-2]:.3f} to {loss[-1]:.3f})",
            )
        )
    floor = MIN_STEPS.get(finetune)
    if steps is not None and floor is not None and steps < floor:
        flags.append(
            _flag(
                "too_few_steps",
                f"it trained for {steps} optimizer steps; a `{finetune}` fine-tune usually needs at least {floor}",
            )
        )
    val_loss = [float(h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if best_epoch is not None and n >= 3 and best_epoch <= n / 3 and len(val_loss) == n:
        b = best_epoch - 1
        if val_loss[-1] > 1.1 * val_loss[b] and loss[-1] < loss[b]:
            flags.append(
                _flag(
                    "overfits_early",
                    f"its best epoch was {best_epoch} of {n}; after it the validation "
                    f"loss rose from {val_loss[b]:.3f} to {val_loss[-1]:.3f} while the training loss fell",
                )
            )
    return flags


def _flag(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


# ------------------------------------------------------------------------------------------ did it learn?

CHANCE_ROOM = 0.05  # within this share of the way from chance level to 100%: near chance...
CHANCE_FACTOR = 1.5  # ...but never beyond this multiple of chance level (many classes: chance is tiny)
ONE_CLASS_SHARE = 0.5  # one class answered for more than this share of the test images...
ONE_CLASS_EXCESS = 0.4  # ...and for this much more of them than it has: a collapsed model


@dataclass(frozen=True)
class Learning:
    """Whether a model's test scores show that it learned anything: its accuracy against chance level
    (the accuracy of always answering the most frequent test class: 1/classes on a balanced test set),
    and the class it answers most often.

    Near chance: the accuracy is below chance level plus `CHANCE_ROOM` of the way from it to 100%, and
    below `CHANCE_FACTOR` x chance level whichever is lower (10 classes: under 14.5%; 120 classes: under
    1.25%; 2 classes: under 52.5%). One class: a class answered for over half of the test images and for
    `ONE_CLASS_EXCESS` (40 points) more of them than are of that class (10 classes: over half; 3 classes:
    at least 73%). Either means the model did not learn, and a comparison with it says nothing about
    the models. The size of the test set is not judged here: a small one has its own caveat.
    """

    n: int  # test images
    accuracy: float
    chance: float
    majority: bool  # chance level is the most frequent class's share (an unbalanced test set), not 1/classes
    top_class: int | None = None  # the class answered most often (None: predictions not known)
    top_share: float = 0.0  # its share of the test images' answers
    top_truth: float = 0.0  # its share of the test images' true classes

    @property
    def near_chance(self) -> bool:
        margin = min((CHANCE_FACTOR - 1) * self.chance, CHANCE_ROOM * (1 - self.chance))
        return self.accuracy < self.chance + margin

    @property
    def one_class(self) -> bool:
        return (
            self.top_class is not None
            and self.top_share > ONE_CLASS_SHARE
            and self.top_share >= self.top_truth + ONE_CLASS_EXCESS
        )

    @property
    def learned(self) -> bool:
        return not (self.near_chance or self.one_class)

    def reasons(self, class_names: list[str]) -> list[str]:
        """Why it did not learn, as clauses: 'its test accuracy, 9.3%, is no better than chance level
        (10.0%)', 'it answers beagle for 93% of the test images (10% of them are beagle)'."""
        out = []
        if self.near_chance:
            level = f"{100 * self.chance:.1f}%" + (", always answering the most common class" if self.majority else "")
            how = "is no better than" if self.accuracy <= self.chance else "is barely above"
            out.append(f"its test accuracy, {100 * self.accuracy:.1f}%, {how} chance level ({level})")
        if self.one_class and self.top_class is not None:
            name = class_names[self.top_class] if self.top_class < len(class_names) else f"class {self.top_class}"
            out.append(
                f"it answers {name} for {100 * self.top_share:.0f}% of the test images "
                f"({100 * self.top_truth:.0f}% of them are {name})"
            )
        return out


def learning(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> Learning:
    """`Learning` from a model's test predictions (targets and predicted classes, (N,) each)."""
    t, p = np.asarray(targets, dtype=np.int64).ravel(), np.asarray(preds, dtype=np.int64).ravel()
    n, k = t.size, max(num_classes, int(t.max(initial=-1)) + 1, int(p.max(initial=-1)) + 1, 1)
    truth, answers = np.bincount(t, minlength=k) / max(n, 1), np.bincount(p, minlength=k) / max(n, 1)
    uniform = 1 / max(num_classes, 1)
    chance = max(uniform, float(truth.max()))
    top = int(answers.argmax())
    accuracy = float((t == p).mean()) if n else 0.0
    return Learning(n, accuracy, chance, chance > uniform + 1e-9, top, float(answers[top]), float(truth[top]))


def learning_from_accuracy(accuracy: float, n: int, num_classes: int) -> Learning:
    """`Learning` from a recorded test accuracy alone (no predictions: chance level is 1/classes and the
    answers per class are unknown)."""
    return Learning(n, accuracy, 1 / max(num_classes, 1), majority=False)
