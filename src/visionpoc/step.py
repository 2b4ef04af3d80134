"""One optimizer step: forward/backward over micro-batches (gradient accumulation keeps the global
batch), DDP gradient sync on the last micro-batch only, clipping, and the CUDA out-of-memory fallback
that halves the micro-batch and retries the same batch."""

from __future__ import annotations

import gc
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import timm.scheduler
import timm.utils
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from visionpoc.data import augment

log = logging.getLogger(__name__)


@dataclass
class StepParts:
    """What one optimizer step needs; `micro_batch` shrinks after a CUDA out-of-memory error."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: timm.scheduler.scheduler.Scheduler
    loss_fn: nn.Module
    device: torch.device
    dtype: torch.dtype | None
    grad_clip: float | None
    channels_last: bool
    micro_batch: int | None = None
    oom_events: list[dict[str, Any]] = field(default_factory=list)
    batch_aug: augment.BatchOp | None = None  # on the device batch, before the step (mixup/cutmix, erasing)
    ema: timm.utils.ModelEmaV3 | None = None  # updated after every optimizer step
    eval_frozen: bool = False  # `finetune: head`: the frozen backbone trains in eval mode (models.eval_frozen)


def _step(p: StepParts, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward over micro-batches of the batch, one optimizer step. Returns (loss sum, correct)."""
    micro = p.micro_batch or len(y)
    chunks = list(zip(x.split(micro), y.split(micro), strict=True))
    autocast = torch.autocast(p.device.type, dtype=p.dtype) if p.dtype is not None else nullcontext()
    p.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=p.device, dtype=torch.float64)
    correct = torch.zeros((), device=p.device, dtype=torch.long)
    ddp = getattr(p.model, "_orig_mod", p.model)  # torch.compile(DDP(model)) under torchrun
    for i, (xc, yc) in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = nullcontext() if last or not isinstance(ddp, DistributedDataParallel) else ddp.no_sync()
        with sync:
            with autocast:
                logits = p.model(xc)  # (b, num_classes)
                loss = p.loss_fn(logits, yc)
            (loss * (len(yc) / len(y))).backward()  # the mean over the whole batch
        loss_sum += loss.detach().double() * len(yc)
        correct += (logits.argmax(1) == (yc.argmax(1) if yc.ndim == 2 else yc)).sum()  # soft y: its top class
    if p.grad_clip is not None:
        nn.utils.clip_grad_norm_(p.model.parameters(), p.grad_clip)
    p.optimizer.step()
    return loss_sum, correct


def train_step(
    p: StepParts, x: torch.Tensor, y: torch.Tensor, where: dict[str, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_step`, retried with half the micro-batch (same global batch) after an out-of-memory error."""
    while True:
        try:
            return _step(p, x, y)
        except torch.OutOfMemoryError:
            pass  # the failed step's tensors live as long as the traceback: free the cache after it
        p.optimizer.zero_grad(set_to_none=True)
        if p.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
        current = p.micro_batch or len(y)
        if current <= 1:
            raise torch.OutOfMemoryError(
                f"out of memory at {where} even with a micro-batch of 1 image: the model does not fit this "
                "device at this input size; lower img_size, or train fewer layers (finetune: top_fraction/head)"
            )
        p.micro_batch = current // 2
        p.oom_events.append({**where, "micro_batch": p.micro_batch})
        log.warning(
            "out of memory at %s: micro-batch %d -> %d, gradients accumulated over %d steps",
            where,
            current,
            p.micro_batch,
            -(-len(y) // p.micro_batch),
        )
