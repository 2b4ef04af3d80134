"""The demo's dataset: scikit-learn's handwritten digits (`load_digits`: 1,797 real 8x8 grayscale scans of
the digits 0-9, shipped inside scikit-learn, no download) as a `folder` dataset tree.

`write_digits(root)` writes `root/train/<digit>/<n>.png` and `root/test/<digit>/<n>.png` (a stratified,
seeded 75/25 split; each scan upscaled to `size` px with bilinear interpolation, as RGB), then a
`digits.json` marker. A folder holding the marker of the same size is reused as it is; the tree is
built in a temporary folder and renamed into place, so an interrupted build leaves no half tree.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from visionpoc.errors import DataError

log = logging.getLogger(__name__)

MARKER = "digits.json"
SIZE = 32
"""Side of the written images (px): 8x8 scans upscaled 4x, the input size of the demo's models."""
TEST_FRACTION = 0.25
SPLIT_SEED = 0


def _marker(size: int, counts: dict[str, int]) -> dict[str, object]:
    return {"source": "sklearn.datasets.load_digits", "size": size, "split_seed": SPLIT_SEED, "images": counts}


def _reusable(root: Path, size: int) -> bool:
    """Whether `root` holds a finished tree of `size` px images; a folder that is something else is refused."""
    marker = root / MARKER
    if not marker.is_file():
        if root.exists() and any(root.iterdir()):
            raise DataError(
                f"{root} exists but holds no {MARKER}: it is not the demo's digits folder; "
                "delete it or give the demo another --out"
            )
        return False
    try:
        found = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{marker} is unreadable ({e}): delete {root} and run the demo again") from e
    if found.get("size") != size:
        raise DataError(f"{root} holds the digits at {found.get('size')} px, not {size}: delete it and run again")
    return True


def _write_tree(tmp: Path, size: int) -> dict[str, int]:
    """Write the split tree into `tmp`; returns the image count of each split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)  # (1797, 64) values 0..16, (1797,)
    scans = np.round(x.reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)  # (N, 8, 8)
    index = np.arange(len(y))
    train, test = train_test_split(index, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED)
    for split, idx in (("train", train), ("test", test)):
        for digit in range(10):
            (tmp / split / str(digit)).mkdir(parents=True, exist_ok=True)
        for i in idx:
            img = Image.fromarray(scans[i]).resize((size, size), Image.Resampling.BILINEAR)
            img.convert("RGB").save(tmp / split / str(y[i]) / f"{i:04d}.png")
    return {"train": len(train), "test": len(test)}


def write_digits(root: str | Path, size: int = SIZE) -> Path:
    """The digits as `root/{train,test}/<digit>/*.png` (`size` px RGB), written once; returns `root`."""
    root = Path(root)
    if _reusable(root, size):
        log.info("digits: reusing %s", root)
        return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    except OSError as e:
        raise DataError(f"cannot write the digits into {root.parent} ({e}): give the demo another --out") from e
    try:
        counts = _write_tree(tmp, size)
        (tmp / MARKER).write_text(json.dumps(_marker(size, counts), indent=2) + "\n", encoding="utf-8")
        if root.exists():  # an empty folder (checked above): the rename replaces it
            root.rmdir()
        os.replace(tmp, root)
    except OSError as e:
        if not _reusable(root, size):  # unless another demo finished the same tree meanwhile
            raise DataError(f"cannot write the digits to {root} ({e}): give the demo another --out") from e
        log.info("digits: another demo wrote %s meanwhile; reusing it", root)
        return root
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename
    log.info("digits: wrote %d train and %d test images (%d px) to %s", counts["train"], counts["test"], size, root)
    return root
