"""What the report reads: each model's test predictions, and the test images they refer to.

Nothing here trains or evaluates. A missing or unreadable file is a fact the report states, never a
crash: loaders return None and log why.

Test images live under the test split's root, which `compare` records as `dataset.test_root` (an
absolute path: `<root>/Images` for Stanford Dogs, `<root>/test` or `val` for a `folder` dataset).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from visionpoc.data.images import load_rgb
from visionpoc.errors import DataError
from visionpoc.evaluate import topk_correct
from visionpoc.results import DatasetInfo, ModelResult, load_predictions
from visionpoc.runfiles import PREDICTIONS_FILE

log = logging.getLogger(__name__)


@dataclass
class Predictions:
    """One model's test predictions, in the test split's file order."""

    targets: np.ndarray  # (N,) int64
    probs: np.ndarray  # (N, C) float32
    preds: np.ndarray  # (N,) int64
    files: list[str]

    @property
    def correct(self) -> np.ndarray:
        return self.preds == self.targets  # (N,) bool

    @property
    def top5_correct(self) -> np.ndarray:
        """(N,) bool: the truth is among the 5 most probable classes: `evaluate`'s rule, so its mean is the
        recorded top-5 accuracy."""
        return topk_correct(self.targets, self.probs, 5)


def read_predictions(run_dir: Path, model: ModelResult) -> Predictions | None:
    """`RUN_DIR/<label>/test_predictions.npz`, or None (logged) when absent or unreadable."""
    path = Path(run_dir) / model.label / PREDICTIONS_FILE
    if model.status != "ok" or not path.is_file():
        return None
    try:
        z = load_predictions(path)
        probs = z["probs"]
        preds = z["preds"] if "preds" in z else probs.argmax(1)
        files = [str(f) for f in z["files"]] if "files" in z else [str(i) for i in range(len(probs))]
        return Predictions(z["targets"].astype(np.int64), probs, preds.astype(np.int64), files)
    except (OSError, KeyError, ValueError) as e:
        log.warning("cannot read %s (%s): the report leaves this model's predictions out", path, e)
        return None


def align(a: Predictions, b: Predictions) -> tuple[np.ndarray, np.ndarray] | None:
    """Index arrays putting `a` and `b` on the same images (same order), or None if they do not match."""
    if a.files == b.files and np.array_equal(a.targets, b.targets):
        idx = np.arange(len(a.files))
        return idx, idx
    pos_b = {f: i for i, f in enumerate(b.files)}
    common = [(i, pos_b[f]) for i, f in enumerate(a.files) if f in pos_b]
    if not common or len(common) != len(a.files) or len(common) != len(b.files):
        return None
    ia, ib = (np.asarray(x, dtype=np.int64) for x in zip(*common, strict=True))
    if not np.array_equal(a.targets[ia], b.targets[ib]):
        return None
    return ia, ib


def shared_classes(a: ModelResult, b: ModelResult, targets: np.ndarray, class_names: list[str]) -> np.ndarray | None:
    """(N,) bool: the test images whose true class both models know, when a deployed model lacks some of the
    dataset's classes (`ModelResult.classes_unknown`): a paired test counts only those. None: every image."""
    unknown = set(a.classes_unknown) | set(b.classes_unknown)
    if not unknown:
        return None
    known = np.array([name not in unknown for name in class_names], dtype=bool)
    return known[np.asarray(targets, dtype=np.int64)]


def test_split_root(dataset: DatasetInfo) -> Path | None:
    """The folder the test split's relative file paths start from (recorded by `compare`), or None if it
    is not on this machine."""
    root = Path(dataset.test_root) if dataset.test_root else None
    return root if root is not None and root.is_dir() else None


def test_image_path(dataset: DatasetInfo, rel: str) -> Path | None:
    """The absolute path of test image `rel`, or None when the dataset or the file is absent."""
    root = test_split_root(dataset)
    if root is None:
        return None
    path = root / rel
    return path if path.is_file() else None


def open_test_images(dataset: DatasetInfo, files: list[str]) -> list[Image.Image] | None:
    """Decode `files` (RGB); None, with a logged reason, if any is missing or unreadable."""
    images = []
    for rel in files:
        path = test_image_path(dataset, rel)
        if path is None:
            log.info("test image %s not found under %s: image sections are skipped", rel, dataset.root)
            return None
        try:
            images.append(load_rgb(path))
        except DataError as e:
            log.warning("%s: image sections are skipped", e)
            return None
    return images
