"""Checkpoints: model weights as safetensors (with the timm name and class count as metadata), and
optimizer/scheduler state as a weights-only torch file. Writes are atomic; loading a truncated or
mismatched file is a clear error, never a silent restart."""

from __future__ import annotations

import logging
import pickle
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from visionpoc.errors import CheckpointError
from visionpoc.runfiles import atomic_copy, atomic_write, is_disk_full

BEST = "best.safetensors"  # best-on-validation weights: the ones scored on test
LAST = "last.safetensors"  # weights at the last save (epoch end or interruption)
STATE = "last_state.pt"  # optimizer, scheduler, RNG and loop state matching LAST

log = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def save_weights(model: nn.Module, path: Path, meta: dict[str, str]) -> None:
    _write_weights({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}, path, meta)


def _write_weights(state: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    """`state` (host tensors) as a safetensors file at `path`, atomically."""
    state = {k: v.contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def _host_copy(obj: Any) -> Any:
    """`obj` with every tensor copied to host memory (a snapshot the training can no longer change)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v) for v in obj)
    return obj


class Writer:
    """Checkpoint writes off the training's path: each call snapshots what it saves to host memory at
    once, then one background thread writes the files in call order (atomically, as above). `wait()`
    (and leaving the `with` block) returns when everything asked for is on disk, re-raising a failed
    write. A crash before then leaves the previous files, whole."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._pending: list[Future[Any]] = []

    def weights(self, model: nn.Module, path: Path, meta: dict[str, str]) -> None:
        state = _host_copy(unwrap(model).state_dict())
        self._submit(lambda: _write_weights(state, path, meta))

    def state(self, path: Path, state: dict[str, Any]) -> None:
        snapshot = _host_copy(state)
        self._submit(lambda: save_state(path, snapshot))

    def copy(self, src: Path, dst: Path) -> None:
        """`dst` as the same bytes as `src` once the writes before this call are done (a hard link)."""
        self._submit(lambda: atomic_copy(src, dst))

    def _submit(self, fn: Any) -> None:
        self._pending.append(self._pool.submit(fn))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.wait()
        except Exception as e:
            if exc_type is None:
                raise
            if is_disk_full(e):  # the message names the file and the space; no traceback
                log.error("a checkpoint write failed while the run was already stopping: %s", e)
            else:
                log.exception("a checkpoint write failed while the run was already stopping")
        finally:
            self._pool.shutdown(wait=True)


def read_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({e}): it is truncated or not safetensors") from e


def load_weights(model: nn.Module, path: Path, expect: dict[str, str] | None = None) -> None:
    """Load `path` into `model`; `expect` metadata (e.g. timm name, num_classes) must match."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    meta = read_meta(path)
    for k, v in (expect or {}).items():
        if k in meta and meta[k] != v:
            raise CheckpointError(f"checkpoint {path} was saved for {k}={meta[k]!r}, not {v!r}: wrong run or model")
    try:
        state = load_file(str(path))
        unwrap(model).load_state_dict(state, strict=True)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({e}): it is truncated or corrupt") from e
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {str(e)[:500]}") from e


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Optimizer/scheduler/RNG state (tensors and plain containers only)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any]:
    """The state saved by `save_state`, unpickled with `weights_only=True`: tensors and plain containers
    only, so a file holding any other object (whose unpickling could run code) is refused, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError for damaged files
        # the weights-only unpickler names the global it refused ("... GLOBAL posix.system ...")
        refused = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln]
        if isinstance(e, pickle.UnpicklingError) and refused:
            raise CheckpointError(
                f"training state {path} holds objects other than tensors and plain containers, so visionpoc "
                f"did not write it: refused without unpickling them ({refused[0].split('. ')[0].rstrip('.')[:200]}); "
                "resume from a run's own checkpoint, or start a fresh run"
            ) from e
        raise CheckpointError(f"training state {path} is unreadable ({e}): truncated or not ours") from e
