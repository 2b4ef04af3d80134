"""Train/validation/test splits: a stratified, seeded validation carve-out of train (or the source's own
validation split), the test carve-out for sources without a test split, and per-class limits.

Every choice (best epoch, early stopping, tuning) reads validation only; the test split is scored once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from visionpoc.data.sources import Dataset, Split
from visionpoc.errors import DataError


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    class_names: list[str]  # display names (index = label), as results and reports show them

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def limit_per_class(split: Split, limit: int | None, seed: int) -> Split:
    """At most `limit` images of each class, chosen at random (seeded), in the original order."""
    if limit is None:
        return split
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for c in np.unique(split.labels):
        idx = np.flatnonzero(split.labels == c)
        keep += rng.permutation(idx)[:limit].tolist() if len(idx) > limit else idx.tolist()
    return split.subset(np.sort(np.asarray(keep, dtype=np.int64)))


def stratified_val_split(
    train: Split, fraction: float, seed: int, class_folders: list[str], key: str = "data.val_fraction"
) -> tuple[Split, Split]:
    """Hold out round(fraction * n_c) images of each class c (at least one) for validation (or, with
    `key="data.test_fraction"`, for test); errors name the class by its folder (`class_folders`), where
    images are to be added, and the config key."""
    what = "test" if key == "data.test_fraction" else "validation"
    if fraction <= 0:
        return train, train.subset(np.zeros(0, dtype=np.int64))
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for c in np.unique(train.labels):
        idx = rng.permutation(np.flatnonzero(train.labels == c))
        if len(idx) < 2:
            raise DataError(
                f"class {class_folders[c]!r} has {len(idx)} training image(s); the {what} split needs "
                f"at least 2 per class: add images" + (" or set data.val_fraction=0" if what == "validation" else "")
            )
        n_val = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        val += idx[:n_val].tolist()
    val_idx = np.sort(np.asarray(val, dtype=np.int64))
    train_idx = np.setdiff1d(np.arange(len(train)), val_idx)
    return train.subset(train_idx), train.subset(val_idx)


def make_splits(ds: Dataset, val_fraction: float, limit: int | None, seed: int) -> Splits:
    """Limit train and test per class, then carve validation out of (limited) train."""
    train = limit_per_class(ds.train, limit, seed)
    test = limit_per_class(ds.test, limit, seed)
    if ds.val is not None:  # the source's own validation split (a manifest's `val` rows)
        val = limit_per_class(ds.val, limit, seed)
    else:
        train, val = stratified_val_split(train, val_fraction, seed, ds.class_folders)
    return Splits(train=train, val=val, test=test, class_names=ds.class_names)


def carve_test(ds: Dataset, fraction: float, seed: int) -> Dataset:
    """`ds` with a stratified, seeded `fraction` of its train images (at least one per class) moved to
    test: for a source that gives no test split."""
    test_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])  # unrelated to the val carve-out's
    rest, test = stratified_val_split(ds.train, fraction, test_seed, ds.class_folders, "data.test_fraction")
    ds.train, ds.test = rest, test
    return ds
