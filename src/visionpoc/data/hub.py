"""The `hf` source: a Hugging Face `datasets` dataset, from a `save_to_disk` folder, parquet files, an
image folder, or a hub id (read from the local cache; offline it must be there).

Its images are written once, as the bytes the dataset stores (not re-encoded), into a cache folder:
`<root>/.visionpoc-cache/hf-<key>/` (a hub id: the user cache, `~/.cache/visionpoc/`), keyed on each
split's fingerprint and the columns. From there they are files like any other source's, so they decode
through `images.load_rgb` (EXIF, modes, bounds) and the prepared store, repeats, tune, the report's
pictures and `serve` work unchanged. The cost is one copy of the encoded images on disk; the gain is
one input path for every source.

`data.image_column` and `data.label_column` name the columns; a `ClassLabel`'s names are the class
names (in its order). Splits named `train`, `validation` (`val`, `valid`) and `test` are used; without
a test split, `data.test_fraction` of train is carved out (stratified, seeded). `datasets` is imported
only here: without it the error names `pip install 'visionpoc[hf]'`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from visionpoc.config import DataConfig
from visionpoc.data.manifest import Entry, _entry, from_entries, materialised
from visionpoc.data.sources import Dataset
from visionpoc.errors import DataError

log = logging.getLogger(__name__)

HF_EXTRA = "pip install 'visionpoc[hf]'"
SPLITS = {"train": "train", "validation": "val", "val": "val", "valid": "val", "test": "test"}
CACHE_VERSION = 1  # bump when the written layout changes
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"data.source: hf reads Hugging Face datasets with the `datasets` package: {HF_EXTRA}") from e
    return datasets


def _load(root: str, cache: Path) -> Any:
    """A Dataset or DatasetDict: `save_to_disk` folder, parquet file or folder, image folder, or hub id."""
    datasets = _datasets()
    path = Path(root).expanduser()
    hf_cache = str(cache / "hf-datasets")  # parquet/imagefolder conversions stay next to ours
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
            return datasets.load_from_disk(str(path))
        if path.is_file() and path.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files={"train": str(path)}, cache_dir=hf_cache)
        if path.is_dir() and any(path.rglob("*.parquet")):
            return datasets.load_dataset("parquet", data_dir=str(path), cache_dir=hf_cache)
        if path.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=hf_cache)
        return datasets.load_dataset(root)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (offline, missing, malformed)
        raise DataError(
            f"data.root {root}: cannot load it as a Hugging Face dataset ({type(e).__name__}: {e}); give a "
            "save_to_disk folder, parquet files or an image folder, or a hub id already in the local cache "
            "(download it once where there is a network)"
        ) from e


def _splits(loaded: Any, root: str) -> dict[str, Any]:
    """Our split name -> the dataset's split, for the splits we know (others are left out, said)."""
    if not hasattr(loaded, "keys"):  # one Dataset: all of it is train
        return {"train": loaded}
    out: dict[str, Any] = {}
    for name in loaded:
        ours = SPLITS.get(name.lower())
        if ours is None or ours in out:
            log.warning("%s: split %r is not read (train, validation and test are)", root, name)
            continue
        out[ours] = loaded[name]
    if "train" not in out:
        raise DataError(f"data.root {root}: no train split among {list(loaded)}; name the training split `train`")
    return out


def _check_columns(splits: dict[str, Any], root: str, opts: DataConfig) -> None:
    for name, part in splits.items():
        for key, col in (("data.image_column", opts.image_column), ("data.label_column", opts.label_column)):
            if col not in part.column_names:
                raise DataError(
                    f"{key}: the {name} split of {root} has no column {col!r}; its columns are {part.column_names}: "
                    f"set {key} to the right one"
                )


def _image_bytes(value: Any, where: str) -> bytes:
    """The encoded image of one cell: the `Image` feature's {bytes, path}, raw bytes, or a file path."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return bytes(data)
        value = path
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str) and Path(value).is_file():
        return Path(value).read_bytes()
    raise DataError(
        f"{where}: the image cell holds no image bytes or file ({type(value).__name__}); check data.image_column"
    )


def _suffix(data: bytes, where: str) -> str:
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{where}: the image does not decode ({e}); fix or remove that row") from e
    return EXTENSIONS.get(fmt, f".{fmt.lower() or 'img'}")


def _writer(splits: dict[str, Any], root: str, opts: DataConfig, names: list[str] | None) -> Any:
    datasets = _datasets()

    def write(tmp: Path) -> list[Entry]:
        entries = []
        for split, part in splits.items():
            if isinstance(part.features[opts.image_column], datasets.Image):
                part = part.cast_column(opts.image_column, datasets.Image(decode=False))
            (tmp / split).mkdir()
            for i, row in enumerate(part.select_columns([opts.image_column, opts.label_column])):
                where = f"{root} [{split}] row {i}"
                label = row[opts.label_column]
                if names is not None and isinstance(label, int):
                    label = names[label] if 0 <= label < len(names) else None  # -1: unlabelled
                data = _image_bytes(row[opts.image_column], where)
                file = f"{split}/{i:07d}{_suffix(data, where)}"
                entries.append(_entry(where, file, label, split))
                (tmp / file).write_bytes(data)
        return entries

    return write


def read_hf(root: str, opts: DataConfig, seed: int) -> Dataset:
    """The `hf` dataset at `root` (see the module docstring)."""
    from visionpoc.data.prepared import cache_dir_for

    local = Path(root).expanduser()
    if local.exists():
        base = cache_dir_for(local if local.is_dir() else local.parent)
    else:  # a hub id
        base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "visionpoc"
    splits = _splits(_load(root, base), root)
    _check_columns(splits, root, opts)
    feature = splits["train"].features[opts.label_column]
    names = list(feature.names) if hasattr(feature, "names") else None  # a ClassLabel
    h = hashlib.sha256(f"hf v{CACHE_VERSION} {opts.image_column} {opts.label_column}".encode())
    for split, part in sorted(splits.items()):
        h.update(f"{split}={part._fingerprint}".encode())
    folder = base / f"hf-{h.hexdigest()[:20]}"
    entries = materialised(folder, _writer(splits, root, opts, names))
    return from_entries("hf", local, folder, entries, opts.test_fraction, seed, class_order=names)
