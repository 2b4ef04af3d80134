"""The benchmark's workload, shared by its sections: the models and sizes it measures (`plan`: full
size on a GPU, toy sizes for `--smoke`), and the helpers every section uses: building a spec's model
with our fine-tuning policy, timing a call on the device, and writing Stanford-Dogs-sized JPEGs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visionpoc import models
from visionpoc.config import ModelConfig
from visionpoc.data.sources import Split
from visionpoc.timing import sync

NUM_CLASSES = 120  # Stanford Dogs


@dataclass(frozen=True)
class Spec:
    label: str
    timm: str
    finetune: str  # "full" or "top_fraction" (top 10% of convs)
    size: int
    batch: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    peer: str | None = None  # the peer rows it is compared with (a variant of another spec); None: its own
    hf: str | None = None  # a transformers model (an `hf:` folder or cached hub id) instead of `timm`


@dataclass(frozen=True)
class Plan:
    specs: tuple[Spec, ...]
    n_images: int
    store_size: int
    steps: int
    warm: int
    workers: int
    input_batch: int = 32  # the input section's batch: each DataLoader worker builds several per pass
    input_passes: int = 5  # the prepared path's timed passes (median)
    variants: tuple[Spec, ...] = ()  # our loop only, measured last: levers such as a larger batch
    smoke: bool = False  # toy sizes


def plan(smoke: bool) -> Plan:
    if smoke:  # toy sizes: checks the code on a CPU in seconds
        vit = Spec("vit_b16", "vit_tiny_patch16_224", "full", 32, 4, {"depth": 2})
        cnn = Spec("xception_top10", "legacy_xception", "top_fraction", 48, 2)
        big = Spec("vit_b16_bs8", "vit_tiny_patch16_224", "full", 32, 8, {"depth": 2}, peer="vit_b16")
        return Plan(
            (vit, cnn),
            n_images=32,
            store_size=48,
            steps=2,
            warm=1,
            workers=0,
            input_batch=4,
            input_passes=2,
            variants=(big,),
            smoke=True,
        )
    return Plan(
        (
            Spec("vit_b16", "vit_base_patch16_224", "full", 224, 256),
            Spec("xception_top10", "legacy_xception", "top_fraction", 299, 128),
            Spec("xception_full", "legacy_xception", "full", 299, 128),
        ),
        n_images=2048,
        store_size=320,
        steps=20,
        warm=5,
        workers=min(16, os.cpu_count() or 1),
        # does a batch twice the peers' fill the GPU better? ("a batch that fills the GPU")
        variants=(Spec("vit_b16_bs512", "vit_base_patch16_224", "full", 224, 512, peer="vit_b16"),),
    )


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds `fn()` takes, the device synchronized before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def model_config(spec: Spec) -> ModelConfig:
    """`spec` as a `models:` entry: random weights, at its size, `top_fraction` the top 10%."""
    return ModelConfig(
        label=spec.label,
        timm="" if spec.hf else spec.timm,
        hf=spec.hf,
        pretrained=False,
        finetune=spec.finetune,  # type: ignore[arg-type]
        fraction=0.1,
        img_size=spec.size,
        model_kwargs=spec.kwargs,
    )


def build_model(spec: Spec) -> nn.Module:
    """`spec`'s timm (or transformers) model, random weights, with our fine-tuning policy applied."""
    mcfg = model_config(spec)
    model = models.create_model(mcfg, NUM_CLASSES)
    models.apply_finetune(model, mcfg)
    return model


def write_jpegs(folder: Path, n: int, size: tuple[int, int] = (500, 375), workers: int = 1) -> Split:
    """`n` noisy-gradient JPEGs of Stanford Dogs' typical size (~100 KB at quality 90, as peer_anchor.py)."""
    from PIL import Image

    w, h = size
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))  # (H, W, 3)

    def write(i: int) -> None:
        noise = np.random.default_rng([0, i]).integers(-40, 40, (h, w, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)

    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL encodes without the GIL
        list(pool.map(write, range(n)))
    labels = np.random.default_rng(0).integers(0, NUM_CLASSES, n).astype(np.int64)
    return Split(folder, [f"{i}.jpg" for i in range(n)], labels)
