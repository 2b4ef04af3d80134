"""The prepared store (the fast input path): building it, caching it, and the loaders over it. Every
image of the splits is decoded once (`load_rgb`; a JPEG at least twice the size at libjpeg's reduced
scale, 1/2 to 1/8, that keeps both sides >= S), its central square is resized to `prepared_size`
(the same pixels as resizing the short side to S and center-cropping S x S), and the result is kept as
one uint8 array (N, 3, S, S) in a `.npy` file. Training then gathers batches from that array and
augments them on the device (`StoreBatches`, `gpu_aug`).

- Where: `<data.root>/.visionpoc-cache/`, else `$XDG_CACHE_HOME/visionpoc` (`~/.cache/visionpoc`) when
  the dataset folder is read-only. Stanford Dogs at the default S=336 takes 20,580 x 331 KiB = 6.5 GiB.
- Key: a hash of STORE_VERSION, S, and every file's path (relative to the files' common folder),
  size and mtime_ns. A training split streamed from tar shards (`data.source: webdataset`) is read from
  its shards, each once, start to end; its images' names are their split files and the shard's size
  and mtime stand for theirs. A changed, added or removed image, or another S, gives another key and a rebuild;
  the store it replaces (same files, older content) is deleted, and of the other stores of the same
  folder and S only the last used one is kept (a quick run's subset next to the full set). The key
  reads file stats, not contents: a file replaced by one of the same size with its old mtime kept
  (`cp -p`, `rsync -a`) is not seen; delete the cache folder after such a copy. Labels are not part
  of the key: they come from the splits, so a relabelling never forces a re-decode.
- Atomic: the array is written to a temp file, fsynced and renamed, then its `.json` sidecar is
  written the same way; a store without its sidecar (a crash mid-build) is never used.
- Shared: one store for train, validation and test, and for every model: each model crops it at its
  own input size. The crop keeps the central square, as timm's eval transform does anyway; training's
  random-resized-crop samples inside that square (the image's far left/right edges are never seen).
  Eval needs S >= floor(input / crop_pct) to be exact: Xception's 299 / 0.8975 asks for 333, hence the
  default S=336 (at S=320 its eval crop would be upsampled by 4%).
- Loaders: `data/store_batches.py` turns the store and the splits into `Loaders` (`prepared_loaders`),
  places the store and gathers and augments batches on the device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from visionpoc.config import Config
from visionpoc.data.images import decode_rgb, load_rgb
from visionpoc.data.shard_stream import shard_images, shard_stem
from visionpoc.data.sources import Split
from visionpoc.data.splits import Splits
from visionpoc.errors import DataError
from visionpoc.recovery import shield_worker
from visionpoc.runfiles import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

STORE_VERSION = 2  # bump when the stored pixels change (filter, layout), so old stores are rebuilt
CACHE_DIRNAME = ".visionpoc-cache"
CHUNK = 64  # images per task of a build worker


def decode_square(path: str | Path, size: int) -> np.ndarray:
    """(3, S, S) uint8: the central square of the image at `path`, resized (bicubic) to S x S."""
    return square(load_rgb(path, min_side=size), size)  # a large JPEG decodes at a reduced scale still >= size


def square(img: Image.Image, size: int) -> np.ndarray:
    """(3, S, S) uint8: the central square of `img`, resized (bicubic) to S x S."""
    w, h = img.size
    m = min(w, h)
    box = ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)  # exact central square, sub-pixel
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(img).transpose(2, 0, 1)  # (3, S, S)


@dataclass
class PreparedStore:
    """A built store: `images[i]` holds `base / names[i]`."""

    path: Path
    key: str
    size: int
    base: Path
    names: list[str]  # sorted, relative to `base`
    images: np.ndarray  # (N, 3, S, S) uint8, read-only memory map
    built: bool  # this call decoded the images (False: reused from the cache)
    build_s: float

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes)

    def rows(self, paths: Sequence[Path]) -> np.ndarray:
        """(len(paths),) int64 rows of `paths` in the store."""
        index = {n: i for i, n in enumerate(self.names)}
        return np.asarray([index[_rel(p, self.base)] for p in paths], dtype=np.int64)


def _rel(path: Path, base: Path) -> str:
    return Path(path).absolute().relative_to(base).as_posix()


def _names(paths: Sequence[Path]) -> tuple[Path, list[str]]:
    if not paths:
        raise ValueError("the prepared store needs at least one image")
    base = Path(os.path.commonpath([str(Path(p).absolute().parent) for p in paths]))
    return base, sorted({_rel(p, base) for p in paths})


def _digest(base: Path, names: list[str], size: int, with_stats: bool, held: Mapping[str, Held] | None = None) -> str:
    """`held`: the images that live in a tar shard, by name: the shard's stats stand for theirs."""
    h = hashlib.sha256(f"visionpoc-store v{STORE_VERSION} size={size}\n".encode())
    held = held or {}
    for name in names:
        st = (held[name][0] if name in held else base / name).stat() if with_stats else None
        line = f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n" if st else f"{name}\n"
        h.update(os.fsencode(line))  # a file name's bytes as the file system gave them, UTF-8 or not
    return h.hexdigest()[:24]


def store_key(paths: Sequence[Path], size: int, streamed: Sequence[Split] = ()) -> str:
    """The cache key of a store of `paths` and of the images of the `streamed` splits at side `size`
    (changes when any file or shard changes)."""
    base, names, held = _inputs(paths, streamed)
    return _digest(base, names, size, True, held)


def split_key(split: Split) -> str:
    """A key of `split`'s images (their files', or shards', paths, sizes and mtimes)."""
    if split.shards is not None:
        return store_key([], 0, [split])
    return store_key([split.path(i) for i in range(len(split))], 0)


Held = tuple[Path, str]  # an image inside a tar shard: (the shard, its split file `<split>/<shard stem>/<key>.<ext>`)


def _inputs(paths: Sequence[Path], streamed: Sequence[Split]) -> tuple[Path, list[str], dict[str, Held]]:
    """(base, names, where each image of the `streamed` splits is, by name)."""
    inside = {s.root / f: _held(s, f) for s in streamed for f in s.files}
    base, names = _names([*paths, *inside])
    return base, names, {_rel(p, base): held for p, held in inside.items()}


def _held(split: Split, file: str) -> Held:
    assert split.shards is not None, "a split streamed from tar shards"
    return split.shards[shard_stem(file)], file


def cache_dir_for(root: str | Path) -> Path:
    """`root/.visionpoc-cache` when writable, else the user cache folder."""
    preferred = Path(root).expanduser() / CACHE_DIRNAME
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=preferred):
            return preferred
    except OSError:
        fallback = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "visionpoc"
        log.info("%s is not writable: the prepared store goes to %s", preferred, fallback)
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def dataset_cache_dir(cfg: Config, splits: Splits) -> Path:
    """The cache folder of the run's dataset (`cache_dir_for`): beside `data.root` when it is a folder,
    else beside the training images (`data.root` a manifest file, a hub id or a brace pattern of shards)."""
    root = Path(cfg.data.root).expanduser()
    return cache_dir_for(root if root.is_dir() else splits.train.root)


_WORKER_STORE: np.memmap | None = None  # each build worker's writable map of the temp file


def _open_worker_store(path: str) -> None:
    global _WORKER_STORE
    shield_worker()  # a stop signal sent to the process group is the main process's to handle
    _WORKER_STORE = np.load(path, mmap_mode="r+")


# A build task: rows of image files to decode, or the rows of one tar shard's images (`shard_images`: the
# shard is read once, start to end, as streaming reads it)
FileTask = tuple[list[int], list[str], int]  # rows, paths, size
ShardTask = tuple[Path, str, dict[str, int], int]  # shard, its split (the files' first folder), file -> row, size


def _fill_files(store: np.ndarray, task: FileTask) -> int:
    rows, paths, size = task
    for row, p in zip(rows, paths, strict=True):
        store[row] = decode_square(p, size)
    return len(rows)


def _fill_shard(store: np.ndarray, task: ShardTask) -> int:
    shard, split, rows, size = task
    done = 0
    for file, name, data in shard_images(shard, split, rows.__contains__):
        store[rows[file]] = square(decode_rgb(data, name, min_side=size), size)
        done += 1
    if done != len(rows):
        raise DataError(
            f"shard {shard}: {len(rows) - done} indexed image(s) not found in it (changed since?); run again"
        )
    return done


def _run_task(store: np.ndarray, task: FileTask | ShardTask) -> int:
    return _fill_shard(store, task) if len(task) == 4 else _fill_files(store, task)  # type: ignore[arg-type]


def _fill(task: FileTask | ShardTask) -> int:
    assert _WORKER_STORE is not None
    n = _run_task(_WORKER_STORE, task)
    _WORKER_STORE.flush()
    return n


def _tasks(base: Path, names: list[str], held: Mapping[str, Held], size: int) -> list[FileTask | ShardTask]:
    """The build's tasks: images from files in chunks of CHUNK, those in tar shards one task per shard."""
    files = [(row, str(base / n)) for row, n in enumerate(names) if n not in held]
    tasks: list[FileTask | ShardTask] = []
    for s in range(0, len(files), CHUNK):
        chunk = files[s : s + CHUNK]
        tasks.append(([r for r, _ in chunk], [p for _, p in chunk], size))
    by_shard: dict[tuple[Path, str], dict[str, int]] = {}
    for row, n in enumerate(names):
        if n in held:
            shard, file = held[n]
            by_shard.setdefault((shard, file.split("/")[0]), {})[file] = row
    tasks += [(shard, split, rows, size) for (shard, split), rows in by_shard.items()]
    return tasks


def _build(target: Path, base: Path, names: list[str], held: Mapping[str, Held], size: int, workers: int) -> None:
    tasks = _tasks(base, names, held, size)

    def write(tmp: Path) -> None:
        arr: np.memmap = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(names), 3, size, size))
        bar = tqdm(total=len(names), desc=f"preparing {len(names)} images at {size}px", unit="img", disable=None)
        if workers <= 1 or (len(names) <= 2 * CHUNK and not held):
            for task in tasks:
                bar.update(_run_task(arr, task))
        else:
            with ProcessPoolExecutor(workers, initializer=_open_worker_store, initargs=(str(tmp),)) as ex:
                for k in ex.map(_fill, tasks):
                    bar.update(k)
        bar.close()
        arr.flush()
        del arr

    atomic_write(target, write)


def prepare_store(
    paths: Sequence[Path],
    size: int,
    cache_dir: Path | None = None,
    workers: int = 0,
    streamed: Sequence[Split] = (),
) -> PreparedStore:
    """The store of `paths` and of the images of the `streamed` splits (read from their tar shards, each
    shard once) at side `size`: reused from `cache_dir` when its key matches, else built."""
    base, names, held = _inputs(paths, streamed)
    cache = Path(cache_dir) if cache_dir is not None else cache_dir_for(base)
    cache.mkdir(parents=True, exist_ok=True)
    key = _digest(base, names, size, True, held)
    npy, meta = cache / f"store-{key}.npy", cache / f"store-{key}.json"
    t0, built = time.perf_counter(), False
    images = _load(npy, meta, key, len(names), size)
    if images is not None:
        with contextlib.suppress(OSError):
            os.utime(meta)  # last used: pruning keeps the stores in use
    else:
        log.info("building the prepared store %s (%d images at %dx%d)", npy, len(names), size, size)
        _check_space(cache, store_bytes(len(names), size), size)
        _build(npy, base, names, held, size, workers)
        names_key = _digest(base, names, size, with_stats=False)
        atomic_write_json(
            meta,
            {
                "key": key,
                "names_key": names_key,
                "version": STORE_VERSION,
                "size": size,
                "n": len(names),
                "base": str(base),
            },
        )
        _prune(cache, key, names_key, base, size)
        images, built = np.load(npy, mmap_mode="r"), True
    dt = time.perf_counter() - t0
    log.info(
        "prepared store %s: %d images, %.2f GiB, %s in %.1fs",
        npy.name,
        len(names),
        images.nbytes / 2**30,
        "built" if built else "reused",
        dt,
    )
    return PreparedStore(npy, key, size, base, names, images, built, dt if built else 0.0)


def store_bytes(n: int, size: int) -> int:
    """The size on disk of a store of `n` images at side `size`: uint8 (3, S, S) each (plus a small header)."""
    return n * 3 * size * size


def _check_space(cache: Path, need: int, size: int) -> None:
    """Refuse a build the disk cannot hold: the store is written through a memory map, and a full disk
    under a memory map kills the process (SIGBUS) instead of raising an error."""
    free = shutil.disk_usage(cache).free
    if free < need + need // 20:  # 5% to spare
        raise DataError(
            f"the prepared store needs {need / 2**30:,.2f} GiB in {cache} and {free / 2**30:,.2f} GiB are free: "
            f"free some space there, lower data.prepared_size ({size}), or set data.pipeline=stream"
        )


def _load(npy: Path, meta: Path, key: str, n: int, size: int) -> np.ndarray | None:
    if not (npy.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        images = np.load(npy, mmap_mode="r")
    except (OSError, ValueError) as e:
        log.warning("prepared store %s is unreadable (%s): rebuilding it", npy, e)
        return None
    if info.get("key") != key or images.shape != (n, 3, size, size) or images.dtype != np.uint8:
        log.warning("prepared store %s does not match its key: rebuilding it", npy)
        return None
    return images


KEEP_PER_DATASET = 2  # stores kept per (dataset folder, size): e.g. a quick run's subset and the full one


def _prune(cache: Path, key: str, names_key: str, base: Path, size: int) -> None:
    """Delete stores of the same files and size built from older content (they can never match again),
    and of the same dataset folder and size all but the KEEP_PER_DATASET last used (files were added,
    removed or renamed since): an edited dataset does not leave a full-size copy behind each time."""
    same_dataset = []
    for meta in cache.glob("store-*.json"):
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if info.get("key") == key:
            continue
        if info.get("names_key") == names_key:
            _remove(meta)
        elif info.get("base") == str(base) and info.get("size") == size:
            same_dataset.append(meta)
    same_dataset.sort(key=lambda m: m.stat().st_mtime, reverse=True)  # last used first (reuse touches it)
    for meta in same_dataset[KEEP_PER_DATASET - 1 :]:
        _remove(meta)


def _remove(meta: Path) -> None:
    log.info("removing the outdated prepared store %s", meta.with_suffix(".npy"))
    meta.unlink(missing_ok=True)
    meta.with_suffix(".npy").unlink(missing_ok=True)
