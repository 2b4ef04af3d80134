"""Training from webdataset shards by streaming (`data/shard_stream.py`), on shards the tests write.

The training images are never written to disk (only val and test are extracted); one epoch reads every
training sample exactly once; the order changes with the epoch and repeats with the seed; a resumed
epoch yields the tail of the uninterrupted one; `prepared` is refused for a streamed split; under
torchrun (2 processes, gloo) the ranks read disjoint halves that cover the split, in the same number
of batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_sources_more import _shards
from visionpoc.config import Config, DataConfig, TrainConfig
from visionpoc.data.loaders import build_loaders, resolve_pipeline, set_epoch
from visionpoc.data.shard_stream import ShardSamples, StreamBatches
from visionpoc.data.sources import Dataset, read_dataset
from visionpoc.data.splits import Splits, make_splits
from visionpoc.errors import ConfigError

pytest.importorskip("webdataset")
IMAGE_SUFFIXES = {".png", ".jpg"}


def mean_pixel(img: object) -> torch.Tensor:
    """A cheap stand-in transform: the image as a (1,) tensor, plus one random draw (the seeded augmentation)."""
    return torch.tensor([float(np.asarray(img).mean()) + torch.rand(()).item()])


def _read(root: Path, workers: int = 0, val_fraction: float = 0.25) -> tuple[Dataset, Splits]:
    opts = DataConfig(num_workers=workers, val_fraction=val_fraction)
    ds = read_dataset("webdataset", root, options=opts, seed=0)
    return ds, make_splits(ds, val_fraction, None, 0)


def _order(splits: Splits, epoch: int, seed: int = 0) -> list[int]:
    samples = ShardSamples(splits.train, mean_pixel, seed)
    samples.epoch = epoch
    return [i for _, _, i in samples]


def test_streamed_training_writes_no_training_image(tmp_path: Path) -> None:
    root = _shards(tmp_path / "shards", 3, {"train": 2})  # val and test carved out of the train shards
    ds, splits = _read(root)
    cfg = Config(data=DataConfig(num_workers=0, pipeline="auto"), train=TrainConfig(batch_size=4, device="cpu"))
    dcfg = {
        "input_size": (3, 16, 16),
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    loaders = build_loaders(splits, dcfg, cfg, torch.device("cpu"))
    set_epoch(loaders.train, 1)
    assert sum(len(y) for _, y in loaders.train) == len(loaders.train) * 4 > 0
    on_disk = {
        str(p.relative_to(q))
        for q in (root / ".visionpoc-cache").glob("shards-*")
        if q.is_dir()
        for p in q.rglob("*")
        if p.suffix in IMAGE_SUFFIXES
    }
    assert on_disk == set(splits.val.files) | set(splits.test.files)  # nothing of train
    assert not set(splits.train.files) & on_disk and len(splits.train) == 18 - len(on_disk)


def test_one_epoch_reads_every_training_sample_once(tmp_path: Path) -> None:
    _, splits = _read(_shards(tmp_path / "shards", 4, {"train": 3, "val": 1, "test": 1}), workers=2)
    n = len(splits.train)
    assert sorted(_order(splits, 1)) == list(range(n))
    samples = ShardSamples(splits.train, mean_pixel, 0)  # two workers, each its own shards
    loader = torch.utils.data.DataLoader(samples, batch_size=None, num_workers=2)
    assert sorted(int(i) for _, _, i in loader) == list(range(n))
    batches = StreamBatches(ShardSamples(splits.train, mean_pixel, 0), 6, True, workers=2, pin=False)
    batches.set_epoch(1)
    assert len(list(batches)) == len(batches) == n // 6 and sorted(batches.indices()) == list(range(n))


def test_order_changes_with_the_epoch_and_repeats_with_the_seed(tmp_path: Path) -> None:
    _, splits = _read(_shards(tmp_path / "shards", 3, {"train": 3, "test": 1}), val_fraction=0.0)
    first, second = _order(splits, 1), _order(splits, 2)
    assert sorted(first) == sorted(second) and first != second
    assert _order(splits, 1) == first and _order(splits, 1, seed=1) != first


def test_the_seeded_augmentation_leaves_the_training_streams_alone(tmp_path: Path) -> None:
    """In the main process (`num_workers: 0`), the draws between samples (dropout, mixup) are the run's own."""
    _, splits = _read(_shards(tmp_path / "shards", 2, {"train": 2, "test": 1}), val_fraction=0.0)
    torch.manual_seed(5)
    expected = [torch.rand(()).item() for _ in range(3)]
    torch.manual_seed(5)
    stream, got = iter(ShardSamples(splits.train, mean_pixel, 0)), []
    for _ in range(3):
        next(stream)
        got.append(torch.rand(()).item())
    assert got == expected


def test_resumed_epoch_yields_the_tail_of_the_uninterrupted_one(tmp_path: Path) -> None:
    _, splits = _read(_shards(tmp_path / "shards", 3, {"train": 2, "test": 1}), val_fraction=0.0)
    full = StreamBatches(ShardSamples(splits.train, mean_pixel, 0), 3, True, workers=0, pin=False)
    full.set_epoch(2)
    whole = [x for x, _ in full]
    resumed = StreamBatches(ShardSamples(splits.train, mean_pixel, 0), 3, True, workers=0, pin=False)
    resumed.set_epoch(2, skip_batches=2)
    tail = [x for x, _ in resumed]
    assert len(tail) == len(resumed) == len(whole) - 2 == 4
    assert all(torch.equal(a, b) for a, b in zip(tail, whole[2:], strict=True))  # same images, same augmentation


def test_prepared_pipeline_is_refused_for_a_streamed_split() -> None:
    cuda = torch.device("cuda")  # resolve_pipeline only looks at the device's type
    assert resolve_pipeline(Config(data=DataConfig(pipeline="auto")), cuda, streamed=True) == "stream"
    assert resolve_pipeline(Config(data=DataConfig(pipeline="auto")), cuda) == "prepared"
    with pytest.raises(ConfigError, match="data.pipeline=stream"):
        resolve_pipeline(Config(data=DataConfig(pipeline="prepared")), cuda, streamed=True)


RANK_SCRIPT = """
import json, os, sys
from visionpoc import distributed
from visionpoc.config import DataConfig
from visionpoc.data.sources import read_dataset
from visionpoc.data.splits import make_splits
from visionpoc.data.shard_stream import ShardSamples, StreamBatches
from test_shards_stream import mean_pixel

d = distributed.init("cpu")
root = sys.argv[1]
ds = read_dataset("webdataset", root, options=DataConfig(num_workers=0), seed=0)
splits = make_splits(ds, 0.1, None, 0)
batches = StreamBatches(ShardSamples(splits.train, mean_pixel, 0, d), 3, True, workers=2, pin=False)
out = {"n": len(splits.train), "epochs": []}
for epoch in (1, 2):
    batches.set_epoch(epoch)
    out["epochs"].append({"batches": len(list(batches)), "read": batches.read})
distributed.barrier(d)
with open(os.path.join(sys.argv[2], f"rank{d.rank}.json"), "w") as f:
    json.dump(out, f)
distributed.shutdown(d)
"""


@pytest.mark.slow
def test_ranks_stream_disjoint_halves_that_cover_the_split(tmp_path: Path) -> None:
    """4 train shards of 9 samples (val and test in their own shards): each of the 2 ranks reads 2 whole
    shards an epoch, 6 batches of 3, the same count on both, and together every sample once."""
    root = _shards(tmp_path / "shards", 3, {"train": 4, "val": 1, "test": 1})
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run([*torchrun, str(root), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    n = ranks[0]["n"]
    assert n == 36
    orders = []
    for epoch in (0, 1):
        a, b = (r["epochs"][epoch] for r in ranks)
        assert a["batches"] == b["batches"] == 6
        assert not set(a["read"]) & set(b["read"]) and sorted(a["read"] + b["read"]) == list(range(n))
        orders.append(a["read"] + b["read"])
    assert orders[0] != orders[1]
