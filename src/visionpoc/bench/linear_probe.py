"""The `probe` section of `visionpoc bench`: a linear probe (`finetune: head`) trained for the same epochs
two ways on the same images, in this process: through the frozen backbone at every step (the shared
loop, `probe.cache: false`) and from features computed once (`probe.py`, the cache cold, so its one
backbone pass is timed). The figure is the wall time of `train.fit` each way, scoring included, and
their ratio. It means something on the CPU too: the backbone's forward passes are the cost either way.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionpoc.bench.workload import NUM_CLASSES, write_jpegs
from visionpoc.config import Config, DataConfig, ModelConfig, ProbeConfig, TrainConfig
from visionpoc.data.sources import Split
from visionpoc.data.splits import Splits

EPOCHS = 10


def _splits(split: Split) -> Splits:
    """70% train, 10% validation, 20% test of the bench's JPEGs."""
    n = len(split)
    cut = np.split(np.arange(n), [int(0.7 * n), int(0.8 * n)])
    train, val, test = (split.subset(idx) for idx in cut)
    return Splits(train, val, test, [f"class_{i}" for i in range(NUM_CLASSES)])


def linear_probe(smoke: bool, device: torch.device, tmp: Path) -> dict[str, Any]:
    """Seconds of a 10-epoch linear probe through the backbone and from cached features; their ratio."""
    from visionpoc.train import fit

    n, side = (60, (96, 72)) if smoke else (1000, (320, 240))
    mcfg = (
        ModelConfig(
            label="probe", timm="vit_tiny_patch16_224", pretrained=False, finetune="head", img_size=32,
            model_kwargs={"depth": 2},
        )
        if smoke
        else ModelConfig(label="probe", timm="resnet18", pretrained=False, finetune="head", img_size=128)
    )  # fmt: skip
    folder = tmp / "probe_jpg"
    folder.mkdir()
    splits = _splits(write_jpegs(folder, n, size=side))
    cfg = Config(
        data=DataConfig(root=str(tmp), num_workers=0 if smoke else 2, pipeline="stream", download=False),
        models=(mcfg,),
        train=TrainConfig(epochs=EPOCHS, batch_size=16 if smoke else 32, device=device.type, compile=False),
        probe=ProbeConfig(epochs=EPOCHS),
    )
    seconds, accuracy = {}, {}
    for way, cache in (("through_backbone", False), ("cached", True)):
        run = replace(cfg, probe=replace(cfg.probe, cache=cache))
        t0 = time.perf_counter()
        result = fit(run, mcfg, splits, tmp / f"probe_{way}")
        seconds[way], accuracy[way] = time.perf_counter() - t0, result.val_accuracy
    return {
        "name": "linear_probe",
        "model": mcfg.timm,
        "img_size": mcfg.img_size,
        "images": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "epochs": EPOCHS,
        "through_backbone_s": seconds["through_backbone"],
        "cached_s": seconds["cached"],
        "ratio": seconds["through_backbone"] / seconds["cached"],
        "val_accuracy": accuracy,
    }
