"""Evaluation: one pass in eval mode under inference_mode, and the metrics (top-1, top-5, macro-F1,
per-class accuracy). The number of evaluated samples is checked against the split size."""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn
from tqdm.auto import tqdm


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
) -> EvalStats:
    """Run `model` over `batches` and compute metrics; asserts exactly `expected_n` samples were seen.

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
    for x, y in tqdm(batches, desc=desc, leave=False, disable=None):
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
