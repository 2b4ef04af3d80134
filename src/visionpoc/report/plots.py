"""The report's pictures, drawn with matplotlib's object API (`Figure`, rendered by Agg; no pyplot state,
no display needed). Each function takes plain data and returns PNG bytes; the renderer embeds them.

Every figure is drawn `WIDTH` inches wide at `DPI`, the width of the report's column (the page shows it at
its natural size), under one style (`STYLE`, applied by `styled`; the tuning figures use it too). Every
model keeps one colour across all figures (its position in the run, tab10). The per-class scatter names the
classes that differ most, placed without overlap by `labels.place_labels`.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backend_bases import RendererBase
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox
from PIL import Image

from visionpoc.report.labels import Label, covers, place_labels, text_box
from visionpoc.results import ModelResult

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

DPI = 100
WIDTH = 11.0  # inches: the report's column (about 1,120 px at DPI), so a figure is shown at its natural size
RIGHT, WRONG, NEUTRAL = "#1a7f37", "#cf222e", "#24292f"
STYLE: dict[RcKeyType, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "axes.edgecolor": "#57606a",
    "axes.labelcolor": NEUTRAL,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "xtick.color": "#57606a",
    "ytick.color": "#57606a",
    "text.color": NEUTRAL,
    "legend.frameon": False,
    "figure.dpi": DPI,
}
CAPTION_GID = "triangle-caption"  # the gid of the scatter's "... better" captions

P = ParamSpec("P")
R = TypeVar("R")


def styled(draw: Callable[P, R]) -> Callable[P, R]:
    """Run a drawing function under the report's style (`STYLE`)."""

    @functools.wraps(draw)
    def inner(*args: P.args, **kwargs: P.kwargs) -> R:
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)

    return inner


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


@styled
def learning_curves(models: Sequence[ModelResult]) -> bytes | None:
    """Train loss and validation accuracy by epoch, all models on shared axes."""
    runs = _with_history(models)
    if not runs:
        return None
    fig = Figure(figsize=(WIDTH, 3.8), layout="constrained")
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
    loss_ax.legend()
    return to_png(fig)


def train_clock(m: ModelResult) -> list[tuple[float, float]]:
    """(training time in s, validation accuracy) after each epoch, on the summary table's clock.

    An epoch record's `cumulative_train_time_s` includes the run's warm-up (its first step: compilation,
    workers starting), which the table's `train_time_s` leaves out; the warm-up is taken out here too, so
    that the curve ends at the table's training time."""
    warm = m.warmup_s or 0.0
    return [
        (max(h.cumulative_train_time_s - warm, 0.0), h.val_accuracy) for h in m.history if h.val_accuracy is not None
    ]


@styled
def accuracy_vs_time_figure(models: Sequence[ModelResult]) -> Figure | None:
    """Validation accuracy against training time (warm-up and evaluation excluded, as in the summary table):
    what each extra minute bought."""
    runs = [(i, m, pts) for i, m in _with_history(models) if (pts := train_clock(m))]
    if not runs:
        return None
    longest = max(t for _, _, pts in runs for t, _ in pts)
    scale, unit = (60.0, "min") if longest > 600 else (1.0, "s")
    fig = Figure(figsize=(WIDTH, 3.8), layout="constrained")
    ax = fig.subplots()
    for i, m, pts in runs:
        ax.plot([t / scale for t, _ in pts], [v for _, v in pts], "o-", color=colour(i), label=m.label)
    ax.set(
        title="Validation accuracy vs training time",
        xlabel=f"training time ({unit}; warm-up and evaluation excluded, as in the summary table)",
        ylabel="accuracy",
        ylim=(-0.02, 1.02),
    )
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def accuracy_vs_time(models: Sequence[ModelResult]) -> bytes | None:
    fig = accuracy_vs_time_figure(models)
    return None if fig is None else to_png(fig)


def most_different(
    acc_a: np.ndarray, acc_b: np.ndarray, class_names: Sequence[str], n_labels: int = 8
) -> dict[tuple[float, float], list[str]]:
    """The scatter's labels: the `n_labels` classes whose accuracies differ most (largest |difference|
    first, ties in class order), keyed by their (baseline, candidate) point. Each point lists every class
    drawn there, the chosen ones first, so that a pile of classes (e.g. at (0, 0): both models always
    wrong) gets one label that says how many it holds. Classes with equal accuracies are chosen only when
    fewer than `n_labels` classes differ; a class absent from the test set (NaN) never is."""
    a, b = np.asarray(acc_a, dtype=float), np.asarray(acc_b, dtype=float)
    finite = np.isfinite(a) & np.isfinite(b)
    gap = np.where(finite, np.abs(b - a), -1.0)
    chosen = [int(k) for k in np.argsort(-gap, kind="stable")[:n_labels] if gap[k] >= 0]

    def spot(k: int) -> tuple[float, float]:
        return round(float(a[k]), 3), round(float(b[k]), 3)

    members: dict[tuple[float, float], list[int]] = {}
    for k in chosen:
        members.setdefault(spot(k), []).append(k)
    for other in map(int, np.flatnonzero(finite)):  # the other classes drawn at a labelled point
        if other not in chosen and spot(other) in members:
            members[spot(other)].append(other)
    return {xy: [class_names[k] for k in ks] for xy, ks in members.items()}


def label_text(names: Sequence[str], width: int = 30) -> str:
    """'beagle, pug +3': the names that fit in about `width` characters (at least one), then how many more."""
    shown = [names[0]]
    for name in names[1:]:
        if len(", ".join([*shown, name])) > width:
            break
        shown.append(name)
    rest = len(names) - len(shown)
    return ", ".join(shown) + (f" +{rest}" if rest else "")


# where a caption may go in its triangle: its corner nearest the triangle's right angle, in axes fractions
# (the upper triangle's; the lower triangle's mirror them)
CAPTION_SPOTS = ((0.02, 0.98), (0.02, 0.80), (0.20, 0.98), (0.02, 0.62), (0.38, 0.98))


def _caption(ax: Axes, renderer: RendererBase, name: str, colour_: str, upper: bool, dots: np.ndarray) -> Bbox:
    """'NAME better' inside its triangle (upper: above the diagonal), clear of the diagonal, where it covers
    the fewest points; returns its box (display pixels)."""
    t = ax.text(0, 0, "", transform=ax.transAxes, fontsize=9, color=colour_, style="italic", gid=CAPTION_GID)
    to_axes = ax.transAxes.inverted()
    best: tuple[int, str, tuple[float, float]] | None = None
    for text in (f"{name} better", f"{name}\nbetter"):
        t.set_text(text)
        for x, y in CAPTION_SPOTS:
            xy = (x, y) if upper else (1 - x, 1 - y)
            t.set_position(xy)
            t.set_horizontalalignment("left" if upper else "right")
            t.set_verticalalignment("top" if upper else "bottom")
            box = text_box(t, renderer)
            (x0, y0), (x1, y1) = to_axes.transform(box.get_points())
            if (y0 - x1 if upper else x0 - y1) < 0.04:  # it would touch or cross the diagonal
                continue
            hits = int(covers(box, dots))
            if best is None or hits < best[0]:
                best = (hits, text, xy)
        if best is not None:
            break
    if best is not None:
        _, text, xy = best
        t.set_text(text)
        t.set_position(xy)
    return text_box(t, renderer).padded(3)


def _difference_bars(
    ax: Axes, a: np.ndarray, b: np.ndarray, names: Sequence[str], pair: tuple[str, str], n: int = 15
) -> None:
    """The `n` classes whose accuracies differ most, as horizontal bars of the difference in points."""
    baseline, candidate = pair
    diff = b - a
    order = [int(k) for k in np.argsort(-np.abs(np.nan_to_num(diff)), kind="stable") if np.isfinite(diff[k])]
    order = [k for k in order if diff[k] != 0][:n]
    ax.set_title("Largest per-class differences")
    if not order:
        ax.axis("off")
        ax.text(0.5, 0.5, "Every class has the same accuracy in both models.", ha="center", transform=ax.transAxes)
        return
    values = 100 * diff[order]
    slots = max(len(order), 10)  # a few bars keep the thickness of ten
    ys = slots - 1 - np.arange(len(order))  # the largest at the top
    ax.barh(ys, values, height=0.7, color=[RIGHT if v > 0 else WRONG for v in values])
    shown = [names[k] if len(names[k]) <= 32 else names[k][:31] + "…" for k in order]
    ax.set_yticks(ys, shown, fontsize=8)
    lim = 1.15 * float(np.max(np.abs(values)))
    ax.set(xlim=(-lim, lim), ylim=(-0.6, slots - 0.4))
    ax.axvline(0, color=NEUTRAL, lw=0.8)
    ax.set_xlabel(f"{candidate} − {baseline} (accuracy points)")
    ax.grid(axis="x", alpha=0.3)


@styled
def scatter_figure(
    baseline: str, candidate: str, acc_a: np.ndarray, acc_b: np.ndarray, class_names: Sequence[str], n_labels: int = 8
) -> Figure:
    """Per-class test accuracy, candidate (y) against baseline (x), the most different classes named; beside
    it, the largest differences as bars. Drawn once, so that the labels are placed on the final layout."""
    a, b = np.asarray(acc_a, dtype=float), np.asarray(acc_b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    fig = Figure(figsize=(WIDTH, WIDTH / 2), layout="constrained")
    ax, bars = fig.subplots(1, 2)
    ax.plot([0, 1], [0, 1], "--", color="#888", lw=1)
    jitter = np.random.default_rng(0).uniform(-0.008, 0.008, size=(2, a.size))  # tied classes stay visible
    xs, ys = a[ok] + jitter[0, ok], b[ok] + jitter[1, ok]
    ax.scatter(xs, ys, s=18, alpha=0.7, color=colour(1), edgecolors="none")
    ax.set(
        xlim=(-0.03, 1.03),
        ylim=(-0.03, 1.03),
        xlabel=f"{baseline} (baseline) accuracy",
        ylabel=f"{candidate} accuracy",
        title="Per-class test accuracy",
    )
    ax.grid(alpha=0.3)
    ax.set_aspect("equal")
    _difference_bars(bars, a, b, class_names, (baseline, candidate))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # the layout, final from here on: labels are placed in display pixels
    fig.set_layout_engine("none")
    renderer = canvas.get_renderer()
    dots = ax.transData.transform(np.column_stack([xs, ys])) if xs.size else np.empty((0, 2))
    avoid = [_caption(ax, renderer, candidate, RIGHT, True, dots), _caption(ax, renderer, baseline, WRONG, False, dots)]
    labels = [
        Label(x, y, label_text(names), RIGHT if y > x else WRONG if y < x else NEUTRAL, (-1, 1) if y >= x else (1, -1))
        for (x, y), names in most_different(a, b, class_names, n_labels).items()
    ]
    place_labels(ax, renderer, labels, avoid, dots)
    return fig


def per_class_scatter(
    baseline: str, candidate: str, acc_a: np.ndarray, acc_b: np.ndarray, class_names: Sequence[str], n_labels: int = 8
) -> bytes:
    """`scatter_figure` as PNG."""
    return to_png(scatter_figure(baseline, candidate, acc_a, acc_b, class_names, n_labels))


@dataclass
class Caption:
    """One line under a gallery image; `right` colours it (None: neutral, e.g. the truth)."""

    text: str
    right: bool | None = None


def _line_colour(right: bool | None) -> str:
    return NEUTRAL if right is None else RIGHT if right else WRONG


@styled
def gallery(
    images: Sequence[Image.Image], captions: Sequence[Sequence[Caption]], columns: int = 4, thumb: int = 280
) -> bytes:
    """A grid of thumbnails, each with coloured caption lines (green: right, red: wrong)."""
    rows = max(1, -(-len(images) // columns))
    lines = max((len(c) for c in captions), default=1)
    cell = WIDTH / columns  # the column's width shared by the thumbnails
    fig = Figure(figsize=(WIDTH, rows * cell * (1.9 + 0.2 * lines) / 2.3))
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
    fig.subplots_adjust(left=0.01, right=0.99, top=0.98, hspace=0.05 + 0.12 * lines, wspace=0.08)
    return to_png(fig)


@styled
def image_grid(rows: Sequence[tuple[str, Sequence[Image.Image], Sequence[Caption]]], thumb: int = 280) -> bytes:
    """Rows of images with a row title (e.g. one row per model) and one caption per image."""
    cols = max(len(imgs) for _, imgs, _ in rows)
    cell = WIDTH / max(cols, 4)  # a row of fewer images keeps the size of four
    fig = Figure(figsize=(cell * cols, len(rows) * cell * 2.6 / 2.3))
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
    fig.subplots_adjust(left=0.04, right=0.99, top=0.98, hspace=0.3, wspace=0.08)
    return to_png(fig)


@styled
def seeds_strip(
    labels: Sequence[str], per_seed: Sequence[Sequence[float | None]], seeds: Sequence[int]
) -> bytes | None:
    """Each model's test accuracy in every seed (a dot per seed, a bar at the mean): the spread that
    one run cannot show."""
    if not any(v is not None for values in per_seed for v in values):
        return None
    fig = Figure(figsize=(WIDTH, 3.6), layout="constrained")
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
