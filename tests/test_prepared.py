"""The prepared store (`visionpoc.data.prepared`): the same pixels as decoding with PIL, the cache key
(reuse, rebuild on change), atomic builds, the loaders it feeds, and training through it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
import yaml
from PIL import Image
from torchvision.transforms import InterpolationMode

from dogs_fixture import make_mini_dogs
from visionpoc.compare import run_compare
from visionpoc.config import load_config
from visionpoc.data import prepared, store_batches
from visionpoc.data.images import load_rgb
from visionpoc.data.loaders import build_loaders, set_epoch
from visionpoc.data.prepared import CACHE_DIRNAME, cache_dir_for, prepare_store, store_key
from visionpoc.data.sources import read_stanford_dogs
from visionpoc.data.splits import make_splits
from visionpoc.errors import DataError

DCFG = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 0.9,
    "crop_mode": "center",
}


def all_paths(root: Path) -> list[Path]:
    ds = read_stanford_dogs(root)
    return [s.path(i) for s in (ds.train, ds.test) for i in range(len(s))]


def test_store_holds_the_pil_resize_and_center_crop(mini_dogs: Path, tmp_path: Path) -> None:
    paths = all_paths(mini_dogs)
    store = prepare_store(paths, 72, tmp_path / "cache")  # 48x36 -> 96x72: an exact resize, then the crop
    assert store.built and store.images.shape == (len(paths), 3, 72, 72) and store.images.dtype == np.uint8
    rows = store.rows(paths)
    assert sorted(rows.tolist()) == list(range(len(paths)))
    for path, row in zip(paths, rows, strict=True):
        ref = TF.center_crop(TF.resize(load_rgb(path), 72, InterpolationMode.BICUBIC), 72)
        diff = np.abs(np.asarray(ref).transpose(2, 0, 1).astype(np.float32) - store.images[row])
        assert diff.mean() <= 3, path
    assert not any(mini_dogs.rglob(f"{CACHE_DIRNAME}/*.npy"))  # the store went where it was told


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_that_keeps_the_store_size(tmp_path: Path) -> None:
    h, w = 1600, 2000  # a photo 4x the store size and more: libjpeg can decode it at 1/4 scale
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(pixels).save(tmp_path / "big.png")  # the same pixels, no DCT scaling possible
    assert load_rgb(tmp_path / "big.jpg", min_side=400).size == (500, 400)  # 1/4 scale: still >= 400
    assert load_rgb(tmp_path / "big.jpg", min_side=401).size == (1000, 800)  # 1/4 would be too small
    assert load_rgb(tmp_path / "big.png", min_side=400).size == (w, h)  # not a JPEG: full size
    assert load_rgb(tmp_path / "big.jpg").size == (w, h)  # by default: full size
    fast = prepared.decode_square(tmp_path / "big.jpg", 400)
    full = prepared.decode_square(tmp_path / "big.png", 400)
    assert fast.shape == full.shape == (3, 400, 400)
    assert np.abs(fast.astype(np.float32) - full).mean() < 2  # the same picture


def test_store_is_reused_and_rebuilt_when_a_file_changes(fresh_dogs: Path, tmp_path: Path) -> None:
    paths, cache = all_paths(fresh_dogs), tmp_path / "cache"
    first = prepare_store(paths, 32, cache)
    before = np.array(first.images)
    again = prepare_store(paths, 32, cache)
    assert first.built and not again.built and again.key == first.key
    assert np.array_equal(np.asarray(again.images), before)
    other = prepare_store(paths, 24, cache)  # the size is part of the key
    assert other.built and other.key != first.key and first.path.exists()

    changed = paths[4]
    row = int(first.rows([changed])[0])
    Image.new("RGB", (48, 36), (255, 255, 255)).save(changed, quality=95)  # new content for one file
    assert store_key(paths, 32) != first.key
    rebuilt = prepare_store(paths, 32, cache)
    assert rebuilt.built and rebuilt.key != first.key
    assert rebuilt.images[row].min() >= 250  # the new pixels are there
    keep = np.arange(len(paths)) != row
    assert np.array_equal(rebuilt.images[keep], before[keep])
    assert not first.path.exists() and not first.path.with_suffix(".json").exists()  # the outdated store is gone
    assert other.path.exists()  # another size's store stays
    assert not list(cache.glob(".*.tmp"))


def test_an_edited_dataset_keeps_two_stores_at_most(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    paths = []
    for i in range(4):
        paths.append(root / f"{i}.png")
        Image.new("RGB", (20, 16), (i * 40, 0, 0)).save(paths[-1])
    cache = tmp_path / "cache"
    full = prepare_store(paths, 16, cache)
    subset = prepare_store(paths[:2], 16, cache)  # a quick run's subset: both are kept
    assert full.path.exists() and subset.path.exists()
    assert not prepare_store(paths, 16, cache).built  # reusing the full store marks it as last used
    paths.append(root / "new.png")  # the dataset grows: the store before it is kept, the subset goes
    Image.new("RGB", (20, 16)).save(paths[-1])
    grown = prepare_store(paths, 16, cache)
    assert grown.built and full.path.exists() and not subset.path.exists()
    assert sorted(cache.glob("store-*.npy")) == sorted([grown.path, full.path])
    assert prepare_store(paths[:3], 24, cache).built and grown.path.exists()  # another size: its own


def test_file_names_that_are_not_utf8_are_stored(tmp_path: Path) -> None:
    import os

    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    try:
        Image.new("RGB", (20, 16), (9, 9, 9)).save(tmp_path / name)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    store = prepare_store([tmp_path / name], 16, tmp_path / "cache")
    assert store.built and int(store.images[0].max()) == 9


def test_a_half_built_store_is_never_used(fresh_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths, cache = all_paths(fresh_dogs), tmp_path / "cache"
    real, calls = prepared.decode_square, []

    def crash_after_three(path: str | Path, size: int) -> np.ndarray:
        calls.append(path)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(path, size)

    monkeypatch.setattr(prepared, "decode_square", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare_store(paths, 32, cache)
    assert not list(cache.iterdir())  # no store, no sidecar, no temp file
    monkeypatch.setattr(prepared, "decode_square", real)
    store = prepare_store(paths, 32, cache)
    store.path.with_suffix(".json").unlink()  # a crash between the array's rename and the sidecar's
    assert prepare_store(paths, 32, cache).built


def test_parallel_build_matches_serial(mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepared, "CHUNK", 4)  # several tasks for the 2 worker processes
    paths = all_paths(mini_dogs)
    serial = prepare_store(paths, 32, tmp_path / "a", workers=0)
    parallel = prepare_store(paths, 32, tmp_path / "b", workers=2)
    assert serial.key == parallel.key and np.array_equal(np.asarray(serial.images), np.asarray(parallel.images))


def test_a_store_the_disk_cannot_hold_is_refused_before_writing(
    mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk under a memory map is a SIGBUS, not an error: the space is checked first."""
    paths = sorted((mini_dogs / "Images").rglob("*.jpg"))[:4]
    need = 4 * 3 * 32 * 32
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(prepared.shutil, "disk_usage", lambda _: usage._replace(free=need))
    with pytest.raises(
        DataError, match=r"needs 0.00 GiB in .*cache.* free some space there, lower data.prepared_size \(32\)"
    ):
        prepare_store(paths, 32, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("store-*"))
    monkeypatch.setattr(prepared.shutil, "disk_usage", lambda _: usage._replace(free=2 * need))
    assert prepare_store(paths, 32, tmp_path / "cache").built


def test_cache_dir_falls_back_when_the_dataset_folder_is_not_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir_for(tmp_path / "ok") == tmp_path / "ok" / CACHE_DIRNAME
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / CACHE_DIRNAME).write_text("a file where the cache folder would go")
    assert cache_dir_for(blocked) == tmp_path / "xdg" / "visionpoc"


def overrides(root: Path, pipeline: str, **extra: object) -> list[str]:
    sets = {
        "data.root": root,
        "data.download": "false",
        "data.num_workers": 0,
        "data.val_fraction": 0.2,
        "data.pipeline": pipeline,
        "data.prepared_size": 48,
        "train.device": "cpu",
        "train.batch_size": 4,
        **extra,
    }
    return [f"{k}={v}" for k, v in sets.items()]


def test_prepared_loaders_batches_order_and_resume(fresh_dogs: Path) -> None:
    cfg = load_config(None, overrides(fresh_dogs, "prepared"))
    splits = make_splits(read_stanford_dogs(fresh_dogs), 0.2, None, 0)
    loaders = build_loaders(splits, DCFG, cfg, torch.device("cpu"))
    assert loaders.pipeline == "prepared"
    assert any((fresh_dogs / CACHE_DIRNAME).glob("store-*.npy"))  # next to the dataset
    assert len(loaders.train) == len(splits.train) // 4  # no short last batch
    x, y = next(iter(loaders.train))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    ys = torch.cat([y for _, y in loaders.test])
    assert ys.tolist() == splits.test.labels.tolist()  # evaluation keeps the split's order
    assert sum(len(y) for _, y in loaders.val) == len(splits.val)

    set_epoch(loaders.train, 1)
    a = list(loaders.train)
    set_epoch(loaders.train, 1)
    b = list(loaders.train)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    set_epoch(loaders.train, 2)
    assert not torch.equal(torch.cat([x for x, _ in loaders.train]), torch.cat([x for x, _ in a]))
    set_epoch(loaders.train, 1, skip_batches=1)  # a resumed epoch gets the very batches it had left
    rest = list(loaders.train)
    assert len(rest) == len(a) - 1
    assert all(torch.equal(xa, xr) and torch.equal(ya, yr) for (xa, ya), (xr, yr) in zip(a[1:], rest, strict=True))
    # on the CPU whole batches are made on a thread each: the batches do not depend on how many
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        set_epoch(loaders.train, 1)
        one = list(loaders.train)
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(3)
    try:
        set_epoch(loaders.train, 1)
        three = list(loaders.train)
    finally:
        torch.set_num_threads(threads)
    for many in (one, three):
        assert all(torch.equal(xa, xm) and torch.equal(ya, ym) for (xa, ya), (xm, ym) in zip(a, many, strict=True))


@pytest.mark.slow
def test_training_through_the_store_learns_like_the_stream_path(tmp_path: Path, one_thread: None) -> None:
    root = make_mini_dogs(tmp_path / "dogs")
    models = [
        {
            "label": "vit",
            "timm": "vit_tiny_patch16_224",
            "pretrained": False,
            "finetune": "full",
            "img_size": 32,
            "lr": 3e-3,
            "model_kwargs": {"depth": 2},
        }
    ]
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": models}))
    acc = {}
    for pipeline in ("stream", "prepared"):
        cfg = load_config(
            tmp_path / "models.yaml", overrides(root, pipeline, **{"train.epochs": 8, "train.warmup_epochs": 0.5})
        )
        m = run_compare(cfg, tmp_path / pipeline).models[0]
        assert m.status == "ok", m.error
        assert m.data_pipeline == pipeline
        acc[pipeline] = m.test_accuracy
    assert acc["stream"] >= 0.8 and acc["prepared"] >= 0.8, acc  # 9 test images, 3 colour-coded breeds
    assert abs(acc["stream"] - acc["prepared"]) <= 2 / 9, acc


def test_the_gpu_copy_is_uploaded_once_per_process(
    fresh_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The models of a compare and the trials of a tune share one GPU copy of the store; another store
    replaces it. (The upload is faked with a CPU tensor: no GPU here.)"""
    uploads: list[str] = []

    def fake_place(images: np.ndarray, device: torch.device) -> torch.Tensor:
        uploads.append(str(device))
        return torch.from_numpy(np.array(images))

    monkeypatch.setattr(store_batches, "place", fake_place)
    monkeypatch.setattr(store_batches, "_RESIDENT", {})
    paths = all_paths(fresh_dogs)
    a = prepare_store(paths, 32, tmp_path / "a", workers=1)
    b = prepare_store(paths[:4], 32, tmp_path / "b", workers=1)
    gpu = torch.device("cuda", 0)
    first = store_batches.resident(a, gpu)
    assert store_batches.resident(a, gpu) is first and uploads == ["cuda:0"]  # the second model: no upload
    assert isinstance(first, torch.Tensor) and torch.equal(first, torch.from_numpy(np.array(a.images)))
    store_batches.resident(b, gpu)  # another store replaces the first
    assert uploads == ["cuda:0", "cuda:0"] and len(store_batches._RESIDENT) == 1
    assert store_batches.resident(a, torch.device("cpu")) is a.images  # on the CPU: the memory map, no copy
