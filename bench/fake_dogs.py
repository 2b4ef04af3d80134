"""A stand-in Stanford Dogs for timing the whole PoC where the real one cannot be downloaded (the lent
GPU machine has no network): the official layout and split sizes (120 breeds, 100 train + ~71.5 test
images each: 12,000 / 8,580), Stanford-Dogs-sized JPEGs (500x375, ~quality 90), .mat lists written with
scipy in the official structure. The pixels are noise with a per-breed tint: this measures time, not
accuracy.

    python bench/fake_dogs.py OUT_DIR [--classes 120] [--train 100] [--test 8580] [--size 500x375]
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image


def _write(task: tuple[str, int, int, int, int]) -> None:
    path, k, n, w, h = task
    rng = np.random.default_rng(1_000_003 * k + n)
    tint = np.array([(37 * k) % 256, (91 * k) % 256, (53 * k) % 256], dtype=np.float32)
    img = 0.5 * tint + rng.normal(128, 40, size=(h, w, 3)) * 0.5  # (H, W, 3)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def _cell(strings: list[str]) -> np.ndarray:
    arr = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        arr[i, 0] = s
    return arr


def make(root: Path, classes: int, train: int, test: int, size: tuple[int, int]) -> None:
    tasks, lists = [], {"train": ([], []), "test": ([], [])}
    test_each = [test // classes + (1 if k < test % classes else 0) for k in range(classes)]
    for k in range(classes):
        folder = f"n{k:08d}-breed_{k}"
        (root / "Images" / folder).mkdir(parents=True, exist_ok=True)
        for n in range(train + test_each[k]):
            rel = f"{folder}/n{k:08d}_{n + 1}.jpg"
            tasks.append((str(root / "Images" / rel), k, n, *size))
            files, labels = lists["train" if n < train else "test"]
            files.append(rel)
            labels.append(k + 1)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write, tasks, chunksize=64))
    for name, (files, labels) in lists.items():
        scipy.io.savemat(
            str(root / f"{name}_list.mat"),
            {
                "file_list": _cell(files),
                "annotation_list": _cell([f[:-4] for f in files]),
                "labels": np.asarray(labels, dtype=np.float64).reshape(-1, 1),
            },
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--classes", type=int, default=120)
    p.add_argument("--train", type=int, default=100, help="training images per class")
    p.add_argument("--test", type=int, default=8580, help="test images in all")
    p.add_argument("--size", default="500x375")
    a = p.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    make(a.root, a.classes, a.train, a.test, (w, h))
    print(f"{a.root}: {a.classes * a.train} train / {a.test} test JPEGs of {w}x{h}")


if __name__ == "__main__":
    main()
