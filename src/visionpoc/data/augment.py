"""The augmentation recipe: presets `none`, `basic` and `strong`, built from timm's pieces.

- `none`: the eval transform (resize, center crop, normalize); hard targets.
- `basic`: random-resized-crop + horizontal flip, then the model's normalization; hard targets.
- `strong`: `basic` + RandAugment (timm `rand-m9-mstd0.5-inc1-mmax9`, per image, PIL) on the image, then on
  the batch: random erasing (p=0.25, per-pixel noise) and mixup/cutmix (DeiT's alphas 0.8/1.0, one of
  them per batch) with the label smoothing folded into the soft targets, trained with
  `SoftTargetCrossEntropy`.

Two halves: `train_transform` is the per-image CPU transform of the streaming path; `batch_augment`
returns the batch ops, which take normalized float batches (B, 3, H, W) on any device and hard targets
(B,), so the same function serves the streaming path and the prepared-store path.

In the prepared-store path (`data/prepared.py` + `data/gpu_aug.py`) images are augmented as whole
batches on the device: `strong` there is GPU random-resized-crop + flip, torchvision's RandAugment on
the batch (same strength, ops drawn per chunk of 16 images instead of per image), then erasing +
mixup/cutmix. `describe` says what ran (it goes into `results.json` as `augment_applied`).

Training accuracy with soft targets counts a prediction as right when its argmax equals the argmax of
the (mixed) target, i.e. the class with the larger share of the mixed image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import timm.data
import torch
from timm.data.mixup import Mixup, mixup_target
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from torch import nn

log = logging.getLogger(__name__)

PRESETS = ("none", "basic", "strong")
# timm's RandAugment: 2 ops, magnitude 9 +- 0.5 std, increasing severity (DeiT's), with the magnitude
# clipped at 9 (`mmax9`) instead of 10: at 10 timm's increasing posterize keeps 0 bits, which Pillow >= 12
# rejects with a ValueError (a crash about once in 300 images).
RAND_AUGMENT = "rand-m9-mstd0.5-inc1-mmax9"
ERASE_PROB = 0.25
MIXUP_ALPHA, CUTMIX_ALPHA = 0.8, 1.0  # DeiT/timm ImageNet recipe; one of the two per batch, 50/50

BatchOp = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _check(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"augment preset {preset!r} is not one of {list(PRESETS)}")


def eval_transform(data_cfg: dict[str, Any]) -> Any:
    """Resize + center crop (the model's crop_pct) + normalize: timm's eval transform."""
    return timm.data.create_transform(**data_cfg, is_training=False)


def train_transform(data_cfg: dict[str, Any], preset: str = "basic") -> Any:
    """The per-image training transform (PIL in, normalized (3, H, W) float tensor out) of `preset`."""
    _check(preset)
    if preset == "none":
        return eval_transform(data_cfg)
    return timm.data.create_transform(
        input_size=data_cfg["input_size"],
        is_training=True,
        interpolation=data_cfg["interpolation"],
        mean=data_cfg["mean"],
        std=data_cfg["std"],
        hflip=0.5,
        color_jitter=None,  # type: ignore[arg-type]
        auto_augment=RAND_AUGMENT if preset == "strong" else None,
    )


def batch_augment(preset: str, num_classes: int, label_smoothing: float, device: torch.device) -> BatchOp:
    """`(x, y) -> (x, y')` on a normalized float batch x (B, 3, H, W) and hard targets y (B,).

    `none`/`basic`: the identity (y stays hard, (B,)). `strong`: random erasing then mixup/cutmix, in
    place on x; y' is soft, (B, num_classes) float, rows summing to 1 (label smoothing included). An odd
    batch mixes its first B-1 images; the last keeps its own (smoothed) target.
    """
    _check(preset)
    if preset != "strong":
        return lambda x, y: (x, y)
    erase = RandomErasing(probability=ERASE_PROB, mode="pixel", device=str(device))
    mix = Mixup(
        mixup_alpha=MIXUP_ALPHA, cutmix_alpha=CUTMIX_ALPHA, label_smoothing=label_smoothing, num_classes=num_classes
    )

    def apply(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = erase(x)  # (B, 3, H, W), a few images get a noise rectangle
        if len(y) % 2 == 0:
            return mix(x, y)  # (B, 3, H, W), (B, C)
        last = mixup_target(y[-1:], num_classes, 1.0, label_smoothing)  # (1, C): Mixup pairs images
        if len(y) == 1:
            return x, last
        xs, ys = mix(x[:-1], y[:-1])
        return torch.cat([xs, x[-1:]]), torch.cat([ys, last])

    return apply


def loss_for(preset: str, label_smoothing: float) -> nn.Module:
    """The training loss: soft-target cross-entropy for `strong` (its targets already carry the
    smoothing), else cross-entropy with label smoothing on hard targets."""
    _check(preset)
    if preset == "strong":
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def describe(preset: str, pipeline: str) -> str:
    """What `preset` actually does on `pipeline` (`stream` or `prepared`), for `results.json`."""
    _check(preset)
    if preset == "none":
        return "none (eval transform)"
    crop = "gpu random-resized-crop+flip" if pipeline == "prepared" else "random-resized-crop+flip"
    if preset == "basic":
        return crop
    batch = f"random-erasing(p={ERASE_PROB})+mixup({MIXUP_ALPHA})/cutmix({CUTMIX_ALPHA})"
    if pipeline == "prepared":
        from visionpoc.data import gpu_aug

        ra = (
            f"gpu randaugment(torchvision, {gpu_aug.RAND_AUGMENT_OPS} ops, m{gpu_aug.RAND_AUGMENT_MAGNITUDE}, "
            f"per {gpu_aug.RAND_AUGMENT_CHUNK} images)"
        )
        return f"{crop}+{ra}+{batch}"
    return f"{crop}+randaugment({RAND_AUGMENT})+{batch}"
