"""The files of a run: their names, and the atomic writes every file of ours goes through.

Names: the files in a run folder, and in a `visionpoc tune` folder: one spelling for the code that
writes them (compare, train, the report, tune) and the code that reads them (resume, the report, tracking,
serving). A model's checkpoints are named by `visionpoc.checkpoint` (BEST, LAST, STATE), and a repeat's
`seed-<s>/` folder by `visionpoc.repeats.repeat_dir`.

Atomic writes: write a temp file in the same folder, fsync, then rename over the target. A crash
mid-write leaves the old file (or none), never a half-written one that looks valid. A full disk (or quota)
raises `DiskFullError`, naming the file and the free space. Imports nothing of ours.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# RUN_DIR/ of `compare` or `train` (a run with repeats: RUN_DIR/ and each RUN_DIR/seed-<s>/)
CONFIG_FILE = "config.yaml"  # the resolved config; its presence marks a started run
RESULTS_FILE = "results.json"
RESULTS_CSV = "results.csv"  # one row per model, for a spreadsheet
REPEATS_FILE = "repeats.json"  # a run with repeats (`train.repeats`): the seeds, one whole run each
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
REPORT_FILES_DIR = "report_files"  # the report's figures as PNG files, for report.md
RUN_TUNING_DIR = "tuning"  # `compare --tuned`: the tuning records and figures the report shows
EXPORT_DIR = "export"  # `visionpoc export`'s default output folder

# RUN_DIR/<label>/: one model (its checkpoints: `visionpoc.checkpoint`)
PREDICTIONS_FILE = "test_predictions.npz"
HISTORY_FILE = "history.json"  # the learning curves, epoch by epoch
DATA_CONFIG_FILE = "data_config.json"  # the preprocessing the model was trained and scored with

# OUT/ of `visionpoc tune`
TUNED_DIR = "tuned"  # tuned/<label>.yaml: the best trial's settings
TUNE_SUMMARY_FILE = "tune_summary.json"  # also in RUN_DIR/tuning/
TUNE_PLOTS_DIR = "plots"  # plots/<label>_<kind>.png (`tuning_plot`); copied flat into RUN_DIR/tuning/
TUNE_PLOTS = ("history", "importance")  # the kinds of figure each study gets
TUNE_DB_FILE = "tune.db"  # the default Optuna storage (SQLite)
TRIALS_DIR = "trials"  # trials/<label>/<number>/: each trial's training folder


def tuned_file(label: str) -> str:
    """The name of model `label`'s file in `tuned/`."""
    return f"{label}.yaml"


def tuning_plot(label: str, kind: str) -> str:
    """The name of model `label`'s figure of `kind` (one of `TUNE_PLOTS`)."""
    return f"{label}_{kind}.png"


# Atomic writes

_UMASK = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give: the temp file's private 0600 is not kept


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write that found no space left (disk full or quota exceeded); the message names the file, the
    free space and what the file needed at least."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message alone, without OSError's `[Errno 28]`


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` is a write that ran out of disk space (or quota)."""
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def _disk_full(path: Path, written: int, e: OSError) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 1e6:,.1f} MB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        e.errno,
        f"no space left on the disk to write {path} ({free} in {path.parent}; the file needed more than "
        f"the {written / 1e6:,.1f} MB written when it failed): free at least that much there",
    )


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp_path)` then atomically move the temp file to `path` (with the usual permissions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
    except OSError as e:
        written = tmp_path.stat().st_size if tmp_path.exists() else 0
        tmp_path.unlink(missing_ok=True)
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise _disk_full(path, written, e) from e
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """`dst` becomes the same bytes as the finished file `src`: a hard link where the filesystem has
    them (nothing written again), else a copy; atomic either way. Files here are only ever replaced by
    rename, never rewritten in place, so a later replacement of `src` leaves `dst` as it is."""

    def write(tmp: Path) -> None:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    return atomic_write(dst, write)
