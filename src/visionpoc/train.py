"""The training loop, one for every model (torchvision reference shape):
`train_one_epoch(...) -> EpochProgress`, `evaluate(...) -> EvalStats`, `fit(...) -> ModelResult`.
`fit` runs one function per phase: `build_run`, `restore` (on resume), `train_epochs`, `score_best`.

AdamW (timm's factory: no weight decay on biases and norms; optional layer-wise LR decay), cosine
schedule with linear warmup (timm's scheduler, stepped per update), label smoothing, gradient clipping,
bf16 autocast on CUDA; the augmentation preset's batch ops (mixup/cutmix, erasing: `data/augment.py`)
and its loss; an optional weight EMA (`optim.py`). Each model trains with `config.for_model(cfg, mcfg)`:
its per-model settings replace the shared `train.*` ones. After each epoch the weights and the full
training state are checkpointed; the best-on-validation weights are the ones scored on test, once, at
the end (`score_test=False`, for tuning, skips every test pass; `on_epoch` sees each validation score).

Surviving interruptions: Ctrl-C or SIGTERM stops at the next step boundary, writes a checkpoint
(weights, optimizer, scheduler, RNG states, position in the epoch) and raises TrainingInterrupted;
`fit(..., resume=True)` continues from it. A CUDA out-of-memory error halves the micro-batch and keeps
the global batch by gradient accumulation. Under torchrun the model is wrapped in
DistributedDataParallel; only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm.utils
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from visionpoc import checkpoint, distributed, models, optim, recovery
from visionpoc.config import Config, ConfigError, ModelConfig, for_model
from visionpoc.data import augment
from visionpoc.data.loaders import Batches, Loaders, build_loaders, set_epoch
from visionpoc.data.splits import Splits
from visionpoc.distributed import SINGLE, Dist
from visionpoc.errors import TrainingInterrupted
from visionpoc.evaluate import EvalStats, evaluate, learning, summarize, training_flags
from visionpoc.presets import facts as presets
from visionpoc.results import EpochRecord, ModelResult, save_predictions
from visionpoc.runfiles import DATA_CONFIG_FILE, HISTORY_FILE, PREDICTIONS_FILE, atomic_write_json
from visionpoc.step import StepParts, train_step
from visionpoc.timing import Progress, latency_ms, peak_memory_gib, reset_peak_memory, sync

log = logging.getLogger(__name__)

BEST, LAST, STATE = checkpoint.BEST, checkpoint.LAST, checkpoint.STATE


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; `deterministic` also picks deterministic kernels (slower on GPU)."""
    recovery.seed_streams(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic


def seed_rank(seed: int, d: Dist) -> None:
    """After the model is built (identical on every rank, and DDP broadcasts rank 0's weights anyway),
    give each process its own stream for dropout, drop-path and the batch ops (mixup/cutmix, erasing)."""
    recovery.seed_streams(distributed.rank_seed(seed, d.rank))


def wrap_model(model: nn.Module, d: Dist, device: torch.device, compile_: bool) -> tuple[nn.Module, nn.Module]:
    """(the module the training step calls, the module evaluation calls). Under torchrun: DDP first,
    then torch.compile of the DDP module (PyTorch's order: the compiled graph is split at DDP's gradient
    buckets so communication overlaps the backward). Evaluation always runs the plain module (on each
    shard under torchrun): compiled, its eval mode, inference mode, larger batch and smaller last batch
    would each compile again, which costs more than the few seconds of evaluation it would save."""
    compile_ = compile_ and device.type == "cuda"
    if not d.enabled:
        return (torch.compile(model) if compile_ else model), model  # type: ignore[return-value]
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return (torch.compile(ddp) if compile_ else ddp), model  # type: ignore[return-value]


def sync_batchnorm(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """Trainable BatchNorm layers share their batch statistics across processes (SyncBatchNorm, via
    timm so that BatchNormAct layers keep their activation). NCCL only: gloo has no SyncBatchNorm, so on
    the CPU each process normalizes with its own shard's statistics. Frozen BatchNorm layers are
    FrozenBatchNorm2d already (models.apply_finetune) and stay as they are."""
    if not (d.enabled and device.type == "cuda"):
        return model
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def resolve_device(name: str, d: Dist = SINGLE) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is visible; use 'auto' or 'cpu'")
    if name == "cuda" and d.enabled:
        return torch.device("cuda", d.local_rank)
    return torch.device(name)


@dataclass
class EpochProgress:
    """Running sums of one epoch; checkpointed so that an interrupted epoch resumes exactly."""

    batches: int = 0
    n: int = 0
    n_steady: int = 0  # images in steady-state steps (all but the run's first step)
    loss_sum: float = 0.0
    correct: int = 0
    time_s: float = 0.0  # steady-state steps, input waits included (synchronized wall time)
    data_wait_s: float = 0.0  # host time blocked waiting for the input path (part of time_s)
    warmup_s: float = 0.0  # the run's first step: compilation and warm-up

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.n)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.n)


def train_one_epoch(
    p: StepParts,
    batches: Batches,
    epoch: int,
    step: int,
    progress: EpochProgress,
    stop: recovery.StopRequest,
    d: Dist = SINGLE,
    desc: str | None = None,
) -> tuple[EpochProgress, int, bool]:
    """Train over `batches` from `progress` on. Returns (progress, global step, stopped early).

    `desc` names the epoch in the progress display (`timing.Progress`: a bar in a terminal, else a log
    line about every `PROGRESS_LOG_S` s), e.g. "[vit] epoch 2/5"."""
    p.model.train()
    if p.eval_frozen:
        models.eval_frozen(p.model)
    # one process continues the interrupted epoch's running sum, so a resumed epoch adds in the same order
    carried = 0.0 if d.enabled else progress.loss_sum
    loss_sum = torch.tensor(carried, device=p.device, dtype=torch.float64)
    correct = torch.zeros((), device=p.device, dtype=torch.long)
    n = n_first = 0
    warm_s = wait_s = 0.0
    bar = Progress(batches, desc or f"epoch {epoch}", done=progress.batches, show=d.main, logger=log)
    batch_iter, stopped = iter(bar), False
    sync(p.device)  # the epoch clock: synchronized at both ends only, so GPU work stays asynchronous
    t_epoch = time.perf_counter()
    while True:
        first = step == 0  # the run's first step (its batch's fetch included) carries compilation and
        if first:  # warm-up (workers starting, first augmentation call): timed apart
            sync(p.device)
            t_warm = time.perf_counter()
        t_wait = time.perf_counter()
        try:
            x, y = next(batch_iter)
        except StopIteration:
            break
        if not first:
            wait_s += time.perf_counter() - t_wait  # host time blocked on the input path
        x = x.to(p.device, non_blocking=True)  # (B, C, H, W)
        y = y.to(p.device, non_blocking=True)  # (B,)
        if p.batch_aug is not None:
            x, y = p.batch_aug(x, y)  # `strong`: y becomes soft, (B, num_classes)
        if p.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ls, c = train_step(p, x, y, {"epoch": epoch, "step": step})
        step += 1
        if p.ema is not None:
            p.ema.update(checkpoint.unwrap(p.model), step=step)
        p.scheduler.step_update(num_updates=step)
        loss_sum += ls
        correct += c
        if first:
            sync(p.device)
            warm_s, n_first = time.perf_counter() - t_warm, len(y)
        progress.batches += 1
        n += len(y)
        if bar.step(len(y)):  # .item() syncs: only when a bar's figures or a log line are due
            bar.show(loss=f"{loss_sum.item() / n:.3f}", acc=f"{correct.item() / n:.3f}")
        if first:
            bar.restart_clock()  # the rate and the ETA leave the warm-up out
        if distributed.broadcast_flag(d, stop.signum is not None):  # every rank stops at the same step
            stopped = True
            break
    bar.close()
    sync(p.device)
    steady_s = time.perf_counter() - t_epoch - warm_s  # input waits included: end-to-end throughput
    # the epoch's sums over every process's samples, added to what an interrupted run had done
    progress.loss_sum -= carried
    for ls_, c_, n_, ns_ in distributed.all_gather(d, (loss_sum.item(), int(correct.item()), n, n - n_first)):
        progress.loss_sum += ls_
        progress.correct += c_
        progress.n += n_
        progress.n_steady += ns_
    progress.time_s += steady_s
    progress.warmup_s += warm_s
    progress.data_wait_s += wait_s
    return progress, step, stopped


def evaluate_split(
    model: nn.Module,
    batches: Batches,
    d: Dist,
    n_total: int,
    device: torch.device,
    num_classes: int,
    dtype: torch.dtype | None,
    desc: str,
) -> EvalStats:
    """`evaluate` on this process's shard; under torchrun, the shards are gathered in sample order and
    every sample is checked to be counted exactly once. Only the main process shows its progress."""
    shard = distributed.shard_of(batches, n_total)
    stats = evaluate(model, batches, device, num_classes, len(shard), dtype, desc, show=d.main)
    if not d.enabled:
        return stats
    shard = distributed.shard_of(batches, n_total)  # a split streamed from shards knows its order once read
    targets, probs = distributed.gather_in_order(d, shard, (stats.targets, stats.probs), n_total)
    sums = distributed.all_gather(d, (stats.loss * stats.n, stats.time_s))
    return summarize(targets, probs, sum(s[0] for s in sums) / n_total, max(s[1] for s in sums))


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class LoopState:
    """Where the loop stands; checkpointed with `dataclasses.asdict` so that a resumed run continues exactly."""

    epoch: int = 1  # the epoch to run (or to finish, when `progress` has batches)
    step: int = 0  # optimizer steps so far
    progress: EpochProgress = field(default_factory=EpochProgress)  # the epoch under way
    best_val: float = -1.0  # the best epoch's score: its val accuracy (its number when there is no val split)
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    # the finished epochs' sums of EpochProgress.time_s, .warmup_s, .data_wait_s and .n_steady
    train_time: float = 0.0
    warmup: float = 0.0
    data_wait: float = 0.0
    n_steady: int = 0
    images: int = 0  # training images passed through, every epoch (a resumed epoch's included)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LoopState:
        fields = {f.name: saved[f.name] for f in dataclasses.fields(cls)}
        return cls(**{**fields, "progress": EpochProgress(**saved["progress"])})


@dataclass
class ModelFacts:
    """What the model is, measured on the CPU before it moves or is wrapped."""

    input_size: tuple[int, int, int]  # (C, H, W): timm's data config, or the model's `img_size`
    params: int
    trainable: int
    gflops: float  # one image, forward pass, at input_size
    tag: str | None  # the pretrained tag, when timm has one
    licence: str | None  # timm's, else the preset's


@dataclass
class Run:
    """One model's training, built: what the loop, the checkpoints and the scoring share."""

    cfg: Config  # the model's view of the config (`for_model`)
    mcfg: ModelConfig
    splits: Splits
    out_dir: Path
    d: Dist
    model: nn.Module  # the plain module: checkpoints, latency
    eval_model: nn.Module  # the module evaluation calls (plain: see `wrap_model`)
    parts: StepParts  # the training step: the wrapped model, optimizer, scheduler, loss, batch ops, EMA
    loaders: Loaders
    dcfg: dict[str, Any]  # the model's preprocessing (timm's data config)
    meta: dict[str, str]  # checkpoint metadata, checked on every load
    facts: ModelFacts
    lr_source: str  # where `cfg.train.lr` came from (optim.resolve_lr)

    @property
    def device(self) -> torch.device:
        return self.parts.device

    @property
    def ema(self) -> timm.utils.ModelEmaV3 | None:
        return self.parts.ema

    @property
    def val_model(self) -> nn.Module:
        """The weights judged on validation (and saved as BEST): with EMA, the averaged ones."""
        return self.ema.module if self.ema is not None else self.eval_model


def model_facts(model: nn.Module, mcfg: ModelConfig, input_size: tuple[int, int, int]) -> ModelFacts:
    params, trainable = models.count_params(model)
    if trainable == 0:
        raise ValueError(f"model {mcfg.label!r}: the fine-tuning policy left no trainable parameter")
    gflops = models.forward_gflops(model, input_size, torch.device("cpu"))
    tag, licence = models.pretrained_info(model) if mcfg.pretrained else (None, None)
    if mcfg.pretrained and licence is None and mcfg.preset is not None:  # timm has none: the preset's
        licence = presets.get_preset(mcfg.preset).license
    return ModelFacts(input_size, params, trainable, gflops, tag, licence)


def build_run(cfg: Config, mcfg: ModelConfig, splits: Splits, out_dir: Path) -> Run:
    """The model (fine-tuning policy applied, measured, moved, wrapped), its EMA, its loaders at its own
    input size, the optimizer, the per-step schedule and the training step. `cfg` is the model's view."""
    lr, lr_source = optim.resolve_lr(cfg.train.lr, mcfg, cfg.train.batch_size)  # tc.lr: the model's own
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=lr))
    tc, nc = cfg.train, splits.num_classes
    d = distributed.init("cuda" if tc.device != "cpu" and torch.cuda.is_available() else "cpu")
    device = resolve_device(tc.device, d)
    seed_everything(tc.seed, tc.deterministic)
    if tc.batch_size % d.world:
        raise ConfigError(f"train.batch_size={tc.batch_size} (the global batch) must divide by the {d.world} processes")

    model = models.create_model(mcfg, nc)
    models.init_head(model, mcfg.head_init_scale)
    models.apply_finetune(model, mcfg)
    dcfg = models.data_config(model, mcfg)
    facts = model_facts(model, mcfg, tuple(dcfg["input_size"]))
    channels_last = device.type == "cuda" and tc.channels_last and not models.is_transformer(model)
    model = sync_batchnorm(model, d, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    ema = optim.make_ema(model, tc.ema_decay)
    step_model, eval_model = wrap_model(model, d, device, tc.compile)
    seed_rank(tc.seed, d)

    loaders = build_loaders(splits, dcfg, cfg, device, d)
    optimizer = optim.make_optimizer(model, tc, lr, device, optim.head_lr_scale(mcfg) or 1.0)
    set_epoch(loaders.train, 1)
    scheduler = optim.make_scheduler(optimizer, tc, lr, len(loaders.train))
    parts = StepParts(
        step_model,
        optimizer,
        scheduler,
        augment.loss_for(tc.augment, tc.label_smoothing),
        device,
        torch.bfloat16 if tc.amp and device.type == "cuda" else None,
        tc.grad_clip,
        channels_last,
        batch_aug=augment.batch_augment(tc.augment, nc, tc.label_smoothing, device),
        ema=ema,
        eval_frozen=mcfg.finetune == "head",
    )
    meta = {"timm": mcfg.timm, "num_classes": str(nc), "label": mcfg.label}
    return Run(cfg, mcfg, splits, out_dir, d, model, eval_model, parts, loaders, dcfg, meta, facts, lr_source)


def new_result(run: Run) -> ModelResult:
    """The model's result before training: what it is, and the settings it resolved to (per-model
    overrides and tuning applied). Training and scoring fill in the measurements."""
    mcfg, tc, facts = run.mcfg, run.cfg.train, run.facts
    return ModelResult(
        label=mcfg.label,
        timm=mcfg.name,
        hf=mcfg.hf,
        hf_revision=models.pretrained_cfg(run.model).get("hf_revision"),
        finetune=mcfg.finetune,
        pretrained=mcfg.pretrained,
        preset=mcfg.preset,
        policy=mcfg.policy,
        fraction=mcfg.fraction if mcfg.finetune == "top_fraction" else None,
        img_size=int(facts.input_size[-1]),
        lr=tc.lr,
        lr_source=run.lr_source,
        batch_size=tc.batch_size,
        batch_size_per_device=tc.batch_size // run.d.world,
        world_size=run.d.world,
        epochs=tc.epochs,
        data_pipeline=run.loaders.pipeline,
        params=facts.params,
        trainable_params=facts.trainable,
        fwd_gflops=facts.gflops,
        pretrained_tag=facts.tag,
        license=facts.licence,
        weight_decay=tc.weight_decay,
        warmup_epochs=tc.warmup_epochs,
        label_smoothing=tc.label_smoothing,
        layer_decay=tc.layer_decay,
        ema_decay=tc.ema_decay,
        augment=tc.augment,
        augment_applied=augment.describe(tc.augment, run.loaders.pipeline),
        drop_path_rate=mcfg.model_kwargs.get("drop_path_rate"),
        tuned_from=mcfg.tuned_from,
        tuning_trials=mcfg.tuning_trials,
        head_init_scale=mcfg.head_init_scale,
        head_lr_scale=optim.head_lr_scale(mcfg),
    )


# ---------------------------------------------------------------------------------------------- checkpoints


def save_last(
    run: Run, ckpt: checkpoint.Writer, loop: LoopState, result: ModelResult, best_is_current: bool = False
) -> None:
    """LAST weights and the STATE that continues from them: optimizer, scheduler, every rank's RNG
    streams, the loop state, history, EMA. Every rank must call it (the RNG gather); rank 0 writes."""
    rngs = distributed.all_gather(run.d, recovery.rng_state())  # every rank saves its own streams
    if not run.d.main:
        return
    out = run.out_dir
    if best_is_current:  # BEST was just written from these very weights: link it, no second write
        ckpt.copy(out / BEST, out / LAST)
    else:
        ckpt.weights(run.model, out / LAST, {**run.meta, "step": str(loop.step)})
    ckpt.state(
        out / STATE,
        {
            **dataclasses.asdict(loop),
            "optimizer": run.parts.optimizer.state_dict(),
            "scheduler": run.parts.scheduler.state_dict(),
            "rng": rngs[0],
            "rng_ranks": rngs,
            "history": [dataclasses.asdict(h) for h in result.history],
            "best_epoch": result.best_epoch,
            "micro_batch": run.parts.micro_batch,
            "oom_events": run.parts.oom_events,
            "ema": run.ema.module.state_dict() if run.ema is not None else None,
        },
    )


def restore(run: Run, result: ModelResult) -> LoopState:
    """Put back what `save_last` saved in `run.out_dir` (weights, optimizer, scheduler, this rank's RNG
    streams, EMA, history, micro-batch) and return its loop state; a fresh one when nothing was saved."""
    saved = recovery.load_resume(run.out_dir, run.model, run.meta)
    if saved is None:
        return LoopState()
    run.parts.optimizer.load_state_dict(saved["optimizer"])
    run.parts.scheduler.load_state_dict(saved["scheduler"])
    rngs = saved.get("rng_ranks") or [saved["rng"]]  # each process's own streams
    if len(rngs) == run.d.world:
        recovery.set_rng_state(rngs[run.d.rank])
    else:
        log.warning(
            "[%s] checkpoint saved by %d process(es), resumed with %d: the random streams restart "
            "(the data order is kept; the run is not an exact continuation)",
            run.mcfg.label,
            len(rngs),
            run.d.world,
        )
    if run.ema is not None and saved.get("ema") is not None:
        run.ema.module.load_state_dict(saved["ema"])
    elif run.ema is not None:  # the checkpoint predates the EMA: start it from the current weights
        run.ema.set(run.model)
    loop = LoopState.from_dict(saved)
    result.history = [EpochRecord(**h) for h in saved["history"]]
    result.best_epoch, result.resumed_from_epoch = saved["best_epoch"], loop.epoch
    run.parts.micro_batch, run.parts.oom_events = saved["micro_batch"], saved["oom_events"]
    log.info("[%s] resuming at epoch %d, batch %d", run.mcfg.label, loop.epoch, loop.progress.batches)
    return loop


# ---------------------------------------------------------------------------------------------- fit


def interrupted(label: str, where: str, out_dir: Path) -> TrainingInterrupted:
    """The command to resume is the caller's to say (`cli._run` adds it: compare or train)."""
    return TrainingInterrupted(f"model {label!r} stopped {where}; checkpoint saved in {out_dir}")


def evaluate_on(run: Run, model: nn.Module, batches: Batches, n_total: int, desc: str) -> EvalStats:
    """`evaluate_split` with the run's processes, device, classes and autocast dtype; `desc` names the
    pass (the model's label is added)."""
    desc = f"[{run.mcfg.label}] {desc}"
    return evaluate_split(model, batches, run.d, n_total, run.device, run.splits.num_classes, run.parts.dtype, desc)


def record_epoch(run: Run, loop: LoopState, result: ModelResult, epoch: int, val: EvalStats | None) -> None:
    """Add the epoch just trained (`loop.progress`) to the run's clocks and history, and log it."""
    progress = loop.progress
    loop.train_time += progress.time_s
    loop.warmup += progress.warmup_s
    loop.data_wait += progress.data_wait_s
    loop.n_steady += progress.n_steady
    loop.images += progress.n
    t = progress.time_s + progress.warmup_s
    result.history.append(
        EpochRecord(
            epoch=epoch,
            train_loss=progress.loss,
            train_accuracy=progress.accuracy,
            val_loss=val.loss if val else None,
            val_accuracy=val.accuracy if val else None,
            val_top5_accuracy=val.top5_accuracy if val else None,
            lr=optim.peak_lr(run.parts.optimizer),
            epoch_train_time_s=t,
            cumulative_train_time_s=loop.train_time + loop.warmup,
            train_img_s=progress.n / t if t > 0 else 0.0,
        )
    )
    log.info(
        "[%s] epoch %d/%d loss %.4f train-acc %.4f val-acc %s (%.1fs)",
        run.mcfg.label,
        epoch,
        run.cfg.train.epochs,
        progress.loss,
        progress.accuracy,
        f"{val.accuracy:.4f}" if val else "n/a",
        t,
    )


def train_epochs(
    run: Run, loop: LoopState, result: ModelResult, on_epoch: Callable[[int, float | None], None] | None
) -> None:
    """Train from `loop`'s position to the last epoch or an early stop. After each epoch: validation,
    BEST when it improved, LAST and its state, `history.json`, then `on_epoch`. A stop signal saves LAST
    (mid-epoch when it came during one) and raises TrainingInterrupted."""
    d, label, out_dir, patience = run.d, run.mcfg.label, run.out_dir, run.cfg.train.early_stop_patience
    ckpt = checkpoint.Writer()  # snapshots now, files written by a background thread (in order)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    reset_peak_memory(run.device)
    with recovery.stop_on_signals() as stop, ckpt:  # leaving: every checkpoint asked for is on disk
        for epoch in range(loop.epoch, run.cfg.train.epochs + 1):
            set_epoch(run.loaders.train, epoch, skip_batches=loop.progress.batches)
            desc = f"[{label}] epoch {epoch}/{run.cfg.train.epochs}"
            loop.progress, loop.step, stopped = train_one_epoch(
                run.parts, run.loaders.train, epoch, loop.step, loop.progress, stop, d, desc
            )
            if stopped:
                save_last(run, ckpt, loop, result)
                raise interrupted(label, f"in epoch {epoch} after {loop.progress.batches} batches", out_dir)
            n_val = len(run.splits.val)
            val = evaluate_on(run, run.val_model, run.loaders.val, n_val, "val") if n_val else None
            record_epoch(run, loop, result, epoch, val)
            score = val.accuracy if val else float(epoch)  # no validation split: the last epoch is the best
            improved = score > loop.best_val
            if improved:
                loop.best_val, loop.bad_epochs, result.best_epoch = score, 0, epoch
                if d.main:  # with EMA: the EMA weights; without, the trained ones, which LAST then shares
                    ckpt.weights(run.val_model, out_dir / BEST, {**run.meta, "step": str(loop.step)})
            else:
                loop.bad_epochs += 1
            loop.epoch, loop.progress = epoch + 1, EpochProgress()
            save_last(run, ckpt, loop, result, best_is_current=improved and run.ema is None)
            if d.main:
                atomic_write_json(out_dir / HISTORY_FILE, [dataclasses.asdict(h) for h in result.history])
            if on_epoch is not None:
                on_epoch(epoch, val.accuracy if val else None)
            if distributed.broadcast_flag(d, stop.signum is not None):  # a signal during validation
                raise interrupted(label, f"after epoch {epoch}", out_dir)
            if not improved and patience is not None and loop.bad_epochs >= patience:
                log.info("[%s] early stop: no better val accuracy for %d epochs", label, loop.bad_epochs)
                break


def record_training(run: Run, loop: LoopState, result: ModelResult) -> None:
    """The training's measurements: epochs run, clocks, throughput, micro-batch, peak memory."""
    result.epochs_run = len(result.history)
    result.optimizer_steps, result.images_seen = loop.step, loop.images
    result.train_time_s, result.warmup_s, result.data_wait_s = loop.train_time, loop.warmup, loop.data_wait
    # None (shown as "–") when every step was warm-up: a rate of 0 img/s would be a measurement
    result.train_img_s = loop.n_steady / loop.train_time if loop.n_steady > 0 and loop.train_time > 0 else None
    result.micro_batch_size, result.oom_events = run.parts.micro_batch, run.parts.oom_events
    result.flags = flags_of(result)
    result.peak_memory_gib, result.peak_memory_kind = peak_memory_gib(run.device)
    # a prepared store resident on the GPU is input data, not the model's footprint: reported apart
    store_bytes = run.loaders.resident_bytes
    if store_bytes > 0:
        result.peak_memory_gib -= store_bytes / 2**30
        result.input_store_gib = store_bytes / 2**30


def flags_of(result: ModelResult) -> list[dict[str, str]]:
    """The training diagnoses of `result`'s history (evaluate.training_flags), logged."""
    history = [dataclasses.asdict(h) for h in result.history]
    flags = training_flags(history, result.best_epoch, result.optimizer_steps, result.finetune)
    for f in flags:
        log.warning("[%s] %s", result.label, f["message"])
    return flags


def score_best(run: Run, result: ModelResult) -> None:
    """Score the best-on-validation weights, once: a clean pass over train, validation, test, latency at
    batch 1. Rank 0 writes the test predictions and the model's data config."""
    distributed.barrier(run.d)
    checkpoint.load_weights(run.model, run.out_dir / BEST, run.meta)
    splits, loaders = run.splits, run.loaders
    train = score_on(run, "train (clean)", loaders.train_eval, len(splits.train))
    val = score_on(run, "val", loaders.val, len(splits.val)) if len(splits.val) else None
    test = score_on(run, "test", loaders.test, len(splits.test))
    record_scores(run, result, train, val, test)


def score_on(run: Run, name: str, batches: Batches, n: int) -> EvalStats:
    """One scoring pass of the best weights, announced: the time after the last epoch is not silent."""
    if run.d.main:
        log.info("[%s] scoring the best weights on %s: %d images", run.mcfg.label, name, n)
    return evaluate_on(run, run.eval_model, batches, n, name)


def warn_if_not_learned(label: str, test: EvalStats, class_names: list[str]) -> None:
    """A warning when the test scores show that the model did not learn (`evaluate.learning`)."""
    check = learning(test.targets, test.probs.argmax(1), len(class_names))
    if not check.learned:
        log.warning(
            "[%s] did not learn: %s; comparisons with it say nothing until it does: check the learning rate, "
            "the number of epochs and the data",
            label,
            " and ".join(check.reasons(class_names)),
        )


def record_scores(run: Run, result: ModelResult, train: EvalStats, val: EvalStats | None, test: EvalStats) -> None:
    """The best weights' scores into `result`, the latency at batch 1; rank 0 writes the test predictions
    and the model's data config."""
    if val is not None:
        result.val_accuracy, result.val_top5_accuracy = val.accuracy, val.top5_accuracy
        result.val_macro_f1, result.val_per_class_accuracy = val.macro_f1, val.per_class_accuracy
    result.train_accuracy, result.train_top5_accuracy = train.accuracy, train.top5_accuracy
    result.train_macro_f1, result.train_per_class_accuracy = train.macro_f1, train.per_class_accuracy
    result.test_accuracy, result.test_top5_accuracy = test.accuracy, test.top5_accuracy
    result.test_macro_f1, result.test_per_class_accuracy = test.macro_f1, test.per_class_accuracy
    result.eval_time_s, result.eval_img_s = test.time_s, test.img_s
    result.latency_ms_b1 = latency_ms(run.model, run.facts.input_size, run.device)
    if run.d.main:
        warn_if_not_learned(run.mcfg.label, test, run.splits.class_names)
        log.info("[%s] writing the test predictions (%d images) to %s", run.mcfg.label, len(test.targets), run.out_dir)
        save_predictions(run.out_dir / PREDICTIONS_FILE, test.targets, test.probs, run.splits.test.files)
        atomic_write_json(run.out_dir / DATA_CONFIG_FILE, json.loads(json.dumps(run.dcfg, default=list)))
        if run.mcfg.kind == "hf":  # its architecture beside the weights: predict, serve and export stay offline
            from visionpoc.hfmodels.build import save_architecture

            save_architecture(run.model, run.out_dir, run.dcfg)


def fit(
    cfg: Config,
    mcfg: ModelConfig,
    splits: Splits,
    out_dir: Path,
    resume: bool = False,
    score_test: bool = True,
    on_epoch: Callable[[int, float | None], None] | None = None,
) -> ModelResult:
    """Fine-tune one model on `splits`, checkpoint it, score its best weights; write `out_dir`.

    `on_epoch(epoch, val_accuracy)` runs after each epoch's validation and checkpoint (an exception it
    raises, e.g. a pruned trial, ends the run there). `score_test=False` stops after training: no test
    pass, no predictions file, and `val_accuracy` is the best epoch's.
    """
    run = build_run(for_model(cfg, mcfg), mcfg, splits, out_dir)
    result = new_result(run)
    if mcfg.finetune == "head" and cfg.probe.cache:  # frozen backbone: features once, a grid of heads on them
        from visionpoc.probe import fit_probe  # probe.py builds on this module

        return fit_probe(run, result, score_test, on_epoch)
    loop = restore(run, result) if resume else LoopState()
    train_epochs(run, loop, result, on_epoch)
    record_training(run, loop, result)
    if not score_test:  # tuning: validation only; the test split is never batched or read
        result.val_accuracy = loop.best_val if len(splits.val) else None
        return result
    score_best(run, result)
    return result
