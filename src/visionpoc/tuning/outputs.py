"""What `visionpoc tune` leaves behind, and how `compare --tuned` uses it.

In the tune folder OUT:
- `tuned/<label>.yaml`: the best trial's settings as overrides of that model's ModelConfig (`model:`),
  plus the study's record (`tuning:` trials complete/pruned/failed, time spent, device, best
  validation accuracy). It is plain YAML: edit it, or copy it between machines. A study without a
  completed trial writes none: the model stays untuned (and the report says so). A study whose
  completed trials all scored the same (at least two: `tied_value`) found nothing to choose between
  them: its file holds no settings (`model: {}`), only the record with `tied_value`, so the configured
  settings stand.
- `tune_summary.json`: every `tuned/*.yaml`'s record, side by side (the fairness table).
- `plots/<label>_history.png`, `plots/<label>_importance.png`: the optimisation history and the
  parameter importances, drawn in the report's style.

`apply_tuned(cfg, OUT)` puts each model's overrides into the config (`tuned_from` records the file; a file
without overrides and without a best trial is ignored with a warning), and with `out_dir` copies the
records and the figures into `out_dir/tuning/`, where the report finds them (a tied study's record too:
the report says that its search found nothing).
"""

from __future__ import annotations

import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml

from visionpoc.config import Config, ConfigError, ModelConfig, with_model_changes
from visionpoc.runfiles import (
    RUN_TUNING_DIR,
    TUNE_PLOTS,
    TUNE_PLOTS_DIR,
    TUNE_SUMMARY_FILE,
    TUNED_DIR,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    tuned_file,
    tuning_plot,
)
from visionpoc.typed import BoundedLoader

log = logging.getLogger(__name__)

TS = optuna.trial.TrialState
FINISHED = (TS.COMPLETE, TS.PRUNED)  # the trials that count towards a study's budget


def _overrides(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The ModelConfig changes a trial trained with (recorded by the objective as a user attribute)."""
    return dict(trial.user_attrs.get("overrides", {}))


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TS.COMPLETE,)) if t.value is not None]


def tied_value(study: optuna.Study) -> float | None:
    """The validation accuracy that every completed trial scored, when there are at least two and they all
    scored the same (e.g. three trials at chance level, 0.100): the search found nothing to choose
    between them. None otherwise."""
    values = [float(t.value or 0.0) for t in _complete(study)]
    if len(values) < 2 or not all(math.isclose(v, values[0], rel_tol=0, abs_tol=1e-12) for v in values):
        return None
    return values[0]


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The completed trial with the highest validation accuracy, the earliest among equals (Optuna's
    `best_trial` leaves ties to the database); None without a completed trial, or when every completed
    trial scored the same (`tied_value`: no trial is better than another)."""
    complete = _complete(study)
    if not complete or tied_value(study) is not None:
        return None
    return max(complete, key=lambda t: (float(t.value or 0.0), -t.number))


def study_record(study: optuna.Study, mcfg: ModelConfig, storage: str, epochs: int) -> dict[str, Any]:
    """The study's facts for the fairness table: trials by state, time spent, device, best result."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    seconds = [
        (end - start).total_seconds()
        for t in trials
        if (start := t.datetime_start) is not None and (end := t.datetime_complete) is not None
    ]
    best = best_trial(study)
    devices = sorted({str(t.user_attrs["device"]) for t in trials if "device" in t.user_attrs})
    return {
        "label": mcfg.label,
        "timm": mcfg.name,  # the model's identifier: its timm name, HF id or folder
        "study": study.study_name,
        "storage": storage,
        "epochs_per_trial": epochs,
        "trials": sum(s in FINISHED for s in states),  # the budget `--trials` targets: complete + pruned
        "complete": states.count(TS.COMPLETE),
        "pruned": states.count(TS.PRUNED),
        "failed": states.count(TS.FAIL),
        "running": states.count(TS.RUNNING),
        "tuning_time_s": sum(seconds),  # every finished trial, from every worker: the compute spent
        "device": ", ".join(devices) or None,
        "best_trial": best.number if best else None,
        "best_val_accuracy": best.value if best else None,
        "best_params": dict(best.params) if best else {},
        "tied_value": tied_value(study),  # set: every completed trial scored this, no settings chosen
        "searched": sorted({k for t in trials for k in t.params}),
    }


def best_params_yaml(study: optuna.Study, mcfg: ModelConfig, record: dict[str, Any]) -> str:
    """The best trial's settings as a `model:` block of ModelConfig overrides, with the study's record."""
    best_number = record.get("best_trial")
    best = next((t for t in study.get_trials(deepcopy=False) if t.number == best_number), None)
    doc = {
        "label": mcfg.label,
        "timm": mcfg.name,
        "model": _overrides(best) if best else {},
        "tuning": record,
    }
    head = (
        f"# Tuned settings of {mcfg.label!r}: overrides of its ModelConfig, used by `visionpoc compare --tuned DIR`.\n"
    )
    if record.get("tied_value") is not None:
        head = (
            f"# No tuned settings for {mcfg.label!r}: {tie_text(record)}; "
            "its configured settings stand. The study's record follows.\n"
        )
    return head + yaml.safe_dump(doc, sort_keys=False)


def tie_text(record: dict[str, Any]) -> str:
    """'all 3 completed trials scored 0.100 validation accuracy: the search found nothing to choose between
    them', from a study record with `tied_value`."""
    return (
        f"all {record.get('complete')} completed trials scored {float(record['tied_value']):.3f} validation "
        "accuracy: the search found nothing to choose between them"
    )


def save_plots(study: optuna.Study, folder: Path, label: str) -> list[str]:
    """Optimisation history and parameter importances as PNG in `folder`, drawn in the report's style
    (`report.tuning.history_figure`, `importance_figure`); returns notes on skipped ones."""
    from visionpoc.report.plots import to_png
    from visionpoc.report.tuning import history_figure, importance_figure

    folder.mkdir(parents=True, exist_ok=True)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TS.COMPLETE,)) if t.value is not None]
    n_trials = len(study.get_trials(deepcopy=False))
    notes = []
    for name, need in (("history", 1), ("importance", 2)):
        path = folder / tuning_plot(label, name)
        if len(complete) < need:
            notes.append(f"{name} plot skipped: it needs {need} completed trial(s), the study has {len(complete)}")
            path.unlink(missing_ok=True)
            continue
        try:
            if name == "history":
                fig = history_figure([t.number for t in complete], [float(t.value or 0.0) for t in complete], n_trials)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    fig = importance_figure(optuna.importance.get_param_importances(study))
            atomic_write_bytes(path, to_png(fig))
        except Exception as e:  # importance needs parameters that vary; a plot must never lose the study
            notes.append(f"{name} plot skipped: {type(e).__name__}: {e}")
    for n in notes:
        log.info("[%s] %s", label, n)
    return notes


def write_outputs(study: optuna.Study, mcfg: ModelConfig, out_dir: Path, storage: str, epochs: int) -> Path | None:
    """Write `tuned/<label>.yaml`, the plots and `tune_summary.json` in `out_dir`; return the YAML path,
    or None when the study has no completed trial (no YAML: the model is not tuned) or when its completed
    trials all tied (a YAML without settings, for the record: the configured settings stand)."""
    record = study_record(study, mcfg, storage, epochs)
    record["notes"] = save_plots(study, out_dir / TUNE_PLOTS_DIR, mcfg.label)
    path: Path | None = None
    if record["tied_value"] is not None:  # the record is kept (the summary, the report), without settings
        atomic_write_text(out_dir / TUNED_DIR / tuned_file(mcfg.label), best_params_yaml(study, mcfg, record))
        log.warning("[%s] %s; no tuned settings written (the defaults stand)", mcfg.label, tie_text(record))
    elif record["best_trial"] is None:
        log.warning(
            "[%s] study %r has no completed trial: no tuned settings written; run the same command again to add trials",
            mcfg.label,
            study.study_name,
        )
    else:
        path = atomic_write_text(out_dir / TUNED_DIR / tuned_file(mcfg.label), best_params_yaml(study, mcfg, record))
    summary = {
        p.stem: (yaml.load(p.read_text(), Loader=BoundedLoader) or {}).get("tuning", {})
        for p in sorted((out_dir / TUNED_DIR).glob("*.yaml"))
    }
    atomic_write_json(out_dir / TUNE_SUMMARY_FILE, {"models": summary})
    return path


def apply_tuned(cfg: Config, tuned_dir: Path, out_dir: Path | None = None) -> Config:
    """`cfg` with each model's tuned settings from `tuned_dir` (a tune OUT folder, or its `tuned/`).

    A model without a tuned file, or whose file holds no overrides and no best trial (a study without a
    completed trial), keeps its configured settings (logged: the comparison is then not equal-budget). With `out_dir`, the tuning records and figures are copied to `out_dir/tuning/`.
    """
    tuned_dir = Path(tuned_dir)
    folder = tuned_dir / TUNED_DIR if (tuned_dir / TUNED_DIR).is_dir() else tuned_dir
    files = {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}
    if not files:
        raise ConfigError(
            f"no tuned settings (<label>.yaml) in {folder}: run "
            f"'visionpoc tune --model LABEL --out {tuned_dir}' for each model first"
        )
    records: dict[str, Any] = {}
    for m in cfg.models:
        path = files.get(m.label)
        if path is None:
            log.warning(
                "model %s has no tuned settings in %s: it keeps its configured ones, so the "
                "comparison is not equal-budget",
                m.label,
                folder,
            )
            continue
        try:
            doc = yaml.load(path.read_text(), Loader=BoundedLoader) or {}  # an alias bomb is refused
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        if doc.get("timm", m.name) != m.name:
            raise ConfigError(
                f"{path} was tuned for {doc['timm']!r}, but model {m.label!r} is {m.name!r}: "
                "tune it again or remove the file"
            )
        if not doc.get("model") and (doc.get("tuning") or {}).get("tied_value") is not None:
            log.warning(
                "model %s: %s holds no tuned settings (%s): it keeps its configured ones",
                m.label,
                path,
                tie_text(doc["tuning"]),
            )
            records[m.label] = doc["tuning"]  # the report says that the search found nothing
            continue
        if not doc.get("model") and (doc.get("tuning") or {}).get("best_trial") is None:
            log.warning(
                "model %s: %s holds no tuned settings (its study has no completed trial): it keeps "
                "its configured ones, so the comparison is not equal-budget",
                m.label,
                path,
            )
            continue
        tuned = doc.get("model") or {}
        changes = {**tuned, "tuned_from": str(path.resolve()), "tuning_trials": (doc.get("tuning") or {}).get("trials")}
        if "lr" in tuned:
            changes["lr_source"] = "tuned"
        cfg = with_model_changes(cfg, m.label, changes, f"{path}: model")
        records[m.label] = doc.get("tuning", {})
        log.info("model %s: tuned settings from %s: %s", m.label, path, doc.get("model"))
    if out_dir is not None:
        dest = Path(out_dir) / RUN_TUNING_DIR
        atomic_write_json(dest / TUNE_SUMMARY_FILE, {"models": records, "source": str(tuned_dir.resolve())})
        plots = folder.parent / TUNE_PLOTS_DIR if folder.name == TUNED_DIR else tuned_dir / TUNE_PLOTS_DIR
        for label in records:
            for name in TUNE_PLOTS:
                src = plots / tuning_plot(label, name)
                if src.is_file():
                    shutil.copyfile(src, dest / src.name)
    return cfg
