"""Hyper-parameter search with Optuna: one study per model, the same budget for every model, judged on
validation accuracy only.

- Study: TPE sampler (seeded from `tune.seed`, else `train.seed`, and the number of trials the study
  already holds, mixed by NumPy's SeedSequence, so a continued study draws new points and no two
  (seed, count) pairs share a stream) and a pruner (`tune.pruner`: median, or Hyperband) fed each
  epoch's validation accuracy through `fit`'s `on_epoch` hook.
- Budget: `trials` is the study's target of finished (complete or pruned) trials, shared by every
  worker (Optuna's `MaxTrialsCallback`): a rerun tops the study up to it, parallel workers stop together
  (each may finish the trial it is running, so N workers can overshoot by up to N - 1), and failed or
  interrupted trials do not count.
- Storage: `sqlite:///OUT/tune.db` unless `storage` names another RDB URL (a plain `postgresql://`
  takes whichever of psycopg 3 and psycopg2 is installed); the study is named after the model. Optuna commits each
  finished trial, so running the same command again continues the same study; Ctrl-C (or SIGTERM) ends
  the interrupted trial as failed and keeps every finished one. Several processes given the same
  storage share the study (for SQLite, a 60 s lock timeout lets them take turns; a server's pooled
  connections are pinged before use, so a database restarted between two trials is reconnected to);
  give each its own `--set tune.seed=K` so their first random points differ. Running trials send a
  heartbeat every `tune.heartbeat_s`: the trial of a killed worker is marked failed (and queued again,
  `tune.retries` times) by the next worker that starts a trial after `tune.grace_s` of silence.
- Never the test split: trials train on splits whose test split is empty (the Stanford Dogs reader
  only checks that the listed test files exist, a stat), and `fit(score_test=False)` never scores test.
- Space (`cfg.tune`), per model family: lr and weight decay on a log scale, warmup, label smoothing,
  batch size, augmentation preset for every model; `top_fraction` only for `finetune: top_fraction`
  models (the CNN baseline); layer-wise LR decay only for transformers; drop-path and dropout only for
  models whose constructor takes `drop_path_rate` / `drop_rate` (Xception: dropout only). Warmup is
  capped at the trial's epochs (a longer one would never reach the peak LR).
- Each trial trains in `OUT/trials/<label>/<number>/` and keeps its `history.json` there; its weights
  are deleted when it ends (compare retrains the best settings). Results: see `outputs.py`.
- Optuna's log lines (a study created, a trial finished or pruned) go through the project's logging
  (`optuna_logs_to_root`), in its format, instead of Optuna's own stderr handler.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from visionpoc import checkpoint, models, preflight
from visionpoc.compare import load_data
from visionpoc.config import Config, ConfigError, ModelConfig, TuneConfig, with_model_changes
from visionpoc.data.splits import Splits
from visionpoc.errors import TrainingInterrupted, VisionpocError
from visionpoc.recovery import stop_on_signals
from visionpoc.runfiles import TRIALS_DIR, TUNE_DB_FILE
from visionpoc.train import fit, resolve_device
from visionpoc.tuning import ddp as tune_ddp  # under torchrun, trials run data-parallel
from visionpoc.tuning.outputs import FINISHED, apply_tuned, best_params_yaml, write_outputs

log = logging.getLogger(__name__)

__all__ = ["run_tune", "apply_tuned", "best_params_yaml"]

# tune key -> (ModelConfig field, log scale, the Family flag it needs or None)
RANGES = {
    "lr": ("lr", True, None),
    "weight_decay": ("weight_decay", True, None),
    "warmup_epochs": ("warmup_epochs", False, None),
    "label_smoothing": ("label_smoothing", False, None),
    "top_fraction": ("fraction", False, "top_fraction"),
    "layer_decay": ("layer_decay", False, "layer_decay"),
    "drop_path": ("drop_path_rate", False, "drop_path"),
    "drop_rate": ("drop_rate", False, "drop_rate"),
}
CHOICES = ("batch_size", "augment")
MODEL_KWARGS = ("drop_path_rate", "drop_rate")  # suggested settings that are `timm.create_model` arguments


@dataclass(frozen=True)
class Family:
    """Which family-specific settings apply to a model."""

    top_fraction: bool  # its fine-tuning policy trains a top fraction (the CNN baseline)
    layer_decay: bool  # a transformer: blocks to decay the LR over
    drop_path: bool  # its constructor takes `drop_path_rate`
    drop_rate: bool  # its constructor takes `drop_rate` (dropout before the classifier)


def model_family(mcfg: ModelConfig, num_classes: int) -> Family:
    """Build the model once, untrained, to see what it is."""
    model = models.create_model(mcfg, num_classes, pretrained=False)
    takes = inspect.signature(type(model).__init__).parameters
    return Family(
        mcfg.finetune == "top_fraction", models.is_transformer(model), "drop_path_rate" in takes, "drop_rate" in takes
    )


def suggest(trial: optuna.Trial, tc: TuneConfig, family: Family, epochs: int) -> dict[str, Any]:
    """One trial's settings, as ModelConfig changes (`drop_path_rate`/`drop_rate` go into `model_kwargs`)."""
    changes: dict[str, Any] = {}
    for key, (field, log_scale, needs) in RANGES.items():
        r = getattr(tc, key)
        if r is not None and (needs is None or getattr(family, needs)):
            lo, hi = r
            if key == "warmup_epochs":  # a warmup as long as the trial never reaches the peak LR
                lo, hi = min(lo, epochs), min(hi, epochs)
            changes[field] = trial.suggest_float(key, lo, hi, log=log_scale)
    for key in CHOICES:
        if getattr(tc, key) is not None:
            changes[key] = trial.suggest_categorical(key, list(getattr(tc, key)))
    kwargs = {k: changes.pop(k) for k in MODEL_KWARGS if k in changes}
    if kwargs:
        changes["model_kwargs"] = kwargs
    return changes


def sampler_seed(base: int, existing: int) -> int:
    """The sampler seed of a worker whose study holds `existing` trials: distinct (base, existing) pairs
    give unrelated seeds (a plain sum would give seed 1 with 1 trial the stream of seed 2 with none)."""
    return int(np.random.SeedSequence([base % 2**64, existing]).generate_state(1)[0])


def make_pruner(tc: TuneConfig, epochs: int) -> optuna.pruners.BasePruner:
    if tc.pruner == "median":  # the first epoch is never judged: warmup makes it noisy
        return optuna.pruners.MedianPruner(n_startup_trials=tc.startup_trials, n_warmup_steps=2)
    if tc.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def _stale_trial_callback(retries: int) -> dict[str, Any]:
    """Queue a stale trial's parameters again, `retries` times at most: `RetryHeartbeatStaleTrialCallback`
    (Optuna >= 4.9), or its older name."""
    if retries == 0:
        return {}
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    if retry is not None:
        return {"heartbeat_stale_trial_callback": retry(max_retry=retries)}
    return {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=retries)}


def storage_url(url: str) -> str:
    """`url` with a PostgreSQL driver that is installed: a plain `postgresql://` means SQLAlchemy's
    default driver (psycopg2 before SQLAlchemy 2.1, psycopg 3 since); when that one is missing, the
    other is named in the URL. The `postgres` extra installs psycopg 3."""
    import importlib.util

    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.drivername != "postgresql":
        return url
    default = u.get_dialect().driver  # the dialect only: its DBAPI module is imported by create_engine
    for driver in (default, "psycopg", "psycopg2"):
        if importlib.util.find_spec(driver) is not None:
            return url if driver == default else u.set(drivername=f"postgresql+{driver}").render_as_string(False)
    raise ConfigError(f"--storage {_public_url(url)}: no PostgreSQL driver is installed: pip install -e '.[postgres]'")


def open_storage(url: str, tc: TuneConfig) -> optuna.storages.RDBStorage:
    """An RDB storage with trial heartbeats (`tune.heartbeat_s`, `grace_s`, `retries`). SQLite waits up
    to 60 s for a lock so that parallel workers take turns; a server's connections are checked before
    use (`pool_pre_ping`), so a worker reconnects after the database restarted between two trials. A
    database that cannot be reached is a user error naming the URL (without its password)."""
    from sqlalchemy.exc import OperationalError, SQLAlchemyError

    url = storage_url(url)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(3):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=kwargs,
                    heartbeat_interval=tc.heartbeat_s,
                    grace_period=tc.grace_s,
                    **_stale_trial_callback(tc.retries),
                )
        except SQLAlchemyError as e:  # workers starting together race to create the tables: the loser retries
            if attempt < 2:
                time.sleep(1.0 + attempt)
            elif isinstance(e, OperationalError):
                reason = " ".join(str(e.orig).split())
                raise VisionpocError(
                    f"cannot open the study's database {_public_url(url)} ({reason}): check that the server "
                    "runs and the --storage URL, then run the same command again"
                ) from None
            else:
                raise
    raise AssertionError("unreachable")


def _public_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def optuna_logs_to_root() -> None:
    """Optuna's records (INFO and up: a study created, each trial's end) to the root logger's handlers,
    formatted like every other line, instead of Optuna's own stderr handler and format."""
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(optuna.logging.INFO)


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
    for f in (*folder.glob("*.safetensors"), folder / checkpoint.STATE):
        f.unlink(missing_ok=True)


def objective(
    trial: optuna.Trial, cfg: Config, mcfg: ModelConfig, splits: Splits, family: Family, out_dir: Path
) -> float:
    """Train one trial's settings for `cfg.train.epochs` epochs; its score is the best validation accuracy."""
    changes = suggest(trial, cfg.tune, family, cfg.train.epochs)
    tune_ddp.share_trial(trial.number, changes)  # torchrun: every rank runs this trial (tune_ddp.py)
    trial.set_user_attr("overrides", changes)
    trial.set_user_attr("device", _device_name(cfg))
    tcfg = with_model_changes(cfg, mcfg.label, changes, f"trial {trial.number}")

    def report(epoch: int, val_accuracy: float | None) -> None:
        if val_accuracy is None:
            return
        trial.report(val_accuracy, epoch)
        if tune_ddp.share_prune(trial.should_prune()):  # torchrun: rank 0 decides for every rank
            raise optuna.TrialPruned(f"epoch {epoch}: validation accuracy {val_accuracy:.4f} is below the bar")

    folder = out_dir / TRIALS_DIR / mcfg.label / str(trial.number)
    try:
        result = fit(tcfg, tcfg.model(mcfg.label), splits, folder, score_test=False, on_epoch=report)
    finally:
        _drop_weights(folder)
    if result.val_accuracy is None:
        raise ValueError("the trial has no validation accuracy")
    return result.val_accuracy


def run_tune(
    cfg: Config,
    label: str,
    trials: int | None = None,
    storage: str | None = None,
    study: str | None = None,
    timeout: float | None = None,
    out_dir: Path = Path("runs/tune"),
) -> optuna.Study:
    """Run trials until the study of model `label` holds `trials` (default `tune.trials`) finished ones,
    then write its tuned settings, summary and plots in `out_dir`. Returns the study (also after Ctrl-C:
    finished trials kept)."""
    out_dir = Path(out_dir)
    optuna_logs_to_root()
    mcfg = cfg.model(label)
    if mcfg.onnx:
        raise ConfigError(f"model {label!r} is a deployed file ({mcfg.onnx}): a deployed model is not tuned")
    if cfg.data.val_fraction <= 0:
        raise ConfigError("tune scores trials on the validation split: set data.val_fraction > 0 (e.g. 0.1)")
    preflight.refuse(preflight.model_problems(cfg, [label]))  # a misspelt timm name: said before any trial
    tc = cfg.tune
    if cfg.train.repeats > 1:
        log.warning(
            "train.repeats=%d is for compare and train: each trial trains once (compare the tuned "
            "settings across seeds with: visionpoc compare --tuned OUT)",
            cfg.train.repeats,
        )
    epochs = tc.epochs or cfg.train.epochs
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs))
    if tune_ddp.follower(cfg):  # torchrun: ranks > 0 run rank 0's trials and write nothing (tune_ddp.py)
        return tune_ddp.follow(cfg, mcfg, out_dir, tuning_splits)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = tuning_splits(cfg)
    family = model_family(mcfg, splits.num_classes)
    url = storage or f"sqlite:///{(out_dir / TUNE_DB_FILE).resolve()}"
    s = open_study(url, study or label, mcfg, tc, epochs, cfg.train.seed)
    target = trials if trials is not None else tc.trials
    missing = target - len(s.get_trials(deepcopy=False, states=FINISHED))
    log.info(
        "[%s] tuning: %d finished trial(s) of %d epochs wanted, %d to run; study %r (%d trials so far) "
        "in %s; searching %s",
        label,
        target,
        epochs,
        max(missing, 0),
        s.study_name,
        len(s.get_trials(deepcopy=False)),
        _public_url(url),
        family,
    )
    objective_of = functools.partial(objective, cfg=cfg, mcfg=mcfg, splits=splits, family=family, out_dir=out_dir)
    interrupted = optimize(s, objective_of, target, missing, timeout)
    path = write_outputs(s, mcfg, out_dir, _public_url(url), epochs)
    if path is not None:
        log.info("[%s] tuned settings%s: %s", label, " so far" if interrupted else "", path)
    if interrupted:
        raise TrainingInterrupted(
            f"tuning of {label!r} stopped; the study keeps its {len(s.get_trials(deepcopy=False, states=FINISHED))} "
            f"finished trial(s) (the interrupted one counts as failed): run the same command, with the same "
            f"--out or --storage, to finish it"
        )
    return s


def open_study(url: str, name: str, mcfg: ModelConfig, tc: TuneConfig, epochs: int, train_seed: int) -> optuna.Study:
    """The study `name` on `url` (created or continued) for model `mcfg`, its stale trials failed and its
    sampler seeded for the trials it already holds."""
    s = optuna.create_study(
        storage=open_storage(url, tc),
        study_name=name,
        direction="maximize",
        pruner=make_pruner(tc, epochs),
        load_if_exists=True,
    )
    made_for = s.user_attrs.get("timm")
    if made_for is not None and made_for != mcfg.name:
        raise ConfigError(
            f"study {s.study_name!r} in {_public_url(url)} tunes {made_for!r}, not {mcfg.name!r}: "
            "pass another --study name or --storage"
        )
    s.set_user_attr("timm", mcfg.name)  # the key of earlier studies; the value: a timm name, HF id or folder
    with warnings.catch_warnings():  # a killed worker's RUNNING trial: failed (and queued again) now
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(s)
    seed = sampler_seed(tc.seed if tc.seed is not None else train_seed, len(s.get_trials(deepcopy=False)))
    s.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=tc.startup_trials)
    return s


def optimize(
    s: optuna.Study, objective_of: Callable[[optuna.Trial], float], target: int, missing: int, timeout: float | None
) -> bool:
    """Run `missing` trials of `objective_of` (fewer if the study reaches `target` finished trials through
    other workers, or `timeout` passes). Returns whether a signal or Ctrl-C stopped it."""
    quiet = _NoTracebackOnInterrupt()
    optuna_log = logging.getLogger("optuna.study._optimize")  # where Optuna logs a failed trial
    optuna_log.addFilter(quiet)

    def run_trial(t: optuna.Trial) -> float:
        if stop.signum is not None:  # a signal between two trials: start no other
            raise TrainingInterrupted("stopped by a signal before the trial started")
        return objective_of(t)  # fit() catches signals during training

    def stop_if_asked(study: optuna.Study, _: optuna.trial.FrozenTrial) -> None:
        if stop.signum is not None:
            study.stop()

    try:
        # between trials too (Optuna's bookkeeping), a signal is a request, not an exception thrown
        # wherever Python happens to be (it was lost in a weakref callback, and tuning went on)
        with stop_on_signals() as stop:
            if missing > 0:  # every worker stops once the study (not this worker) has `target` finished trials
                s.optimize(
                    run_trial,
                    n_trials=missing,
                    timeout=timeout,
                    catch=(RuntimeError,),
                    gc_after_trial=True,
                    callbacks=[optuna.study.MaxTrialsCallback(target, states=FINISHED), stop_if_asked],
                )
        return stop.signum is not None
    except (KeyboardInterrupt, TrainingInterrupted):
        return True
    finally:
        optuna_log.removeFilter(quiet)
        tune_ddp.finish(s)  # torchrun: the other ranks stop following (tune_ddp.py)


class _NoTracebackOnInterrupt(logging.Filter):
    """Optuna logs a failed trial with its traceback; a trial the user interrupted gets one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (KeyboardInterrupt, TrainingInterrupted)):
            record.exc_info = None
        return True
