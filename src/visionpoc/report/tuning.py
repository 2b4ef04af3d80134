"""The hyper-parameter search part of the report: did every model get the same tuning budget?

Reads the study records that `compare --tuned` copied into `RUN_DIR/tuning/` (`tune_summary.json` and
Optuna's figures), or, when they were not copied, the tune folder that each model's `tuned_from` names.
Nothing here imports Optuna or the training code: these are plain files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionpoc.repeats import repeats_of
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


@dataclass
class Tuning:
    rows: list[TuneRow]
    figures: list[tuple[str, str, str]] = field(default_factory=list)  # (label, kind, figure name)
    notes: list[str] = field(default_factory=list)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


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
        params = " · ".join(f"{k} {_fmt(v)}" for k, v in (rec.get("best_params") or {}).items())
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
                rec.get("best_val_accuracy"),
                params,
            )
        )
        for kind in TUNE_PLOTS:
            png = _plot(folders, label, kind)
            if png is not None:
                name = f"tune_{kind}_{''.join(c if c.isalnum() else '_' for c in label)}"
                pngs[name] = png
                figures.append((label, kind, name))
    return Tuning(rows, figures, _fairness_notes(rows)), pngs


def _fairness_notes(rows: list[TuneRow]) -> list[str]:
    notes = []
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
