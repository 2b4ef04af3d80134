"""Tracking against a real `mlflow server` on loopback (SQLite backend store, a local artifact folder):
a compare's parent run, its nested run per model, their metrics and the report's files arrive over HTTP;
a server that is down at the end of a run loses nothing, fails in seconds, and the printed command logs
the run once the server is back."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import MlflowServer, free_port, mlflow_command
from visionpoc.cli import main
from visionpoc.results import load_results

mlflow = pytest.importorskip("mlflow")
if not mlflow_command():
    pytest.skip("no `mlflow` command: install the full mlflow package (the test extra has it)", allow_module_level=True)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def finished(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the session's finished tiny compare run (the report writes into it)."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def _check_logged(uri: str, experiment: str, run: Path, artifacts: Path) -> None:
    """The parent run, one nested run per model with its scores, and the report's files on the server."""
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    r = load_results(run)
    (parent,) = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    assert parent.data.tags["visionpoc.run_dir"] == str(run.resolve())
    assert parent.data.params["train.epochs"] == "2"
    assert len(runs) == 1 + len(r.models)
    for m in r.models:
        (child,) = [x for x in runs if x.info.run_name == m.label]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.metrics["test_accuracy"] == pytest.approx(m.test_accuracy)
        assert child.data.metrics["val_accuracy"] == pytest.approx(m.val_accuracy)
        curve = client.get_metric_history(child.info.run_id, "epoch/train_loss")
        assert len(curve) == len(m.history) > 0
    names = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "config.yaml", "report.html", "report.md", "report_files"} <= names
    figures = {Path(f.path).name for f in client.list_artifacts(parent.info.run_id, "report_files")}
    assert figures == {p.name for p in (run / "report_files").iterdir()} and figures
    # served by the tracking server (mlflow-artifacts:/), stored in its own artifact folder, byte for byte
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    got = Path(client.download_artifacts(parent.info.run_id, "results.json", str(artifacts)))
    assert got.read_bytes() == (run / "results.json").read_bytes()


def test_a_compare_logs_to_a_tracking_server(server: MlflowServer, finished: Path, tmp_path: Path) -> None:
    """`compare --resume` of the finished tiny run trains nothing more, writes its report and logs it."""
    args = ["compare", "--resume", str(finished), "--set", f"tracking.mlflow_uri={server.uri}"]
    assert main([*args, "--set", "tracking.experiment=served"]) == 0
    _check_logged(server.uri, "served", finished, tmp_path / "download")
    stored = list((server.root / "artifacts").rglob("results.json"))
    assert len(stored) == 1 and stored[0].read_bytes() == (finished / "results.json").read_bytes()


def test_a_server_down_at_the_end_loses_nothing(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listens on the port: the run's files stay, the exit code is 1 within seconds (not after the
    MLflow client's minutes of retries), and the printed command logs the run once a server is there."""
    down = MlflowServer(tmp_path / "later", port=free_port())
    start = time.monotonic()
    code = main(["compare", "--resume", str(finished), "--set", f"tracking.mlflow_uri={down.uri}"])
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 1, err
    assert "does not answer" in err and took < 60, (took, err)
    retry = f"visionpoc report {finished} --mlflow-uri {down.uri}"
    assert retry in err
    assert (finished / "results.json").is_file() and (finished / "report.html").is_file()
    down.start()
    try:
        assert main(retry.split()[1:]) == 0
        _check_logged(down.uri, "visionpoc", finished, tmp_path / "download")
    finally:
        down.stop()
