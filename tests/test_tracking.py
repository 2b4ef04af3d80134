"""The optional MLflow logging: a finished run lands in a local SQLite store with every score,
learning curve and report figure; a missing MLflow fails before training; a broken store keeps the run."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from visionpoc.cli import main
from visionpoc.errors import ConfigError
from visionpoc.report.tracking import artifact_location, require_mlflow
from visionpoc.results import load_results

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def finished(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the session's finished run (the report writes into it)."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def _runs(uri: str, experiment: str) -> list[object]:
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    return list(client.search_runs([exp.experiment_id]))


@pytest.mark.slow
def test_report_logs_the_run_to_a_sqlite_store(finished: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    assert main(["report", str(finished), "--mlflow-uri", uri, "--mlflow-experiment", "dogs"]) == 0
    r = load_results(finished)
    client = mlflow.tracking.MlflowClient(uri)
    runs = _runs(uri, "dogs")
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    assert len(parents) == 1 and len(runs) == 1 + len(r.models)
    parent = parents[0]
    assert parent.data.params["train.epochs"] == "2" and parent.data.params["dataset.test_size"] == "9"
    assert parent.data.tags["visionpoc.run_dir"] == str(finished.resolve())
    # every report figure and the run's files, as artifacts next to the store (not in the cwd)
    names = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "config.yaml", "report.html", "report.md", "report_files"} <= names
    figures = {Path(f.path).name for f in client.list_artifacts(parent.info.run_id, "report_files")}
    assert figures == {p.name for p in (finished / "report_files").iterdir()} and figures
    assert parent.info.artifact_uri.startswith((tmp_path / "store" / "mlartifacts").as_uri())
    # one nested run per model: its scores, settings and learning curves, equal to results.json
    for m in r.models:
        (child,) = [x for x in runs if x.info.run_name == m.label]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["visionpoc.status"] == "ok"
        assert child.data.metrics["test_accuracy"] == pytest.approx(m.test_accuracy)
        assert child.data.metrics["train_time_s"] == pytest.approx(m.train_time_s)
        assert child.data.params["timm"] == m.timm and child.data.params["finetune"] == m.finetune
        curve = client.get_metric_history(child.info.run_id, "epoch/val_accuracy")
        assert [(p.step, p.value) for p in sorted(curve, key=lambda p: p.step)] == [
            (e.epoch, pytest.approx(e.val_accuracy)) for e in m.history
        ]


@pytest.mark.slow
def test_compare_logs_when_the_config_asks(finished: Path, tmp_path: Path) -> None:
    """`compare --resume` of a finished run trains nothing more, then reports and logs it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["compare", "--resume", str(finished), "--set", f"tracking.mlflow_uri={uri}"]
    assert main(args) == 0
    assert len(_runs(uri, "visionpoc")) == 3  # parent + cnn + vit


def test_missing_mlflow_fails_before_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[mlflow\]'"):
        require_mlflow("sqlite:///x.db")
    require_mlflow(None)  # off: nothing is needed
    # through the CLI: exit 2 with the message, and no run folder was started
    out = tmp_path / "never"
    code = main(["compare", "--out", str(out), "--set", "tracking.mlflow_uri=sqlite:///x.db"])
    assert code == 2 and not out.exists()


@pytest.mark.slow
def test_a_failing_store_keeps_the_run_and_says_how_to_retry(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    uri = f"sqlite:///{blocker / 'mlflow.db'}"  # a path under a file: the store cannot be created
    assert main(["report", str(finished), "--mlflow-uri", uri]) == 1
    err = capsys.readouterr().err
    assert "MLflow logging" in err and f"visionpoc report {finished} --mlflow-uri {uri}" in err
    assert (finished / "report.html").is_file() and (finished / "results.json").is_file()


def test_artifact_location() -> None:
    assert artifact_location("sqlite:////srv/t/mlflow.db") == "file:///srv/t/mlartifacts"
    assert artifact_location("http://mlflow:5000") is None
