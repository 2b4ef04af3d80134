"""The `plain` section of `visionpoc bench`: our loop against the plainest correct PyTorch loop doing the
same work, in this process, epoch for epoch, on the same device (a CPU too: it measures the loop's own
cost, not the device).

The work: real photos (crops of scikit-learn's sample photos, 128-240 px JPEGs in ImageFolder layout),
the same timm model and weights, batch, DataLoader workers and augmentation (timm's
`create_transform(is_training=True)`, flip only, as our `basic` preset), AdamW, label smoothing 0.1.
- `full`: every weight trains; both loops clip gradients at norm 1.
- `head`: only the classifier trains. The plain loop freezes the backbone the plain way
  (`requires_grad_(False)`, the backbone in eval mode); ours runs `finetune: head` with the feature
  cache off (`probe.cache: false`), so every step goes through the backbone, as the plain one does.

The plain loop: `ImageFolder` + `DataLoader` (shuffled, persistent workers), forward, loss, backward,
(clip), step. Ours: `train.build_run` and `train.train_one_epoch`, the path `fit` takes (scheduler,
progress, stop flag, seeded per-sample augmentation and all). Each side builds once, trains one warm-up
epoch untimed, then the two alternate, `repeats` epochs each, the order flipped every round; an
epoch's img/s is its images over its synchronized wall time, the start of its iteration included.
Then the same over batches already built (`loop`): the loops alone, without their input paths, whose
workers share the CPU with the model and make the end-to-end figure noisier.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import timm
import timm.data
import torch
from torch import nn

from visionpoc.config import Config, DataConfig, ModelConfig, ProbeConfig, TrainConfig, for_model
from visionpoc.data.sources import Split
from visionpoc.data.splits import Splits
from visionpoc.timing import sync

QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")


@dataclass(frozen=True)
class Case:
    finetune: str  # "full" or "head"
    timm: str
    size: int
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PlainPlan:
    cases: tuple[Case, ...]
    n_images: int
    side: tuple[int, int]  # the JPEGs' side, drawn in [lo, hi]
    batch: int
    workers: int
    repeats: int


def plain_plan(smoke: bool) -> PlainPlan:
    if smoke:  # toy sizes: the code path in seconds
        tiny = Case("full", "resnet10t", 32), Case("head", "tf_efficientnet_lite0", 32)
        return PlainPlan(tiny, n_images=16, side=(40, 64), batch=4, workers=0, repeats=1)
    cases = Case("full", "resnet18", 128), Case("head", "tf_efficientnet_lite1", 240)
    return PlainPlan(cases, n_images=320, side=(128, 240), batch=32, workers=2, repeats=5)


def photo_folder(root: Path, n: int, side: tuple[int, int], seed: int = 0) -> Split:
    """`n` JPEGs cut from scikit-learn's two sample photos, in ImageFolder layout: 8 classes (each
    photo's quadrants), a random square crop of each quadrant per image, resized to a side in `side`."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    regions = []
    for f, a in zip(photos.filenames, photos.images, strict=True):
        img, name = Image.fromarray(a), Path(f).stem
        w, h = img.size
        for q, quad in enumerate(QUADRANTS):
            left, top = (q % 2) * (w // 2), (q // 2) * (h // 2)
            regions.append((f"{name}_{quad}", img.crop((left, top, left + w // 2, top + h // 2))))
    regions.sort()  # ImageFolder's class order: sorted folder names
    rng, files = np.random.default_rng(seed), []
    labels = np.arange(n, dtype=np.int64) % len(regions)
    for i, label in enumerate(labels):
        name, region = regions[label]
        w, h = region.size
        s = int(rng.integers(min(w, h) // 2, min(w, h) + 1))
        x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        out = int(rng.integers(side[0], side[1] + 1))
        (root / name).mkdir(parents=True, exist_ok=True)
        files.append(f"{name}/{i:05d}.jpg")
        region.crop((x, y, x + s, y + s)).resize((out, out), Image.Resampling.BILINEAR).save(
            root / files[-1], quality=90
        )
    return Split(root, files, labels)


@dataclass(frozen=True)
class Loop:
    """One side of the comparison: `epoch()` trains one epoch of its loader and returns its images;
    `over(batches)` trains over batches already built: the loop alone, without its input path."""

    epoch: Callable[[], int]
    over: Callable[[list[tuple[torch.Tensor, torch.Tensor]]], int]


def _plain(case: Case, root: Path, dcfg: dict[str, Any], p: PlainPlan, device: torch.device) -> Loop:
    """The plainest correct loop."""
    from torchvision.datasets import ImageFolder

    torch.manual_seed(0)
    model: nn.Module = timm.create_model(case.timm, pretrained=False, num_classes=8, **case.kwargs).to(device)
    head = case.finetune == "head"
    classifier = cast(nn.Module, model.get_classifier())  # type: ignore[operator]
    if head:
        model.requires_grad_(False)
        classifier.requires_grad_(True)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    tf = timm.data.create_transform(
        input_size=dcfg["input_size"],
        is_training=True,
        interpolation=dcfg["interpolation"],
        mean=dcfg["mean"],
        std=dcfg["std"],
        hflip=0.5,
        color_jitter=None,  # type: ignore[arg-type]  # as our `basic` preset
    )
    loader = torch.utils.data.DataLoader(
        ImageFolder(str(root), transform=tf),
        batch_size=p.batch,
        shuffle=True,
        num_workers=p.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=p.workers > 0,
        drop_last=True,
    )
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def modes() -> None:
        model.train()
        if head:  # a frozen backbone: eval mode (its BatchNorm statistics stay as they are)
            model.eval()
            classifier.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with amp:
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not head:
            nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def over(batches: Any) -> int:
        modes()
        n = 0
        for x, y in batches:
            step(x, y)
            n += len(y)
        return n

    return Loop(lambda: over(loader), over)


def _ours(case: Case, split: Split, p: PlainPlan, device: torch.device, tmp: Path) -> tuple[Loop, Any]:
    """Our loop as `fit` builds it; returns (the loop, its model's data config)."""
    from visionpoc.data.loaders import set_epoch
    from visionpoc.recovery import StopRequest
    from visionpoc.train import EpochProgress, build_run, train_one_epoch

    mcfg = ModelConfig(
        label=case.finetune, timm=case.timm, pretrained=False, finetune=case.finetune,  # type: ignore[arg-type]
        img_size=case.size, model_kwargs=case.kwargs,
    )  # fmt: skip
    cfg = Config(
        data=DataConfig(root=str(tmp), num_workers=p.workers, pipeline="stream", download=False),
        models=(mcfg,),
        train=TrainConfig(epochs=1 + p.repeats, batch_size=p.batch, device=device.type, lr=1e-3),
        probe=ProbeConfig(cache=False),
    )
    empty = split.subset(np.arange(0))
    splits = Splits(split, empty, empty, [f"c{i}" for i in range(8)])
    run = build_run(for_model(cfg, mcfg), mcfg, splits, tmp / f"ours_{case.finetune}")
    stop, state = StopRequest(), {"epoch": 0, "step": 0}

    def over(batches: Any) -> int:
        state["epoch"] += 1
        set_epoch(batches, state["epoch"])  # a no-op on a list
        prog, state["step"], _ = train_one_epoch(
            run.parts, batches, state["epoch"], state["step"], EpochProgress(), stop
        )
        return prog.n

    return Loop(lambda: over(run.loaders.train), over), run.dcfg


def _rate(pass_: Callable[[], int], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    n = pass_()
    sync(device)
    return n / (time.perf_counter() - t0)


def _alternate(passes: dict[str, Callable[[], int]], repeats: int, device: torch.device) -> dict[str, Any]:
    """img/s of each side's pass, alternating, the order flipped every round; the median ratio ours/plain."""
    rates: dict[str, list[float]] = {"plain": [], "ours": []}
    for r in range(repeats):
        for who in ("plain", "ours") if r % 2 == 0 else ("ours", "plain"):
            rates[who].append(_rate(passes[who], device))
    ratios = [o / q for o, q in zip(rates["ours"], rates["plain"], strict=True)]
    return {
        "plain_img_s": statistics.median(rates["plain"]),
        "ours_img_s": statistics.median(rates["ours"]),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "rates": rates,
    }


def plain_case(case: Case, split: Split, p: PlainPlan, device: torch.device, tmp: Path) -> dict[str, Any]:
    """Both loops, alternating: whole epochs (input path included), then the loops alone over the same
    batches already built (`loop`: the loop's own cost, free of the input path's noise)."""
    ours, dcfg = _ours(case, split, p, device, tmp)
    plain = _plain(case, split.root, dcfg, p, device)
    t0 = time.perf_counter()
    plain.epoch(), ours.epoch()  # warm-up: worker start-up, page cache, first calls
    warm = time.perf_counter() - t0
    epochs = _alternate({"plain": plain.epoch, "ours": ours.epoch}, p.repeats, device)
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(p.batch, *dcfg["input_size"], generator=g), torch.arange(p.batch) % 8)
        for _ in range(len(split) // p.batch)
    ]
    loop = _alternate({"plain": lambda: plain.over(batches), "ours": lambda: ours.over(batches)}, p.repeats, device)
    return {
        "finetune": case.finetune,
        "timm": case.timm,
        "size": case.size,
        "batch": p.batch,
        "workers": p.workers,
        "images": len(split),
        "warmup_s": warm,
        **epochs,
        "loop": loop,
    }


def plain_peer(smoke: bool, device: torch.device, tmp: Path) -> dict[str, Any]:
    """Both cases of `plain_plan(smoke)` on one set of photos."""
    p = plain_plan(smoke)
    split = photo_folder(tmp / "plain_photos", p.n_images, p.side)
    cases = [plain_case(c, split, p, device, tmp) for c in p.cases]
    return {"name": "plain", "threads": torch.get_num_threads(), "cases": cases}
