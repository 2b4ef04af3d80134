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

from visionpoc.errors import VisionpocError
from visionpoc.results import RunResults, load_results
from visionpoc.runfiles import REPEATS_FILE, RESULTS_FILE, atomic_write_json


def repeat_dir(seed: int) -> str:
    """The folder name of the repeat trained with `seed`."""
    return f"seed-{seed}"


def repeats_of(run_dir: Path) -> Path | None:
    """The run with repeats that `run_dir` is one seed of (its `seed-<s>` folders' parent), or None."""
    here = Path(run_dir).resolve()
    return here.parent if here.name.startswith("seed-") and (here.parent / REPEATS_FILE).is_file() else None


@dataclass
class Repeats:
    """What `repeats.json` records: the seeds, in order, and the models the command trained."""

    run_dir: Path
    seeds: list[int]
    labels: list[str] | None = None  # `train --model X`: [X]; None: every model of the config (`compare`)

    @property
    def dirs(self) -> list[Path]:
        """Each seed's run folder (always `run_dir/seed-<s>`: the file's own paths are not trusted)."""
        return [self.run_dir / repeat_dir(s) for s in self.seeds]

    def results(self) -> list[RunResults | None]:
        """Each seed's results; None for a seed that has not written its `results.json` yet."""
        return [load_results(d) if (d / RESULTS_FILE).is_file() else None for d in self.dirs]


def save_repeats(out_dir: Path, seeds: list[int], labels: list[str] | None = None) -> Path:
    """Write `OUT/repeats.json`: the seeds, their run folders and the models asked for."""
    data = {"seeds": seeds, "runs": [repeat_dir(s) for s in seeds], "labels": labels}
    return atomic_write_json(Path(out_dir) / REPEATS_FILE, data)


def read_repeats(run_dir: Path) -> Repeats | None:
    """The repeats listed in `run_dir/repeats.json`; None when there is no such file."""
    path = Path(run_dir) / REPEATS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        labels = data.get("labels")
        if labels is not None and not isinstance(labels, list):
            raise TypeError(f"labels must be a list or null, not {labels!r}")
        return Repeats(Path(run_dir), [int(s) for s in data["seeds"]], [str(x) for x in labels] if labels else None)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise VisionpocError(
            f"{path} is not a readable list of repeats ({type(e).__name__}: {e}): restore it, or let resuming "
            f"the run write it again (`visionpoc compare --resume {run_dir}`, or `visionpoc train --resume "
            f"{run_dir} --model LABEL` for a `train` run)"
        ) from e


def run_folders(run_dir: Path) -> list[Path]:
    """The run folders of `run_dir` to read results from: itself, or each finished repeat's (`train.repeats`)."""
    repeats = read_repeats(run_dir)
    return [run_dir] if repeats is None else [d for d in repeats.dirs if (d / RESULTS_FILE).is_file()]


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
    return Spread(known, float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else None, float(a.min()), float(a.max()))
