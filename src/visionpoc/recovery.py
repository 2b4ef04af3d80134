"""Surviving interruptions: SIGINT/SIGTERM become a stop request honoured at the next step boundary,
and the training state (RNG states included) is saved and restored so that a resumed run continues
exactly where the interrupted one stopped."""

from __future__ import annotations

import logging
import random
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
from visionpoc.errors import CheckpointError

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
    req = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield req
        return
    previous = {s: signal.signal(s, req) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield req
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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
        raise CheckpointError(
            f"{weights} and {state_path} are from different steps: the last save was cut off"
        )
    return state
