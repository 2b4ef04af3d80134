"""The `webdataset` source: tar shards of `<key>.<image ext>` + `<key>.cls` (the class index) samples.

Where the shards are: `data.root` is a folder whose `train*.tar`, `val*.tar` (or `validation*.tar`) and
`test*.tar` shards are those splits (with no `train*` shard, every `.tar` is train), or a brace pattern
(`shards/{000..099}.tar`, `shards/{train,test}-{000..009}.tar`) whose shards go by the same prefixes,
else to train. Without test shards, `data.test_fraction` of train is carved out (stratified, seeded).
Class names: `classes.txt` (line i names class i) or `classes.json` (a list, or `{"i": name}`) next to
the shards; else the class indices themselves.

How they are read: each shard is indexed once from its tar headers and `.cls` entries (the images are
skipped), kept as `<shards>/.visionpoc-cache/shards-index-<key>.json` keyed on the shards' paths, sizes
and mtimes. The training split is not copied: it is a `Split` with `shards` set, streamed from the tars
by `data/shard_stream.py`. Validation (the `val*` shards, else carved out of train here, stratified
and seeded by `data.val_fraction`) and test are small and need exact, ordered passes: their images are
extracted once, as their stored bytes, into `<shards>/.visionpoc-cache/shards-<key>/` and read like
any source's files. `webdataset` is imported only here and in `shard_stream.py`: without it the error
names `pip install 'visionpoc[shards]'`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from visionpoc.config import DataConfig
from visionpoc.data.manifest import Entry, _entry, from_entries, materialised
from visionpoc.data.sources import Dataset
from visionpoc.errors import DataError

log = logging.getLogger(__name__)

SHARDS_EXTRA = "pip install 'visionpoc[shards]'"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff", "gif", "pgm")
PREFIXES = (("train", "train"), ("validation", "val"), ("val", "val"), ("test", "test"))
CACHE_VERSION = 1


def _wds() -> Any:
    try:
        import webdataset
    except ImportError as e:
        raise DataError(
            f"data.source: webdataset reads tar shards with the `webdataset` package: {SHARDS_EXTRA}"
        ) from e
    return webdataset


def shard_groups(root: str) -> tuple[Path, dict[str, list[Path]]]:
    """The shards' folder and the shards of each split (`train`, `val`, `test`), sorted."""
    if "{" in root:
        from braceexpand import braceexpand  # a dependency of webdataset

        _wds()
        paths = [Path(p).expanduser() for p in braceexpand(root)]
        folder = paths[0].parent if paths else Path(root).parent
    else:
        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise DataError(f"data.root {root}: no such folder; give the folder of the .tar shards or a brace pattern")
        paths = sorted(folder.glob("*.tar"))
    absent = [p for p in paths if not p.is_file()]
    if absent or not paths:
        raise DataError(
            f"data.root {root}: {len(absent)} shard(s) not found (e.g. {absent[0]})"
            if absent
            else f"data.root {root}: "
            "no .tar shards; write train-000000.tar, ... (webdataset.TarWriter) or fix the pattern"
        )
    groups: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
    named = any(p.name.startswith("train") for p in paths)
    for p in sorted(paths):
        split = next((s for pre, s in PREFIXES if p.name.startswith(pre)), "train" if not named else None)
        if split is None:
            log.warning("%s: shard %s is not read (its name starts with none of train, val, test)", folder, p.name)
            continue
        groups[split].append(p)
    return folder, groups


def class_names_file(folder: Path) -> list[str] | None:
    """The class names next to the shards (`classes.txt` or `classes.json`), or None."""
    txt, js = folder / "classes.txt", folder / "classes.json"
    if txt.is_file():
        return [line.strip() for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
    if js.is_file():
        try:
            data = json.loads(js.read_text(encoding="utf-8"))
        except ValueError as e:
            raise DataError(f'{js}: not valid JSON ({e}); write a list of names or {{"0": name}}') from e
        if isinstance(data, dict):
            return [str(data[k]) for k in sorted(data, key=int)]
        return [str(x) for x in data]
    return None


def scan_shard(shard: Path, split: str, names: list[str] | None) -> list[Entry]:
    """The samples of one shard, from its tar headers and `.cls` entries alone (the images are skipped,
    not read): files `<split>/<shard stem>/<key>.<ext>`, labels the class names (or indices)."""
    import tarfile

    base_plus_ext = _wds().tariterators.base_plus_ext
    samples: dict[str, dict[str, bytes | None]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:  # seekable: each image's bytes are skipped
            for m in tar:
                prefix, ext = base_plus_ext(m.name)
                if not m.isreg() or prefix is None or Path(prefix).name.startswith("__"):
                    continue
                entry = samples.setdefault(prefix, {})
                if ext.lower() in entry:
                    raise DataError(
                        f"shard {shard.name}, key {prefix}: the key appears twice; give each sample its own"
                    )
                f = tar.extractfile(m) if ext.lower() == "cls" else None
                entry[ext.lower()] = f.read() if f is not None else None
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"shard {shard}: not a readable tar file ({e}); rewrite it (webdataset.TarWriter)") from e
    return [_sample_entry(shard, split, key, exts, names) for key, exts in samples.items()]


def _sample_entry(shard: Path, split: str, key: str, exts: dict[str, bytes | None], names: list[str] | None) -> Entry:
    where = f"shard {shard.name}, key {key}"
    ext = next((k for k in IMAGE_KEYS if k in exts), None)
    if ext is None or exts.get("cls") is None:
        raise DataError(f"{where}: needs an image ({', '.join(IMAGE_KEYS)}) and a .cls entry; found {sorted(exts)}")
    raw = bytes(exts["cls"] or b"").decode("utf-8", "replace").strip()
    if not raw.lstrip("-").isdigit():
        raise DataError(f"{where}: .cls holds {raw!r}, not a class index; write the class's integer index")
    label = int(raw)
    if names is not None and not 0 <= label < len(names):
        raise DataError(f"{where}: class index {label} is outside the {len(names)} names of classes.txt/json")
    rel = os.path.normpath(f"{split}/{shard.stem}/{key}.{ext}")
    if rel.startswith("..") or os.path.isabs(rel) or not rel.startswith(f"{split}/{shard.stem}/"):
        raise DataError(f"{where}: the key leaves the shard's folder; rename the sample")
    return _entry(where, rel, names[label] if names is not None else str(label), split)


def shard_index(groups: dict[str, list[Path]], names: list[str] | None, cache: Path) -> tuple[list[Entry], str]:
    """Every shard's samples (`scan_shard`), kept in `cache` as JSON keyed on the shards' paths, sizes and
    mtimes; (entries, that key)."""
    h = hashlib.sha256(f"shards v{CACHE_VERSION} {names}".encode())
    for split, shards in sorted(groups.items()):
        stems = [s.stem for s in shards]
        if len(set(stems)) < len(stems):
            raise DataError(f"two {split} shards share a name ({sorted(stems)}); give each shard its own file name")
        for s in shards:
            st = s.stat()
            h.update(f"{split}\t{s.resolve()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    key = h.hexdigest()[:20]
    path = cache / f"shards-index-{key}.json"
    if path.is_file():
        return [Entry(*row) for row in json.loads(path.read_text())], key
    entries = [e for split, shards in groups.items() for s in shards for e in scan_shard(s, split, names)]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps([dataclasses.astuple(e) for e in entries]))
    os.replace(tmp, path)
    log.info("indexed %d samples in %d shards", len(entries), sum(map(len, groups.values())))
    return entries, key


def _write_sample(sample: dict[str, Any], tmp: Path, split: str, wanted: frozenset[str]) -> str | None:
    """Write one wanted sample's image; its file (None when not wanted)."""
    shard, key = Path(sample.get("__url__", "?")), sample["__key__"]
    ext = next((k for k in IMAGE_KEYS if k in sample), "")
    rel = os.path.normpath(f"{split}/{shard.stem}/{key}.{ext}")
    if rel not in wanted:
        return None
    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp / rel).write_bytes(sample[ext])
    return rel


def _every_shard(urls: Iterable[Any]) -> Iterable[Any]:
    return urls  # one process (rank 0) writes the cache for every rank


def _as_is(x: Any) -> Any:
    return x


def _extractor(groups: dict[str, list[Path]], wanted: list[Entry], workers: int) -> Any:
    """`materialised`'s writer of the `wanted` samples' images (read from the shards that hold them)."""
    wds = _wds()
    import torch

    def write(tmp: Path) -> list[Entry]:
        for split, shards in groups.items():
            mine = frozenset(e.file for e in wanted if e.file.split("/", 1)[0] == split)
            holding = [s for s in shards if any(f.startswith(f"{split}/{s.stem}/") for f in mine)]
            if not holding:
                continue
            pipe = wds.WebDataset(
                [str(s) for s in holding], shardshuffle=False, nodesplitter=_every_shard, empty_check=False
            ).map(functools.partial(_write_sample, tmp=tmp, split=split, wanted=mine))
            n = min(workers, len(holding))
            loader = torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=n, collate_fn=_as_is)
            written = {rel for rel in loader if rel is not None}
            if written != mine:
                raise DataError(
                    f"{len(mine - written)} {split} sample(s) indexed but not read back from the shards "
                    "(changed while read?); run again"
                )
        return sorted(wanted, key=lambda e: e.file)

    return write


def read_shards(root: str, opts: DataConfig, seed: int) -> Dataset:
    """The `webdataset` dataset at `root` (see the module docstring): train streamed, val and test extracted."""
    from visionpoc.data.loaders import default_workers
    from visionpoc.data.prepared import cache_dir_for
    from visionpoc.data.splits import stratified_val_split

    folder, groups = shard_groups(root)
    names = class_names_file(folder)
    cache = cache_dir_for(folder)
    entries, key = shard_index(groups, names, cache)
    order = names if names is not None else sorted({e.label for e in entries}, key=int)  # 2 before 10
    ds = from_entries("webdataset", folder, folder, entries, opts.test_fraction, seed, class_order=order)
    if ds.val is None:  # carved here rather than by make_splits: its images are extracted with test's
        ds.train, ds.val = stratified_val_split(ds.train, opts.val_fraction, seed, ds.class_folders)
    by_file = {e.file: e for e in entries}
    wanted = [by_file[f] for s in (ds.val, ds.test) for f in s.files]
    h = hashlib.sha256(f"{key}\n{sorted(e.file for e in wanted)}".encode()).hexdigest()[:20]
    extracted = cache / f"shards-{h}"
    materialised(extracted, _extractor(groups, wanted, max(1, default_workers(opts))))
    ds.val.root = ds.test.root = extracted
    ds.train.shards = {s.stem: s for s in groups["train"]}
    return ds
