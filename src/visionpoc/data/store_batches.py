"""Batches from the prepared store: where the store lives during training (`place`) and the iterator
that gathers a split's batches from it and augments them on the device (`StoreBatches`).

- Placement: on CUDA the whole store goes to GPU memory once when it fits with headroom for training;
  otherwise batches are gathered from the memory-mapped file by a background thread into pinned memory
  and copied without blocking. On the CPU the store stays a memory map.
- Transforms: `batch_train_transform` / `batch_eval_transform` wrap `gpu_aug` for whole uint8 batches
  (the per-image PIL transforms of the stream path are `augment.train_transform` / `eval_transform`).
- Loaders: `prepared_loaders` builds (or reuses) the shared store for a model's splits and gives the four
  passes a run needs over it (`split_batches`); `resident` keeps one GPU copy per process.
Building and caching the store live in `data/prepared.py`.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from visionpoc import distributed
from visionpoc.config import Config
from visionpoc.data import gpu_aug
from visionpoc.data.loaders import Loaders, default_workers
from visionpoc.data.prepared import PreparedStore, dataset_cache_dir, prepare_store
from visionpoc.data.sources import Split
from visionpoc.data.splits import Splits
from visionpoc.distributed import SINGLE, Dist, EpochSampler, derive_seed

log = logging.getLogger(__name__)

HEADROOM_GIB, HEADROOM_FRACTION = 16.0, 0.4  # GPU memory kept free for training when the store moves there


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether `nbytes` fit in the device's free memory with headroom left for training."""
    if device.type != "cuda":
        return False
    free, total = torch.cuda.mem_get_info(device)
    # memory the previous model left in PyTorch's cache is free to us too (mem_get_info counts it as used)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return nbytes + max(HEADROOM_GIB * 2**30, HEADROOM_FRACTION * total) <= free


def place(images: np.ndarray, device: torch.device) -> torch.Tensor | np.ndarray:
    """The store on `device` (uploaded in chunks) when it fits there, else the host memory map."""
    if not fits_on_device(int(images.nbytes), device):
        if device.type == "cuda":
            log.info("prepared store (%.2f GiB) streams from host memory", images.nbytes / 2**30)
        return images
    out = torch.empty(images.shape, dtype=torch.uint8, device=device)  # (N, 3, S, S)
    step = max(1, (256 << 20) // max(1, images[0].nbytes))
    for a in range(0, len(images), step):
        out[a : a + step].copy_(torch.from_numpy(np.array(images[a : a + step])))
    log.info("prepared store (%.2f GiB) is resident on %s", images.nbytes / 2**30, device)
    return out


Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class StoreBatches:
    """Batches of one split from the store: gather rows, transform them on `device`, yield (x, y).

    x: float32 (B, 3, H, W) normalized; y: int64 (B,). The order and this process's shard come from
    `sampler` (the stream path's EpochSampler: `loaders.set_epoch` moves it to an epoch or skips the
    batches a resumed run did). Batch k of an epoch is augmented with a CPU generator seeded by
    (seed, epoch, rank, k): the same crops on every device, and exactly again after a resume."""

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        rows: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        transform: Transform,
        device: torch.device,
        sampler: EpochSampler,
        drop_last: bool = False,
    ) -> None:
        self.images, self.rows, self.labels = images, np.asarray(rows), np.asarray(labels, dtype=np.int64)
        self.batch_size, self.transform, self.device = batch_size, transform, device
        self.sampler, self.drop_last = sampler, drop_last

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _generator(self, k: int) -> torch.Generator:
        s = self.sampler
        return torch.Generator().manual_seed(derive_seed(s.seed, s.epoch, s.d.rank, k))

    def _fetch_host(self, pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(self.images, np.ndarray)
        x = torch.from_numpy(self.images[self.rows[pos]])  # (B, 3, S, S) uint8, a copy off the map
        y = torch.from_numpy(self.labels[pos])  # (B,)
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = np.fromiter(iter(self.sampler), dtype=np.int64)  # this rank's positions in the split
        first = self.sampler.start // self.batch_size  # batches of this epoch done before a resume
        batches = [order[k * self.batch_size : (k + 1) * self.batch_size] for k in range(len(self))]
        if isinstance(self.images, torch.Tensor):  # resident: gather on the device
            rows = torch.from_numpy(self.rows).to(self.device)
            labels = torch.from_numpy(self.labels).to(self.device)
            for k, pos in enumerate(batches):
                idx = torch.from_numpy(pos).to(self.device, non_blocking=True)  # (B,)
                yield self.transform(self.images[rows[idx]], self._generator(first + k)), labels[idx]
            return
        if self.device.type != "cpu":  # streamed to a GPU: gather k+1 on a thread while the GPU does k
            with ThreadPoolExecutor(1, thread_name_prefix="store-prefetch") as pool:
                ahead = pool.submit(self._fetch_host, batches[0]) if batches else None
                for k in range(len(batches)):
                    assert ahead is not None
                    x, y = ahead.result()
                    ahead = pool.submit(self._fetch_host, batches[k + 1]) if k + 1 < len(batches) else None
                    x = self.transform(x.to(self.device, non_blocking=True), self._generator(first + k))
                    yield x, y.to(self.device, non_blocking=True)
            return
        # on the CPU the transform is the work: whole batches on a thread each (roi_align, the gather and
        # the tensor ops release the GIL), yielded in order; batch k's crops depend on k only
        workers = max(1, torch.get_num_threads())
        with ThreadPoolExecutor(workers, thread_name_prefix="store-batches") as pool:
            pending: deque[Future[tuple[torch.Tensor, torch.Tensor]]] = deque()
            for k in range(len(batches) + workers):
                if k < len(batches):
                    pending.append(pool.submit(self._cpu_batch, batches[k], first + k))
                if k >= workers:
                    yield pending.popleft().result()

    def _cpu_batch(self, pos: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._fetch_host(pos)
        return self.transform(x, self._generator(k)), y


def batch_train_transform(data_cfg: dict[str, Any], rand_augment: bool = False) -> Transform:
    return lambda x, g: gpu_aug.train_batch(x, data_cfg, g, rand_augment=rand_augment)


def batch_eval_transform(data_cfg: dict[str, Any]) -> Transform:
    return lambda x, g: gpu_aug.eval_batch(x, data_cfg)


# --------------------------------------------------------------------------------------------- loaders


def split_batches(
    store: PreparedStore,
    images: torch.Tensor | np.ndarray,
    split: Split,
    transform: Transform,
    batch_size: int,
    device: torch.device,
    train: bool,
    seed: int = 0,
    d: Dist = SINGLE,
) -> StoreBatches:
    """StoreBatches over `split`: shuffled and without a last short batch for training, in order for eval."""
    sampler = EpochSampler(len(split), seed, d, shuffle=train)
    rows = store.rows([split.root / f for f in split.files])
    return StoreBatches(
        images,
        rows,
        split.labels,
        batch_size,
        transform,
        device,
        sampler,
        drop_last=train and len(sampler) > batch_size,
    )


_RESIDENT: dict[tuple[str, str], torch.Tensor] = {}  # the last store placed on a GPU, by (store key, device)


def resident(store: PreparedStore, device: torch.device) -> torch.Tensor | np.ndarray:
    """The store on `device` when it fits there (else its host memory map), uploaded once per process:
    the models of a `compare` and the trials of a `tune` share one GPU copy. A different store
    replaces it (its GPU memory is released first)."""
    if device.type != "cuda":
        return store.images
    key = (store.key, str(device))
    if key not in _RESIDENT:
        _RESIDENT.clear()  # its memory goes back to PyTorch's cache, which `place` counts as free
        images = place(store.images, device)
        if not isinstance(images, torch.Tensor):
            return images
        _RESIDENT[key] = images
    return _RESIDENT[key]


def prepared_loaders(
    splits: Splits, data_cfg: dict[str, Any], cfg: Config, device: torch.device, d: Dist = SINGLE
) -> Loaders:
    """Loaders for one model over the shared prepared store (built on first use, then reused)."""
    parts = (splits.train, splits.val, splits.test)
    paths = [s.root / f for s in parts if s.shards is None for f in s.files]
    streamed = [s for s in parts if s.shards is not None]  # a webdataset training split: read from its shards once
    size = cfg.data.prepared_size
    if size < max(data_cfg["input_size"][-2:]):
        log.warning(
            "data.prepared_size=%d is below the model's input size %s: crops are upsampled",
            size,
            tuple(data_cfg["input_size"][-2:]),
        )
    cache = dataset_cache_dir(cfg, splits)
    if not d.main:  # rank 0 builds (for longer than the collective timeout, maybe); the others wait, then reuse it
        distributed.wait_for_main(d)
    store = prepare_store(paths, size, cache, default_workers(cfg.data), streamed)
    if d.main:
        distributed.wait_for_main(d)
    images = resident(store, device)
    bs = cfg.train.batch_size // d.world  # train.batch_size is the global batch
    ebs = cfg.train.eval_batch_size or 2 * bs
    et = batch_eval_transform(data_cfg)
    aug = cfg.train.augment  # `none`: shuffled, not augmented; `strong`: RandAugment on the batch too
    tt = et if aug == "none" else batch_train_transform(data_cfg, rand_augment=aug == "strong")
    seed = cfg.train.seed
    return Loaders(
        train=split_batches(store, images, splits.train, tt, bs, device, True, seed, d),
        train_eval=split_batches(store, images, splits.train, et, ebs, device, False, seed, d),
        val=split_batches(store, images, splits.val, et, ebs, device, False, seed, d),
        test=split_batches(store, images, splits.test, et, ebs, device, False, seed, d),
        pipeline="prepared",
        resident_bytes=images.nbytes if isinstance(images, torch.Tensor) else 0,
    )
