"""Build a miniature Stanford Dogs in the official layout, and pack it as the official tars.

Images: Images/<wnid>-<breed>/<wnid>_<n>.jpg; annotations: Annotation/<wnid>-<breed>/<wnid>_<n> (XML);
lists: train_list.mat, test_list.mat, file_list.mat written with scipy.io.savemat in the official
structure (cell arrays `file_list`, `annotation_list`, 1-based double `labels`).
Each breed has its own colour and stripe direction so that a tiny model can learn it.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

BREEDS = [
    ("n02085620", "Chihuahua"),
    ("n02086240", "Shih-Tzu"),
    ("n02088094", "Afghan_hound"),
    ("n02099601", "golden_retriever"),
    ("n02110185", "Siberian_husky"),
]
TINY_VIT = {  # a `models:` entry: a 2-block ViT at 32 px from scratch, fast enough for whole runs in tests
    "label": "vit",
    "timm": "vit_tiny_patch16_224",
    "pretrained": False,
    "img_size": 32,
    "model_kwargs": {"depth": 2},
}
COLOURS = [(200, 40, 40), (40, 160, 40), (40, 60, 200), (220, 200, 40), (150, 40, 170)]


def dog_image(k: int, n: int, size: tuple[int, int] = (48, 36)) -> Image.Image:
    rng = np.random.default_rng(1000 * k + n)
    w, h = size
    base = np.array(COLOURS[k % len(COLOURS)], dtype=np.float32)
    img = base + rng.normal(0, 25, size=(h, w, 3))
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = ((xx if k % 2 else yy) // 4 + k) % 2 == 0
    img[stripes] *= 0.6
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _cell(strings: list[str]) -> np.ndarray:
    arr = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        arr[i, 0] = s
    return arr


def _annotation(folder: str, stem: str, w: int, h: int, breed: str) -> str:
    return (
        f"<annotation><folder>{folder}</folder><filename>{stem}</filename>"
        f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
        f"<object><name>{breed}</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
        f"<xmax>{w - 1}</xmax><ymax>{h - 1}</ymax></bndbox></object></annotation>"
    )


def make_mini_dogs(
    root: Path,
    n_breeds: int = 3,
    train_per_class: int = 6,
    test_per_class: int = 3,
    size: tuple[int, int] = (48, 36),
    lists_subfolder: bool = False,
) -> Path:
    """Write the miniature dataset into `root` and return it."""
    root.mkdir(parents=True, exist_ok=True)
    splits: dict[str, tuple[list[str], list[str], list[int]]] = {"train": ([], [], []), "test": ([], [], [])}
    for k, (wnid, breed) in enumerate(BREEDS[:n_breeds]):
        folder = f"{wnid}-{breed}"
        (root / "Images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "Annotation" / folder).mkdir(parents=True, exist_ok=True)
        for n in range(train_per_class + test_per_class):
            stem = f"{wnid}_{n + 1}"
            dog_image(k, n, size).save(root / "Images" / folder / f"{stem}.jpg", quality=90)
            (root / "Annotation" / folder / stem).write_text(_annotation(folder, stem, *size, breed))
            files, annos, labels = splits["train" if n < train_per_class else "test"]
            files.append(f"{folder}/{stem}.jpg")
            annos.append(f"{folder}/{stem}")
            labels.append(k + 1)
    lists = root / "lists" if lists_subfolder else root
    lists.mkdir(exist_ok=True)
    everything: tuple[list[str], list[str], list[int]] = ([], [], [])
    for name, (files, annos, labels) in splits.items():
        scipy.io.savemat(
            str(lists / f"{name}_list.mat"),
            {
                "file_list": _cell(files),
                "annotation_list": _cell(annos),
                "labels": np.asarray(labels, dtype=np.float64).reshape(-1, 1),
            },
        )
        for acc, part in zip(everything, (files, annos, labels), strict=True):
            acc += part  # type: ignore[operator]
    scipy.io.savemat(
        str(lists / "file_list.mat"),
        {
            "file_list": _cell(everything[0]),
            "annotation_list": _cell(everything[1]),
            "labels": np.asarray(everything[2], dtype=np.float64).reshape(-1, 1),
        },
    )
    return root


def pack_official_tars(tree: Path, out: Path) -> Path:
    """Pack a tree made by make_mini_dogs as the official images.tar, annotation.tar and lists.tar."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "images.tar", "w") as t:
        t.add(tree / "Images", arcname="Images")
    with tarfile.open(out / "annotation.tar", "w") as t:
        t.add(tree / "Annotation", arcname="Annotation")
    with tarfile.open(out / "lists.tar", "w") as t:
        for f in ("file_list.mat", "train_list.mat", "test_list.mat"):
            t.add(tree / f, arcname=f)
    return out
