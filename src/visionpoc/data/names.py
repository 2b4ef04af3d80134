"""Class display names: what a reader sees for each class in results, reports, `predict` and the demo.

A class is found by its folder; it is shown by its display name:
- Stanford Dogs' folders, and `folder` datasets whose class folders all read `n<8 digits>-<name>` (a
  WordNet id, then the name, e.g. `n02085620-Chihuahua`), show the name (`Chihuahua`; `_` as spaces);
- other folders show their own name;
- `data.class_names` names a file that maps folders to names: a CSV of `folder,name` rows (a
  `folder,name` header is optional) or a JSON object `{folder: name}`. Classes it leaves out keep the
  name above. Every key must be a class folder, and no two classes may share a name.
"""

from __future__ import annotations

import csv
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from visionpoc.errors import ConfigError

WORDNET_FOLDER = re.compile(r"n\d{8}-.+")  # `n02085620-Chihuahua`: a WordNet id, then the name
KEY = "data.class_names"


def breed_name(folder: str) -> str:
    """`n02085620-Chihuahua` -> `Chihuahua`; `n02088094-Afghan_hound` -> `Afghan hound`."""
    name = folder.split("-", 1)[1] if "-" in folder else folder
    return name.replace("_", " ")


def default_names(folders: list[str]) -> list[str]:
    """The names shown without a map: the names after the WordNet ids when every folder carries one, else
    the folder names."""
    if not folders or not all(WORDNET_FOLDER.fullmatch(f) for f in folders):
        return list(folders)
    names = [breed_name(f) for f in folders]
    twice = {n for n, c in Counter(names).items() if c > 1}  # ImageNet has two `crane`s: those keep their folder
    return [f if n in twice else n for f, n in zip(folders, names, strict=True)]


def _fail(path: Path, problem: str) -> ConfigError:
    return ConfigError(f"{KEY}: {path} {problem}")


def _read_csv(path: Path, text: str) -> list[tuple[str, str, str]]:
    rows = []
    for line, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise _fail(
                path,
                f"line {line} has {len(row)} column(s) {row}: each row must be `folder,name` (quote a name "
                'that holds a comma: `n02085620,"Chihuahua, long-haired"`)',
            )
        folder, name = (cell.strip() for cell in row)
        if line == 1 and (folder.lower(), name.lower()) == ("folder", "name"):
            continue  # the header
        rows.append((folder, name, f"line {line}"))
    return rows


def _read_json(path: Path, text: str) -> list[tuple[str, str, str]]:
    seen: list[tuple[str, Any]] = []

    def keep_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen.extend(pairs)  # every pair, so that a key given twice is seen (a dict would keep the last)
        return dict(pairs)

    try:
        loaded = json.loads(text, object_pairs_hook=keep_pairs)
    except json.JSONDecodeError as e:
        raise _fail(path, f'is not valid JSON ({e}): write an object {{"folder": "name", ...}}') from e
    if not isinstance(loaded, dict):
        raise _fail(path, f'holds a {type(loaded).__name__}: write an object {{"folder": "name", ...}}')
    if any(isinstance(v, dict) for v in loaded.values()):
        raise _fail(path, 'holds nested objects: write one flat object {"folder": "name", ...}')
    bad = [k for k, v in loaded.items() if not isinstance(v, str)]
    if bad:
        raise _fail(path, f"maps {bad[0]!r} to {loaded[bad[0]]!r}: each name must be a string")
    return [(k.strip(), v.strip(), f"key {k!r}") for k, v in seen]


def read_class_map(path: str | Path) -> dict[str, str]:
    """The folder -> name map in `path` (CSV, or JSON for a `.json` file); a missing or unreadable file,
    a bad row, an empty name or a folder given twice is a `ConfigError` naming the file and the fix."""
    path = Path(path).expanduser()
    if not path.is_file():
        why = "is a folder" if path.is_dir() else "not found"
        raise _fail(path, f"{why}: give a CSV (`folder,name` rows) or JSON ({{folder: name}}) file, or null")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's CSV may start with a BOM
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(path, f"cannot be read as UTF-8 text ({e}): save it as a UTF-8 CSV or JSON file") from e
    rows = _read_json(path, text) if path.suffix.lower() == ".json" else _read_csv(path, text)
    mapping: dict[str, str] = {}
    for folder, name, where in rows:
        folder = unicodedata.normalize("NFC", folder)  # as the folder names are read
        if not folder or not name:
            raise _fail(path, f"{where}: an empty {'folder' if not folder else 'name'}: give both, or drop the row")
        if folder in mapping:
            raise _fail(path, f"{where}: {folder!r} is mapped twice; keep one name for it")
        mapping[folder] = name
    return mapping


def display_names(folders: list[str], defaults: list[str], path: str | Path | None) -> list[str]:
    """The display name of each class folder: `defaults`, replaced by the map in `path` (if any). A key
    that names no class folder, or two classes given the same name, is a `ConfigError`."""
    if path is None:
        return list(defaults)
    mapping = read_class_map(path)
    unknown = [k for k in mapping if k not in folders]
    if unknown:
        shown = ", ".join(map(repr, folders[:3])) + (", ..." if len(folders) > 3 else "")
        raise _fail(
            Path(path),
            f"maps {', '.join(map(repr, unknown[:5]))}, which name(s) no class folder: the keys are the class "
            f"folders' names ({len(folders)}, e.g. {shown}); fix or remove those rows",
        )
    names = [mapping.get(f, d) for f, d in zip(folders, defaults, strict=True)]
    by_name: dict[str, list[str]] = {}
    for f, n in zip(folders, names, strict=True):
        by_name.setdefault(n, []).append(f)
    shared = {n: fs for n, fs in by_name.items() if len(fs) > 1}
    if shared:
        name, fs = next(iter(shared.items()))
        raise _fail(
            Path(path),
            f"gives the name {name!r} to {len(fs)} classes ({', '.join(map(repr, fs))}): a reader could not "
            "tell them apart; give each class its own name",
        )
    return names
