"""Training from webdataset shards by streaming (`data/shard_stream.py`), on shards the tests write.

The training images are never written to disk (only val and test are extracted); one epoch reads every
training sample exactly once; the order changes with the epoch and repeats with the seed; a resumed
epoch yields the tail of the uninterrupted one; `prepared` builds its store by reading each training
shard once (equal to decoding the images as files); under
torchrun (2 processes, gloo) the ranks read disjoint halves that cover the split, in the same number
of batches."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from test_sources_more import _shards
from visionpoc.config import Config, DataConfig, TrainConfig
from visionpoc.data.loaders import build_loaders, resolve_pipeline, set_epoch
from visionpoc.data.prepared import decode_square, prepare_store
from visionpoc.data.shard_stream import ShardSamples, StreamBatches
from visionpoc.data.sources import Dataset, read_dataset
from visionpoc.data.splits import Splits, make_splits

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


DCFG = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear", "crop_pct": 1.0}


def test_streamed_training_writes_no_training_image(tmp_path: Path) -> None:
    root = _shards(tmp_path / "shards", 3, {"train": 2})  # val and test carved out of the train shards
    ds, splits = _read(root)
    cfg = Config(data=DataConfig(num_workers=0, pipeline="auto"), train=TrainConfig(batch_size=4, device="cpu"))
    loaders = build_loaders(splits, DCFG, cfg, torch.device("cpu"))
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


def test_auto_keeps_a_streamed_split_streamed_and_prepared_is_taken_as_asked() -> None:
    cuda = torch.device("cuda")  # resolve_pipeline only looks at the device's type
    assert resolve_pipeline(Config(data=DataConfig(pipeline="auto")), cuda, streamed=True) == "stream"
    assert resolve_pipeline(Config(data=DataConfig(pipeline="auto")), cuda) == "prepared"
    assert resolve_pipeline(Config(data=DataConfig(pipeline="prepared")), cuda, streamed=True) == "prepared"


def _from_tar(shard: Path, key: str, size: int, tmp: Path) -> np.ndarray:
    """The store's pixels of one sample, read with the standard library's tarfile and decoded as a file."""
    with tarfile.open(shard) as tar:
        data = tar.extractfile(key)
        assert data is not None
        (tmp / "one.png").write_bytes(data.read())
    return decode_square(tmp / "one.png", size)


def test_the_prepared_store_reads_each_training_shard_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`data.pipeline: prepared` on a streamed split: the training images come from their shards (each
    read once), val and test from their extracted files, into one store that equals decoding every image
    as a file; it is reused, rebuilt when a shard changes, and the same built by two processes."""
    import visionpoc.data.prepared as prepared

    root = _shards(tmp_path / "shards", 3, {"train": 2, "test": 1})
    _, splits = _read(root)
    reads: list[str] = []
    real = prepared.shard_images

    def counted(shard: Path, *args: object, **kw: object) -> object:
        reads.append(shard.name)
        return real(shard, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(prepared, "shard_images", counted)
    files = [s.root / f for s in (splits.val, splits.test) for f in s.files]
    store = prepare_store(files, 20, tmp_path / "cache", streamed=[splits.train])
    assert store.built and sorted(reads) == ["train-000000.tar", "train-000001.tar"]  # each training shard once
    assert len(store.names) == 18 + 9
    for f in splits.train.files:  # `train/<shard stem>/<key>.png`
        _, stem, key = f.split("/")
        expected = _from_tar(root / f"{stem}.tar", key, 20, tmp_path)
        assert np.array_equal(store.images[store.rows([splits.train.root / f])[0]], expected), f
    for p in files:
        assert np.array_equal(store.images[store.rows([p])[0]], decode_square(p, 20))
    again = prepare_store(files, 20, tmp_path / "cache", streamed=[splits.train])
    assert not again.built and again.key == store.key
    parallel = prepare_store(files, 20, tmp_path / "other", workers=2, streamed=[splits.train])
    assert np.array_equal(parallel.images, store.images)
    st = (root / "train-000001.tar").stat()
    os.utime(root / "train-000001.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the shard changed
    assert prepare_store(files, 20, tmp_path / "cache", streamed=[splits.train]).built


def test_prepared_loaders_over_a_streamed_split_train_from_the_store(tmp_path: Path) -> None:
    root = _shards(tmp_path / "shards", 3, {"train": 2, "test": 1})
    _, splits = _read(root)
    data = DataConfig(num_workers=0, pipeline="prepared", prepared_size=20)
    loaders = build_loaders(splits, DCFG, Config(data=data, train=TrainConfig(batch_size=4)), torch.device("cpu"))
    assert loaders.pipeline == "prepared"
    set_epoch(loaders.train, 1)
    batches = list(loaders.train)
    assert len(batches) == len(splits.train) // 4 and all(x.shape == (4, 3, 16, 16) for x, _ in batches)
    assert torch.cat([y for _, y in loaders.test]).tolist() == splits.test.labels.tolist()
    assert not list(root.rglob("*.png")) or all(".visionpoc-cache" in p.parts for p in root.rglob("*.png"))


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


def test_the_dry_run_says_how_the_shards_are_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_sources_more import _compare_config
    from visionpoc.cli import main

    root = _shards(tmp_path / "shards", 3, {"train": 2, "test": 1})
    cfg = _compare_config(tmp_path / "c.yaml", {"source": "webdataset", "root": str(root)})
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    assert "input: stream on cpu: the training split streamed from its tar shards" in capsys.readouterr().out
    prepared = ["--set", "data.pipeline=prepared", "--set", "data.prepared_size=32"]
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "run"), "--dry-run", *prepared]) == 0
    assert "input: prepared store on cpu: 27 images decoded once at 32 px" in capsys.readouterr().out
    assert not list(root.rglob("store-*")) and not (tmp_path / "run").exists()


def test_shards_written_by_tar_with_dot_slash_names_stream_and_prepare(tmp_path: Path) -> None:
    """`tar -cf train-0.tar -C samples .` names its members `./key.png`: they are indexed, streamed and
    prepared like webdataset.TarWriter's `key.png`."""
    from test_sources_more import _png

    root = tmp_path / "shards"
    root.mkdir()
    for split, n in (("train", 12), ("test", 6)):
        with tarfile.open(root / f"{split}-0.tar", "w") as tar:
            for i in range(n):
                for ext, data in (("png", _png(i % 3, i)), ("cls", str(i % 3).encode())):
                    info = tarfile.TarInfo(f"./{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    _, splits = _read(root, val_fraction=0.25)
    assert len(splits.train) == 9 and len(splits.test) == 6
    assert sorted(_order(splits, 1)) == list(range(9))  # every training sample streamed
    store = prepare_store([], 16, tmp_path / "cache", streamed=[splits.train])
    assert store.images.shape == (9, 3, 16, 16) and all(store.images.reshape(9, -1).max(1) > 0)
