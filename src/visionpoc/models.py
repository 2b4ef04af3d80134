"""Models: timm creation by full tagged name, pretrained weights (hub or local file), fine-tuning
policies, preprocessing config, and size/cost figures (params, forward GFLOPs). An `hf:` entry is built
by `visionpoc.hfmodels` (transformers) with the same attributes, and goes through the same functions.

Policies:
- `full`: every parameter trains.
- `head`: a linear probe; only the new classifier trains. Configs may say `finetune: linear_probe` (or
  `policy: linear_probe`): the loader turns it into `head` and records the policy name.
- `top_fraction`: the top `fraction` of conv layers (CNN) or of transformer blocks, everything after
  them, and the new head train. Frozen BatchNorm layers become `FrozenBatchNorm2d` (timm), so they stay
  in eval mode and their running statistics never move; ours is fused into one kernel
  (`FusedFrozenBatchNorm2d`). Under `head` the frozen backbone also trains in eval mode (`eval_frozen`).

A model is a transformer when it has multi-head self-attention outside its classifier head
(`is_transformer`), whatever its attribute names: EfficientNet and MobileNet keep their stages in
`.blocks` and are CNNs; Swin keeps its blocks in `.layers[i].blocks` and is a transformer. Hybrids with
attention stages (CoAtNet, MobileViT, MobileNetV4 hybrid) count as transformers.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, cast

import timm
import timm.utils
import torch
import torch.nn.functional as F
from timm.layers.norm_act import FrozenBatchNormAct2d
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from visionpoc.config import ModelConfig
from visionpoc.errors import WeightsError

log = logging.getLogger(__name__)


def create_model(mcfg: ModelConfig, num_classes: int, pretrained: bool | None = None) -> nn.Module:
    """`timm.create_model` (or, for an `hf:` entry, transformers' `AutoModelForImageClassification`) with a
    new head for `num_classes`; `pretrained` overrides the config's."""
    if mcfg.onnx:
        raise WeightsError(
            f"model {mcfg.label!r} is a deployed file ({mcfg.onnx}): it is scored as it is, never rebuilt, so it "
            "cannot be trained, tuned, exported, explained, served or benchmarked; pick a timm model's label"
        )
    use_pretrained = mcfg.pretrained if pretrained is None else pretrained
    if mcfg.kind == "hf":  # transformers (the `hf` extra): imported only for such an entry
        from visionpoc.hfmodels import build

        return build.create(mcfg, num_classes, use_pretrained, hub_online=hub_reachable)
    kwargs: dict[str, Any] = dict(mcfg.model_kwargs)
    if use_pretrained and mcfg.pretrained_path:
        path = Path(mcfg.pretrained_path).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"model {mcfg.label!r}: pretrained_path {path} not found; point it to a .safetensors or .pth "
                "state dict of the same architecture"
            )
        overlay: dict[str, Any] = {"file": str(path)}
        if path.suffix != ".npz":  # timm < 1.0.31 sends any file of a `custom_load` tag to its .npz reader
            overlay["custom_load"] = False
        kwargs["pretrained_cfg_overlay"] = overlay
    if mcfg.img_size is not None:
        kwargs["img_size"] = mcfg.img_size
    # no network: cached weights still load, and missing ones fail at once, not after a minute of retries
    offline = _hub_offline() if use_pretrained and not mcfg.pretrained_path and not hub_reachable() else nullcontext()
    try:
        with offline:
            try:
                return timm.create_model(mcfg.timm, pretrained=use_pretrained, num_classes=num_classes, **kwargs)
            except TypeError as e:
                if "img_size" not in str(e) or "img_size" not in kwargs:
                    raise
                # CNNs take any resolution; img_size then only sets the input size of the data config
                del kwargs["img_size"]
                return timm.create_model(mcfg.timm, pretrained=use_pretrained, num_classes=num_classes, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise WeightsError(
                f"model {mcfg.label!r}: timm has no model {mcfg.timm!r}; list names with "
                "`python -c \"import timm; print(timm.list_pretrained('PATTERN*'))\"`"
            ) from e
        if not use_pretrained:
            raise
        raise _weights_error(mcfg, e) from e
    except (OSError, ValueError, ConnectionError) as e:
        if not use_pretrained:
            raise
        raise _weights_error(mcfg, e) from e


@functools.cache
def hub_reachable(timeout_s: float = 5.0) -> bool:
    """Whether the Hugging Face Hub answers (once per process; honours HF_ENDPOINT, HF_HUB_OFFLINE and
    the usual proxy variables). Without it, huggingface_hub retries each file for about a minute."""
    import huggingface_hub.constants as hc
    import requests

    if hc.HF_HUB_OFFLINE:
        return False
    try:
        requests.head(hc.ENDPOINT, timeout=timeout_s)
    except requests.RequestException:
        log.warning(
            "the Hugging Face Hub (%s) does not answer: pretrained weights load from the local cache only", hc.ENDPOINT
        )
        return False
    return True


@contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub's offline mode for the calls inside (it reads the flag at call time)."""
    import huggingface_hub.constants as hc

    before = hc.HF_HUB_OFFLINE
    hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE = before


def _weights_error(mcfg: ModelConfig, e: Exception) -> WeightsError:
    if mcfg.pretrained_path:
        return WeightsError(f"model {mcfg.label!r}: cannot load {mcfg.pretrained_path}: {e}")
    cfg = timm.models.get_pretrained_cfg(mcfg.timm)
    hub = getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None) or mcfg.timm
    from huggingface_hub.constants import HF_HUB_CACHE

    return WeightsError(
        f"model {mcfg.label!r}: could not fetch the pretrained weights of {mcfg.timm!r} (looked for {hub} "
        f"in the HF hub cache {HF_HUB_CACHE}, then online): {type(e).__name__}: {e}. Fix: run once with "
        f"internet access to fill the cache, or download the weights file and set "
        f"`pretrained_path: FILE` on this model, or `pretrained: false` to train from scratch"
    )


def classifier(model: nn.Module) -> nn.Linear | nn.Conv2d:
    """The model's final classifier layer (timm's `get_classifier`; a head module's own `fc` when the
    classifier is a block)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else getattr(model, "head", None)
    if (
        head is not None
        and not isinstance(head, (nn.Linear, nn.Conv2d))
        and isinstance(getattr(head, "fc", None), nn.Module)
    ):
        head = head.fc
    if not isinstance(head, (nn.Linear, nn.Conv2d)):
        raise WeightsError(f"{type(model).__name__}: its classifier is {type(head).__name__}, not a linear layer")
    return head


@torch.no_grad()
def init_head(model: nn.Module, scale: float | None) -> None:
    """Scale the new classifier's initial weights by `scale` and zero its bias, so that the first
    predictions are near uniform and the first loss near ln(classes) (BEiT, MAE). None: timm's init."""
    if scale is None:
        return
    head = classifier(model)
    head.weight.mul_(scale)
    if head.bias is not None:
        head.bias.zero_()


def data_config(model: nn.Module, mcfg: ModelConfig) -> dict[str, Any]:
    """The model's own preprocessing (input size, mean/std, crop, interpolation) from timm."""
    cfg = timm.data.resolve_model_data_config(model)
    if mcfg.img_size is not None:
        cfg["input_size"] = (3, mcfg.img_size, mcfg.img_size)
    return cfg


# --------------------------------------------------------------------------------------- fine-tuning


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters or buffers directly, in definition (≈ forward) order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if name and (any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)))
    ]


def _classifier_prefixes(model: nn.Module) -> list[str]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    return [names] if isinstance(names, str) else list(names)


ATTENTION_PROJECTIONS = ("qkv", "q", "k", "v", "q_proj", "kv", "query", "key")  # timm's names for them


def _is_attention(m: nn.Module) -> bool:
    """Multi-head attention: torch's, or a timm module with heads and query/key/value projections (a
    squeeze-excite or channel-attention gate of a CNN has neither)."""
    if isinstance(m, nn.MultiheadAttention):
        return True
    heads = hasattr(m, "num_heads") or hasattr(m, "num_attention_heads")  # timm's name, transformers'
    return heads and any(isinstance(getattr(m, a, None), nn.Module) for a in ATTENTION_PROJECTIONS)


def transformer_blocks(model: nn.Module) -> list[str]:
    """The names of the model's transformer blocks in forward order: the modules that hold a multi-head
    attention layer, outside the classifier head (an attention-pool head makes no CNN a transformer)."""
    heads = {name.split(".")[0] for name in _classifier_prefixes(model)}
    blocks: list[str] = []
    for name, m in model.named_modules():
        if not name or name.split(".")[0] in heads or not _is_attention(m):
            continue
        block = name.rpartition(".")[0] or name  # the block that holds it: `blocks.3` for `blocks.3.attn`
        if block not in blocks and not any(block.startswith(b + ".") for b in blocks):
            blocks.append(block)
    return blocks


def is_transformer(model: nn.Module) -> bool:
    """Whether `model` is (or has stages of) a vision transformer: it has self-attention blocks outside
    its head. Decides layer-wise LR decay in tuning, `top_fraction`'s unit and channels-last inputs."""
    return bool(transformer_blocks(model))


def _first_trainable(model: nn.Module, fraction: float) -> str:
    """Name of the first module of the trainable top: a transformer block for transformers (the top
    `fraction` of them), else a conv layer (the top `fraction` of the conv layers)."""
    blocks = transformer_blocks(model)
    if blocks:
        return blocks[len(blocks) - max(1, math.ceil(fraction * len(blocks)))]
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise WeightsError(
            f"{type(model).__name__} has neither transformer blocks nor conv layers: use finetune 'full' or 'head'"
        )
    k = max(1, math.ceil(fraction * len(convs)))
    return convs[len(convs) - k]


class FusedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (what `timm.utils.freeze` makes of a frozen BatchNorm2d) computed
    by one fused kernel, `F.batch_norm` in inference mode, instead of four elementwise ops: the same
    affine map from the same buffers, one pass over the activations (it counts on a CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class FusedFrozenBatchNormAct2d(FrozenBatchNormAct2d):
    """timm's FrozenBatchNormAct2d, fused as `FusedFrozenBatchNorm2d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = cast(torch.Tensor, self.running_mean), cast(torch.Tensor, self.running_var)
        w, b = cast(torch.Tensor, self.weight), cast(torch.Tensor, self.bias)
        x = F.batch_norm(x, mean, var, w, b, False, 0.0, self.eps)
        return self.act(self.drop(x))


def fuse_frozen_norms(model: nn.Module) -> None:
    """Swap each frozen BatchNorm's class for its fused twin, in place (same buffers, same state dict)."""
    for m in model.modules():
        if type(m) is FrozenBatchNorm2d:
            m.__class__ = FusedFrozenBatchNorm2d
        elif type(m) is FrozenBatchNormAct2d:
            m.__class__ = FusedFrozenBatchNormAct2d


def eval_frozen(model: nn.Module) -> None:
    """Put every submodule whose parameters are all frozen into eval mode (called after `model.train()`
    under `finetune: head`): a frozen backbone then computes the same features as at evaluation, as the
    cached probe's do (no dropout or drop-path in it; its BatchNorm statistics are frozen anyway).
    Parameter-free modules directly on a trainable path (a head's dropout) keep their mode."""
    for child in model.children():
        params = list(child.parameters())
        if params and not any(q.requires_grad for q in params):
            child.eval()
        elif params:
            eval_frozen(child)


def apply_finetune(model: nn.Module, mcfg: ModelConfig) -> None:
    """Set `requires_grad` per the policy and freeze BatchNorm statistics of frozen layers (fused
    FrozenBatchNorm2d)."""
    if mcfg.finetune == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    heads = _classifier_prefixes(model)

    def in_head(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in heads)

    trainable: set[str] = set()
    leaves = _leaves(model)
    if mcfg.finetune == "top_fraction":
        cut = _first_trainable(model, mcfg.fraction)
        pos = {n: i for i, (n, _) in enumerate(model.named_modules())}
        trainable = {n for n, _ in leaves if pos[n] >= pos[cut]}
    trainable |= {n for n, _ in leaves if in_head(n)}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in leaves:
        if name in trainable:
            for p in m.parameters():
                p.requires_grad_(True)
    frozen = [n for n, _ in leaves if n not in trainable]
    timm.utils.freeze(model, frozen)  # params off, BatchNorm -> FrozenBatchNorm2d (eval-mode stats)
    fuse_frozen_norms(model)
    for name, m in leaves:  # freeze() may not reach params of frozen parents; re-assert the top
        if name in trainable:
            for p in m.parameters():
                p.requires_grad_(True)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def forward_gflops(model: nn.Module, input_size: tuple[int, int, int], device: torch.device) -> float:
    """Forward GFLOPs for one image (torch.utils.flop_counter; a multiply-add counts as 2 FLOPs).

    Attention runs through SDPA's math kernel so that it is counted on every device, and parameters are
    briefly frozen: attention-pool heads (SigLIP, PE) assert on trainable weights under no_grad."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    was_training, needs_grad = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    x = torch.zeros(1, *input_size, device=device)
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            model(x)
    finally:
        for p, g in zip(model.parameters(), needs_grad, strict=True):
            p.requires_grad_(g)
        model.train(was_training)
    return counter.get_total_flops() / 1e9


def pretrained_cfg(model: nn.Module) -> dict[str, Any]:
    """timm's pretrained config of the model (an `hf:` model's: its preprocessing, classifier, revision)."""
    return dict(getattr(model, "pretrained_cfg", None) or {})


def pretrained_info(model: nn.Module) -> tuple[str | None, str | None]:
    """(pretrained tag, licence) from the model's pretrained config, when timm has them."""
    cfg = pretrained_cfg(model)
    return cfg.get("tag"), cfg.get("license")
