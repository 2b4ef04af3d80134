"""The optimizer and the weight EMA of a run, from timm: what the loop steps, beside the model.

- Optimizer: AdamW from timm's factory (no weight decay on biases and norms). With `layer_decay`, timm
  gives each layer group its own LR scale (`lr_scale`, applied by timm's scheduler): the head trains at
  the full LR and each block below at `layer_decay` times the one above (BEiT/DeiT-III fine-tuning).
  Models with a `group_matcher` (timm's ViTs and most modern families) group by block; others fall back
  to timm's automatic grouping.
- EMA: `timm.utils.ModelEmaV3` with warm-up (the decay ramps from 0 towards `ema_decay`, so short runs
  are not stuck near the initial weights). It averages parameters and buffers; the loop validates,
  checkpoints (as `best`) and scores the EMA weights when it is on.
"""

from __future__ import annotations

from typing import Any

import timm.optim
import timm.scheduler
import timm.utils
import torch
from torch import nn

from visionpoc.config import TrainConfig


def make_optimizer(model: nn.Module, t: TrainConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `model`'s trainable parameters at peak `lr`, with `t`'s weight and layer decay."""
    extra: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    return timm.optim.create_optimizer_v2(
        model, opt="adamw", lr=lr, weight_decay=t.weight_decay, layer_decay=t.layer_decay, **extra
    )


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
