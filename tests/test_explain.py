"""Saliency maps on tiny untrained timm models (CPU, no download): shape, range, method choice, overlay."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from visionpoc.explain import attention_rollout, explain, grad_cam, is_vit, overlay, to_pil


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, depth=2
    ).eval()


@pytest.fixture(scope="module")
def cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()


def _check_map(heat: np.ndarray, size: tuple[int, int]) -> None:
    assert heat.shape == size  # the input's spatial size, not the patch grid or feature map
    assert heat.dtype == np.float32
    assert np.isfinite(heat).all()
    assert heat.min() >= 0.0 and heat.max() <= 1.0


def test_attention_rollout_on_a_tiny_vit(vit: torch.nn.Module) -> None:
    fused = [m.fused_attn for m in vit.modules() if hasattr(m, "fused_attn")]
    x = torch.randn(1, 3, 32, 32)
    heat = attention_rollout(vit, x)
    _check_map(heat, (32, 32))
    assert heat.max() == pytest.approx(1.0)  # normalized, and not constant for a random input
    assert [m.fused_attn for m in vit.modules() if hasattr(m, "fused_attn")] == fused  # restored
    assert not any(m._forward_pre_hooks for m in vit.modules())  # hooks removed


def test_grad_cam_on_a_tiny_cnn(cnn: torch.nn.Module) -> None:
    x = torch.randn(1, 3, 64, 64)
    _check_map(grad_cam(cnn, x), (64, 64))
    _check_map(grad_cam(cnn, x, target=2), (64, 64))
    assert all(p.grad is None for p in cnn.parameters())  # the model is left as it was
    with torch.inference_mode():  # callers in inference mode still get a map
        _check_map(grad_cam(cnn, x.clone()), (64, 64))


def test_grad_cam_on_a_cnn_without_forward_features() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3),
    ).eval()  # fmt: skip
    for p in model[:3].parameters():
        p.requires_grad_(False)  # frozen early layers, as with the top_fraction policy
    _check_map(grad_cam(model, torch.randn(1, 3, 40, 48)), (40, 48))


def test_explain_picks_the_method(vit: torch.nn.Module, cnn: torch.nn.Module) -> None:
    assert is_vit(vit) and not is_vit(cnn)
    assert explain(vit, torch.randn(1, 3, 32, 32))[1] == "attention rollout"
    assert explain(cnn, torch.randn(1, 3, 64, 64))[1] == "Grad-CAM"
    with pytest.raises(ValueError, match=r"\(1, 3, H, W\)"):
        explain(cnn, torch.randn(2, 3, 64, 64))


def test_overlay_and_to_pil() -> None:
    image = Image.new("L", (50, 40), 128)
    heat = np.linspace(0, 1, 8 * 8, dtype=np.float32).reshape(8, 8)
    out = overlay(image, heat)
    assert out.mode == "RGB" and out.size == (50, 40)
    assert np.asarray(out).std() > 0  # the heatmap shows
    x = torch.zeros(1, 3, 16, 24)  # the mean colour after denormalization
    seen = to_pil(x, (0.5, 0.25, 0.0), (0.5, 0.5, 0.5))
    assert seen.size == (24, 16)
    assert tuple(np.asarray(seen)[0, 0]) == (128, 64, 0)
