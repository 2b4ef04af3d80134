"""Surviving interruptions: SIGINT/SIGTERM become a stop request honoured at the next step boundary,
worker processes leave a signal sent to the whole process group to the main process (`shield_worker`),
and the training state (RNG states included) is saved and restored so that a resumed run continues
exactly where the interrupted one stopped. A resumed run keeps its saved config: only settings that do
not change the training (`RESUME_MAY_CHANGE`) may be overridden. A resume first removes the temp files
that a killed process left behind (`clean_orphan_temps`)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visionpoc import checkpoint
from visionpoc.config import Config, load_config, to_dict
from visionpoc.errors import CheckpointError, ConfigError, TrainingInterrupted
from visionpoc.repeats import repeat_dir, repeats_of
from visionpoc.runfiles import CONFIG_FILE
from visionpoc.typed import flat_keys

log = logging.getLogger(__name__)


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a request honoured at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum
        log.warning("%s received: stopping at the next step boundary", signal.Signals(signum).name)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """SIGINT and SIGTERM set the yielded `StopRequest` inside. A DataLoader worker that died after a stop
    was asked for (a second signal to the group) ends the block as an interruption, not as a failure."""
    req = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield req
        return
    previous = {s: signal.signal(s, req) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield req
    except RuntimeError as e:
        if req.signum is None or not str(e).startswith("DataLoader worker (pid"):
            raise
        raise TrainingInterrupted(
            f"{signal.Signals(req.signum).name} received, and a DataLoader worker ended before the next step "
            f"boundary ({e}): this model's last checkpoint stands"
        ) from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def shield_worker() -> None:
    """The initializer of a worker process (DataLoader, process pool): a signal sent to the whole process
    group is left to the main process, which stops at the next step boundary and then ends its workers.

    A terminal's Ctrl-C, `timeout`, Slurm, Kubernetes and `kill -- -PGID` signal every process of the
    group: a worker that died of it first would turn the clean stop into a loader crash (the model
    recorded as failed, no checkpoint). SIGINT is ignored. SIGTERM is taken by a thread (`sigwaitinfo`,
    which tells the sender): from the main process (a loader ending a worker that does not answer) the
    worker exits at once, as torch's own handler does; from anyone else the first is left to the main
    process, and a second ends the worker. Where `sigwaitinfo` is missing (macOS, Windows) SIGTERM keeps
    its default action."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = multiprocessing.parent_process()
    main_pid = parent.pid if parent is not None and parent.pid is not None else os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # from now on only the thread receives it
    threading.Thread(target=_take_sigterm, args=(main_pid,), name="sigterm", daemon=True).start()


def _take_sigterm(main_pid: int) -> None:
    asked = False
    while True:
        sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
        if sender == main_pid or asked:
            os._exit(0 if sender == main_pid else 128 + signal.SIGTERM)
        asked = True  # the group's signal: the main process got it too and will end this worker


def seed_streams(seed: int) -> None:
    """Seed the global streams the training draws from: Python's, NumPy's (32 bits) and torch's."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    name, keys, *rest = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def load_resume(out_dir: Path, model: nn.Module, meta: dict[str, str]) -> dict[str, Any] | None:
    """The saved training state of `out_dir`, with its weights loaded into `model`; None if no checkpoint."""
    state_path, weights = out_dir / checkpoint.STATE, out_dir / checkpoint.LAST
    if not state_path.exists() and not weights.exists():
        return None
    if not state_path.exists() or not weights.exists():
        raise CheckpointError(
            f"{out_dir}: one of {checkpoint.LAST} and {checkpoint.STATE} is missing; cannot resume this model"
        )
    state = checkpoint.load_state(state_path)
    checkpoint.load_weights(model, weights, meta)
    if checkpoint.read_meta(weights).get("step") != str(state.get("step")):
        raise CheckpointError(f"{weights} and {state_path} are from different steps: the last save was cut off")
    return state


# settings a resumed run may change: where the data is and how it is read, the device, compilation and
# tracking; everything else (batch size, epochs, LR, fine-tuning, ...) would mix with the saved schedule.
# A run with repeats may also change `train.repeats`: more seeds, or fewer down to the last one started.
RESUME_MAY_CHANGE = (
    "tracking.",
    "data.num_workers",
    "data.root",
    "data.download",
    "data.base_url",
    "train.device",
    "train.compile",
)


def _may_change(key: str) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in RESUME_MAY_CHANGE)


def _fewest_seeds(run_dir: Path, saved: Config) -> int | None:
    """The fewest `train.repeats` a resumed run with repeats may ask for: down to its last started seed
    (never 1: a single run's folder is laid out differently); None for a single run (no repeats)."""
    if saved.train.repeats < 2:
        return None
    started = [
        k + 1
        for k in range(saved.train.repeats)
        if (Path(run_dir) / repeat_dir(saved.train.seed + k) / CONFIG_FILE).is_file()
    ]
    return max(2, *started)


def resume_config(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The interrupted run's `config.yaml` with `overrides`; ConfigError if they change the training."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: --resume takes the folder of a run started by compare or train")
    parent = repeats_of(run_dir)
    if parent is not None:  # resumed alone, the other seeds and the report across them would be left behind
        raise ConfigError(f"{run_dir} is one seed of the repeats in {parent}: resume them all with --resume {parent}")
    cfg = load_config(path, overrides)
    saved_cfg = load_config(path)
    saved, new = flat_keys(to_dict(saved_cfg)), flat_keys(to_dict(cfg))
    changed = sorted(k for k in saved.keys() | new.keys() if saved.get(k) != new.get(k))
    fewest = _fewest_seeds(run_dir, saved_cfg)
    refused = [
        k
        for k in changed
        if not _may_change(k) and not (k == "train.repeats" and fewest is not None and cfg.train.repeats >= fewest)
    ]
    if refused:
        seeds = f" (train.repeats may go down to {fewest} here)" if "train.repeats" in refused and fewest else ""
        raise ConfigError(
            f"--resume {run_dir}: --set would change {', '.join(refused)} of the interrupted run, whose "
            f"optimizer and schedule were built for its saved settings. A resumed run may only change "
            f"{', '.join(a.rstrip('.') + ('.*' if a.endswith('.') else '') for a in RESUME_MAY_CHANGE)}, "
            f"and, in a run with repeats, train.repeats down to its last started seed{seeds}; to train with "
            f"other settings, start a new run: --config {path} --set ... --out NEW_DIR"
        )
    return cfg


ORPHAN_TEMP = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")
"""The temp files of `runfiles.atomic_write` (`.<name>.<8 random characters>.tmp`), left only by a process
killed mid-write (any other end removes or renames them)."""


def clean_orphan_temps(run_dir: Path) -> int:
    """Remove the atomic writes' temp files left under `run_dir` (its sub-folders included, symbolic links
    not followed) by a killed run; return how many. Call it before the resumed run writes anything."""
    removed = 0
    for folder, _, files in os.walk(run_dir, followlinks=False):
        for name in files:
            path = Path(folder) / name
            if ORPHAN_TEMP.fullmatch(name) and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("removed %d temp file(s) under %s left by the interrupted run", removed, run_dir)
    return removed


def resume_hint(command: str, run_dir: Path, label: str | None, world: int) -> str:
    """The command that resumes an interrupted `compare` or `train` run."""
    cmd = f"visionpoc {command} --resume {run_dir}" + (f" --model {label}" if command == "train" and label else "")
    if world > 1:
        cmd = f"torchrun <the same options> -m {cmd}"  # every process resumes its own shard
    return cmd
