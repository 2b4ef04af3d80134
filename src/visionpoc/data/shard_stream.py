"""Training straight from tar shards: a split whose samples live in webdataset shards (`Split.shards`,
see `data/shards.py`) is read by streaming, never copied to disk.

Each pass reads whole shards with webdataset's tar reader. Shards are split by rank, then by DataLoader
worker: a seeded permutation of the shards per (train.seed, epoch), the same on every rank, gives rank r
the shards r, r + world, ...; each worker of that rank takes every n-th of those. A worker shuffles its
samples' (still encoded) bytes in a seeded buffer of `SHUFFLE_BUFFER` samples, then decodes each
(`images.decode_rgb`: the same bounds, modes and EXIF handling as a file) and augments it seeded by
(train.seed, epoch, sample index), as `ImageDataset` does: a sample is augmented the same whichever rank
or worker reads it. The order itself depends on the number of processes and of workers.

The split's size is known up front (the shards' index), so every rank runs the same number of steps
per epoch: floor(N / world / batch) batches. A rank whose shards hold more samples than that drops the
rest of its stream for this epoch; one whose shards hold fewer reads its shards again (in another order)
to fill its last batches: a few samples are dropped or repeated per epoch, different ones each epoch.
A resumed run reads the interrupted epoch's stream again and discards the batches already trained on.

The clean pass over train (`train (clean)` in the results) streams too, unshuffled, each rank its own
shards: every sample is scored exactly once, and the batches record their sample indices so that the
distributed evaluation gathers them back in order.
"""

from __future__ import annotations

import functools
import logging
import os
import random
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from visionpoc.config import Config
from visionpoc.data.images import decode_rgb
from visionpoc.data.sources import Split
from visionpoc.distributed import SINGLE, Dist, derive_seed, rank_seed
from visionpoc.errors import DataError

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 512  # encoded samples each worker shuffles among (about 50 MB of JPEG photos)


class ShardSamples(IterableDataset):
    """This rank's samples of a streamed split for one pass: (image, label, index) in the split.

    `epoch` and `round` (a rank's re-read of its shards to fill an epoch) seed the shard order and the
    buffer; `transform` runs seeded per sample when `seed` is set (training)."""

    def __init__(self, split: Split, transform: Any, seed: int | None, d: Dist = SINGLE) -> None:
        if split.shards is None:
            raise ValueError("ShardSamples needs a split streamed from shards (Split.shards)")
        self.transform, self.seed, self.d = transform, seed, d
        self.index = {f: i for i, f in enumerate(split.files)}
        self.labels = split.labels
        holding = {shard_stem(f) for f in split.files}
        self.shards = [p for stem, p in sorted(split.shards.items()) if stem in holding]
        self.prefix = split.files[0].split("/")[0] if split.files else ""
        self.epoch, self.round = 0, 0
        if len(self.shards) < d.world:
            raise DataError(
                f"the {len(self.shards)} training shard(s) are fewer than the {d.world} processes: each process "
                f"streams whole shards; write the training split into at least {d.world} shards "
                "(webdataset.ShardWriter's maxcount)"
            )

    def rank_shards(self) -> list[Path]:
        """This rank's shards in this pass, in reading order."""
        order = list(self.shards)
        if self.seed is not None:
            random.Random(derive_seed(self.seed, self.epoch, self.round)).shuffle(order)
        return order[self.d.rank :: self.d.world]

    def per_shard(self) -> dict[str, int]:
        """The split's sample count in each shard (by stem)."""
        counts = dict.fromkeys((p.stem for p in self.shards), 0)
        for f in self.index:
            counts[shard_stem(f)] += 1
        return counts

    def rank_indices(self) -> list[int]:
        """The split indices this rank's shards hold (what an unshuffled pass yields, in some order)."""
        stems = {p.stem for p in self.rank_shards()}
        return sorted(i for f, i in self.index.items() if shard_stem(f) in stems)

    def _encoded(self, shards: list[Path]) -> Iterator[tuple[int, str, bytes]]:
        """(index, name, image bytes) of the split's samples in `shards`, in their stored order; the bytes
        of other members (labels, samples of other splits) are not read out."""
        for shard in shards:
            for file, name, data in shard_images(shard, self.prefix, self.index.__contains__):
                yield self.index[file], name, data

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int]]:
        info = torch.utils.data.get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        samples: Iterator[tuple[int, str, bytes]] = self._encoded(self.rank_shards()[wid::workers])
        if self.seed is not None:
            rng = random.Random(derive_seed(self.seed, self.epoch, self.round, self.d.rank, wid))
            samples = _buffer_shuffle(samples, rng, SHUFFLE_BUFFER)
        from visionpoc.data.loaders import sample_seed, seeded_rngs

        for i, name, data in samples:
            img = decode_rgb(data, name)
            if self.seed is None:
                x = self.transform(img)
            else:  # a repeated read (`round`) of a sample in one epoch is augmented afresh
                seed = sample_seed(self.seed, self.epoch, i)
                with seeded_rngs(derive_seed(seed, self.round) if self.round else seed):
                    x = self.transform(img)
            yield x, int(self.labels[i]), i  # outside `seeded_rngs`: the consumer's draws stay its own


def shard_stem(file: str) -> str:
    """The shard that holds a streamed split's `file` (`<split>/<shard stem>/<key>.<ext>`, as
    `shards.scan_shard` names it): its stem."""
    return file.split("/")[1]


def shard_images(shard: Path, split: str, wanted: Callable[[str], bool]) -> Iterator[tuple[str, str, bytes]]:
    """(file, name, image bytes) of the images in `shard` whose split file (`<split>/<shard stem>/<key>.<ext>`,
    as `shards.scan_shard` names them) is `wanted`, in their stored order; `name` says where it is (errors).
    The bytes of the other members (labels, unwanted images) are skipped, not read out."""
    from visionpoc.data.shards import _wds

    tar = _wds().tariterators
    which = functools.partial(_member_file, f"{split}/{shard.stem}/")
    members = tar.url_opener([{"url": str(shard)}])

    def keep(fname: str) -> bool:
        file = which(fname)
        return file is not None and wanted(file)

    for f in tar.tar_file_expander(members, select_files=keep, eof_value=None):
        yield str(which(f["fname"])), f"{shard.name}:{f['fname']}", f["data"]


def undecodable_samples(split: Split, workers: int = 1) -> list[str]:
    """The error of every image of a streamed `split` that does not decode (all of them), each shard read
    once, `workers` shards at a time, with a progress bar (`images.undecodable` for files)."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    assert split.shards is not None, "a split streamed from tar shards"
    files: dict[str, set[str]] = {}
    for f in split.files:
        files.setdefault(shard_stem(f), set()).add(f)
    tasks = [(split.shards[stem], split.files[0].split("/")[0], frozenset(fs)) for stem, fs in sorted(files.items())]
    bar = tqdm(total=len(split), desc=f"decoding {len(split)} images in {len(tasks)} shards", unit="img", disable=None)
    errors: list[str] = []
    with ProcessPoolExecutor(min(workers, len(tasks))) if workers > 1 and len(tasks) > 1 else nullcontext() as pool:
        for n, errs in pool.map(_decode_errors, tasks) if pool else map(_decode_errors, tasks):
            bar.update(n)
            errors += errs
    bar.close()
    return errors


def _decode_errors(task: tuple[Path, str, frozenset[str]]) -> tuple[int, list[str]]:
    shard, split, wanted = task
    n, errors = 0, []
    for _, name, data in shard_images(shard, split, wanted.__contains__):
        n += 1
        try:
            decode_rgb(data, name)
        except DataError as e:
            errors.append(str(e))
    if n != len(wanted):
        errors.append(f"shard {shard}: {len(wanted) - n} indexed image(s) not found in it (changed since?)")
    return len(wanted), errors


def _member_file(head: str, fname: str) -> str | None:
    """The split file of a shard member (`head` names the split and shard), or None for one that is not an image."""
    from webdataset.tariterators import base_plus_ext

    from visionpoc.data.shards import IMAGE_KEYS

    prefix, ext = base_plus_ext(fname)
    if not ext or ext.lower() not in IMAGE_KEYS:
        return None
    return os.path.normpath(f"{head}{prefix}.{ext.lower()}")  # as `shards.scan_shard` names it (`./key.jpg`)


def _buffer_shuffle(items: Iterator[Any], rng: random.Random, size: int) -> Iterator[Any]:
    """`items` shuffled within a buffer of `size` (webdataset's shuffle, seeded here)."""
    buf: list[Any] = []
    for x in items:
        buf.append(x)
        if len(buf) >= size:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class StreamBatches:
    """Batches of a streamed split (the `Batches` protocol): for training, exactly `len(self)` batches of
    `batch_size` on every rank (see the module docstring); for evaluation, one pass over this rank's
    shards. `indices()` (the `sampler` of `distributed.shard_of`) is this rank's sample order: the
    indices of the last full pass once read, else the set it will read."""

    def __init__(self, samples: ShardSamples, batch_size: int, train: bool, workers: int, pin: bool) -> None:
        self.samples, self.batch_size, self.train = samples, batch_size, train
        self.workers, self.pin = workers, pin
        self.per_rank = len(samples.index) // samples.d.world
        if train:
            self.batch_size = max(1, min(batch_size, self.per_rank))
        self.skip = 0
        self.read: list[int] | None = None
        self.sampler = self

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.samples.epoch, self.skip = epoch, skip_batches

    def full_batches(self) -> int:
        return self.per_rank // self.batch_size

    def __len__(self) -> int:
        if self.train:
            return max(0, self.full_batches() - self.skip)
        shards, n = self.samples.rank_shards(), self._workers()
        per_shard = self.samples.per_shard()
        return sum(
            -(-sum(per_shard[s.stem] for s in shards[w :: max(1, n)]) // self.batch_size) for w in range(max(1, n))
        )

    def _workers(self) -> int:
        return min(self.workers, len(self.samples.rank_shards()))

    def indices(self) -> list[int]:
        return list(self.read) if self.read is not None else self.samples.rank_indices()

    def _loader(self) -> DataLoader:
        n = self._workers()
        seed = self.samples.seed if self.samples.seed is not None else 0
        from visionpoc.data.loaders import _seed_worker

        return DataLoader(
            self.samples,
            batch_size=self.batch_size,
            num_workers=n,
            pin_memory=self.pin,
            worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(rank_seed(seed, self.samples.d.rank)),
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._train() if self.train else self._eval()

    def _eval(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        read: list[int] = []
        self.samples.round = 0
        for x, y, i in self._loader():
            read += i.tolist()
            yield x, y
        self.read = read

    def _train(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Full batches, re-chunked from the workers' (each ends its stream with a partial batch)."""
        todo, done, bs = self.full_batches(), 0, self.batch_size
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        have, read, self.samples.round = 0, [], 0
        while done < todo:
            got = 0
            for x, y, i in self._loader():
                parts.append((x, y, i))
                have, got = have + len(y), got + len(y)
                while have >= bs and done < todo:
                    xb, yb, ib = (torch.cat(t) for t in zip(*parts, strict=True))
                    parts = [(xb[bs:], yb[bs:], ib[bs:])]
                    have, done = have - bs, done + 1
                    if done > self.skip:  # a resumed epoch reads its first batches again, unused
                        read += ib[:bs].tolist()
                        yield xb[:bs], yb[:bs]
                if done >= todo:
                    break
            if got == 0:
                raise DataError("a streamed training pass read no sample from its shards; check the shards")
            self.samples.round += 1
        self.read = read


def stream_batches(
    split: Split, transform: Any, batch_size: int, train: bool, cfg: Config, device: torch.device, d: Dist = SINGLE
) -> StreamBatches:
    """Batches streamed from `split`'s shards: shuffled and augmented (`train`), or one clean pass."""
    from visionpoc.data.loaders import default_workers

    samples = ShardSamples(split, transform, cfg.train.seed if train else None, d)
    return StreamBatches(samples, batch_size, train, default_workers(cfg.data), device.type == "cuda")
