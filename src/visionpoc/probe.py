"""The linear probe as the field runs it (DINOv2's linear evaluation), for `finetune: head` models.

The frozen backbone runs once per image, not once per epoch: its pre-logits features (what the classifier
reads: timm's `forward_head(..., pre_logits=True)`) of the clean train pass, validation and test (the eval
transform's centre crop), plus `probe.views` augmented views of each training image, are computed once
and cached on disk next to the prepared store. A grid of linear heads, every `probe.lrs` x
`probe.weight_decays`, then trains on the standardized features at once (one batched matmul per step for
all of them) with AdamW, the run's cosine schedule, label smoothing and batch size; each head starts at
zero (uniform predictions) and keeps its best-on-validation epoch. The best head is folded back into the
model's classifier (standardization included) and scored like any other model, from the same features.

Cache key: the model (timm name or `hf:` model, weights file and its stat, kwargs, image size), its preprocessing (data
config, input path), the views (augmentation, seed, count) and each split's files (path, size, mtime)
and labels (a split streamed from tar shards: the shards' paths, sizes and mtimes). Any change computes
the features again; nothing else does.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import timm.scheduler
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from visionpoc import checkpoint, distributed, models, recovery
from visionpoc.config import Config, ModelConfig, ProbeConfig
from visionpoc.data.loaders import Loaders, set_epoch
from visionpoc.data.prepared import dataset_cache_dir, split_key
from visionpoc.data.splits import Splits
from visionpoc.distributed import Dist, gather_in_order, shard_of
from visionpoc.errors import TrainingInterrupted
from visionpoc.evaluate import summarize
from visionpoc.results import EpochRecord, ModelResult
from visionpoc.runfiles import HISTORY_FILE, atomic_write, atomic_write_json
from visionpoc.timing import Progress, peak_memory_gib, reset_peak_memory, sync
from visionpoc.train import BEST, LAST, Run, flags_of, record_scores

OnEpoch = Callable[[int, float | None], None]

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when what is cached changes
PARTS = ("train", "train_eval", "val", "test")  # train: the clean pass then each view; train_eval: clean only


def pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the classifier reads: (B, C, H, W) -> (B, D). A model without timm's `forward_head` (an
    `hf:` model) runs whole and its classifier layer's input is kept."""
    if callable(getattr(model, "forward_head", None)):
        return model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
    seen: list[torch.Tensor] = []
    hook = models.classifier(model).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        model(x)
    finally:
        hook.remove()
    return seen[0].flatten(1)  # (B, D)


# ------------------------------------------------------------------------------------------ the features


@dataclass
class Features:
    """Each part's features (N, D) float32 and labels (N,), on the CPU, and what computing them cost."""

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    seconds: dict[str, float]  # each part's backbone pass, when it was computed (kept with the cache)
    hit: bool = False


def cache_key(cfg: Config, mcfg: ModelConfig, dcfg: dict[str, Any], pipeline: str, splits: Splits) -> str:
    """What the features depend on, hashed (see the module's docstring)."""
    weights = Path(mcfg.pretrained_path).expanduser() if mcfg.pretrained and mcfg.pretrained_path else None
    if mcfg.pretrained and mcfg.hf and Path(mcfg.hf).expanduser().is_dir():  # a folder's weights may change
        weights = Path(mcfg.hf).expanduser() / "model.safetensors"
    st = weights.stat() if weights is not None and weights.is_file() else None
    what: dict[str, Any] = {
        "version": CACHE_VERSION,
        "model": [mcfg.name, mcfg.pretrained, str(weights), st and [st.st_size, st.st_mtime_ns], mcfg.model_kwargs],
        "preprocessing": [json.loads(json.dumps(dcfg, default=list)), pipeline, cfg.data.prepared_size],
        "views": [cfg.probe.views, cfg.train.augment if cfg.probe.views else None, cfg.train.seed],
    }
    for name in ("train", "val", "test"):
        split = getattr(splits, name)
        labels = hashlib.sha256(np.asarray(split.labels, np.int64).tobytes()).hexdigest()
        what[name] = [split_key(split), labels] if len(split) else None
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


@torch.inference_mode()
def _pass(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype | None,
    stop: recovery.StopRequest,
    desc: str = "probe features",
    show: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the frozen backbone: (features (n, D) float32, labels (n,)) of this process's batches;
    its progress shown (`timing.Progress`) as `desc` when `show` (the main process)."""
    model.eval()
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    feats, ys = [], []
    bar = Progress(batches, desc, show=show, logger=log)
    for x, y in bar:
        if stop.signum is not None:
            bar.close()
            raise TrainingInterrupted("stopped while computing the probe's features (they are computed again)")
        with autocast:
            feats.append(pre_logits(model, x.to(device, non_blocking=True)).float())  # (B, D)
        ys.append(y)
        if bar.step(len(y)):  # the host's view of the rate: no sync
            bar.show()
    bar.close()
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats).cpu(), torch.cat(ys).long().cpu()


def _gather_rows(d: Dist, f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's training rows, in rank order (their order does not matter: the heads shuffle)."""
    if not d.enabled:
        return f, y
    parts = distributed.all_gather(d, (f.numpy(), y.numpy()))
    fs = np.concatenate([p[0] for p in parts if len(p[0])])
    return torch.from_numpy(fs), torch.from_numpy(np.concatenate([p[1] for p in parts]))


def compute_features(
    model: nn.Module,
    loaders: Loaders,
    cfg: Config,
    device: torch.device,
    dtype: torch.dtype | None,
    d: Dist,
    stop: recovery.StopRequest,
    splits: Splits,
    label: str = "",
) -> Features:
    """Run the frozen backbone over every part once (the views: `probe.views` augmented train epochs);
    `label` names the model in the progress display."""
    x: dict[str, torch.Tensor] = {}
    y: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    passes = (
        ("train_eval", loaders.train_eval, len(splits.train)),
        ("val", loaders.val, len(splits.val)),
        ("test", loaders.test, len(splits.test)),
    )
    for part, batches, n in passes:
        sync(device)
        t0 = time.perf_counter()
        f, lab = _pass(model, batches, device, dtype, stop, f"[{label}] probe features: {part}", d.main)
        if d.enabled:  # each process's shard, back in sample order (as `train.evaluate_split` does)
            rows = gather_in_order(d, shard_of(batches, n), (f.numpy(), lab.numpy()), n)
            f, lab = torch.from_numpy(rows[0]), torch.from_numpy(rows[1])
        x[part], y[part] = f, lab
        sync(device)
        seconds[part] = time.perf_counter() - t0
        log.info("probe features: %s, %d images in %.1fs", part, len(y[part]), seconds[part])
    views_x, views_y, t0 = [x["train_eval"]], [y["train_eval"]], time.perf_counter()
    for v in range(1, cfg.probe.views + 1):  # epoch v's augmentation of every training image
        set_epoch(loaders.train, v)
        desc = f"[{label}] probe features: train view {v}/{cfg.probe.views}"
        f, lab = _pass(model, loaders.train, device, dtype, stop, desc, d.main)
        f, lab = _gather_rows(d, f, lab)
        views_x.append(f)
        views_y.append(lab)
    x["train"], y["train"] = torch.cat(views_x), torch.cat(views_y)
    seconds["train"] = seconds["train_eval"] + time.perf_counter() - t0
    return Features(x, y, seconds)


def cached_features(key: str, cache: Path, compute: Callable[[], Features], d: Dist) -> Features:
    """The features of `key` from the `cache` folder, or `compute()` them and (rank 0) save them.
    Every process reads them, or every process computes them (with collectives): a cache entry that one
    process cannot read (damaged, or absent from its file system) is computed again by all."""
    path = cache / "features" / f"{key}.safetensors"
    if distributed.broadcast_flag(d, path.is_file()):
        hit = _read_features(path)
        if all(distributed.all_gather(d, hit is not None)):
            assert hit is not None
            log.info("probe features: cache hit (%s)", path)
            return hit
    feats = compute()
    if d.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{p}.{k}": getattr(feats, k)[p].contiguous() for p in PARTS for k in ("x", "y")}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
        atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps({"seconds": feats.seconds})))
    return feats


def _read_features(path: Path) -> Features | None:
    """The cached features at `path`, or None (with a warning) when they cannot be read."""
    try:
        tensors = load_file(str(path))
        meta = json.loads(path.with_suffix(".json").read_text())
        x = {p: tensors[f"{p}.x"] for p in PARTS}
        y = {p: tensors[f"{p}.y"] for p in PARTS}
        return Features(x, y, {k: float(v) for k, v in meta["seconds"].items()}, hit=True)
    except (OSError, KeyError, ValueError) as e:  # a damaged cache entry: computed again
        log.warning("probe features: %s unreadable (%s): computing them again", path, e)
        return None


# ------------------------------------------------------------------------------------------ the grid of heads


@dataclass
class Grid:
    """The trained heads: each grid point's settings and best validation accuracy, and the chosen head."""

    points: list[dict[str, float]]  # {lr, weight_decay, val_accuracy}, in grid order
    chosen: int
    weight: torch.Tensor  # (C, D): the chosen head, on raw (unstandardized) features
    bias: torch.Tensor  # (C,)
    history: list[dict[str, float]] = field(default_factory=list)  # the chosen head, per epoch
    steps: int = 0
    rows_seen: int = 0
    seconds: float = 0.0


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(G, N, C) logits -> (G,) accuracy of each head."""
    return (logits.argmax(-1) == y).float().mean(-1)


class Heads:
    """One linear head per grid point `(lr, weight_decay)`, each from zero (uniform predictions, loss ln C),
    with its own AdamW group and the run's per-step cosine schedule (timm's)."""

    def __init__(
        self, grid: list[tuple[float, float]], num_classes: int, dim: int, steps: int, warmup: int, min_lr: float
    ) -> None:
        self.weights: list[torch.Tensor] = [nn.Parameter(torch.zeros(num_classes, dim)) for _ in grid]
        self.biases: list[torch.Tensor] = [nn.Parameter(torch.zeros(num_classes)) for _ in grid]
        groups = [
            {"params": [w, b], "lr": lr, "weight_decay": wd}
            for (lr, wd), w, b in zip(grid, self.weights, self.biases, strict=True)
        ]
        self.opt = torch.optim.AdamW(groups)
        self.sched = timm.scheduler.CosineLRScheduler(
            self.opt,
            t_initial=max(1, steps - warmup),
            lr_min=min_lr,
            warmup_t=warmup,
            warmup_lr_init=0.0,
            warmup_prefix=True,
            t_in_epochs=False,
        )
        self.step = 0

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) standardized features -> (G, N, C): every head in one batched matmul."""
        return torch.einsum("nd,gcd->gnc", z, torch.stack(self.weights)) + torch.stack(self.biases)[:, None]

    def train_epoch(
        self, z: torch.Tensor, y: torch.Tensor, order: torch.Tensor, batch_size: int, label_smoothing: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over `order`; returns each head's (G,) mean training loss and accuracy."""
        loss_sum, correct = torch.zeros(len(self.weights)), torch.zeros(len(self.weights))
        for idx in order.split(batch_size):
            logits = self.logits(z[idx])  # (G, B, C)
            target = y[idx].expand(len(self.weights), -1)  # (G, B)
            losses = F.cross_entropy(
                logits.flatten(0, 1), target.flatten(), label_smoothing=label_smoothing, reduction="none"
            )
            per_head = losses.view(len(self.weights), -1).mean(1)  # (G,): each head's loss, independent
            self.opt.zero_grad(set_to_none=True)
            per_head.sum().backward()
            self.opt.step()
            self.step += 1
            self.sched.step_update(num_updates=self.step)
            loss_sum += per_head.detach() * len(idx)
            correct += (logits.detach().argmax(-1) == target).float().sum(1)
        return loss_sum / len(order), correct / len(order)


def train_heads(
    f: Features,
    pc: ProbeConfig,
    num_classes: int,
    epochs: int,
    batch_size: int,
    warmup_epochs: float,
    min_lr: float,
    label_smoothing: float,
    seed: int,
    desc: str = "linear probe heads",
    show: bool = True,
) -> Grid:
    """Train every grid point's head on `f.x["train"]` at once; keep each one's best validation epoch (no
    validation split: its lowest loss on the clean train pass). The epochs' progress is shown as `desc`
    when `show` (the main process)."""
    t0 = time.perf_counter()
    mean, std = f.x["train"].mean(0), f.x["train"].std(0).clamp_min(1e-6)  # (D,)
    z = {p: (f.x[p] - mean) / std if len(f.x[p]) else torch.zeros(0, len(mean)) for p in PARTS}  # (N, D)
    grid = [(lr, wd) for lr in pc.lrs for wd in pc.weight_decays]
    n, per_epoch = len(z["train"]), math.ceil(len(z["train"]) / batch_size)
    total = epochs * per_epoch
    heads = Heads(grid, num_classes, len(mean), total, min(round(warmup_epochs * per_epoch), total - 1), min_lr)
    g = torch.Generator().manual_seed(seed)
    part = "val" if len(z["val"]) else "train_eval"
    best = torch.full((len(grid),), -math.inf)
    best_w, best_b = torch.stack(heads.weights).detach().clone(), torch.stack(heads.biases).detach().clone()
    curves: list[torch.Tensor] = []  # per epoch: (G, 4) train loss, train acc, val loss, val acc
    bar = Progress(range(epochs), desc, show=show, logger=log, unit="epoch")
    for _ in bar:
        loss, acc = heads.train_epoch(
            z["train"], f.y["train"], torch.randperm(n, generator=g), batch_size, label_smoothing
        )
        with torch.no_grad():
            logits = heads.logits(z[part])  # (G, N, C)
            val_loss = F.cross_entropy(logits.permute(0, 2, 1), f.y[part].expand(len(grid), -1), reduction="none")
            val_acc = _accuracy(logits, f.y[part])
            score = val_acc if part == "val" else -val_loss.mean(1)
            better = score > best
            best = torch.where(better, score, best)
            best_w[better], best_b[better] = torch.stack(heads.weights)[better], torch.stack(heads.biases)[better]
        curves.append(torch.stack([loss, acc, val_loss.mean(1), val_acc], 1))
        if bar.step(n):
            bar.show()
    bar.close()
    chosen = int(torch.argmax(best))  # the first of equal bests: grid order
    weight = best_w[chosen] / std  # fold the standardization in: W (x - m) / s + b = (W / s) x + (b - (W / s) m)
    bias = best_b[chosen] - weight @ mean
    points = [
        {"lr": lr, "weight_decay": wd, "val_accuracy": float(best[i]) if part == "val" else float("nan")}
        for i, (lr, wd) in enumerate(grid)
    ]
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
    history = [{k: float(v) for k, v in zip(keys, c[chosen], strict=True)} for c in curves]
    return Grid(points, chosen, weight, bias, history, heads.step, epochs * n, time.perf_counter() - t0)


def set_head(model: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Put a (C, D) head into the model's classifier (a Linear, or a 1x1 Conv2d)."""
    head = models.classifier(model)
    with torch.no_grad():
        head.weight.copy_(weight.view_as(head.weight))
        if head.bias is not None:
            head.bias.copy_(bias)


def probs_of(f: Features, part: str, weight: torch.Tensor, bias: torch.Tensor) -> tuple[np.ndarray, float]:
    """(softmax probabilities (N, C), mean cross-entropy) of the head on a part's features."""
    logits = f.x[part] @ weight.T + bias  # (N, C)
    loss = float(F.cross_entropy(logits, f.y[part])) if len(logits) else float("nan")
    return logits.softmax(1).numpy(), loss


# ------------------------------------------------------------------------------------------ the model's run


def fit_probe(run: Run, result: ModelResult, score_test: bool, on_epoch: OnEpoch | None) -> ModelResult:
    """`train.fit` for a cached linear probe: the features (cached), the grid of heads, the chosen head in
    the model, saved as its weights, and its scores from the same features."""
    cfg, d, label = run.cfg, run.d, run.mcfg.label
    per_epoch = math.ceil(len(run.splits.train) * (1 + cfg.probe.views) / cfg.train.batch_size)
    epochs = cfg.probe.epochs or max(cfg.train.epochs, math.ceil(cfg.probe.min_steps / per_epoch))
    key = cache_key(cfg, run.mcfg, run.dcfg, run.loaders.pipeline, run.splits)
    reset_peak_memory(run.device)
    with recovery.stop_on_signals() as stop:
        compute = functools.partial(
            compute_features,
            run.eval_model,
            run.loaders,
            cfg,
            run.device,
            run.parts.dtype,
            d,
            stop,
            run.splits,
            label=label,
        )
        feats = cached_features(key, dataset_cache_dir(cfg, run.splits), compute, d)
    tc = cfg.train
    given = (float(tc.lr or 0.0),)  # build_run resolved it
    pc = cfg.probe if run.lr_source == "policy_default" else replace(cfg.probe, lrs=given)  # a given lr is kept
    grid = train_heads(
        feats,
        pc,
        run.splits.num_classes,
        epochs,
        tc.batch_size,
        tc.warmup_epochs,
        tc.min_lr,
        tc.label_smoothing,
        tc.seed,
        f"[{label}] linear probe: {len(pc.lrs) * len(pc.weight_decays)} heads",
        d.main,
    )
    record_grid(run, result, feats, grid, epochs)
    set_head(run.model, grid.weight, grid.bias)
    if d.main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        with checkpoint.Writer() as ckpt:
            ckpt.weights(run.model, run.out_dir / BEST, {**run.meta, "step": str(grid.steps)})
            ckpt.copy(run.out_dir / BEST, run.out_dir / LAST)
        atomic_write_json(run.out_dir / HISTORY_FILE, [dataclasses.asdict(h) for h in result.history])
    for h in result.history:
        if on_epoch is not None:
            on_epoch(h.epoch, h.val_accuracy)
    result.peak_memory_gib, result.peak_memory_kind = peak_memory_gib(run.device)
    if not score_test:
        return result
    stats = {}
    for part in ("train_eval", "val", "test") if len(run.splits.val) else ("train_eval", "test"):
        probs, loss = probs_of(feats, part, grid.weight, grid.bias)
        stats[part] = summarize(feats.y[part].numpy(), probs, loss, feats.seconds[part])
    record_scores(run, result, stats["train_eval"], stats.get("val"), stats["test"])
    log.info("[%s] linear probe: %s", label, "features from the cache" if feats.hit else "features computed")
    return result


def record_grid(run: Run, result: ModelResult, feats: Features, grid: Grid, epochs: int) -> None:
    """The probe's training into `result`: the chosen head's settings and history, the grid, the budget,
    the clocks (the backbone's pass over train counts as training time, also when it came from the cache)."""
    chosen = grid.points[grid.chosen]
    has_val = len(run.splits.val) > 0
    features_s = feats.seconds["train"]
    per_epoch = grid.seconds / max(1, epochs)
    result.history = [
        EpochRecord(
            epoch=e + 1,
            train_loss=h["train_loss"],
            train_accuracy=h["train_accuracy"],
            val_loss=h["val_loss"] if has_val else None,
            val_accuracy=h["val_accuracy"] if has_val else None,
            val_top5_accuracy=None,
            lr=chosen["lr"],
            epoch_train_time_s=per_epoch + (features_s if e == 0 else 0.0),
            cumulative_train_time_s=features_s + per_epoch * (e + 1),
            train_img_s=len(feats.y["train"]) / max(per_epoch, 1e-9),
        )
        for e, h in enumerate(grid.history)
    ]
    vals = [h["val_accuracy"] for h in grid.history] if has_val else [-h["val_loss"] for h in grid.history]
    result.best_epoch = int(np.argmax(vals)) + 1
    result.lr, result.weight_decay = chosen["lr"], chosen["weight_decay"]
    if run.lr_source == "policy_default":  # no lr was given: the grid chose it
        result.lr_source = "probe_grid"
    result.epochs, result.epochs_run = epochs, epochs
    result.optimizer_steps, result.images_seen = grid.steps, grid.rows_seen
    result.train_time_s, result.warmup_s = features_s + grid.seconds, 0.0
    result.train_img_s = grid.rows_seen / result.train_time_s if result.train_time_s > 0 else None
    result.probe = {
        "grid": grid.points,
        "chosen": chosen,
        "cache": "hit" if feats.hit else "miss",
        "views": run.cfg.probe.views,
        "epochs": epochs,
        "feature_dim": int(feats.x["train"].shape[1]),
        "features_s": features_s,
        "heads_s": grid.seconds,
    }
    result.flags = flags_of(result)
