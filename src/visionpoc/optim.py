"""The optimizer and the weight EMA of a run, from timm: what the loop steps, beside the model.

- Optimizer: AdamW from timm's factory (no weight decay on biases and norms). With `layer_decay`, timm
  gives each layer group its own LR scale (`lr_scale`, applied by timm's scheduler): the head trains at
  the full LR and each block below at `layer_decay` times the one above (BEiT/DeiT-III fine-tuning).
  Models with a `group_matcher` (timm's ViTs and most modern families) group by block; others fall back
  to timm's automatic grouping.
- Learning rate: a model that sets none (nor `train.lr`) gets its policy's default, `default_lr`: an AdamW
  peak rate per policy at a reference batch of 256, scaled by the square root of batch / 256 (the
  square-root rule for adaptive optimizers: Malladi et al., 2022; the linear rule of Goyal et al., 2017
  is for SGD). A new linear head on frozen features needs a rate about 100x a full fine-tune's.
- EMA: `timm.utils.ModelEmaV3` with warm-up (the decay ramps from 0 towards `ema_decay`, so short runs
  are not stuck near the initial weights). It averages parameters and buffers; the loop validates,
  checkpoints (as `best`) and scores the EMA weights when it is on.
"""

from __future__ import annotations

import math
from typing import Any

import timm.optim
import timm.scheduler
import timm.utils
import torch
from torch import nn

from visionpoc.config import ModelConfig, TrainConfig
from visionpoc.models import classifier

REFERENCE_BATCH = 256
POLICY_LR = {"full": 2e-4, "top_fraction": 1e-3, "head": 2e-2}
"""AdamW peak LR per fine-tuning policy at REFERENCE_BATCH: full fine-tuning of a pretrained backbone
(ViT/ConvNeXt recipes: 1e-4 at batch 64), the top layers of a CNN (the original PoC's tuned Xception:
1e-3), a new linear head alone (linear probes: 1e-2 and above)."""


def default_lr(finetune: str, batch_size: int) -> float:
    """The policy's peak LR for a global batch of `batch_size`: POLICY_LR x sqrt(batch / 256)."""
    return POLICY_LR[finetune] * math.sqrt(batch_size / REFERENCE_BATCH)


def head_lr_scale(mcfg: ModelConfig) -> float | None:
    """The new classifier's LR multiplier: `mcfg.head_lr_scale` when a pretrained backbone trains too;
    None when it does not apply (the head alone, or a model trained from scratch)."""
    return mcfg.head_lr_scale if mcfg.pretrained and mcfg.finetune != "head" else None


def resolve_lr(lr: float | None, mcfg: ModelConfig, batch_size: int) -> tuple[float, str]:
    """(peak LR, where it came from) for model `mcfg`: `lr` is the model's view of `train.lr` (its own
    `lr` when it sets one), else the policy's default. Sources: config, preset, tuned, policy_default."""
    if lr is None:
        return default_lr(mcfg.finetune, batch_size), "policy_default"
    return lr, (mcfg.lr_source or "config") if mcfg.lr is not None else "config"


def make_optimizer(
    model: nn.Module, t: TrainConfig, lr: float, device: torch.device, head_lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    """AdamW over `model`'s trainable parameters at peak `lr`, with `t`'s weight and layer decay; the new
    classifier's LR is `head_lr_scale` times its group's (a new head learns from scratch)."""
    extra: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    opt = timm.optim.create_optimizer_v2(
        model, opt="adamw", lr=lr, weight_decay=t.weight_decay, layer_decay=t.layer_decay, **extra
    )
    if head_lr_scale == 1.0:
        return opt
    return _scale_head(opt, model, head_lr_scale)


def _scale_head(opt: torch.optim.Optimizer, model: nn.Module, scale: float) -> torch.optim.Optimizer:
    """`opt` rebuilt with the new classifier's parameters in groups of their own, whose `lr_scale` (which
    timm's scheduler applies) is multiplied by `scale`."""
    head = {id(p) for p in classifier(model).parameters()}
    groups = []
    for g in opt.param_groups:
        params = g["params"]
        rest = {k: v for k, v in g.items() if k != "params"}
        body, new = [p for p in params if id(p) not in head], [p for p in params if id(p) in head]
        if body:
            groups.append({**rest, "params": body})
        if new:
            groups.append({**rest, "params": new, "lr_scale": rest.get("lr_scale", 1.0) * scale})
    opt.param_groups.clear()  # the same optimizer (its class and defaults), with the groups split
    for g in groups:
        opt.add_param_group(g)
    return opt


def make_scheduler(
    optimizer: torch.optim.Optimizer, t: TrainConfig, lr: float, steps_per_epoch: int
) -> timm.scheduler.CosineLRScheduler:
    """Per-step schedule over the whole run (`t.epochs`): linear warm-up from `lr`/100 over
    `t.warmup_epochs`, then a cosine from `lr` that reaches `t.min_lr` at the last step (timm's; call
    `step_update(step)` after each optimizer step)."""
    total = t.epochs * steps_per_epoch
    warmup = min(round(t.warmup_epochs * steps_per_epoch), total - 1)
    return timm.scheduler.CosineLRScheduler(
        optimizer,
        t_initial=max(1, total - warmup),
        lr_min=t.min_lr,
        warmup_t=warmup,
        warmup_lr_init=lr * 0.01,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def make_ema(model: nn.Module, decay: float | None) -> timm.utils.ModelEmaV3 | None:
    """An EMA copy of `model` (already on its device), or None when `decay` is None."""
    if decay is None:
        return None
    return timm.utils.ModelEmaV3(model, decay=decay, use_warmup=True)


def peak_lr(optimizer: torch.optim.Optimizer) -> float:
    """The current LR of the fastest group (with layer decay: the head's)."""
    return max(float(g["lr"]) for g in optimizer.param_groups)
