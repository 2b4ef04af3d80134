"""Loaders: the streaming input path (decode JPEGs with PIL in DataLoader workers, timm transforms)
and the choice between it and the prepared-store fast path.

Every loader yields `(images, targets)`: float images normalized with the model's own mean/std,
(B, 3, H, W), and int64 targets (B,). Train batches are shuffled with a seeded generator and
augmented (per-image transforms from `data/augment.py`; its batch ops, mixup/cutmix and erasing, run
in the training step for both paths); evaluation batches keep the split's order, so predictions line up
with its files.

A training split streamed from tar shards (`data.source: webdataset`) is read by
`data/shard_stream.py` instead, on the `stream` pipeline; `data.pipeline: prepared` reads the shards
once into the prepared store (`data/prepared.py`) and trains from it like any other source.

Each training image's augmentation is seeded by (train.seed, epoch, sample index) alone: it does not
depend on the number of DataLoader workers, on which process (rank) draws the sample, or on where a
resumed run restarts, so an interrupted and resumed run augments exactly like an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from visionpoc.config import Config, DataConfig
from visionpoc.data.augment import eval_transform as eval_transform  # re-exported: bench, tests
from visionpoc.data.augment import train_transform as train_transform
from visionpoc.data.images import load_rgb
from visionpoc.data.sources import Split
from visionpoc.data.splits import Splits
from visionpoc.distributed import SINGLE, Dist, EpochSampler, derive_seed, rank_seed
from visionpoc.recovery import shield_worker

log = logging.getLogger(__name__)


class Batches(Protocol):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def __len__(self) -> int: ...


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one training sample's augmentation in one epoch (64 bits)."""
    return derive_seed(seed, epoch, index)


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Python, NumPy and torch (CPU) seeded with `seed` inside: the transforms draw from these global
    generators. In the main process (`num_workers: 0`) they are restored after, since the training
    stream (dropout, mixup) must not see the draws; a worker has no other draw to protect. Only torch's
    CPU generator is seeded (the transforms run on the CPU): `torch.manual_seed` would also queue a seed
    for every accelerator, with a stack trace each time while CUDA is uninitialized (a worker), about
    half of a small photo's cost, and would reseed a live GPU generator."""
    if torch.utils.data.get_worker_info() is not None:  # a DataLoader worker: no other draw to protect
        _seed_cpu_streams(seed)
        yield
        return
    py, npy = random.getstate(), np.random.get_state()  # NumPy's state costs ~60 us to save and restore
    with torch.random.fork_rng(devices=[]):
        _seed_cpu_streams(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _seed_cpu_streams(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)


class ImageDataset(torch.utils.data.Dataset):
    """Decodes `split`'s files to RGB (errors name the file) and applies `transform`.

    With `seed` set (training), items are asked for as (index, epoch) and each is transformed under
    `sample_seed(seed, epoch, index)`."""

    def __init__(self, split: Split, transform: Any, seed: int | None = None) -> None:
        self.split = split
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, epoch = key if isinstance(key, tuple) else (key, None)
        img = load_rgb(self.split.path(i))
        if self.seed is None or epoch is None:
            return self.transform(img), int(self.split.labels[i])
        with seeded_rngs(sample_seed(self.seed, epoch, i)):
            return self.transform(img), int(self.split.labels[i])


class AugmentSampler(EpochSampler):
    """EpochSampler for training: yields (index, epoch), so that the dataset seeds each sample itself
    (exact across worker counts, persistent workers and mid-epoch resumes)."""

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        return ((i, self.epoch) for i in self.indices()[self.start :])


def _seed_worker(worker_id: int) -> None:
    # Ctrl-C and SIGTERM sent to the whole process group (a terminal, `timeout`, Slurm) reach the workers
    # too: the main process stops at a step boundary and ends its workers; a worker that died of the
    # signal first would turn a clean stop into a loader crash
    shield_worker()
    seed = torch.initial_seed() % 2**32  # torch already derives a distinct seed for each worker
    np.random.seed(seed)
    random.seed(seed)


def default_workers(data: DataConfig) -> int:
    """`data.num_workers`, or min(8, CPUs) when it is null."""
    if data.num_workers is not None:
        return data.num_workers
    return min(8, os.cpu_count() or 1)


def stream_loader(
    split: Split,
    transform: Any,
    batch_size: int,
    shuffle: bool,
    cfg: Config,
    device: torch.device,
    d: Dist = SINGLE,
    every_epoch: bool = False,
) -> DataLoader:
    """A DataLoader over this process's shard of `split` (EpochSampler: seeded per epoch, resumable).
    `every_epoch` loaders (train, val) keep their workers alive between passes; one-pass loaders don't."""
    workers = default_workers(cfg.data)
    seed = cfg.train.seed
    sampler = (AugmentSampler if shuffle else EpochSampler)(len(split), seed, d, shuffle=shuffle)
    return DataLoader(
        ImageDataset(split, transform, seed if shuffle else None),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=shuffle and len(sampler) > batch_size,  # no 1-image batch for BatchNorm to choke on
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0 and every_epoch,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(rank_seed(seed, d.rank)),  # workers' base seeds
    )


def set_epoch(batches: Batches, epoch: int, skip_batches: int = 0) -> None:
    """Point a train loader at `epoch`'s permutation, skipping the batches a resumed run already did."""
    sampler = getattr(batches, "sampler", None)
    if hasattr(batches, "set_epoch"):  # streamed from shards (`shard_stream.StreamBatches`)
        batches.set_epoch(epoch, skip_batches)
    elif isinstance(sampler, EpochSampler):
        bs = getattr(batches, "batch_size", None) or 1
        sampler.epoch, sampler.start = epoch, skip_batches * bs


@dataclass
class Loaders:
    """The four passes a run needs. `train_eval` is train without augmentation (the original PoC's train acc)."""

    train: Batches
    train_eval: Batches
    val: Batches
    test: Batches
    pipeline: str
    resident_bytes: int = 0  # the prepared store's GPU copy, when it lives on the device


def resolve_pipeline(cfg: Config, device: torch.device, streamed: bool = False) -> str:
    """`data.pipeline`, with `auto` resolved: `prepared` on CUDA, else `stream`. A training split `streamed`
    from tar shards stays streamed under `auto` (shards say the data is large: the store would copy it
    all, decoded, to disk); `prepared` set explicitly builds its store by reading the shards once."""
    if cfg.data.pipeline == "auto":
        return "prepared" if device.type == "cuda" and not streamed else "stream"
    return cfg.data.pipeline


def build_loaders(
    splits: Splits, data_cfg: dict[str, Any], cfg: Config, device: torch.device, d: Dist = SINGLE
) -> Loaders:
    """Loaders for one model (its own input size and normalization) over the shared splits."""
    streamed = splits.train.shards is not None
    pipeline = resolve_pipeline(cfg, device, streamed)
    if pipeline == "prepared":
        from visionpoc.data.store_batches import prepared_loaders

        return prepared_loaders(splits, data_cfg, cfg, device, d)
    bs = cfg.train.batch_size // d.world  # train.batch_size is the global batch
    ebs = cfg.train.eval_batch_size or 2 * bs
    tt, et = train_transform(data_cfg, cfg.train.augment), eval_transform(data_cfg)
    if streamed:  # read from the shards, never copied to disk
        from visionpoc.data.shard_stream import stream_batches

        train: Batches = stream_batches(splits.train, tt, bs, True, cfg, device, d)
        train_eval: Batches = stream_batches(splits.train, et, ebs, False, cfg, device, d)
    else:
        train = stream_loader(splits.train, tt, bs, True, cfg, device, d, every_epoch=True)
        train_eval = stream_loader(splits.train, et, ebs, False, cfg, device, d)
    return Loaders(
        train=train,
        train_eval=train_eval,
        val=stream_loader(splits.val, et, ebs, False, cfg, device, d, every_epoch=True),
        test=stream_loader(splits.test, et, ebs, False, cfg, device, d),
        pipeline="stream",
    )
