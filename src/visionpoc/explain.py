"""What a model looks at: attention rollout for ViT-family models, Grad-CAM for CNNs, and an overlay.

Shared by the report and the web demo. Every map is an (H, W) float32 NumPy array in [0, 1] at the
input tensor's spatial size (the patch grid of a ViT is upsampled bilinearly), so any map can be
overlaid on the image the model saw (`to_pil` recovers it from the normalized tensor).

- `attention_rollout` (Abnar & Zuidema, 2020): per block, head-averaged attention plus the identity
  (the residual path), rows renormalized, multiplied through the blocks; the class token's row over
  the patch tokens is the map (models without a class token use the mean row). timm's attention
  modules use fused SDPA, which never materializes the attention matrix, so the modules are switched
  to their unfused path for the call and the softmaxed matrix is read from the input of their
  `attn_drop` (the identity in eval mode), then switched back.
- `grad_cam` (Selvaraju et al., 2017): the class score's gradient, averaged over space, weights the
  channels of the last spatial feature map (timm's `forward_features` output, else the output of the
  last `nn.Conv2d`); ReLU, upsample, normalize. Frozen layers are fine: only d(score)/d(features) is
  needed.

A Hugging Face model (an `hf:` entry, `visionpoc.hfmodels`) gives what its transformers output holds:
the attention matrices (`output_attentions`, its attention switched to the eager path for the call) for
rollout, the last spatial hidden state (`output_hidden_states`: a ConvNeXt's or ResNet's last stage,
a Swin's reshaped one) for Grad-CAM. A ViT-family HF model (patch size and attention heads, global
attention) gets rollout; the others Grad-CAM.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image
from torch import nn

log = logging.getLogger(__name__)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """timm self-attention modules that can expose their attention matrix (unfused path + attn_drop)."""
    return [
        m for m in model.modules() if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module)
    ]


def _is_hf(model: nn.Module) -> bool:
    """A transformers model built by `visionpoc.hfmodels` (its whole output is at `hf_output`)."""
    return callable(getattr(model, "hf_output", None))


def is_vit(model: nn.Module) -> bool:
    """A ViT-family model: patch embedding, a stack of blocks, and global self-attention we can read."""
    if _is_hf(model):
        config = getattr(model, "config", None)
        global_attention = not hasattr(config, "window_size")  # Swin's windows are not one token matrix
        return hasattr(config, "patch_size") and hasattr(config, "num_attention_heads") and global_attention
    return hasattr(model, "patch_embed") and hasattr(model, "blocks") and bool(_attention_modules(model))


def _normalize(cam: torch.Tensor) -> np.ndarray:
    """(H, W) -> float32 in [0, 1]; a constant map becomes zeros, non-finite values become 0."""
    cam = torch.nan_to_num(cam.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = cam.min(), cam.max()
    out = (cam - lo) / (hi - lo) if hi - lo > 1e-12 else torch.zeros_like(cam)
    return out.clamp(0, 1).cpu().numpy().astype(np.float32)


def _upsample(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) -> (H, W), bilinear."""
    return F.interpolate(grid[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def _check_input(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one normalized image of shape (1, 3, H, W), got {tuple(x.shape)}")


@contextmanager
def _captured_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Yield a list that fills with each block's attention (B, heads, N, N) during a forward pass."""
    modules = _attention_modules(model)
    saved = [m.fused_attn for m in modules]
    maps: list[torch.Tensor] = []

    def hook(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
        maps.append(inputs[0].detach())

    handles = [m.attn_drop.register_forward_pre_hook(hook) for m in modules]  # type: ignore[union-attr]
    try:
        for m in modules:
            m.fused_attn = False  # type: ignore[assignment]  # plain attribute at runtime (Final: TorchScript only)
        yield maps
    finally:
        for m, fused in zip(modules, saved, strict=True):
            m.fused_attn = fused  # type: ignore[assignment]
        for h in handles:
            h.remove()


@contextmanager
def _eager_attention(model: Any) -> Iterator[None]:
    """transformers returns attention matrices from its eager attention only (SDPA never forms them)."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _hf_attention(model: Any, x: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention (1, heads, N, N) of a transformers model for `x`."""
    with torch.no_grad(), _eager_attention(model):
        out = model.hf_output(x, output_attentions=True)
    return list(getattr(out, "attentions", None) or [])


def attention_rollout(model: nn.Module, x: torch.Tensor, head_fusion: str = "mean") -> np.ndarray:
    """Attention rollout of a ViT-family `model` (timm, or transformers through `visionpoc.hfmodels`) for
    one image `x` (1, 3, H, W) -> (H, W) in [0, 1]."""
    _check_input(x)
    if _is_hf(model):
        maps = _hf_attention(model, x)
    else:
        with torch.no_grad(), _captured_attention(model) as maps:
            model(x)
    maps = [a for a in maps if a.ndim == 4 and a.shape[-1] == a.shape[-2]]  # (1, heads, N, N)
    if not maps:
        raise ValueError(f"{type(model).__name__}: no attention matrix was captured; use grad_cam instead")
    n = maps[-1].shape[-1]
    rollout = torch.eye(n, device=maps[-1].device)
    for a in maps:
        if a.shape[-1] != n:
            continue  # a pooling head with a different token count (e.g. attention pooling)
        fused = a[0].max(0).values if head_fusion == "max" else a[0].mean(0)  # (N, N)
        fused = 0.5 * fused + 0.5 * torch.eye(n, device=fused.device)  # the residual connection
        fused = fused / fused.sum(-1, keepdim=True)
        rollout = fused @ rollout
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    patch = _patch_size(model)
    if _is_hf(model) and patch is not None:  # ViT: [CLS]; DeiT: [CLS] and the distillation token
        prefix = n - (x.shape[-2] // patch[0]) * (x.shape[-1] // patch[1])
    has_cls = bool(getattr(model, "has_class_token", prefix > 0))
    scores = rollout[0, prefix:] if has_cls else rollout[prefix:, prefix:].mean(0)  # (num_patches,)
    gh, gw = _patch_grid(model, x, scores.numel())
    return _normalize(_upsample(scores.reshape(gh, gw), (x.shape[-2], x.shape[-1])))


def _patch_size(model: nn.Module) -> tuple[int, int] | None:
    """(rows, cols) of a patch: timm's `patch_embed.patch_size`, or a transformers config's `patch_size`."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None and _is_hf(model):
        patch = getattr(getattr(model, "config", None), "patch_size", None)
    if patch is None:
        return None
    return (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))


def _patch_grid(model: nn.Module, x: torch.Tensor, num_patches: int) -> tuple[int, int]:
    """The patch grid (rows, cols) for input `x`, checked against the token count."""
    patch = _patch_size(model)
    if patch is not None:
        ph, pw = patch
        gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
        if gh * gw == num_patches:
            return gh, gw
    side = round(num_patches**0.5)
    if side * side != num_patches:
        raise ValueError(f"cannot arrange {num_patches} patch tokens in a grid")
    return side, side


def _last_conv(model: nn.Module) -> nn.Conv2d:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer for Grad-CAM")
    return convs[-1]


def _hf_features_and_logits(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A transformers model's last spatial hidden state (1, C, h, w) in the graph, and its logits."""
    out = model.hf_output(x.detach().clone().requires_grad_(True), output_hidden_states=True)
    states = getattr(out, "reshaped_hidden_states", None) or getattr(out, "hidden_states", None) or ()
    spatial = [h for h in states if h.ndim == 4]  # (1, C, h, w); a ViT's are token sequences (1, N, D)
    if not spatial:
        raise ValueError(
            f"{type(model).__name__}: transformers gives no spatial feature map (output_hidden_states) for Grad-CAM"
        )
    return spatial[-1], out.logits


def _features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last spatial feature map (1, C, h, w), with gradients enabled, and the logits it gives."""
    if _is_hf(model):
        return _hf_features_and_logits(model, x)
    forward_features, forward_head = (
        getattr(model, "forward_features", None),
        getattr(model, "forward_head", None),
    )
    if callable(forward_features) and callable(forward_head):
        with torch.no_grad():
            feats = forward_features(x)
        if isinstance(feats, torch.Tensor) and feats.ndim == 4:
            feats = feats.detach().clone().requires_grad_(True)  # NCHW, the input of global pooling
            return feats, forward_head(feats)
    # any other CNN: hook the last convolution; the input needs grad so frozen layers pass it through
    store: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        store["a"] = out

    handle = _last_conv(model).register_forward_hook(hook)
    try:
        logits = model(x.detach().clone().requires_grad_(True))
    finally:
        handle.remove()
    return store["a"], logits


def grad_cam(model: nn.Module, x: torch.Tensor, target: int | None = None) -> np.ndarray:
    """Grad-CAM of a CNN for one image `x` (1, 3, H, W) and class `target` (default: the predicted class)."""
    _check_input(x)
    with torch.inference_mode(False), torch.enable_grad():
        feats, logits = _features_and_logits(model, x.clone())  # feats (1, C, h, w), logits (1, K)
        cls = int(logits.argmax(1).item()) if target is None else int(target)
        model.zero_grad(set_to_none=True)
        (grad,) = torch.autograd.grad(logits[0, cls], feats)  # (1, C, h, w)
    weights = grad.mean(dim=(2, 3), keepdim=True)  # (1, C, 1, 1)
    cam = F.relu((weights * feats.detach()).sum(1))[0]  # (h, w)
    return _normalize(_upsample(cam, (x.shape[-2], x.shape[-1])))


def explain(model: nn.Module, x: torch.Tensor, target: int | None = None) -> tuple[np.ndarray, str]:
    """The map for `x` and the method's name: attention rollout for ViT-family models, else Grad-CAM."""
    if is_vit(model):
        try:
            return attention_rollout(model, x), "attention rollout"
        except ValueError as e:
            log.debug("attention rollout failed (%s); trying Grad-CAM", e)
    return grad_cam(model, x, target), "Grad-CAM"


def to_pil(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Image.Image:
    """The image the model saw: undo the normalization of `x` (1, 3, H, W) or (3, H, W)."""
    img = x.detach().float().cpu().reshape(-1, *x.shape[-3:])[0]  # (3, H, W)
    img = img * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (H, W, 3)
    return Image.fromarray(arr, "RGB")


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> Image.Image:
    """`heatmap` (h, w) in [0, 1], resized to `image` and coloured with `cmap`, blended over it (RGB)."""
    base = image.convert("RGB")
    heat = Image.fromarray((np.clip(np.nan_to_num(heatmap), 0, 1) * 255).astype(np.uint8), "L")
    heat = heat.resize(base.size, Image.Resampling.BILINEAR)
    coloured = colormaps[cmap](np.asarray(heat, dtype=np.float32) / 255.0)[..., :3]  # (H, W, 3)
    colour = Image.fromarray((coloured * 255).astype(np.uint8), "RGB")
    return Image.blend(base, colour, alpha)
