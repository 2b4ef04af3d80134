"""Repeated runs as data: a run folder whose `repeats.json` lists whole runs of the same comparison, one
per seed (`train.repeats`: seeds seed, seed+1, ...), each in its own `seed-<s>/` folder, and the spread
of a figure across them. One run measures the test set's noise (its bootstrap interval, McNemar); only
repeats measure the training's (initialisation of the new head, data order, augmentation, dropout).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionpoc.atomic import atomic_write_json
from visionpoc.errors import VisionpocError
from visionpoc.results import REPEATS_FILE, RESULTS_FILE, RunResults, load_results


def repeat_dir(seed: int) -> str:
    """The folder name of the repeat trained with `seed`."""
    return f"seed-{seed}"


def save_repeats(out_dir: Path, seeds: list[int]) -> Path:
    """Write `OUT/repeats.json`: the seeds and their run folders, in order."""
    return atomic_write_json(
        Path(out_dir) / REPEATS_FILE, {"seeds": seeds, "runs": [repeat_dir(s) for s in seeds]}
    )


def read_repeats(run_dir: Path) -> list[tuple[int, Path]] | None:
    """The (seed, run folder) of each repeat listed in `run_dir/repeats.json`; None when there is none."""
    path = Path(run_dir) / REPEATS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [(int(s), Path(run_dir) / str(r)) for s, r in zip(data["seeds"], data["runs"], strict=True)]
    except (ValueError, KeyError, TypeError) as e:
        raise VisionpocError(
            f"{path} is not a readable list of repeats ({type(e).__name__}: {e}): restore it, or rerun the comparison"
        ) from e


def load_repeats(run_dir: Path) -> list[tuple[int, RunResults | None]]:
    """Each repeat's seed and results; None for a repeat that has not written its results yet."""
    repeats = read_repeats(run_dir)
    if repeats is None:
        raise VisionpocError(
            f"{Path(run_dir) / REPEATS_FILE} not found: {run_dir} is not a run with train.repeats > 1"
        )
    return [(seed, load_results(d) if (d / RESULTS_FILE).is_file() else None) for seed, d in repeats]


@dataclass
class Spread:
    """A figure across repeats: its values, mean and sample standard deviation (ddof=1; None for one value)."""

    values: list[float]
    mean: float
    std: float | None
    low: float
    high: float


def spread(values: list[float | None]) -> Spread | None:
    """The spread of the known, finite `values`; None when there is none."""
    known = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not known:
        return None
    a = np.asarray(known)
    return Spread(
        known, float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else None, float(a.min()), float(a.max())
    )
