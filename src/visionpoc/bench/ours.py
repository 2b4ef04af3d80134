"""The benchmark's measurements of our code, on Stanford-Dogs-sized JPEGs the bench writes (500x375).

- `input_path`: images/s of the input path alone: the stream path's PIL DataLoader vs the prepared
  store + `gpu_aug` (the store's build timed apart).
- `ours`: our loop's `train_one_epoch` (compiled on CUDA, channels_last CNNs, label smoothing,
  clipping) fed from the prepared store vs fed one synthetic batch already on the device; their ratio
  is the input path's efficiency.
Figures exclude warm-up (compilation, autotuning, worker start-up), which is reported apart.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import timm
import timm.optim
import timm.scheduler
import torch
from torch import nn

from visionpoc import models
from visionpoc.bench.workload import NUM_CLASSES, Plan, Spec, build_model, model_config, timed
from visionpoc.data.loaders import ImageDataset, train_transform
from visionpoc.data.prepared import PreparedStore, prepare_store
from visionpoc.data.sources import Split
from visionpoc.data.store_batches import batch_train_transform, place, split_batches
from visionpoc.recovery import StopRequest
from visionpoc.step import StepParts
from visionpoc.timing import sync
from visionpoc.train import EpochProgress, train_one_epoch

Batch = tuple[torch.Tensor, torch.Tensor]


def _pass(batches: Iterable[Batch], device: torch.device) -> tuple[float, float]:
    """(img/s over the whole pass, seconds to its first batch), each batch copied to `device`."""
    t0, n, first = time.perf_counter(), 0, 0.0
    for i, (x, _) in enumerate(batches):
        x = x.to(device, non_blocking=True)
        n += len(x)
        if i == 0:
            sync(device)
            first = time.perf_counter() - t0
    sync(device)
    return n / max(time.perf_counter() - t0, 1e-9), first


def input_path(split: Split, dcfg: dict[str, Any], p: Plan, device: torch.device, cache: Path) -> dict[str, Any]:
    """The PIL DataLoader vs the prepared store + `gpu_aug` on `split`: img/s and seconds to the first batch.

    Both are timed over whole passes after a warm-up pass, the first batch included: the DataLoader's
    workers stay alive between passes (persistent), and the batch is small enough that each worker
    builds several (`input_batch`; a per-image cost, so the batch size does not matter otherwise), so the
    rate is the workers' steady rate, not their start-up burst. The store is read at the training batch."""
    bs, paths = p.specs[0].batch, [split.path(i) for i in range(len(split))]
    pil = torch.utils.data.DataLoader(
        ImageDataset(split, train_transform(dcfg)),
        batch_size=p.input_batch,
        shuffle=True,
        num_workers=p.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=p.workers > 0,
    )
    _, pil_first = _pass(pil, device)  # warm-up: worker start-up, page cache
    pil_img_s, _ = _pass(pil, device)
    store = prepare_store(paths, p.store_size, cache, workers=p.workers)
    images = place(store.images, device)
    fast = split_batches(store, images, split, batch_train_transform(dcfg), bs, device, train=True)
    _, first = _pass(fast, device)  # warm-up: kernels
    rates = [_pass(fast, device)[0] for _ in range(p.input_passes)]
    img_s = float(np.median(rates))
    return {
        "n_images": len(split),
        "batch": bs,
        "input_size": dcfg["input_size"],
        "jpeg_kib": round(sum(os.path.getsize(q) for q in paths) / len(paths) / 1024, 1),
        "pil": {"img_s": pil_img_s, "first_batch_s": pil_first, "workers": p.workers, "batch": p.input_batch},
        "prepared": {
            "img_s": img_s,
            "first_batch_s": first,
            "store_size": p.store_size,
            "build_s": store.build_s,
            "build_img_s": len(paths) / max(store.build_s, 1e-9),
            "resident": isinstance(images, torch.Tensor),
        },
        "ratio_prepared_vs_pil": img_s / pil_img_s,
    }


class _Batches:
    """`steps` batches cycled from `source` (a one-batch list, or a StoreBatches' successive epochs)."""

    def __init__(self, steps: int, source: Iterable[Batch]) -> None:
        self.steps, self.source = steps, source

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        return itertools.islice(itertools.chain.from_iterable(itertools.repeat(self.source)), self.steps)


def ours(
    spec: Spec, store: PreparedStore, images: torch.Tensor | np.ndarray, split: Split, p: Plan, device: torch.device
) -> dict[str, Any]:
    """Our loop's img/s fed by the prepared store and by a synthetic batch already on the device."""
    model = build_model(spec).to(device)
    dcfg = models.data_config(model, model_config(spec))
    cl = device.type == "cuda" and not models.is_transformer(model)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    step_model: nn.Module = torch.compile(model) if device.type == "cuda" else model  # type: ignore[assignment]
    fused: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    opt = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05, **fused)
    sched = timm.scheduler.CosineLRScheduler(opt, t_initial=10**6, t_in_epochs=False)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    synthetic = [
        (
            torch.randn(spec.batch, *dcfg["input_size"], device=device),  # (B, 3, H, W)
            torch.randint(0, NUM_CLASSES, (spec.batch,), device=device),
        )
    ]
    fed = split_batches(store, images, split, batch_train_transform(dcfg), spec.batch, device, train=True)
    parts, stop, step = StepParts(step_model, opt, sched, loss_fn, device, dtype, 1.0, cl), StopRequest(), 0

    def run(batches: Iterable[Batch], k: int) -> None:
        nonlocal step
        _, step, _ = train_one_epoch(parts, _Batches(k, batches), 1, step, EpochProgress(), stop)

    warm = timed(lambda: run(synthetic, p.warm), device)
    run(fed, 1)  # the augmentation's first call
    t_syn = timed(lambda: run(synthetic, p.steps), device)
    t_store = timed(lambda: run(fed, p.steps), device)
    return {
        "name": spec.label,
        "peer": spec.peer or spec.label,
        "timm": spec.hf or spec.timm,  # the model (an `hf:` one included)
        "finetune": spec.finetune,
        "bs": spec.batch,
        "size": spec.size,
        "compile": device.type == "cuda",
        "warmup_s": warm,
        "micro_batch": parts.micro_batch,  # None, or what an out-of-memory fallback left
        "synthetic_img_s": spec.batch * p.steps / t_syn,
        "prepared_img_s": spec.batch * p.steps / t_store,
        "input_efficiency": t_syn / t_store,
    }
