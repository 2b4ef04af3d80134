"""The `manifest` source, and what every source of labelled rows shares (`manifest`, `hf`, `webdataset`).

A manifest is a CSV file with a `path,label[,split]` header, or a JSONL file of `{"path": ..., "label":
..., "split": ...}` objects, one a line: what a labelling tool exports. Paths are relative to the
manifest's folder (absolute ones are kept). `split` is `train`, `val` (or `validation`, `valid`) or
`test`; a row without one is a training row. Without test rows, a stratified, seeded
`data.test_fraction` of train is the test split; without val rows, validation is carved out of train as
for every source (`data.val_fraction`).

`from_entries` turns rows into a `Dataset` like `read_folder`'s: classes are the training labels (sorted,
or in the order the source gives), and every problem names where it is (file and row) and the fix:
an empty label, an unknown split, a duplicate path, a missing image, a label seen only in test or val.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionpoc.data.names import default_names
from visionpoc.data.sources import Dataset, Split, _check_class_coverage
from visionpoc.data.splits import carve_test
from visionpoc.errors import DataError

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
SHOWN = 5  # rows named in an error that lists several


@dataclass(frozen=True)
class Entry:
    """One labelled image: where it was listed (for errors), its file relative to the split root, its
    label and its split (`train`, `val`, `test`)."""

    where: str
    file: str
    label: str
    split: str


def _split_of(raw: object, where: str) -> str:
    text = "" if raw is None else str(raw).strip()
    if not text:
        return "train"
    split = SPLIT_NAMES.get(text.lower())
    if split is None:
        raise DataError(
            f"{where}: unknown split {text!r}; use train, val (or validation) or test, or leave it empty for train"
        )
    return split


def _entry(where: str, path: object, label: object, split: object) -> Entry:
    path_text = "" if path is None else str(path).strip()
    label_text = "" if label is None else str(label).strip()
    if not path_text:
        raise DataError(f"{where}: the path is empty; give every row an image path or remove the row")
    if not label_text:
        raise DataError(f"{where}: the label is empty; give every row a label or remove the row")
    return Entry(where, os.path.normpath(path_text), label_text, _split_of(split, where))


def _csv_entries(path: Path) -> list[Entry]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("path", "label") if c not in fields]
        if missing:
            raise DataError(
                f"{path}: the header {fields} lacks {missing}; the first line names the columns: path,label[,split]"
            )
        reader.fieldnames = fields
        return [
            _entry(f"{path}, row {reader.line_num}", rec.get("path"), rec.get("label"), rec.get("split"))
            for rec in reader
        ]


def _jsonl_entries(path: Path) -> list[Entry]:
    entries = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, row {n}"
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise DataError(f'{where}: not a JSON object ({e}); write one {{"path": ..., "label": ...}} a line') from e
        if not isinstance(rec, dict):
            raise DataError(f'{where}: not a JSON object; write one {{"path": ..., "label": ...}} a line')
        entries.append(_entry(where, rec.get("path"), rec.get("label"), rec.get("split")))
    return entries


def read_manifest(root: str | Path, test_fraction: float, seed: int) -> Dataset:
    """The dataset a CSV or JSONL manifest lists (see the module docstring)."""
    path = Path(root).expanduser()
    if not path.is_file():
        raise DataError(
            f"data.root {path}: no such manifest file; point data.root to a CSV or JSONL file of "
            "path,label[,split] rows"
        )
    entries = _jsonl_entries(path) if path.suffix.lower() in JSONL_SUFFIXES else _csv_entries(path)
    _refuse_duplicates(entries, path)
    folder = path.parent
    missing = [e for e in entries if not (folder / e.file).is_file()]
    if missing:
        shown = "; ".join(f"{e.where}: {folder / e.file}" for e in missing[:SHOWN])
        raise DataError(
            f"{len(missing)} image(s) listed in {path} are not found ({shown}); paths are relative to the "
            "manifest's folder: fix the paths or remove those rows"
        )
    return from_entries("manifest", path, folder, entries, test_fraction, seed)


def _refuse_duplicates(entries: Sequence[Entry], path: Path) -> None:
    first: dict[str, Entry] = {}
    for e in entries:
        if e.file in first:
            raise DataError(
                f"{path}: {first[e.file].where.rsplit(', ', 1)[-1]} and {e.where.rsplit(', ', 1)[-1]} both list "
                f"{e.file}; remove one (an image listed twice is trained on twice, or scored on a training image)"
            )
        first[e.file] = e


def from_entries(
    source: str,
    root: Path,
    split_root: Path,
    entries: Sequence[Entry],
    test_fraction: float,
    seed: int,
    class_order: Sequence[str] | None = None,
) -> Dataset:
    """A `Dataset` of `entries` (files relative to `split_root`): classes are the training labels, in
    `class_order` when given, else sorted; test is carved out of train when no entry is a test one."""
    train_labels = {e.label for e in entries if e.split == "train"}
    order = [c for c in class_order if c in train_labels] if class_order is not None else sorted(train_labels)
    if len(order) < 2:
        raise DataError(
            f"{root}: the training images have {len(order)} label(s) {order}: a classifier needs at least two"
        )
    index = {c: i for i, c in enumerate(order)}
    unseen = [e for e in entries if e.label not in index]
    if unseen:
        labels = sorted({e.label for e in unseen})
        raise DataError(
            f"{root}: label(s) {labels[:SHOWN]} appear only in {unseen[0].split} rows (e.g. {unseen[0].where}); "
            "a model cannot learn them: add training rows for them or remove those rows"
        )

    def split(name: str) -> Split:
        rows = [e for e in entries if e.split == name]
        return Split(split_root, [e.file for e in rows], np.asarray([index[e.label] for e in rows], dtype=np.int64))

    test, val = split("test"), split("val")
    ds = Dataset(source, root, split("train"), test, default_names(order), order, val=val if len(val) else None)
    if not len(test):
        log.info("%s gives no test split: a stratified %.0f%% of train is the test split", root, 100 * test_fraction)
        ds = carve_test(ds, test_fraction, seed)
    _check_class_coverage(ds)
    return ds


# ------------------------------------------------------------------------- sources written to a cache


INDEX_FILE = "index.json"


def materialised(folder: Path, write: Callable[[Path], list[Entry]]) -> list[Entry]:
    """The entries of a source written once as image files into `folder` (`write(tmp)` writes them into a
    temp folder and returns them, files relative to it): reused when `folder/index.json` exists, else
    written, then renamed into place (a crash mid-way leaves no half folder that looks complete)."""
    index = folder / INDEX_FILE
    if not index.is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            entries = write(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / INDEX_FILE).write_text(json.dumps([dataclasses.astuple(e) for e in entries]))
        try:
            tmp.rename(folder)
        except OSError:  # another process wrote it first: the same content
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("wrote %d images to %s", len(entries), folder)
    return [Entry(*row) for row in json.loads(index.read_text())]
