"""The report's pictures, drawn with matplotlib's object API (`Figure`, rendered by Agg; no pyplot state,
no display needed). Each function takes plain data and returns PNG bytes; the renderer embeds them.

Every model keeps one colour across all figures (its position in the run, tab10).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from visionpoc.results import ModelResult

DPI = 100
RIGHT, WRONG, NEUTRAL = "#1a7f37", "#cf222e", "#24292f"


def colour(index: int) -> str:
    palette = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    ]
    return palette[index % len(palette)]


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def _with_history(models: Sequence[ModelResult]) -> list[tuple[int, ModelResult]]:
    return [(i, m) for i, m in enumerate(models) if m.status == "ok" and m.history]


def learning_curves(models: Sequence[ModelResult]) -> bytes | None:
    """Train loss and validation accuracy by epoch, all models on shared axes."""
    runs = _with_history(models)
    if not runs:
        return None
    fig = Figure(figsize=(10, 3.6))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for i, m in runs:
        epochs = [h.epoch for h in m.history]
        loss_ax.plot(epochs, [h.train_loss for h in m.history], "o-", color=colour(i), label=m.label)
        val = [(h.epoch, h.val_accuracy) for h in m.history if h.val_accuracy is not None]
        if val:
            acc_ax.plot(*zip(*val, strict=True), "o-", color=colour(i), label=m.label)
    loss_ax.set(title="Training loss (augmented batches)", xlabel="epoch", ylabel="cross-entropy")
    acc_ax.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy", ylim=(-0.02, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    loss_ax.legend(frameon=False)
    return to_png(fig)


def accuracy_vs_time(models: Sequence[ModelResult]) -> bytes | None:
    """Validation accuracy against cumulative training time: what each extra minute bought."""
    runs = [(i, m) for i, m in _with_history(models) if any(h.val_accuracy is not None for h in m.history)]
    if not runs:
        return None
    longest = max(h.cumulative_train_time_s for _, m in runs for h in m.history)
    scale, unit = (60.0, "min") if longest > 600 else (1.0, "s")
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    for i, m in runs:
        pts = [(h.cumulative_train_time_s / scale, h.val_accuracy) for h in m.history if h.val_accuracy is not None]
        ax.plot(*zip(*pts, strict=True), "o-", color=colour(i), label=m.label)
    ax.set(
        title="Validation accuracy vs training time",
        xlabel=f"cumulative training time ({unit})",
        ylabel="accuracy",
        ylim=(-0.02, 1.02),
    )
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return to_png(fig)


def most_different(
    acc_a: np.ndarray, acc_b: np.ndarray, class_names: Sequence[str], n_labels: int = 8
) -> dict[tuple[float, float], list[str]]:
    """The scatter's labels: the `n_labels` classes whose accuracies differ most (ties: class order), keyed
    by their (baseline, candidate) point; classes at the same point share one label. Classes with equal
    accuracy or absent from the test set (NaN) are never labelled."""
    a, b = np.asarray(acc_a, dtype=float), np.asarray(acc_b, dtype=float)
    gap = np.where(np.isfinite(a) & np.isfinite(b), np.abs(b - a), -1.0)
    spots: dict[tuple[float, float], list[str]] = {}
    for k in np.argsort(-gap, kind="stable")[:n_labels]:
        if gap[k] > 0:
            spots.setdefault((round(float(a[k]), 3), round(float(b[k]), 3)), []).append(class_names[k])
    return spots


def per_class_scatter(
    baseline: str, candidate: str, acc_a: np.ndarray, acc_b: np.ndarray, class_names: Sequence[str], n_labels: int = 8
) -> bytes:
    """Per-class test accuracy, candidate (y) against baseline (x); the most different classes are named."""
    a, b = np.asarray(acc_a, dtype=float), np.asarray(acc_b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    fig = Figure(figsize=(5.6, 5.6))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="#888", lw=1, label="equal accuracy")
    rng = np.random.default_rng(0)  # a little jitter so that tied classes do not hide each other
    jitter = rng.uniform(-0.008, 0.008, size=(2, a.size))
    ax.scatter(a[ok] + jitter[0, ok], b[ok] + jitter[1, ok], s=18, alpha=0.7, color=colour(1), edgecolors="none")
    for (x, y), names in most_different(a, b, class_names, n_labels).items():
        text = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
        ax.annotate(
            text,
            (x, y),
            fontsize=8,
            xytext=(5, -10 if y > 0.9 else 4),
            textcoords="offset points",
            color=RIGHT if y > x else WRONG,
            ha="left" if x < 0.6 else "right",
        )
    ax.set(
        xlim=(-0.03, 1.03),
        ylim=(-0.03, 1.03),
        xlabel=f"{baseline} (baseline) accuracy",
        ylabel=f"{candidate} accuracy",
        title="Per-class test accuracy",
    )
    ax.text(
        0.3,
        0.7,
        f"{candidate} better",
        transform=ax.transAxes,
        fontsize=9,
        ha="center",
        color=RIGHT,
        alpha=0.6,
        rotation=45,
    )
    ax.text(
        0.7,
        0.3,
        f"{baseline} better",
        transform=ax.transAxes,
        fontsize=9,
        ha="center",
        color=WRONG,
        alpha=0.6,
        rotation=45,
    )
    ax.grid(alpha=0.3)
    ax.set_aspect("equal")
    return to_png(fig)


@dataclass
class Caption:
    """One line under a gallery image; `right` colours it (None: neutral, e.g. the truth)."""

    text: str
    right: bool | None = None


def _line_colour(right: bool | None) -> str:
    return NEUTRAL if right is None else RIGHT if right else WRONG


def gallery(
    images: Sequence[Image.Image], captions: Sequence[Sequence[Caption]], columns: int = 4, thumb: int = 160
) -> bytes:
    """A grid of thumbnails, each with coloured caption lines (green: right, red: wrong)."""
    rows = max(1, -(-len(images) // columns))
    lines = max((len(c) for c in captions), default=1)
    fig = Figure(figsize=(columns * 2.3, rows * (1.9 + 0.2 * lines)))
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False).ravel())
    for ax in axes:
        ax.axis("off")
    for ax, img, caps in zip(axes, images, captions, strict=False):
        shown = img.copy()
        shown.thumbnail((thumb, thumb))
        ax.imshow(np.asarray(shown))
        for j, cap in enumerate(caps):
            ax.text(
                0.5,
                -0.04 - 0.13 * j,
                cap.text,
                transform=ax.transAxes,
                ha="center",
                va="top",
                fontsize=8,
                color=_line_colour(cap.right),
            )
    fig.subplots_adjust(hspace=0.05 + 0.12 * lines, wspace=0.08)
    return to_png(fig)


def image_grid(rows: Sequence[tuple[str, Sequence[Image.Image], Sequence[Caption]]], thumb: int = 160) -> bytes:
    """Rows of images with a row title (e.g. one row per model) and one caption per image."""
    cols = max(len(imgs) for _, imgs, _ in rows)
    fig = Figure(figsize=(cols * 2.3, len(rows) * 2.6))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (title, imgs, caps) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c >= len(imgs):
                continue
            shown = imgs[c].copy()
            shown.thumbnail((thumb, thumb))
            ax.imshow(np.asarray(shown))
            if c < len(caps):
                ax.set_xlabel(caps[c].text, fontsize=8, color=_line_colour(caps[c].right))
        axes[r, 0].set_ylabel(title, fontsize=9, rotation=90)
    fig.subplots_adjust(hspace=0.3, wspace=0.08)
    return to_png(fig)


def seeds_strip(
    labels: Sequence[str], per_seed: Sequence[Sequence[float | None]], seeds: Sequence[int]
) -> bytes | None:
    """Each model's test accuracy in every seed (a dot per seed, a bar at the mean): the spread that
    one run cannot show."""
    if not any(v is not None for values in per_seed for v in values):
        return None
    fig = Figure(figsize=(max(4.5, 1.4 * len(labels) + 2), 3.6))
    ax = fig.subplots()
    jitter = np.linspace(-0.12, 0.12, len(seeds)) if len(seeds) > 1 else np.zeros(1)
    for i, values in enumerate(per_seed):
        pts = [(i + jitter[k], v) for k, v in enumerate(values) if v is not None]
        if not pts:
            continue
        ax.plot(*zip(*pts, strict=True), "o", color=colour(i), alpha=0.85)
        mean = float(np.mean([v for _, v in pts]))
        ax.hlines(mean, i - 0.25, i + 0.25, color=colour(i), linewidth=2.5)
    ax.set_xticks(range(len(labels)), labels)
    ax.set(
        title=f"Test accuracy in each of {len(seeds)} seeds (bar: mean)",
        ylabel="test accuracy",
        xlim=(-0.6, len(labels) - 0.4),
    )
    ax.grid(alpha=0.3, axis="y")
    return to_png(fig)
