"""Hyper-parameter search with Optuna: one study per model, the same budget for every model, judged on
validation accuracy only.

- Study: TPE sampler (seeded with `tune.seed`, else `train.seed`, plus the number of trials the study
  already holds, so a continued study draws new points) and a pruner (`tune.pruner`: median, or
  Hyperband) fed each epoch's validation accuracy through `fit`'s `on_epoch` hook.
- Storage: `sqlite:///OUT/tune.db` unless `storage` names another RDB URL; the study is named after the
  model. Optuna commits each finished trial, so running the same command again adds trials to the
  same study; Ctrl-C (or SIGTERM) ends the interrupted trial as failed and keeps every finished one.
  Several processes given the same storage share the study (for SQLite, a 60 s lock timeout lets them
  take turns); give each its own `--set tune.seed=K` so their first random points differ.
- Never the test split: trials train on splits whose test split is empty (the Stanford Dogs reader
  only checks that the listed test files exist, a stat), and `fit(score_test=False)` never scores test.
- Space (`cfg.tune`), per model family: lr and weight decay on a log scale, warmup, label smoothing,
  batch size, augmentation preset for every model; `top_fraction` only for `finetune: top_fraction`
  models (the CNN baseline); layer-wise LR decay only for transformers; drop-path only for models
  whose constructor takes `drop_path_rate`.
- Each trial trains in `OUT/trials/<label>/<number>/` and keeps its `history.json` there; its weights
  are deleted when it ends (compare retrains the best settings). Results: see `tuned.py`.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from visionpoc import models
from visionpoc.compare import load_data
from visionpoc.config import Config, ConfigError, ModelConfig, TuneConfig, with_model_changes
from visionpoc.data.splits import Splits
from visionpoc.errors import TrainingInterrupted
from visionpoc.train import fit, is_transformer, resolve_device
from visionpoc.tuned import apply_tuned, best_params_yaml, write_outputs

log = logging.getLogger(__name__)

__all__ = ["run_tune", "apply_tuned", "best_params_yaml"]

TRIALS_DIR = "trials"
# tune key -> (ModelConfig field, log scale, the Family flag it needs or None)
RANGES = {"lr": ("lr", True, None), "weight_decay": ("weight_decay", True, None),
          "warmup_epochs": ("warmup_epochs", False, None), "label_smoothing": ("label_smoothing", False, None),
          "top_fraction": ("fraction", False, "top_fraction"), "layer_decay": ("layer_decay", False, "layer_decay"),
          "drop_path": ("drop_path_rate", False, "drop_path")}  # fmt: skip
CHOICES = ("batch_size", "augment")


@dataclass(frozen=True)
class Family:
    """Which family-specific settings apply to a model."""

    top_fraction: bool  # its fine-tuning policy trains a top fraction (the CNN baseline)
    layer_decay: bool  # a transformer: blocks to decay the LR over
    drop_path: bool  # its constructor takes `drop_path_rate`


def model_family(mcfg: ModelConfig, num_classes: int) -> Family:
    """Build the model once, untrained, to see what it is."""
    model = models.create_model(mcfg, num_classes, pretrained=False)
    takes_drop_path = "drop_path_rate" in inspect.signature(type(model).__init__).parameters
    return Family(mcfg.finetune == "top_fraction", is_transformer(model), takes_drop_path)


def suggest(trial: optuna.Trial, tc: TuneConfig, family: Family) -> dict[str, Any]:
    """One trial's settings, as ModelConfig changes (`drop_path_rate` goes into `model_kwargs`)."""
    changes: dict[str, Any] = {}
    for key, (field, log_scale, needs) in RANGES.items():
        r = getattr(tc, key)
        if r is not None and (needs is None or getattr(family, needs)):
            changes[field] = trial.suggest_float(key, r[0], r[1], log=log_scale)
    for key in CHOICES:
        if getattr(tc, key) is not None:
            changes[key] = trial.suggest_categorical(key, list(getattr(tc, key)))
    if "drop_path_rate" in changes:
        changes["model_kwargs"] = {"drop_path_rate": changes.pop("drop_path_rate")}
    return changes


def make_pruner(tc: TuneConfig, epochs: int) -> optuna.pruners.BasePruner:
    if tc.pruner == "median":  # the first epoch is never judged: warmup makes it noisy
        return optuna.pruners.MedianPruner(n_startup_trials=tc.startup_trials, n_warmup_steps=2)
    if tc.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage; SQLite waits up to 60 s for a lock so that parallel workers take turns."""
    from sqlalchemy.exc import SQLAlchemyError

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except SQLAlchemyError:  # workers starting together race to create the tables: the loser retries
            if attempt == 2:
                raise
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def _public_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def tuning_splits(cfg: Config) -> Splits:
    """The compare run's train/validation splits (same seed, same carve-out), with an empty test split."""
    _, splits = load_data(cfg)
    return dataclasses.replace(splits, test=splits.test.subset(np.zeros(0, dtype=np.int64)))


def _device_name(cfg: Config) -> str:
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} CPUs)"


def _drop_weights(folder: Path) -> None:
    for f in (*folder.glob("*.safetensors"), folder / "last_state.pt"):
        f.unlink(missing_ok=True)


def objective(trial: optuna.Trial, cfg: Config, mcfg: ModelConfig, splits: Splits, family: Family,
              out_dir: Path) -> float:  # fmt: skip
    """Train one trial's settings for `cfg.train.epochs` epochs; its score is the best validation accuracy."""
    changes = suggest(trial, cfg.tune, family)
    trial.set_user_attr("overrides", changes)
    trial.set_user_attr("device", _device_name(cfg))
    tcfg = with_model_changes(cfg, mcfg.label, changes, f"trial {trial.number}")

    def report(epoch: int, val_accuracy: float | None) -> None:
        if val_accuracy is None:
            return
        trial.report(val_accuracy, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(
                f"epoch {epoch}: validation accuracy {val_accuracy:.4f} is below the bar"
            )

    folder = out_dir / TRIALS_DIR / mcfg.label / str(trial.number)
    try:
        result = fit(tcfg, tcfg.model(mcfg.label), splits, folder, score_test=False, on_epoch=report)
    finally:
        _drop_weights(folder)
    if result.val_accuracy is None:
        raise ValueError("the trial has no validation accuracy")
    return result.val_accuracy


def run_tune(cfg: Config, label: str, trials: int | None = None, storage: str | None = None,
             study: str | None = None, timeout: float | None = None,
             out_dir: Path = Path("runs/tune")) -> optuna.Study:  # fmt: skip
    """Add `trials` trials (default `tune.trials`) to the study of model `label`, then write its tuned
    settings, summary and plots in `out_dir`. Returns the study (also after Ctrl-C: finished trials kept)."""
    out_dir = Path(out_dir)
    mcfg = cfg.model(label)
    if cfg.data.val_fraction <= 0:
        raise ConfigError("tune scores trials on the validation split: set data.val_fraction > 0 (e.g. 0.1)")
    tc = cfg.tune
    epochs = tc.epochs or cfg.train.epochs
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs))
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = tuning_splits(cfg)
    family = model_family(mcfg, splits.num_classes)
    url = storage or f"sqlite:///{(out_dir / 'tune.db').resolve()}"
    s = optuna.create_study(storage=open_storage(url), study_name=study or label, direction="maximize",
                            pruner=make_pruner(tc, epochs), load_if_exists=True)  # fmt: skip
    made_for = s.user_attrs.get("timm")
    if made_for is not None and made_for != mcfg.timm:
        raise ConfigError(f"study {s.study_name!r} in {_public_url(url)} tunes {made_for!r}, not {mcfg.timm!r}: "
                          "pass another --study name or --storage")  # fmt: skip
    s.set_user_attr("timm", mcfg.timm)
    before = len(s.get_trials(deepcopy=False))
    seed = (tc.seed if tc.seed is not None else cfg.train.seed) + before
    s.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=tc.startup_trials)
    n = trials if trials is not None else tc.trials
    log.info("[%s] tuning: %d trial(s) of %d epochs, study %r (%d trials so far) in %s; searching %s",
             label, n, epochs, s.study_name, before, _public_url(url), family)  # fmt: skip
    try:
        s.optimize(lambda t: objective(t, cfg, mcfg, splits, family, out_dir), n_trials=n, timeout=timeout,
                   catch=(RuntimeError,), gc_after_trial=True)  # fmt: skip
    except (KeyboardInterrupt, TrainingInterrupted):
        log.warning("[%s] tuning stopped: the study keeps its finished trials; run the same command to add "
                    "more", label)  # fmt: skip
    path = write_outputs(s, mcfg, out_dir, _public_url(url), epochs)
    log.info("[%s] tuned settings: %s", label, path)
    return s
