"""The training loop, one for every model (torchvision reference shape):
`train_one_epoch(...) -> EpochStats`, `evaluate(...) -> EvalStats`, `fit(...) -> ModelResult`.

AdamW (timm's factory: no weight decay on biases and norms), cosine schedule with linear warmup
(timm's scheduler, stepped per update), optional label smoothing and gradient clipping, bf16 autocast
on CUDA. After each epoch the weights and optimizer state are checkpointed; the best-on-validation
weights are kept and are the ones scored on test, once, at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm.optim
import timm.scheduler
import torch
from torch import nn
from tqdm.auto import tqdm

from visionpoc import checkpoint, models
from visionpoc.atomic import atomic_write_json
from visionpoc.config import Config, ModelConfig
from visionpoc.data.loaders import Batches, build_loaders
from visionpoc.data.splits import Splits
from visionpoc.evaluate import evaluate
from visionpoc.results import PREDICTIONS_FILE, EpochRecord, ModelResult, save_predictions
from visionpoc.timing import Stopwatch, latency_ms, peak_memory_gib, reset_peak_memory

log = logging.getLogger(__name__)

BEST = "best.safetensors"
LAST = "last.safetensors"
STATE = "last_state.pt"


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; `deterministic` also picks deterministic kernels (slower on GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from visionpoc.errors import ConfigError

        raise ConfigError(f"train.device={name!r} but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if cfg.train.amp and device.type == "cuda" else None


def is_transformer(model: nn.Module) -> bool:
    return isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList))


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    n: int
    n_steady: int  # images in steady-state steps (all but the run's first step)
    time_s: float  # steady-state steps only
    warmup_s: float  # first step of the run (compilation, allocator), 0 after the first epoch
    lr: float


def train_one_epoch(
    model: nn.Module,
    batches: Batches,
    optimizer: torch.optim.Optimizer,
    scheduler: timm.scheduler.scheduler.Scheduler,
    loss_fn: nn.Module,
    device: torch.device,
    epoch: int,
    step: int,
    grad_clip: float | None,
    dtype: torch.dtype | None,
    channels_last: bool = False,
) -> tuple[EpochStats, int]:
    """One pass over `batches`; returns the stats and the global step after it."""
    model.train()
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    clock, warm = Stopwatch(device), Stopwatch(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n_steady = n = 0
    bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=None)
    for x, y in bar:
        watch = warm if step == 0 else clock  # the very first step carries compilation and warm-up
        watch.start()
        x = x.to(device, non_blocking=True)  # (B, C, H, W)
        y = y.to(device, non_blocking=True)  # (B,)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(x)  # (B, num_classes)
            loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        step += 1
        scheduler.step_update(num_updates=step)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        watch.stop()
        n += len(y)
        if watch is clock:
            n_steady += len(y)
        if bar.disable is False and step % 10 == 0:  # .item() syncs: only when a bar is shown
            bar.set_postfix(loss=f"{loss_sum.item() / n:.3f}", acc=f"{correct.item() / n:.3f}",
                            img_s=f"{n_steady / max(clock.total, 1e-9):.0f}")  # fmt: skip
    if n == 0:
        raise RuntimeError("the training loader produced no batch: the training split is empty")
    if not math.isfinite(loss_sum.item()):
        raise FloatingPointError(f"training loss became {loss_sum.item()} in epoch {epoch}: lower the lr")
    lr = optimizer.param_groups[0]["lr"]
    stats = EpochStats(loss_sum.item() / n, correct.item() / n, n, n_steady, clock.total, warm.total, lr)
    return stats, step


def fit(cfg: Config, mcfg: ModelConfig, splits: Splits, out_dir: Path) -> ModelResult:
    """Fine-tune one model on `splits`, checkpoint it, score its best weights; write `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    device = resolve_device(cfg.train.device)
    dtype = amp_dtype(cfg, device)
    nc = splits.num_classes

    model = models.create_model(mcfg, nc)
    models.apply_finetune(model, mcfg)
    dcfg = models.data_config(model, mcfg)
    input_size = tuple(dcfg["input_size"])
    params, trainable = models.count_params(model)
    if trainable == 0:
        raise ValueError(f"model {mcfg.label!r}: the fine-tuning policy left no trainable parameter")
    gflops = models.forward_gflops(model, input_size, torch.device("cpu"))
    tag, licence = models.pretrained_info(model) if mcfg.pretrained else (None, None)
    meta = {"timm": mcfg.timm, "num_classes": str(nc), "label": mcfg.label}
    channels_last = device.type == "cuda" and cfg.train.channels_last and not is_transformer(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    step_model: nn.Module = model
    if cfg.train.compile and device.type == "cuda":
        step_model = torch.compile(model)  # type: ignore[assignment]

    loaders = build_loaders(splits, dcfg, cfg, device)
    lr = mcfg.lr if mcfg.lr is not None else cfg.train.lr
    extra: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=cfg.train.weight_decay, **extra)
    steps_per_epoch = len(loaders.train)
    total = cfg.train.epochs * steps_per_epoch
    scheduler = timm.scheduler.CosineLRScheduler(
        optimizer, t_initial=total, lr_min=cfg.train.min_lr, warmup_t=round(cfg.train.warmup_epochs * steps_per_epoch),
        warmup_lr_init=lr * 0.01, warmup_prefix=True, t_in_epochs=False,
    )  # fmt: skip
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)

    result = ModelResult(
        label=mcfg.label, timm=mcfg.timm, finetune=mcfg.finetune, pretrained=mcfg.pretrained,
        fraction=mcfg.fraction if mcfg.finetune == "top_fraction" else None, img_size=int(input_size[-1]),
        lr=lr, batch_size=cfg.train.batch_size, epochs=cfg.train.epochs, data_pipeline=loaders.pipeline,
        params=params, trainable_params=trainable, fwd_gflops=gflops, pretrained_tag=tag, license=licence,
    )  # fmt: skip
    reset_peak_memory(device)
    step, best_val, bad_epochs, train_time, warmup, n_steady = 0, -1.0, 0, 0.0, 0.0, 0
    for epoch in range(1, cfg.train.epochs + 1):
        stats, step = train_one_epoch(step_model, loaders.train, optimizer, scheduler, loss_fn, device,
                                      epoch, step, cfg.train.grad_clip, dtype, channels_last)  # fmt: skip
        train_time += stats.time_s
        warmup += stats.warmup_s
        n_steady += stats.n_steady
        val = (
            evaluate(step_model, loaders.val, device, nc, len(splits.val), dtype, "val")
            if len(splits.val)
            else None
        )
        rec = EpochRecord(
            epoch=epoch, train_loss=stats.loss, train_accuracy=stats.accuracy,
            val_loss=val.loss if val else None, val_accuracy=val.accuracy if val else None,
            val_top5_accuracy=val.top5_accuracy if val else None, lr=stats.lr,
            epoch_train_time_s=stats.time_s + stats.warmup_s, cumulative_train_time_s=train_time + warmup,
            train_img_s=(stats.n / (stats.time_s + stats.warmup_s)) if stats.time_s + stats.warmup_s > 0 else 0.0,
        )  # fmt: skip
        result.history.append(rec)
        result.epochs_run = epoch
        log.info("[%s] epoch %d/%d loss %.4f train-acc %.4f val-acc %s (%.1fs)", mcfg.label, epoch,
                 cfg.train.epochs, stats.loss, stats.accuracy,
                 f"{val.accuracy:.4f}" if val else "n/a", rec.epoch_train_time_s)  # fmt: skip
        checkpoint.save_weights(model, out_dir / LAST, meta)
        checkpoint.save_state(out_dir / STATE, {"epoch": epoch, "step": step, "optimizer": optimizer.state_dict(),
                                                "scheduler": scheduler.state_dict()})  # fmt: skip
        score = val.accuracy if val else float(epoch)  # no validation split: the last epoch is the best
        if score > best_val:
            best_val, bad_epochs, result.best_epoch = score, 0, epoch
            checkpoint.save_weights(model, out_dir / BEST, meta)
        else:
            bad_epochs += 1
            if cfg.train.early_stop_patience is not None and bad_epochs >= cfg.train.early_stop_patience:
                log.info("[%s] early stop: no better val accuracy for %d epochs", mcfg.label, bad_epochs)
                break
        atomic_write_json(out_dir / "history.json", [dataclasses.asdict(h) for h in result.history])

    result.train_time_s = train_time
    result.warmup_s = warmup
    result.train_img_s = n_steady / train_time if train_time > 0 else None
    result.peak_memory_gib, result.peak_memory_kind = peak_memory_gib(device)

    # score the best-on-validation weights, once: clean train pass, validation, test
    checkpoint.load_weights(model, out_dir / BEST, meta)
    train_eval = evaluate(
        step_model, loaders.train_eval, device, nc, len(splits.train), dtype, "train (clean)"
    )
    if len(splits.val):
        result.val_accuracy = evaluate(
            step_model, loaders.val, device, nc, len(splits.val), dtype, "val"
        ).accuracy
    test = evaluate(step_model, loaders.test, device, nc, len(splits.test), dtype, "test")
    result.train_accuracy = train_eval.accuracy
    result.test_accuracy = test.accuracy
    result.test_top5_accuracy = test.top5_accuracy
    result.test_macro_f1 = test.macro_f1
    result.test_per_class_accuracy = test.per_class_accuracy
    result.eval_time_s = test.time_s
    result.eval_img_s = test.img_s
    result.latency_ms_b1 = latency_ms(model, input_size, device)
    save_predictions(out_dir / PREDICTIONS_FILE, test.targets, test.probs, splits.test.files)
    atomic_write_json(out_dir / "data_config.json", json.loads(json.dumps(dcfg, default=list)))
    return result
