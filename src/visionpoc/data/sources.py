"""Dataset sources: read a dataset tree into lists of (file, label) for train and test.

Two tree sources:
- `stanford_dogs`, the official layout: `Images/<wnid>-<breed>/<wnid>_<n>.jpg`, `Annotation/...`, and
  `train_list.mat` / `test_list.mat` / `file_list.mat` in the root or in `lists/` (scipy.io.loadmat;
  `file_list`, `annotation_list`, 1-based `labels`). A class-folder tree read as `stanford_dogs` is
  recognised (`class_folder_layout`): the error says to read it as `folder`, not to download.
- `folder`: `root/train/<class>/*` and `root/test/<class>/*` (or `root/val/` as test); classes are the
  sorted train folder names.

`read_dataset` also dispatches to the sources of labelled rows: `manifest` (`manifest.py`), `hf`
(`hub.py`) and `webdataset` (`shards.py`).

Each class has its folder and its display name (`names.py`: the breed for Stanford Dogs, a map given by
`data.class_names`).
"""

from __future__ import annotations

import logging
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionpoc.config import DataConfig
from visionpoc.data.names import breed_name as breed_name  # re-exported: where it was first found
from visionpoc.data.names import default_names, display_names
from visionpoc.errors import DataError

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
DOGS_LISTS = ("train_list.mat", "test_list.mat")


@dataclass
class Split:
    """One split: image files relative to `root` and their integer labels."""

    root: Path
    files: list[str]
    labels: np.ndarray  # (N,) int64
    # a split streamed from tar shards (`data/shards.py`): shard name (stem) -> shard, and `files` name
    # samples in them, `<split>/<shard stem>/<key>.<ext>`, never written to disk
    shards: dict[str, Path] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    def subset(self, idx: np.ndarray) -> Split:
        return Split(self.root, [self.files[i] for i in idx], self.labels[idx], self.shards)


@dataclass
class Dataset:
    """What a source yields: train and test splits and the classes (index = label): their display names
    and their folders."""

    source: str
    root: Path
    train: Split
    test: Split
    class_names: list[str]  # what a reader sees: results, reports, `predict`, the demo, exports
    class_folders: list[str]  # where the images are, in the same order
    val: Split | None = None  # a validation split the source gives (a manifest's `val` rows); else carved

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ------------------------------------------------------------------------------------- stanford dogs


def find_dogs_lists(root: Path) -> Path | None:
    """The folder holding the official .mat lists: `root` or `root/lists`, else None."""
    for d in (root, root / "lists"):
        if all((d / f).is_file() for f in DOGS_LISTS):
            return d
    return None


def _read_list(mat_path: Path) -> tuple[list[str], np.ndarray]:
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(mat_path))
    except Exception as e:  # scipy raises ValueError/TypeError/OSError depending on the damage
        raise DataError(
            f"cannot read {mat_path} ({e}): the list file is damaged; re-run 'visionpoc data download'"
        ) from e
    for key in ("file_list", "labels"):
        if key not in mat:
            raise DataError(f"{mat_path} has no '{key}' entry: it is not an official Stanford Dogs list")
    files = [str(np.asarray(x).ravel()[0]) for x in np.asarray(mat["file_list"]).ravel()]
    labels = np.asarray(mat["labels"]).ravel().astype(np.int64) - 1  # official labels are 1-based
    if len(files) != len(labels):
        raise DataError(f"{mat_path}: {len(files)} files but {len(labels)} labels")
    return files, labels


def read_stanford_dogs(root: str | Path) -> Dataset:
    root = Path(root)
    lists = find_dogs_lists(root)
    if lists is None:
        missing = [f for f in DOGS_LISTS if not (root / f).is_file() and not (root / "lists" / f).is_file()]
        layout = class_folder_layout(root)
        if layout is not None:  # the user's own images, read with the default source
            raise DataError(_not_dogs_message(root, layout, missing))
        raise DataError(
            f"{', '.join(missing)} not found in {root} or {root / 'lists'}: "
            f"run 'visionpoc data download --root {root}' or pass the dataset folder with --root"
        )
    images = root / "Images"
    if not images.is_dir():
        raise DataError(
            f"{images} not found: extract images.tar into {root} (or run 'visionpoc data download --root {root}')"
        )
    train_files, train_labels = _read_list(lists / "train_list.mat")
    test_files, test_labels = _read_list(lists / "test_list.mat")

    # class k is the folder its files live in; the official labels number folders in sorted order
    folders: dict[int, str] = {}
    for f, y in zip(train_files + test_files, np.concatenate([train_labels, test_labels]), strict=True):
        folders.setdefault(int(y), f.split("/")[0])
    num_classes = max(folders) + 1
    absent_classes = [k + 1 for k in range(num_classes) if k not in folders]
    if absent_classes:
        raise DataError(f"{lists}: labels {absent_classes} have no images in either list")
    class_folders = [folders[k] for k in range(num_classes)]
    ds = Dataset(
        source="stanford_dogs",
        root=root,
        train=Split(images, train_files, train_labels),
        test=Split(images, test_files, test_labels),
        class_names=default_names(class_folders),  # the breeds
        class_folders=class_folders,
    )
    _check_files_exist(ds)
    _check_class_coverage(ds)
    return ds


_DOGS_DIRS = {"Images", "Annotation", "lists"}  # Stanford Dogs' own folders, never classes
FOLDER_SOURCE = "--set data.source=folder (compare, train, tune) or --source folder (visionpoc data check)"


def _holds_images(d: Path, nested: bool) -> bool:
    """Whether `d` holds an image file (in sub-folders too, when `nested`); stops at the first."""
    files = d.rglob("*") if nested else d.iterdir()
    return any(p.suffix.lower() in IMG_EXTENSIONS and p.is_file() for p in files)


def class_folder_layout(root: Path) -> str | None:
    """How `root` holds a class-folder dataset rather than Stanford Dogs' official layout: `split`
    (`train/<class>/` folders of images: the `folder` source), `flat` (`<class>/` folders of images, no
    train/test split), or None."""
    if not root.is_dir():
        return None
    train = root / "train"
    if train.is_dir() and any(c.is_dir() and _holds_images(c, nested=True) for c in train.iterdir()):
        return "split"
    classes = [c for c in root.iterdir() if c.is_dir() and not _hidden(c.name) and c.name not in _DOGS_DIRS]
    return "flat" if sum(_holds_images(c, nested=False) for c in classes[:50]) >= 2 else None


def _not_dogs_message(root: Path, layout: str, missing: list[str]) -> str:
    what = f"{root} holds class folders of images, not Stanford Dogs' official layout (no {', '.join(missing)})"
    if layout == "split":
        return f"{what}: read it as a folder dataset with {FOLDER_SOURCE}"
    return (
        f"{what}: for your own images, put them in {root / 'train'}/<class>/ and {root / 'test'}/<class>/, "
        f"then read them with {FOLDER_SOURCE}"
    )


# -------------------------------------------------------------------------------------------- folders


JUNK_FILES = {"thumbs.db", "desktop.ini", "ehthumbs.db"}  # system files that are never images
JUNK_DIRS = {"__MACOSX", "@eaDir"}  # a macOS zip's resource forks, a Synology NAS's thumbnails


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in JUNK_DIRS


def _not_utf8(names: list[str]) -> list[str]:
    """The names the file system gave that are not valid UTF-8 (Python keeps such bytes as surrogates)."""
    bad = []
    for n in names:
        try:
            n.encode("utf-8")
        except UnicodeEncodeError:
            bad.append(n)
    return bad


def _refuse_non_utf8(names: list[str], where: Path) -> None:
    bad = _not_utf8(names)
    if bad:
        shown = ", ".join(repr(os.fsencode(n))[1:] for n in bad[:5])
        raise DataError(
            f"{len(bad)} name(s) under {where} are not valid UTF-8 (e.g. {shown}); they would break the "
            "results and the report: rename them to UTF-8, e.g. `convmv -f latin1 -t utf8 -r --notest "
            f"{where}`"
        )


def _list_images(class_dir: Path, skipped: Counter[str]) -> list[str]:
    """Image files under `class_dir` (sub-folders included, hidden files and folders not), relative to
    its parent; files with other extensions are counted by extension in `skipped`."""
    found = []
    for p in class_dir.rglob("*"):
        rel = p.relative_to(class_dir)
        if not p.is_file() or any(_hidden(part) for part in rel.parts) or p.name.lower() in JUNK_FILES:
            continue
        if p.suffix.lower() in IMG_EXTENSIONS:
            found.append(str(p.relative_to(class_dir.parent)))
        else:
            skipped[p.suffix.lower() or "(no extension)"] += 1
    return sorted(found)


def _class_dirs(d: Path, split_dirs: tuple[Path, ...]) -> dict[str, Path]:
    """Class name (Unicode NFC: a name typed on macOS matches the same name typed elsewhere) -> folder.
    A class folder may be a symbolic link to images kept elsewhere, but not into `split_dirs` (train/,
    test/) or above them: that would read other classes' images, or the test images, again as this class."""
    dirs = [c for c in sorted(d.iterdir()) if c.is_dir() and not _hidden(c.name)]
    for c in dirs:
        if c.is_symlink():
            _refuse_link_into(c, split_dirs)
    return {unicodedata.normalize("NFC", c.name): c for c in dirs}


def _refuse_link_into(link: Path, split_dirs: tuple[Path, ...]) -> None:
    """Raise DataError if the class-folder symlink `link` points to a folder that holds it, or into one
    of `split_dirs`."""
    target = link.resolve()
    around = {link.parent.resolve(), *link.parent.resolve().parents}
    inside = any(target == s.resolve() or s.resolve() in target.parents for s in split_dirs)
    if target in around or inside:
        raise DataError(
            f"the class folder {link} is a symbolic link to {target}, a folder of the dataset: its images "
            "would be read again as this class; replace the link with the class's own images, or remove it"
        )


def read_folder(root: str | Path) -> Dataset:
    root = Path(root)
    if root.is_file():
        raise DataError(f"data.root {root} is a file; point it to the folder that holds train/ and test/")
    train_dir = root / "train"
    test_dir = next((d for d in (root / "test", root / "val") if d.is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(
            f"{root} must hold train/<class>/* and test/<class>/* (or val/<class>/*) folders; "
            f"found {sorted(p.name for p in root.iterdir()) if root.is_dir() else 'no such folder'}"
        )
    if test_dir.name == "test" and (root / "val").is_dir():
        log.warning(
            "%s is not read: test/ is the test split, and validation is carved out of train/ "
            "(data.val_fraction); merge val/ into train/ to train on it",
            root / "val",
        )
    train_classes, test_classes = (
        _class_dirs(train_dir, (train_dir, test_dir)),
        _class_dirs(test_dir, (train_dir, test_dir)),
    )
    _refuse_non_utf8([str(c.relative_to(root)) for c in [*train_classes.values(), *test_classes.values()]], root)
    class_names = sorted(train_classes)
    if len(class_names) < 2:
        raise DataError(
            f"{train_dir} has {len(class_names)} class folder(s) {class_names}: a classifier needs at least "
            "two; put each class's images in train/<class>/"
        )
    index = {c: i for i, c in enumerate(class_names)}
    skipped: dict[str, Counter[str]] = {}

    def split(d: Path, classes: dict[str, Path]) -> Split:
        files: list[str] = []
        labels: list[int] = []
        skipped[d.name] = Counter()
        for c in class_names:
            if c in classes:
                found = _list_images(classes[c], skipped[d.name])
                files += found
                labels += [index[c]] * len(found)
        _refuse_non_utf8(files, d)
        loose = [p.name for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]
        if loose:
            log.warning(
                "%d image(s) directly in %s are not read (e.g. %s): put each in its class folder, %s/<class>/",
                len(loose),
                d,
                loose[0],
                d,
            )
        return Split(d, files, np.asarray(labels, dtype=np.int64))

    train = split(train_dir, train_classes)
    empty = [c for c in class_names if not (train.labels == index[c]).any()]
    if empty:
        raise DataError(f"class folders with no images in {train_dir}: {empty}; add images or remove them")
    unknown = sorted(c for c, path in test_classes.items() if c not in index and _list_images(path, Counter()))
    if unknown:
        raise DataError(
            f"{test_dir} has classes absent from {train_dir}: {unknown}; a model cannot learn them: "
            "add training images for them or remove those folders"
        )
    test = split(test_dir, test_classes)
    if len(test) == 0:
        raise DataError(f"{test_dir} holds no images in class folders: put them in {test_dir}/<class>/")
    for name, counts in skipped.items():
        if counts:
            log.warning(
                "%s: %d file(s) skipped, not an image type this tool reads (%s); supported: %s",
                root / name,
                sum(counts.values()),
                ", ".join(f"{k}: {v}" for k, v in counts.most_common()),
                " ".join(IMG_EXTENSIONS),
            )
    ds = Dataset("folder", root, train, test, default_names(class_names), class_names)
    _check_class_coverage(ds)
    return ds


# ------------------------------------------------------------------------------------------- shared


def _check_files_exist(ds: Dataset) -> None:
    for name, s in (("train", ds.train), ("test", ds.test)):
        missing = [f for f in s.files if not (s.root / f).is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} {name} image(s) listed but absent under {s.root}, e.g. {s.root / missing[0]}: "
                "re-extract images.tar (or run 'visionpoc data download' again)"
            )


def _check_class_coverage(ds: Dataset) -> None:
    in_test = set(np.unique(ds.test.labels).tolist())
    for k, folder in enumerate(ds.class_folders):
        if k not in in_test:
            log.warning("class %r has training images but none in the test split; it is not scored", folder)


SOURCES = ("stanford_dogs", "folder", "manifest", "hf", "webdataset")


def read_dataset(
    source: str,
    root: str | Path,
    class_names: str | Path | None = None,
    options: DataConfig | None = None,
    seed: int = 0,
) -> Dataset:
    """The dataset at `root`; `class_names` (`data.class_names`) maps class folders to display names.
    `options` (`data`: test fraction, `hf` columns) and `seed` (the test carve-out) serve the `manifest`,
    `hf` and `webdataset` sources, whose modules (and optional packages) are imported only for them."""
    opts = options or DataConfig()
    if source == "stanford_dogs":
        ds = read_stanford_dogs(root)
    elif source == "folder":
        ds = read_folder(root)
    elif source == "manifest":
        from visionpoc.data.manifest import read_manifest

        ds = read_manifest(root, opts.test_fraction, seed)
    elif source == "hf":
        from visionpoc.data.hub import read_hf

        ds = read_hf(str(root), opts, seed)
    elif source == "webdataset":
        from visionpoc.data.shards import read_shards

        ds = read_shards(str(root), opts, seed)
    else:
        raise DataError(f"data.source: unknown source {source!r}; use one of {', '.join(SOURCES)}")
    if class_names is not None:
        ds.class_names = display_names(ds.class_folders, ds.class_names, class_names)
    return ds
