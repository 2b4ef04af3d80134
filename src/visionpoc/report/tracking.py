"""Optional MLflow logging of a finished run (`tracking.mlflow_uri`; off by default).

One parent MLflow run per `compare`: the shared settings as params, and as artifacts `results.json`,
`config.yaml`, `report.html`, `report.md` and every report figure (`report_files/*.png`). One nested run
per model: its settings as params, its scores as metrics, and its learning curves as `epoch/...` metrics by epoch.
It reads the run's files only, like the report, so a finished run can be logged again later with
`visionpoc report RUN_DIR --mlflow-uri URI`. MLflow is an extra: `pip install -e '.[mlflow]'`.
A tracking server (http://...) is asked for its `/health` first: one that is down fails in seconds
(`TrackingUnavailable`) instead of after the MLflow client's minutes of retries.
"""

from __future__ import annotations

import dataclasses
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from visionpoc.errors import ConfigError
from visionpoc.repeats import repeats_of
from visionpoc.results import ModelResult, load_results
from visionpoc.runfiles import CONFIG_FILE, REPORT_FILES_DIR, REPORT_HTML, REPORT_MD, RESULTS_CSV, RESULTS_FILE
from visionpoc.typed import flat_keys

log = logging.getLogger(__name__)

RUN_FILES = (RESULTS_FILE, RESULTS_CSV, CONFIG_FILE, REPORT_HTML, REPORT_MD)  # logged as artifacts
SCORES = (
    "train_accuracy",
    "val_accuracy",
    "test_accuracy",
    "test_top5_accuracy",
    "test_macro_f1",
    "train_time_s",
    "warmup_s",
    "data_wait_s",
    "eval_time_s",
    "train_img_s",
    "eval_img_s",
    "latency_ms_b1",
    "peak_memory_gib",
    "params",
    "trainable_params",
    "fwd_gflops",
    "epochs_run",
    "best_epoch",
)
"""ModelResult fields logged as metrics (numbers, compared across runs in the MLflow UI)."""
CURVES = (
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "val_top5_accuracy",
    "lr",
    "epoch_train_time_s",
    "cumulative_train_time_s",
    "train_img_s",
)
"""EpochRecord fields logged as `epoch/<field>` metrics with step = epoch (the learning curves)."""
SETTINGS = (
    "preset",
    "policy",
    "timm",
    "finetune",
    "pretrained",
    "fraction",
    "img_size",
    "lr",
    "batch_size",
    "batch_size_per_device",
    "world_size",
    "micro_batch_size",
    "epochs",
    "weight_decay",
    "warmup_epochs",
    "label_smoothing",
    "layer_decay",
    "ema_decay",
    "drop_path_rate",
    "augment",
    "augment_applied",
    "data_pipeline",
    "pretrained_tag",
    "license",
    "tuned_from",
)
"""ModelResult fields logged as params (what the model was given)."""
HEALTH_TIMEOUT_S = 10.0  # one look at a tracking server's /health


class TrackingUnavailable(ConnectionError):
    """The tracking server does not answer."""


def require_mlflow(uri: str | None) -> None:
    """Fail before any training when tracking is asked for and MLflow is missing."""
    if uri is None:
        return
    try:
        import mlflow  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"tracking.mlflow_uri is set ({uri}) but MLflow is not installed: "
            "pip install -e '.[mlflow]', or unset tracking.mlflow_uri"
        ) from e


def check_server(uri: str) -> None:
    """Raise `TrackingUnavailable` when the tracking server at an http(s) `uri` cannot be reached (refused,
    unknown host, timed out); any HTTP answer, even an error page, counts as reachable."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S):
            return
    except urllib.error.HTTPError:  # it answered: MLflow's own calls will say what is wrong
        return
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingUnavailable(f"the MLflow tracking server at {uri} does not answer ({reason})") from None


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a SQLite store (`mlartifacts/` beside the .db
    file) rather than MLflow's default `./mlruns` of whatever folder the command ran in; a server
    (http://...) decides for itself."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    db = Path(uri[len(prefix) :]).expanduser().resolve()
    return (db.parent / "mlartifacts").as_uri()


def _numbers(obj: Any, keys: tuple[str, ...]) -> dict[str, float]:
    values = {k: getattr(obj, k) for k in keys}
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _log_model(mlflow: Any, m: ModelResult) -> None:
    params = {k: getattr(m, k) for k in SETTINGS if getattr(m, k) is not None}
    mlflow.log_params(params)
    mlflow.set_tags({"visionpoc.status": m.status, **({"visionpoc.error": m.error[:5000]} if m.error else {})})
    scores = _numbers(m, SCORES)
    if scores:
        mlflow.log_metrics(scores)
    for e in m.history:
        mlflow.log_metrics({f"epoch/{k}": v for k, v in _numbers(e, CURVES).items()}, step=e.epoch)


def _already_logged(mlflow: Any, exp_id: str, tags: dict[str, str]) -> str | None:
    """The parent run already logged for this run folder and these results (same creation time), if any."""
    if not tags["visionpoc.created"]:
        return None
    found = mlflow.search_runs(
        [exp_id], filter_string=f"tags.`visionpoc.created` = '{tags['visionpoc.created']}'", output_format="list"
    )
    same = [
        x
        for x in found
        if x.data.tags.get("visionpoc.run_dir") == tags["visionpoc.run_dir"] and x.info.status == "FINISHED"
    ]  # one cut short (failed, killed) is logged again
    return str(same[0].info.run_id) if same else None


def log_run(run_dir: str | Path, uri: str, experiment: str = "visionpoc") -> str:
    """Log the finished run in `run_dir` to the MLflow tracking server or store at `uri` under
    `experiment`; returns the parent MLflow run id."""
    require_mlflow(uri)
    check_server(uri)
    import mlflow

    run_dir = Path(run_dir)
    r = load_results(run_dir)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(experiment, artifact_location(uri))
    shared = {k: v for k, v in r.config.items() if k != "models"}
    tags = {
        "visionpoc.run_dir": str(run_dir.resolve()),
        "visionpoc.dataset": r.dataset.source,
        "visionpoc.models": ", ".join(m.label for m in r.models),
        "visionpoc.created": r.created,
    }
    name, parent = run_dir.name, repeats_of(run_dir)
    if parent is not None:  # one seed of a run with repeats: say which, and of what
        tags["visionpoc.repeats_of"] = str(parent)
        name = f"{parent.name}/{run_dir.name}"
    logged = _already_logged(mlflow, exp_id, tags)
    if logged is not None:  # e.g. a finished seed when a resumed run adds seeds, or a retry after a failure
        log.info("mlflow: %s is already logged as run %s of experiment %r", run_dir, logged, experiment)
        return logged
    with mlflow.start_run(experiment_id=exp_id, run_name=name, tags=tags) as parent:
        mlflow.log_params({k: "null" if v is None else v for k, v in flat_keys(shared, lists=False).items()})
        mlflow.log_params({f"dataset.{k}": v for k, v in dataclasses.asdict(r.dataset).items() if k != "class_names"})
        mlflow.log_params({f"env.{k}": v for k, v in dataclasses.asdict(r.environment).items() if v is not None})
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                mlflow.log_artifact(str(run_dir / name))
        if (run_dir / REPORT_FILES_DIR).is_dir():
            mlflow.log_artifacts(str(run_dir / REPORT_FILES_DIR), REPORT_FILES_DIR)
        for m in r.models:
            with mlflow.start_run(
                experiment_id=exp_id, run_name=m.label, nested=True, tags={"visionpoc.model": m.label}
            ):
                _log_model(mlflow, m)
        log.info(
            "mlflow: logged %s as run %s of experiment %r at %s",
            run_dir / RESULTS_FILE,
            parent.info.run_id,
            experiment,
            uri,
        )
        return str(parent.info.run_id)
