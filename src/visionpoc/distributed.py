"""Data parallelism on PyTorch's own engine: process-group set-up under torchrun (NCCL on GPUs,
gloo on the CPU), the epoch sampler every run uses (sharded when there are several processes), and
exact distributed evaluation (no padding: every sample is scored exactly once, then gathered).

`train.batch_size` is the GLOBAL batch: each of the `world` processes takes `batch_size / world`
samples a step, and the learning rate applies to the global batch unchanged (no scaling rule).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only the main process writes results, checkpoints and the report."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


SINGLE = Dist()  # one process
MASK64 = 2**64 - 1


def derive_seed(*parts: int) -> int:
    """A 64-bit seed mixed from `parts` by NumPy's SeedSequence: distinct tuples give unrelated streams
    (a sum would not: seed 1 at epoch 2 would replay seed 2 at epoch 1)."""
    return int(np.random.SeedSequence([p & MASK64 for p in parts]).generate_state(1, np.uint64)[0])


def rank_seed(seed: int, rank: int) -> int:
    """Process `rank`'s own seed for its random streams (dropout, mixup, DataLoader workers): the
    ranks of one run draw different numbers, and no rank repeats another seed's stream."""
    return derive_seed(seed, rank)


def from_env() -> Dist:
    """Rank and world size from torchrun's environment variables (1 process when unset)."""
    return Dist(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def init(device_type: str) -> Dist:
    """Join the process group torchrun prepared (idempotent); a no-op for a single process."""
    d = from_env()
    if d.enabled and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(d.local_rank)
        dist.init_process_group(backend=backend)
        log.info("process group: %s, rank %d of %d", backend, d.rank, d.world)
        if backend == "nccl":
            _control_group()
    return d


_CONTROL: list[Any] = []  # the gloo group for host-side flags next to NCCL (made once, on every rank)


def _control_group() -> Any:
    """A gloo group for the per-step stop flag: on NCCL the flag would be a GPU tensor, and reading it
    back would synchronize the host with the GPU at every step."""
    if not _CONTROL:
        try:
            _CONTROL.append(dist.new_group(backend="gloo"))
        except Exception as e:  # noqa: BLE001 - no gloo here: the flag goes through NCCL, slower
            log.warning("no gloo group for control flags (%s); stop flags go through NCCL", e)
            _CONTROL.append(None)
    return _CONTROL[0]


def barrier(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.barrier()


def broadcast_flag(d: Dist, flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (for a stop request from one process)."""
    if not (d.enabled and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0])
    group = _CONTROL[0] if _CONTROL else None
    if group is None and dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def all_gather(d: Dist, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable objects, CPU side)."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def shard_of(batches: Any, n_total: int) -> list[int]:
    """The sample indices this process's evaluation batches hold (all of them without a sharded sampler)."""
    return list(getattr(getattr(batches, "sampler", None), "indices", lambda: range(n_total))())


def gather_in_order(d: Dist, shard: list[int], arrays: tuple[np.ndarray, ...], n_total: int) -> list[np.ndarray]:
    """Every process's rows of `arrays` (each indexed like `shard`), concatenated back into sample order;
    every sample is checked to be counted exactly once."""
    parts = all_gather(d, (shard, *arrays))
    index = np.concatenate([np.asarray(p[0], dtype=np.int64) for p in parts])
    if len(index) != n_total or len(np.unique(index)) != n_total:
        raise AssertionError(f"distributed evaluation counted {len(index)} samples for {n_total}")
    order = np.argsort(index)
    out = []
    for k in range(1, len(arrays) + 1):
        rows = [p[k] for p in parts if len(p[k])] or [parts[0][k]]  # an empty shard may lack the row shape
        out.append(np.concatenate(rows)[order])
    return out


class EpochSampler(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch, cut to a multiple of `world` and sharded by rank.

    With one process it is a plain seeded shuffle. Global batch i of a run with `world` processes
    holds exactly the samples of batch i of a single-process run with the same global batch, so the
    two runs see the same data. `start` skips the batches a resumed run already trained on.
    """

    def __init__(self, n: int, seed: int, d: Dist = SINGLE, shuffle: bool = True) -> None:
        self.n, self.seed, self.d, self.shuffle = n, seed, d, shuffle
        self.epoch = 0
        self.start = 0  # samples of this rank's shard to skip (resume mid-epoch)

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        if not self.shuffle:  # evaluation: every sample once, no padding, no drop
            return perm[self.d.rank :: self.d.world]
        usable = self.n - self.n % self.d.world
        return perm[:usable][self.d.rank :: self.d.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.start)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
        _CONTROL.clear()
