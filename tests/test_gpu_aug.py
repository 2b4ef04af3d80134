"""Batch augmentation on the device (`visionpoc.data.gpu_aug`), checked on CPU tensors against timm's
per-image PIL transforms."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionpoc.data import gpu_aug
from visionpoc.data.images import load_rgb
from visionpoc.data.loaders import eval_transform, train_transform
from visionpoc.data.prepared import decode_square
from visionpoc.data.sources import read_stanford_dogs

DCFG = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "crop_mode": "center",
}
STORE = 64


def bounds(dcfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (min, max) a normalized 0..255 image can take."""
    mean, std = torch.tensor(dcfg["mean"]), torch.tensor(dcfg["std"])
    return (0 - mean) / std, (1 - mean) / std


@pytest.fixture(scope="module")
def dog_paths(mini_dogs: Path) -> list[Path]:
    ds = read_stanford_dogs(mini_dogs)
    return [ds.train.path(i) for i in range(len(ds.train))]


@pytest.fixture(scope="module")
def dog_batch(dog_paths: list[Path]) -> torch.Tensor:
    return torch.from_numpy(np.stack([decode_square(p, STORE) for p in dog_paths]))  # (N, 3, S, S) uint8


def test_boxes_follow_torchvision_rules() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = gpu_aug.sample_boxes(4000, 60, 80, g)  # (n, 4)
    x0, y0, x1, y1 = boxes.unbind(1)
    w, h = x1 - x0, y1 - y0
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 80).all() and (y1 <= 60).all()
    assert (w >= 1).all() and (h >= 1).all()
    assert torch.equal(boxes, boxes.round())  # integer pixel boxes, like RandomResizedCrop.get_params
    area = w * h / (60 * 80)
    assert area.min() >= 0.08 * 0.9 and area.max() <= 1.0
    assert (w / h).min() >= 0.75 * 0.9 and (w / h).max() <= 4 / 3 * 1.1
    assert 0.4 < area.mean() < 0.6  # uniform in (0.08, 1) with rejections of the too-large boxes
    assert torch.equal(boxes, gpu_aug.sample_boxes(4000, 60, 80, torch.Generator().manual_seed(0)))


def test_train_batch_shape_dtype_range_and_layouts(dog_batch: torch.Tensor) -> None:
    out = gpu_aug.train_batch(dog_batch, DCFG, torch.Generator().manual_seed(1))
    assert out.shape == (len(dog_batch), 3, 32, 32) and out.dtype == torch.float32
    lo, hi = bounds(DCFG)
    assert (out >= lo[None, :, None, None] - 1e-4).all() and (out <= hi[None, :, None, None] + 1e-4).all()
    nhwc = gpu_aug.train_batch(dog_batch.permute(0, 2, 3, 1).contiguous(), DCFG, torch.Generator().manual_seed(1))
    torch.testing.assert_close(nhwc, out)  # (B, S, S, 3) and (B, 3, S, S) inputs give the same batch
    again = gpu_aug.train_batch(dog_batch, DCFG, torch.Generator().manual_seed(1))
    assert torch.equal(again, out)  # seeded


def test_train_statistics_match_timm_transform(dog_batch: torch.Tensor, dog_paths: list[Path]) -> None:
    reps = 8
    g = torch.Generator().manual_seed(0)
    ours = torch.cat([gpu_aug.train_batch(dog_batch, DCFG, g) for _ in range(reps)])  # (reps*N, 3, H, W)
    random.seed(0)
    torch.manual_seed(0)
    tf = train_transform(DCFG)
    theirs = torch.stack([tf(load_rgb(p)) for _ in range(reps) for p in dog_paths])
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours.mean((0, 2, 3)), theirs.mean((0, 2, 3)), atol=0.05, rtol=0)
    torch.testing.assert_close(ours.std((0, 2, 3)), theirs.std((0, 2, 3)), atol=0, rtol=0.1)
    # the per-image means (colour of each breed) match too, image by image on average
    mine = ours.view(reps, len(dog_paths), 3, -1).mean((0, 3))  # (N, 3)
    ref = theirs.view(reps, len(dog_paths), 3, -1).mean((0, 3))
    assert (mine - ref).abs().mean() < 0.05


def test_flip_flips(dog_batch: torch.Tensor) -> None:
    kept = gpu_aug.train_batch(dog_batch, DCFG, torch.Generator().manual_seed(3), hflip=0.0)
    flipped = gpu_aug.train_batch(dog_batch, DCFG, torch.Generator().manual_seed(3), hflip=1.0)
    assert torch.equal(flipped, kept.flip(-1))  # same boxes (drawn first), every image mirrored
    half = gpu_aug.train_batch(dog_batch.repeat(4, 1, 1, 1), DCFG, torch.Generator().manual_seed(4), hflip=0.5)
    assert half.shape[0] == 4 * len(dog_batch)


def test_random_hflip_is_per_image() -> None:
    x = torch.arange(2 * 8, dtype=torch.float32).view(1, 1, 2, 8).repeat(64, 1, 1, 1)  # (64, 1, 2, 8)
    out = gpu_aug.random_hflip_(x.clone(), 0.5, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert (flipped | kept).all() and 16 < int(flipped.sum()) < 48


def smooth_image(path: Path, w: int, h: int) -> Path:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(xx / 23), 128 + 100 * np.cos(yy / 17), 255 * xx / w], -1)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=95)
    return path


def test_eval_batch_matches_timm_eval_and_is_deterministic(tmp_path: Path) -> None:
    dcfg = {**DCFG, "input_size": (3, 48, 48), "crop_pct": 0.9}
    paths = [smooth_image(tmp_path / f"{i}.jpg", w, h) for i, (w, h) in enumerate([(200, 150), (150, 200), (160, 160)])]
    batch = torch.from_numpy(np.stack([decode_square(p, 96) for p in paths]))  # (3, 3, 96, 96)
    ours = gpu_aug.eval_batch(batch, dcfg)
    assert ours.shape == (3, 3, 48, 48) and ours.dtype == torch.float32
    assert torch.equal(ours, gpu_aug.eval_batch(batch, dcfg))
    theirs = torch.stack([eval_transform(dcfg)(load_rgb(p)) for p in paths])
    # same geometry, pixels resampled twice instead of once: a small difference, on the 0-255 scale
    std = torch.tensor(dcfg["std"])[None, :, None, None]
    assert ((ours - theirs) * std * 255).abs().mean() < 3


def test_eval_region_keeps_timm_crop_fraction() -> None:
    top, left, h, w = gpu_aug.eval_region((320, 320), {"input_size": (3, 224, 224), "crop_pct": 0.9})
    assert h == w == round(320 * 224 / math.floor(224 / 0.9)) and top == left == round(
        (320 - h) / 2
    )  # torchvision CenterCrop
    assert gpu_aug.eval_region((320, 320), {"input_size": (3, 299, 299), "crop_pct": 1.0})[2:] == (320, 320)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(dog_batch: torch.Tensor) -> None:
    cpu = gpu_aug.train_batch(dog_batch, DCFG, torch.Generator().manual_seed(5))
    gpu = gpu_aug.train_batch(dog_batch.cuda(), DCFG, torch.Generator().manual_seed(5))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=1e-3)  # same seed, same crops and flips
    torch.testing.assert_close(
        gpu_aug.eval_batch(dog_batch.cuda(), DCFG).cpu(), gpu_aug.eval_batch(dog_batch, DCFG), atol=1e-3, rtol=1e-3
    )
