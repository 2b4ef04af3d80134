"""Data parallelism on PyTorch's own engine: process-group set-up under torchrun (NCCL on GPUs,
gloo on the CPU), the epoch sampler every run uses (sharded when there are several processes), and
exact distributed evaluation (no padding: every sample is scored exactly once, then gathered).

`train.batch_size` is the GLOBAL batch: each of the `world` processes takes `batch_size / world`
samples a step, and the learning rate applies to the global batch unchanged (no scaling rule).

A failed rank is coordinated: collectives time out after `VISIONPOC_DIST_TIMEOUT_S` seconds (not
PyTorch's 30 minutes), every rank beats a counter in torchrun's store (`Heartbeat`), and a failed
collective is turned into a message naming the ranks whose beat stopped (`peer_failure`). Work that
rank 0 does alone (a download, building the prepared store) is waited for as long as its beat goes on
(`wait_for_main`), not the collective timeout.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from visionpoc.errors import ConfigError, RankLost

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
        timeout = collective_timeout_s()
        dist.init_process_group(backend=backend, timeout=dt.timedelta(seconds=timeout))
        log.info("process group: %s, rank %d of %d, collective timeout %gs", backend, d.rank, d.world, timeout)
        if backend == "nccl":
            _control_group()
        Heartbeat.start(d)
        if d.main:
            _warn_shared_store()
    return d


def _warn_shared_store() -> None:
    """torchrun's agents share one store across restarts, and the process group's keys are not per attempt:
    restarted workers may read the previous attempt's addresses and fail to connect."""
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if restarts.isdigit() and int(restarts) > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        log.warning(
            "torchrun may restart these workers (--max-restarts %s) but shares its store across attempts, so "
            "restarted workers can read the last attempt's addresses and fail to connect: start torchrun with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment (docs/operations.md)",
            restarts,
        )


TIMEOUT_ENV = "VISIONPOC_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0  # long enough for a slow step or a first compilation; PyTorch's gloo default is 30 min


def collective_timeout_s() -> float:
    """How long a collective waits for the other ranks before it fails: `VISIONPOC_DIST_TIMEOUT_S`."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 10**6:
        raise ConfigError(
            f"{TIMEOUT_ENV}={raw!r}: give the seconds a collective may wait for the other processes, "
            f"e.g. {TIMEOUT_ENV}={DEFAULT_TIMEOUT_S:g} (the default)"
        )
    return value


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
    Heartbeat.stop()
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
        _CONTROL.clear()


# ------------------------------------------------------------------------- a failed rank, named

BEAT_S = 1.0  # each rank's heartbeat period
LOST_AFTER_S = 4.0  # after a failed collective: a rank whose beat did not move for this long is lost
MAIN_LOST_AFTER_S = 60.0  # while the others wait for rank 0's work alone: its beat stopped this long
COLLECTIVE_SIGNS = (
    "gloo",
    "NCCL",
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "pair closure",
)


class Heartbeat:
    """Each rank adds 1 to its own counter in the rendezvous store (`MASTER_ADDR:MASTER_PORT`: the store
    torchrun's agent holds, or rank 0 without torchrun) once a second, from a thread: a rank whose
    counter stops has died or lost its host, whatever its main thread is doing. Keys are per run and per
    attempt (rank 0's nonce); each thread has its own store client."""

    running: Heartbeat | None = None

    def __init__(self, d: Dist, host: str, port: int, attempt: str) -> None:
        self.d, self.host, self.port = d, host, port
        self.prefix = f"visionpoc/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{attempt}"
        self.waits = 0  # `wait_for_main` calls so far: the same count on every rank
        self.done = threading.Event()
        self.client = self.connect()  # the main thread's
        self.thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def connect(self) -> Any:
        timeout = dt.timedelta(seconds=10)
        return dist.TCPStore(self.host, self.port, is_master=False, timeout=timeout, wait_for_workers=False)

    def key(self, rank: int) -> str:
        return f"{self.prefix}/beat/{rank}"

    @classmethod
    def start(cls, d: Dist) -> None:
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if cls.running is not None or not (host and port):
            return
        # this attempt's keys, the same on every rank (an agent restarted for another node's failure keeps
        # its TORCHELASTIC_RESTART_COUNT, so that cannot tell attempts apart)
        box = [f"{time.time_ns()}-{os.getpid()}"]
        dist.broadcast_object_list(box, src=0, group=_CONTROL[0] if _CONTROL else None)
        beat: Heartbeat | None = None
        try:
            beat = cls(d, host, int(port), box[0])
        except (RuntimeError, ValueError) as e:
            log.warning("no heartbeat through the store at %s:%s (%s): a lost rank will not be named", host, port, e)
        if broadcast_flag(d, beat is None) or beat is None:  # every rank beats, or none (`wait_for_main`)
            return
        beat.thread.start()
        cls.running = beat

    @classmethod
    def stop(cls) -> None:
        if cls.running is not None:
            cls.running.done.set()
            cls.running = None

    def _beat(self) -> None:
        store = None
        while not self.done.is_set():
            try:
                store = store or self.connect()
                store.add(self.key(self.d.rank), 1)
            except RuntimeError:  # the store's host is gone: the main thread learns it at its next collective
                store = None
            self.done.wait(BEAT_S)

    def counts(self) -> list[int]:
        """Every rank's beats so far (the main thread's client)."""
        return [int(self.client.add(self.key(r), 0)) for r in range(self.d.world)]

    def lost(self, window_s: float | None = None) -> list[int]:
        """The other ranks whose beat did not move in `window_s` seconds (`LOST_AFTER_S`)."""
        before = self.counts()
        time.sleep(LOST_AFTER_S if window_s is None else window_s)
        after = self.counts()
        return [r for r in range(self.d.world) if r != self.d.rank and after[r] == before[r]]


def peer_failure(d: Dist, e: BaseException) -> str | None:
    """What the error `e` of a run of several ranks means when it is a failed collective (by its type or
    text) or when another rank's heartbeat stopped (gloo's messages vary): the lost ranks, named. None
    for any other error (this rank's own failure, e.g. a bug in a model)."""
    if not d.enabled or not isinstance(e, RuntimeError):
        return None
    text = str(e).strip()
    collective = isinstance(e, dist.DistError) or any(sign in text for sign in COLLECTIVE_SIGNS)
    first = text.splitlines()[0] if text else type(e).__name__
    beat = Heartbeat.running
    if beat is None:
        return f"another rank stopped answering: rank {d.rank} stops too ({first})" if collective else None
    try:
        lost = beat.lost()
    except RuntimeError:  # the store went with its host
        where = f"the rendezvous store at {beat.host}:{beat.port}"
        return f"{where} no longer answers, so the host that holds it is lost: rank {d.rank} stops too ({first})"
    if not lost:
        return (
            f"a collective broke off while every rank still beats (one may be stuck) ({first})" if collective else None
        )
    ranks = ", ".join(str(r) for r in lost)
    who = (
        f"rank {ranks} of {d.world} is lost (its process ended or its host is unreachable)"
        if len(lost) == 1
        else f"ranks {ranks} of {d.world} are lost (their processes ended or their hosts are unreachable)"
    )
    return f"{who}: rank {d.rank} stops too ({first})"


def wait_for_main(d: Dist) -> None:
    """A barrier after work that rank 0 does alone (a download, building the prepared store): the others
    wait for as long as it takes while rank 0's heartbeat goes on, not the collective timeout. Called on
    every rank at the same point: rank 0 after its work, the others before theirs."""
    beat = Heartbeat.running
    if d.enabled and beat is not None:
        beat.waits += 1
        key = f"{beat.prefix}/main-done/{beat.waits}"
        if d.main:
            beat.client.set(key, "1")
        else:
            last, since = beat.counts()[0], time.monotonic()
            while not beat.client.check([key]):
                time.sleep(BEAT_S)
                now = beat.counts()[0]
                if now != last:
                    last, since = now, time.monotonic()
                elif time.monotonic() - since > MAIN_LOST_AFTER_S:
                    raise RankLost(
                        f"rank 0 of {d.world} is lost: its heartbeat stopped for {MAIN_LOST_AFTER_S:g}s while "
                        f"rank {d.rank} waited for its work alone (reading the data or building the prepared store)"
                    )
    barrier(d)
