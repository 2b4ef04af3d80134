"""Real pretrained weights on real photos: EfficientNet-Lite0's ImageNet weights give the known answers
on scikit-learn's sample photos through timm and through visionpoc alike, and the `photo_crops` dataset
is learnable from the frozen features (the reference a fine-tuning run is held to)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch

from real_weights import LITE0_TIMM, QUADRANTS, converged_probe_accuracy, make_photo_crops, sample_photos
from visionpoc.config import ModelConfig
from visionpoc.data.augment import eval_transform
from visionpoc.data.sources import read_folder
from visionpoc.models import create_model, data_config

PALACE, DAISY = 698, 985  # ImageNet-1k classes


def test_photo_crops_is_a_deterministic_folder_dataset(photo_crops: Path, tmp_path: Path) -> None:
    ds = read_folder(photo_crops)
    assert ds.class_names == sorted(f"{p}_{q}" for p in ("china", "flower") for q in QUADRANTS)
    assert len(ds.train) == 8 * 40 and len(ds.test) == 8 * 20
    assert np.bincount(ds.train.labels).tolist() == [40] * 8
    again = make_photo_crops(tmp_path / "again")
    for rel in ("train/china_top_left/000.jpg", "test/flower_bottom_right/019.jpg"):
        assert (again / rel).read_bytes() == (photo_crops / rel).read_bytes(), rel


def _logits(model: torch.nn.Module, transform: Any, photos: list[Any]) -> torch.Tensor:
    x = torch.stack([transform(p) for p in photos])  # (2, 3, 224, 224)
    with torch.inference_mode():
        return model.eval()(x)  # (2, 1000)


def test_lite0_knows_the_sample_photos_through_timm_and_visionpoc(lite0_weights: Path) -> None:
    photos = sample_photos()
    images = [photos["china"], photos["flower"]]

    reference = timm.create_model(LITE0_TIMM, pretrained=True, pretrained_cfg_overlay={"file": str(lite0_weights)})
    ref_transform = timm.data.create_transform(**timm.data.resolve_model_data_config(reference), is_training=False)
    ref_logits = _logits(reference, ref_transform, images)

    # head_init_scale=None: keep the pretrained ImageNet classifier as it is
    mcfg = ModelConfig(label="lite0", timm=LITE0_TIMM, pretrained_path=str(lite0_weights), head_init_scale=None)
    model = create_model(mcfg, num_classes=1000)
    logits = _logits(model, eval_transform(data_config(model, mcfg)), images)

    probs = ref_logits.softmax(-1)
    top = probs.argmax(-1).tolist()
    assert top == [PALACE, DAISY], (top, probs.max(-1).values.tolist())
    assert (probs.max(-1).values > 0.2).all(), probs.max(-1).values.tolist()
    assert torch.allclose(logits, ref_logits, atol=1e-4), (logits - ref_logits).abs().max().item()


@pytest.mark.slow
def test_photo_crops_are_learnable_from_frozen_lite0_features(lite0_weights: Path, photo_crops: Path) -> None:
    accuracy = converged_probe_accuracy(lite0_weights, photo_crops, img_size=64)
    print(f"converged linear probe on photo_crops at 64 px: test accuracy {accuracy:.4f} (chance 0.125)")
    assert accuracy >= 0.85, accuracy
