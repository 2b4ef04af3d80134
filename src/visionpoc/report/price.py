"""The report's "Price at inference": each model's CPU latency, throughput, memory and file size (the
`inference` blocks of `results.json`), the machine they were measured on, test accuracy against CPU latency
with the Pareto front, and the verdict's clause that weighs a gain in accuracy against its latency.

A model is on the Pareto front when no other model is at least as accurate and at least as fast, and
strictly better in one of the two (`pareto_front`). The figure draws the front as a step line: between two
front models, the best accuracy one can buy at that latency is the faster one's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from visionpoc.report import plots
from visionpoc.report.labels import Label, place_labels
from visionpoc.report.stats import Interval, pts
from visionpoc.results import InferenceCost, ModelResult

LOG_SPREAD = 10.0  # latencies over this ratio apart: the figure's x axis is logarithmic
FRONT = "#57606a"


@dataclass
class PriceRow:
    """One model's line in the table: its figures (None: not measured), or why it has none."""

    index: int  # the model's position in the run (its colour)
    m: ModelResult
    cost: InferenceCost | None
    test_acc: Interval | None = None
    pareto: bool = False
    p50_ms: float | None = None  # CPU, the smallest batch
    p95_ms: float | None = None
    runs: int | None = None  # timed runs behind p50 and p95
    img_s: float | None = None  # CPU, the largest batch of the section
    peak_mib: float | None = None
    file_mib: float | None = None
    gpu_p50_ms: float | None = None
    gpu_img_s: float | None = None

    def fill(self, latency_batch: int | None, throughput_batch: int | None) -> None:
        """The figures of the table from the model's `inference` block, at the section's batch sizes."""
        c = self.cost
        if c is None or c.error:
            return
        lat, thr = c.latency(), c.throughput()
        if lat is not None and lat.batch == latency_batch:
            self.p50_ms, self.p95_ms, self.runs = lat.p50_ms, lat.p95_ms, lat.runs
        if thr is not None and thr.batch == throughput_batch:
            self.img_s = thr.img_s
        self.peak_mib = c.peak_mib
        self.file_mib = None if c.file_bytes is None else c.file_bytes / 2**20
        if c.gpu_batches:
            self.gpu_p50_ms = c.gpu_batches[0].p50_ms
            self.gpu_img_s = c.gpu_batches[-1].img_s if c.gpu_batches[-1].batch == throughput_batch else None

    @property
    def note(self) -> str:
        if self.cost is None:
            return "not measured" if self.m.status == "ok" else "failed in training"
        return self.cost.error or "; ".join(self.cost.notes)

    @property
    def measured(self) -> bool:
        return self.p50_ms is not None


@dataclass
class PriceSection:
    rows: list[PriceRow] = field(default_factory=list)
    machine: str = ""  # where the CPU figures come from (one line; several if the models' blocks differ)
    latency_batch: int | None = None
    throughput_batch: int | None = None
    gpu: str | None = None  # the GPU the torch figures come from, if any


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, accuracy) points no other point dominates (lower latency is better, higher
    accuracy is better), ordered by latency. Of identical points, the first is kept."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 >= y and (x2 < x or y2 > y)) or ((x2, y2) == (x, y) and j < i)
            for j, (x2, y2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def machine_line(costs: Sequence[InferenceCost]) -> str:
    """'Intel(R) Xeon(R) Processor, 2 CPUs; onnxruntime 1.20.1, CPUExecutionProvider; 2 intra-op threads',
    once per distinct machine the models' blocks name."""
    lines = dict.fromkeys(
        f"{c.cpu}, {c.cpus} CPUs; {c.runtime}; {c.threads} intra-op thread{'s' if c.threads != 1 else ''}"
        + ("" if c.threads_asked else " (its default)")
        for c in costs
        if not c.error
    )
    return " · ".join(lines)


def section(models: Sequence[ModelResult], test_acc: dict[str, Interval]) -> PriceSection:
    """The table's rows (every model, in the run's order), the machine, the batch sizes, the front."""
    rows = [PriceRow(i, m, m.inference, test_acc.get(m.label)) for i, m in enumerate(models)]
    costs = [r.cost for r in rows if r.cost is not None and not r.cost.error]
    sec = PriceSection(rows, machine_line(costs))
    timings = [b.batch for c in costs for b in c.batches]
    if timings:
        sec.latency_batch, sec.throughput_batch = min(timings), max(timings)
    sec.gpu = next((c.gpu for c in costs if c.gpu), None)
    for row in rows:
        row.fill(sec.latency_batch, sec.throughput_batch)
    timed = [r for r in rows if r.measured and r.m.test_accuracy is not None]
    for k in pareto_front([(_p50(r), float(r.m.test_accuracy or 0.0)) for r in timed]):
        timed[k].pareto = True
    return sec


def _p50(row: PriceRow) -> float:
    assert row.p50_ms is not None
    return row.p50_ms


@plots.styled
def accuracy_vs_latency_figure(sec: PriceSection) -> Figure | None:
    """Test accuracy (95% CI as an error bar) against the CPU latency at batch 1 (p50), every measured
    model in its colour and named, the Pareto front as a step line."""
    rows = [r for r in sec.rows if r.measured and r.m.test_accuracy is not None]
    if not rows:
        return None
    xs = np.array([_p50(r) for r in rows])
    ys = np.array([float(r.m.test_accuracy or 0.0) for r in rows])
    fig = Figure(figsize=(plots.WIDTH, 4.2), layout="constrained")
    ax = fig.subplots()
    logx = xs.max() / max(xs.min(), 1e-9) > LOG_SPREAD
    if logx:
        ax.set_xscale("log")
    front = sorted((r for r in rows if r.pareto), key=_p50)
    if len(front) > 1:
        fx, fy = [_p50(r) for r in front], [float(r.m.test_accuracy or 0.0) for r in front]
        ax.step(fx, fy, where="post", color=FRONT, lw=1.2, ls="--", label="Pareto front", zorder=1)
    for r, x, y in zip(rows, xs, ys, strict=True):
        ci = r.test_acc
        yerr = None if ci is None else [[max(y - ci.low, 0.0)], [max(ci.high - y, 0.0)]]
        c = plots.colour(r.index)  # filled: on the front; hollow: another model is as fast and more accurate
        ax.errorbar([x], [y], yerr=yerr, fmt="o", ms=7, color=c, capsize=4, zorder=3, mfc=c if r.pareto else "white")
    top = float(max(ys.max(), max((r.test_acc.high for r in rows if r.test_acc), default=0.0)))
    bottom = float(min(ys.min(), min((r.test_acc.low for r in rows if r.test_acc), default=1.0)))
    pad = max(0.05, 0.1 * (top - bottom))
    ax.set_ylim(max(bottom - pad, -0.02), min(top + pad, 1.02))
    lo, hi = float(xs.min()), float(xs.max())
    ax.set_xlim(*((lo / 1.6, hi * 1.6) if logx else (0.0, 1.25 * hi)))  # linear: from 0, so ratios read true
    batch = sec.latency_batch or 1
    ax.set(
        title="Test accuracy vs CPU latency",
        xlabel=f"CPU latency at batch {batch}, median (ms; ONNX Runtime on this machine)"
        + (", log scale" if logx else ""),
        ylabel="test accuracy (95% CI)",
    )
    ax.grid(alpha=0.3)
    if len(front) > 1:
        ax.legend(loc="lower right")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # the final layout: labels are placed in display pixels
    fig.set_layout_engine("none")
    dots = ax.transData.transform(np.column_stack([xs, ys]))
    labels = [
        Label(float(x), float(y), r.m.label, plots.colour(r.index), (1, 1))
        for r, x, y in zip(rows, xs, ys, strict=True)
    ]
    place_labels(ax, canvas.get_renderer(), labels, dots=dots, fontsize=9)
    return fig


def accuracy_vs_latency(sec: PriceSection) -> bytes | None:
    fig = accuracy_vs_latency_figure(sec)
    return None if fig is None else plots.to_png(fig)


def ms(v: float) -> str:
    """A latency for a sentence: '127', '41', '3.2', '0.41'."""
    return f"{v:,.0f}" if v >= 10 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def latency_clause(baseline: ModelResult, candidate: ModelResult, diff: Interval) -> str | None:
    """The verdict's price: 'Price at inference: +9.7 points at 3.1× the CPU latency (41 → 127 ms, median at
    batch 1).' None when either model's CPU latency was not measured."""
    a = baseline.inference.latency() if baseline.inference else None
    b = candidate.inference.latency() if candidate.inference else None
    if a is None or b is None or a.batch != b.batch or a.p50_ms <= 0:
        return None
    ratio = b.p50_ms / a.p50_ms
    times = f"{ratio:.1f}×" if ratio >= 0.95 else f"{ratio:.2f}× ({1 / ratio:.1f}× faster)"
    return (
        f"Price at inference: {pts(diff.point, True)} points at {times} the CPU latency "
        f"({ms(a.p50_ms)} → {ms(b.p50_ms)} ms, median at batch {a.batch})."
    )
