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
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, depth=2).eval()


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
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 3),
    ).eval()
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


# ----------------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("patch", [(0, 3), (2, 1)])
def test_attention_rollout_peaks_where_attention_goes(patch: tuple[int, int]) -> None:
    """Every block's attention forced onto one patch token (in the softmaxed matrix the rollout reads):
    the map peaks on that patch's pixels and nowhere else."""
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8, depth=2
    ).eval()  # a 4 x 4 patch grid
    row, col = patch
    token = vit.num_prefix_tokens + 4 * row + col

    def onto_one_patch(_m: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        forced = torch.zeros_like(inputs[0])  # (B, heads, N, N)
        forced[..., token] = 1.0  # every query attends to that patch only
        return (forced,)

    handles = [m.attn_drop.register_forward_pre_hook(onto_one_patch) for m in vit.modules() if hasattr(m, "fused_attn")]
    try:
        heat = attention_rollout(vit, torch.randn(1, 3, 32, 32))
    finally:
        for h in handles:
            h.remove()
    _check_map(heat, (32, 32))
    region = np.zeros((32, 32), dtype=bool)
    region[8 * row : 8 * row + 8, 8 * col : 8 * col + 8] = True
    peak = np.unravel_index(int(heat.argmax()), heat.shape)
    assert region[peak], peak
    assert heat[region].mean() > 0.5 and heat[~region].mean() < 0.1
    far = np.ones((32, 32), dtype=bool)  # the pixels bilinear upsampling cannot reach from that patch
    far[max(8 * row - 4, 0) : 8 * row + 12, max(8 * col - 4, 0) : 8 * col + 12] = False
    assert heat[far].max() == 0.0


class _RedVsGreen(torch.nn.Module):
    """Class 0's logit is the mean of the red channel, class 1's the mean of the green one; through a 1x1
    convolution, so the feature map keeps each colour where it is in the image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1, bias=False)
        self.fc = torch.nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).view(2, 3, 1, 1))
            self.fc.weight.copy_(torch.eye(2))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))  # (B, 2, H, W)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(feats.mean(dim=(2, 3)))  # (B, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@pytest.mark.parametrize("path", ["forward_features", "last_conv"])
def test_grad_cam_peaks_on_the_evidence_for_the_class(path: str) -> None:
    """A red rectangle (the only evidence for class 0) on a green image (class 1's): Grad-CAM for class 0 is
    the rectangle, for class 1 everything else. The image is not square and the rectangle off-centre, so a
    transposed or flipped map fails."""
    model = _RedVsGreen().eval()
    if path == "last_conv":  # the same network without forward_features: the hooked-convolution path
        model = torch.nn.Sequential(
            model.conv, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), model.fc
        ).eval()
    region = np.zeros((24, 40), dtype=bool)
    region[3:11, 26:37] = True  # top right
    x = torch.zeros(1, 3, 24, 40)
    x[0, 0][torch.from_numpy(region)] = 1.0  # red inside
    x[0, 1][torch.from_numpy(~region)] = 1.0  # green outside
    red = grad_cam(model, x, target=0)
    _check_map(red, (24, 40))
    assert red[region].min() == pytest.approx(1.0) and red[~region].max() == pytest.approx(0.0)
    green = grad_cam(model, x, target=1)
    assert green[~region].min() == pytest.approx(1.0) and green[region].max() == pytest.approx(0.0)
    assert np.array_equal(grad_cam(model, x), green)  # default: the predicted class, green (most pixels)
