"""The loop really learns: real handwritten digits (scikit-learn's load_digits), a small CNN and a small
ViT trained from scratch through the same `compare` loop, scored once on a held-out test folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from visionpoc.compare import run_compare
from visionpoc.config import load_config


def digits_folder(root: Path) -> Path:
    """load_digits as root/{train,test}/<digit>/*.png (8x8 grayscale upscaled to 32x32)."""
    x, y = load_digits(return_X_y=True)
    images = (x.reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=0)
    for split, idx in (("train", idx_train), ("test", idx_test)):
        for i in idx:
            d = root / split / str(y[i])
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).resize((32, 32), Image.Resampling.NEAREST).save(d / f"{i}.png")
    return root


@pytest.mark.slow
def test_cnn_and_vit_learn_digits(tmp_path: Path) -> None:
    root = digits_folder(tmp_path / "digits")
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n"
        "  - {label: cnn, timm: resnet10t, pretrained: false, img_size: 32, lr: 0.003}\n"
        "  - {label: vit, timm: vit_tiny_patch16_224, pretrained: false, img_size: 32, lr: 0.002,\n"
        "     model_kwargs: {patch_size: 4, depth: 3, embed_dim: 96, num_heads: 3}}\n"
    )
    cfg = load_config(
        models,
        [
            f"data.root={root}",
            "data.source=folder",
            "data.num_workers=0",
            "train.epochs=10",
            "train.batch_size=64",
            "train.augment=none",
            "train.warmup_epochs=0.5",
            "train.weight_decay=0.01",
            "train.device=cpu",
        ],
    )
    results = run_compare(cfg, tmp_path / "run")
    cnn, vit = results.models
    assert results.dataset.test_size == 450 and results.dataset.num_classes == 10
    assert cnn.status == "ok" and vit.status == "ok", (cnn.error, vit.error)
    assert cnn.test_accuracy is not None and cnn.test_accuracy >= 0.90, cnn.test_accuracy
    assert vit.test_accuracy is not None and vit.test_accuracy >= 0.80, vit.test_accuracy
    for m in (cnn, vit):  # the loss went down and validation picked the best epoch
        assert m.history[-1].train_loss < 0.5 * m.history[0].train_loss
        assert m.val_accuracy == max(h.val_accuracy or 0 for h in m.history)
