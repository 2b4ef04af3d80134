"""Augmentation of whole uint8 batches on the device: random-resized-crop, flip and normalize for
training, resize + center crop + normalize for evaluation. It replaces timm's per-image PIL transforms
(`loaders.train_transform` / `loaders.eval_transform`) for batches gathered from the prepared store.

- Train: one crop box per image, drawn exactly as torchvision's `RandomResizedCrop.get_params` draws it
  (10 tries of area in `scale` and log-uniform aspect in `ratio`, integer size and offset, else the
  central crop), then cut and resized for the whole batch by one `torchvision.ops.roi_align` call.
  roi_align averages ceil(box/output) bilinear samples per output pixel: an area filter when the crop
  shrinks, bilinear when it grows; timm's PIL path uses the model's (usually bicubic) filter.
- Eval: timm resizes the short side to floor(input / crop_pct) and center-crops `input`. The store
  already holds the central square of the short-side-resized image, so the same pixels are the
  central (S * input / scale_size)^2 square of a stored image: we cut it and resize it once with
  `F.interpolate(antialias=True)` and the model's interpolation. The only difference from timm is
  that the pixels were resampled twice (source -> store -> input) instead of once. Crop modes other
  than `center` (`squash`, `border`) are treated as `center`.

Random numbers come from a CPU `torch.Generator` passed in (a handful per image), so a seed gives the
same crops and flips on the CPU and on the GPU. Everything runs on CPU tensors too.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms import v2

SCALE = (0.08, 1.0)  # timm / torchvision RandomResizedCrop defaults
RATIO = (3 / 4, 4 / 3)
TRIES = 10  # torchvision's number of attempts before the central-crop fallback


def as_nchw(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) view of a (B, 3, H, W) or (B, H, W, 3) batch (no copy)."""
    if images.ndim != 4:
        raise ValueError(f"expected a batch (B, 3, H, W) or (B, H, W, 3), got shape {tuple(images.shape)}")
    if images.shape[1] == 3:
        return images
    if images.shape[-1] == 3:
        return images.permute(0, 3, 1, 2)
    raise ValueError(f"expected 3 channels first or last, got shape {tuple(images.shape)}")


def sample_boxes(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    scale: Sequence[float] = SCALE,
    ratio: Sequence[float] = RATIO,
) -> torch.Tensor:
    """`n` random-resized-crop boxes (x0, y0, x1, y1) in pixels, torchvision's distribution, on the CPU."""
    area = height * width
    target = area * torch.empty(n, TRIES).uniform_(scale[0], scale[1], generator=generator)  # (n, T)
    log_r = torch.empty(n, TRIES).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)  # (n, T)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (n, T)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)  # (n, 1): the first accepted try
    found = ok.any(1)  # (n,)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)  # (n,)
    # torchvision's fallback: the whole image, its aspect clamped into `ratio`, centred
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    u = torch.rand(n, 2, generator=generator)  # (n, 2): offsets, like randint(0, H - h + 1)
    top = torch.where(found, torch.floor(u[:, 0] * (height - h + 1)).clamp(max=height - h), (height - h) // 2)
    left = torch.where(found, torch.floor(u[:, 1] * (width - w + 1)).clamp(max=width - w), (width - w) // 2)
    return torch.stack([left, top, left + w, top + h], 1).float()  # (n, 4)


def random_resized_crop(
    images: torch.Tensor,
    size: tuple[int, int],
    generator: torch.Generator | None = None,
    scale: Sequence[float] = SCALE,
    ratio: Sequence[float] = RATIO,
) -> torch.Tensor:
    """Crop one random box per image and resize it to `size`: float32 (B, 3, *size), values 0..255."""
    x = as_nchw(images)  # (B, 3, S, S)
    b, _, height, width = x.shape
    boxes = sample_boxes(b, height, width, generator, scale, ratio)  # (B, 4)
    rois = torch.cat([torch.arange(b, dtype=torch.float32)[:, None], boxes], 1)  # (B, 5): index, box
    rois = rois.to(x.device, non_blocking=True)
    # aligned=True: box [x0, x0 + w] covers pixels x0 .. x0 + w - 1 exactly (no half-pixel shift)
    return roi_align(x.float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def random_hflip_(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """In place: flip each image of (B, C, H, W) left-right with probability `p`."""
    if p <= 0:
        return x
    idx = torch.nonzero(torch.rand(x.shape[0], generator=generator) < p).squeeze(1)  # (k,), on the host
    idx = idx.to(x.device, non_blocking=True)  # chosen on the host: the device never syncs for it
    x[idx] = x[idx].flip(-1)  # only the flipped images move (torch.where would rewrite the whole batch)
    return x


def normalize_(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """In place: (x / 255 - mean) / std per channel, for float (B, 3, H, W) with values 0..255."""
    m, s = torch.tensor(mean, dtype=x.dtype), torch.tensor(std, dtype=x.dtype)
    scale = (1.0 / (255.0 * s))[None, :, None, None].to(x.device, non_blocking=True)  # (1, 3, 1, 1)
    shift = (m / s)[None, :, None, None].to(x.device, non_blocking=True)  # no blocking host->device copy
    return x.mul_(scale).sub_(shift)


def _size(data_cfg: dict[str, Any]) -> tuple[int, int]:
    h, w = data_cfg["input_size"][-2:]
    return int(h), int(w)


RAND_AUGMENT_OPS, RAND_AUGMENT_MAGNITUDE = 2, 9  # as timm's `rand-m9` of the stream path (2 ops, m9/10)
RAND_AUGMENT_CHUNK = 16  # images that share one draw of ops: per image would be hundreds of tiny kernels
_RNG_LOCK = threading.Lock()  # torchvision draws from the global generator: one batch at a time


def rand_augment_(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """torchvision's RandAugment on a float batch with values 0..255, in place: 2 ops at 9/10 of the
    full strength (bin 27 of torchvision's 0..30, timm's m9 of 10), drawn per chunk of
    RAND_AUGMENT_CHUNK images. Seeded from `generator`: a batch gets the same ops on any device and
    after a resume."""
    ra = v2.RandAugment(num_ops=RAND_AUGMENT_OPS, magnitude=round(RAND_AUGMENT_MAGNITUDE / 10 * 30))
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    u8 = x.round_().clamp_(0, 255).to(torch.uint8)  # the ops (posterize, solarize, ...) want uint8
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = torch.cat([ra(chunk) for chunk in u8.split(RAND_AUGMENT_CHUNK)])
    return x.copy_(out)


def train_batch(
    images: torch.Tensor,
    data_cfg: dict[str, Any],
    generator: torch.Generator | None = None,
    hflip: float = 0.5,
    rand_augment: bool = False,
) -> torch.Tensor:
    """timm's `basic` train augmentation for a uint8 batch (`rand_augment`: plus RandAugment, the
    per-image part of `strong`): float32 (B, 3, H, W), normalized."""
    x = random_resized_crop(images, _size(data_cfg), generator)  # (B, 3, H, W), 0..255
    x = random_hflip_(x, hflip, generator)
    if rand_augment:
        x = rand_augment_(x, generator)
    return normalize_(x, data_cfg["mean"], data_cfg["std"])


def _mode(interpolation: str) -> str:
    return interpolation if interpolation in ("bicubic", "bilinear", "nearest") else "bilinear"


def eval_region(side: tuple[int, int], data_cfg: dict[str, Any]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the stored square that timm's eval resize + center crop keeps."""
    sh, sw = side
    h, w = _size(data_cfg)
    crop_pct = data_cfg.get("crop_pct") or 0.875  # timm's DEFAULT_CROP_PCT
    scale_h, scale_w = math.floor(h / crop_pct), math.floor(w / crop_pct)
    ch, cw = min(sh, round(sh * h / scale_h)), min(sw, round(sw * w / scale_w))
    return round((sh - ch) / 2), round((sw - cw) / 2), ch, cw


def eval_batch(images: torch.Tensor, data_cfg: dict[str, Any]) -> torch.Tensor:
    """timm's eval transform (resize, center crop, normalize) for a uint8 batch: float32 (B, 3, H, W)."""
    x = as_nchw(images)  # (B, 3, S, S)
    top, left, ch, cw = eval_region((x.shape[-2], x.shape[-1]), data_cfg)
    crop = x[:, :, top : top + ch, left : left + cw].float()  # (B, 3, ch, cw)
    mode = _mode(data_cfg.get("interpolation", "bilinear"))
    if mode == "nearest":
        out = F.interpolate(crop, size=_size(data_cfg), mode="nearest")
    else:
        out = F.interpolate(crop, size=_size(data_cfg), mode=mode, antialias=True, align_corners=False)
    out = out.clamp_(0.0, 255.0)  # bicubic overshoots; PIL clamps to uint8 as well
    return normalize_(out, data_cfg["mean"], data_cfg["std"])
