"""The hyper-parameter search part of the report: did every model get the same tuning budget?

Reads the study records that `compare --tuned` copied into `RUN_DIR/tuning/` (`tune_summary.json` and
Optuna's figures), or, when they were not copied, the tune folder that each model's `tuned_from` names.
A study whose completed trials all scored the same (`tied_value` in its record) found nothing: its row
and a note say so, and name no best settings.
Nothing here imports Optuna or the training code: these are plain files. The figures themselves are drawn
here too, from plain numbers (`history_figure`, `importance_figure`), in the report's style: `visionpoc
tune` calls them with its study's trials.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from visionpoc.repeats import repeats_of
from visionpoc.report.budget import sci
from visionpoc.report.plots import NEUTRAL, WIDTH, colour, styled
from visionpoc.results import RunResults
from visionpoc.runfiles import RUN_TUNING_DIR, TUNE_PLOTS, TUNE_PLOTS_DIR, TUNE_SUMMARY_FILE, tuning_plot

log = logging.getLogger(__name__)


@dataclass
class TuneRow:
    """One model's tuning budget and outcome (all None when the model was not tuned)."""

    label: str
    tuned: bool
    trials: int | None = None
    complete: int | None = None
    pruned: int | None = None
    failed: int | None = None
    epochs_per_trial: int | None = None
    time_s: float | None = None
    device: str | None = None
    best_val: float | None = None
    params: str = ""
    tied: float | None = None  # every completed trial scored this: the search found nothing


@dataclass
class Tuning:
    rows: list[TuneRow]
    figures: list[tuple[str, str, str]] = field(default_factory=list)  # (label, kind, figure name)
    notes: list[str] = field(default_factory=list)


def _fmt(v: Any) -> str:
    """A best setting: '4.0e-04' for a small number (as the budget table writes a learning rate), else '0.888'."""
    if isinstance(v, float):
        return sci(v) if 0 < abs(v) < 0.01 else f"{v:.3g}"
    return str(v)


def _sources(run_dir: Path, r: RunResults) -> list[Path]:
    """Folders that may hold the summary and the figures, the run's own copy first."""
    folders = [run_dir / RUN_TUNING_DIR]
    parent = repeats_of(run_dir)
    if parent is not None:  # a seed of a `compare --tuned`: the run's copy is one level up
        folders.append(parent / RUN_TUNING_DIR)
    for m in r.models:
        if m.tuned_from:  # OUT/tuned/<label>.yaml -> OUT
            folders.append(Path(m.tuned_from).parent.parent)
    return folders


def _read(folder: Path) -> dict[str, Any]:
    path = folder / TUNE_SUMMARY_FILE
    try:
        return dict(json.loads(path.read_text()).get("models", {})) if path.is_file() else {}
    except (OSError, ValueError, AttributeError) as e:
        log.warning("cannot read %s (%s): the tuning table leaves it out", path, e)
        return {}


def _plot(folders: list[Path], label: str, kind: str) -> bytes | None:
    for folder in folders:
        for path in (folder / tuning_plot(label, kind), folder / TUNE_PLOTS_DIR / tuning_plot(label, kind)):
            if path.is_file():
                return path.read_bytes()
    return None


def read_tuning(run_dir: Path, r: RunResults) -> tuple[Tuning | None, dict[str, bytes]]:
    """The tuning table, notes and figures (name -> PNG); None when no model of the run was tuned."""
    folders = _sources(Path(run_dir), r)
    records: dict[str, Any] = {}
    for folder in reversed(folders):  # the run's own copy wins
        records.update(_read(folder))
    labels = [m.label for m in r.models]
    if not any(label in records for label in labels):
        return None, {}
    rows, figures, pngs = [], [], {}
    for label in labels:
        rec = records.get(label)
        if rec is None:
            rows.append(TuneRow(label, tuned=False))
            continue
        tied = rec.get("tied_value")
        tied = float(tied) if isinstance(tied, int | float) and not isinstance(tied, bool) else None
        params = " · ".join(f"{k} {_fmt(v)}" for k, v in (rec.get("best_params") or {}).items())
        if tied is not None:
            params = f"none: all trials scored {tied:.3f} (configured settings kept)"
        rows.append(
            TuneRow(
                label,
                True,
                rec.get("trials"),
                rec.get("complete"),
                rec.get("pruned"),
                rec.get("failed"),
                rec.get("epochs_per_trial"),
                rec.get("tuning_time_s"),
                rec.get("device"),
                rec.get("best_val_accuracy") if tied is None else tied,  # a tie: every trial's score
                params,
                tied,
            )
        )
        for kind in TUNE_PLOTS:
            png = _plot(folders, label, kind)
            if png is not None:
                name = f"tune_{kind}_{''.join(c if c.isalnum() else '_' for c in label)}"
                pngs[name] = png
                figures.append((label, kind, name))
    return Tuning(rows, figures, _fairness_notes(rows)), pngs


def tie_advice(value: float) -> str:
    """What to do about a study whose completed trials all scored `value`."""
    if value >= 1.0:
        return (
            "every trial was perfect: the validation split is too small or too easy to tell settings apart "
            "(give it more images: `data.val_fraction`)"
        )
    return (
        "trials that all score the same usually learned nothing (chance level is 1/classes): check the "
        "learning-rate range (`tune.lr`), the epochs per trial (`tune.epochs`) and the data"
    )


def _fairness_notes(rows: list[TuneRow]) -> list[str]:
    notes = [
        f"The search of {row.label} found nothing: all {row.complete} completed trials scored {row.tied:.3f} "
        f"validation accuracy, so no trial was better than another and {row.label} trained with its configured "
        f"settings; {tie_advice(row.tied)}."
        for row in rows
        if row.tied is not None
    ]
    untuned = [row.label for row in rows if not row.tuned]
    if untuned:
        notes.append(
            f"Not tuned: {', '.join(untuned)} kept its hand-set configuration, so the models did not "
            "get the same tuning budget."
        )
    tuned = [row for row in rows if row.tuned]
    for what, key in (("trials", "trials"), ("epochs per trial", "epochs_per_trial")):
        values = {getattr(row, key) for row in tuned}
        if len(values) > 1:
            each = ", ".join(f"{row.label} {getattr(row, key)}" for row in tuned)
            notes.append(f"Unequal budget: the models were tuned with different {what} ({each}).")
    return notes


# ------------------------------------------------------------------------------------------ figures


@styled
def history_figure(numbers: Sequence[int], values: Sequence[float], n_trials: int | None = None) -> Figure:
    """The optimisation history: each completed trial's validation accuracy (dots, by trial number) and the
    best so far (a step line); the x axis counts whole trials, up to `n_trials` (every trial, pruned and
    failed ones included, so that the gaps show them)."""
    fig = Figure(figsize=(WIDTH / 2, 3.4), layout="constrained")
    ax = fig.subplots()
    order = np.argsort(numbers, kind="stable")
    xs, ys = np.asarray(numbers)[order], np.asarray(values, dtype=float)[order]
    ax.plot(xs, ys, "o", color=colour(0), alpha=0.8, label="completed trial")
    if xs.size:
        ax.step(xs, np.maximum.accumulate(ys), where="post", color=colour(1), lw=2, label="best so far")
    last = max(int(xs.max()) if xs.size else 0, (n_trials or 0) - 1)
    ax.set(
        title="Optimisation history",
        xlabel="trial",
        ylabel="validation accuracy",
        xlim=(-0.5, last + 0.5),
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return fig


@styled
def importance_figure(importances: Mapping[str, float]) -> Figure:
    """Each searched parameter's share of the variation in validation accuracy (Optuna's fANOVA
    importances), as horizontal bars, the most important at the top."""
    names = sorted(importances, key=lambda k: -importances[k])
    fig = Figure(figsize=(WIDTH / 2, max(2.2, 1.2 + 0.4 * len(names))), layout="constrained")
    ax = fig.subplots()
    ys = np.arange(len(names))[::-1]
    values = [importances[k] for k in names]
    ax.barh(ys, values, height=0.6, color=colour(0))
    for y, v in zip(ys, values, strict=True):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=9, color=NEUTRAL)
    ax.set_yticks(ys, names)
    ax.set(title="Parameter importance", xlabel="share of the variation in validation accuracy", xlim=(0, 1.1))
    ax.grid(axis="x", alpha=0.3)
    return fig
