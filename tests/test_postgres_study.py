"""`visionpoc tune --storage postgresql://...` against a real PostgreSQL server: two workers on two test
hosts (network namespaces, `netns.py`) share one study and stop together, the server inside host A on
host A's address; on the session's throwaway cluster on 127.0.0.1 (`postgres` in conftest.py), a
worker killed mid-trial has its trial failed by heartbeat and retried once, and the study survives a
database restart between two trials.

Each worker is its own process with its own `--out` (as on its own machine): the trial folders it
leaves tell which worker ran which trial. Test hooks in the worker script (a barrier before
tuning, a trial that hangs until killed, a pause between two trials) only decide *when* things happen;
the tuning, the heartbeats and the database are real. On the fixture's few validation images trials
often tie, so each score is lowered by 0.001 x its trial number, as in test_tune.py. The same sharing on SQLite, the single-machine
default, is tested in test_tune.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
import yaml

from netns import Hosts, two_hosts
from servers import PostgresServer, free_port, require_postgres
from visionpoc.config import ConfigError, TuneConfig, load_config
from visionpoc.errors import VisionpocError
from visionpoc.tuning import search

TS = optuna.trial.TrialState
FINISHED = (TS.COMPLETE, TS.PRUNED)
GRACE_S = 4  # tune.grace_s of these tests (heartbeat every second)
NET = "10.231.1"  # the test hosts' private subnet (test_multihost.py's is 10.231.0)

WORKER = """
import sys, time
from pathlib import Path
import optuna
from visionpoc import cli
from visionpoc.tuning import search

out, cfg, seed, url, trials, mode, sync = sys.argv[1:8]
sync = Path(sync)
me = Path(out).name


def wait_for(name):
    while not (sync / name).exists():
        time.sleep(0.1)


real_fit = search.fit
def offset_fit(*args, **kwargs):  # a tie of all trials names no tuned settings (exit 1): break it by number
    result = real_fit(*args, **kwargs)
    result.val_accuracy = (result.val_accuracy or 0.0) - 0.001 * int(Path(args[3]).name)
    return result
search.fit = offset_fit
if mode == "barrier":  # both workers start tuning together
    (sync / f"ready-{me}").touch()
    wait_for("go")
if mode == "hang":  # the trial hangs (heartbeats still running) until the test kills the process
    def fit(*args, **kwargs):
        (sync / f"in-trial-{me}").touch()
        time.sleep(3600)
    search.fit = fit
if mode == "pause":  # after the first finished trial, wait (outside any trial) for the test's go
    check = optuna.study.MaxTrialsCallback.__call__
    def paused(self, study, trial):
        check(self, study, trial)
        if not (sync / "between").exists():
            (sync / "between").touch()
            wait_for("go")
    optuna.study.MaxTrialsCallback.__call__ = paused
args = ["tune", "--config", cfg, "--model", "vit", "--out", out, "--storage", url, "--trials", trials]
sys.exit(cli.main([*args, "--set", f"tune.seed={seed}"]))
"""


def _config(tmp: Path, root: Path) -> Path:
    path = tmp / "c.yaml"
    model = {"label": "vit", "timm": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32}
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"source": "stanford_dogs", "root": str(root), "val_fraction": 0.2, "num_workers": 0},
                "models": [{**model, "model_kwargs": {"depth": 2}}],
                "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "device": "cpu", "deterministic": True},
                "tune": {"trials": 3, "batch_size": [4, 8], "pruner": "none", "startup_trials": 2}
                | {"heartbeat_s": 1, "grace_s": GRACE_S, "retries": 1},
            }
        )
    )
    return path


def _worker(
    out: Path, cfg: Path, seed: int, url: str, trials: int, mode: str, sync: Path, on: tuple[Hosts, str] | None = None
) -> subprocess.Popen[str]:
    """A worker process, here or on test host `on` (hosts, "A" or "B")."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # two workers share 2 cores
    cmd = [sys.executable, "-c", WORKER, str(out), str(cfg), str(seed), url, str(trials), mode, str(sync)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    if on is not None:
        return on[0].popen(on[1], cmd, env=env, **pipes)
    return subprocess.Popen(cmd, env=env, **pipes)


def _wait_for(ready: Callable[[], bool], procs: list[subprocess.Popen[str]], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"worker exited with {p.returncode}: {p.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise AssertionError("timed out waiting for the workers")
        time.sleep(0.1)


def _finish(p: subprocess.Popen[str]) -> str:
    try:
        _, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    assert p.returncode == 0, err[-3000:]
    return err


def _kill(p: subprocess.Popen[str]) -> None:
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)


def _ran(out: Path) -> list[int]:
    """The trial numbers a worker ran: their folders in its --out."""
    return sorted(int(d.name) for d in (out / "trials" / "vit").iterdir())


@contextmanager
def _postgres_on_host_a(hosts: Hosts, bindir: Path) -> Iterator[PostgresServer]:
    """A throwaway server inside host A, listening on host A's address and trusting the hosts' subnet;
    stopped and removed at the end (before the hosts are), whatever happens."""
    server = PostgresServer(bindir, prefix=hosts.prefix("A"), host=hosts.addr["A"], trust=hosts.subnet)
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.mark.slow
def test_two_workers_on_two_hosts_share_one_study_and_stop_together(mini_dogs: Path, tmp_path: Path) -> None:
    """Host A runs the database server and one worker, host B the other, which reaches the server over
    the link between them; the plain `postgresql://` URL of the docs; a target of 6 finished trials,
    shared: each worker may finish the trial it was running (search.py), so 6 or 7."""
    bindir = require_postgres()
    cfg, sync = _config(tmp_path, mini_dogs), tmp_path / "sync"
    sync.mkdir()
    outs = {"A": tmp_path / "hostA", "B": tmp_path / "hostB"}
    with two_hosts(f"{os.getpid() % 100000}p", NET) as hosts, _postgres_on_host_a(hosts, bindir) as db:
        db.create_database("shared")
        url = db.url("shared").replace("postgresql+psycopg://", "postgresql://")
        assert url.startswith(f"postgresql://visionpoc@{hosts.addr['A']}:")
        procs = [_worker(outs[h], cfg, k, url, 6, "barrier", sync, (hosts, h)) for k, h in enumerate("AB", 1)]
        _wait_for(lambda: len(list(sync.glob("ready-*"))) == 2, procs)
        (sync / "go").touch()
        for p in procs:
            _finish(p)
        trials = optuna.load_study(study_name="vit", storage=db.socket_url("shared")).trials
        connections = db.log.read_text()
    assert f"connection received: host={hosts.addr['B']} " in connections  # host B's worker, over the link
    numbers = sorted(t.number for t in trials)
    assert all(t.state in FINISHED for t in trials)  # none failed, none left running
    assert len(numbers) in (6, 7), numbers
    ran = [_ran(outs[h]) for h in "AB"]
    assert ran[0] and ran[1], ran  # both worked on the study
    assert sorted(ran[0] + ran[1]) == numbers  # no trial lost, none run twice
    assert all((out / "tuned" / "vit.yaml").is_file() for out in outs.values())


@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_by_heartbeat_and_retried_once(
    postgres: PostgresServer, mini_dogs: Path, tmp_path: Path
) -> None:
    """SIGKILL mid-trial leaves it RUNNING; after `grace_s` of silence the next worker fails it and runs its
    settings again; that retry killed too is failed and not queued a second time (`retries: 1`)."""
    url = postgres.create_database("killed")
    cfg, sync = _config(tmp_path, mini_dogs), tmp_path / "sync"
    sync.mkdir()
    storage = search.storage_url(url)

    def states() -> list[TS]:
        return [t.state for t in optuna.load_study(study_name="vit", storage=storage).trials]

    for name in ("a", "b"):  # a dies in trial 0; b fails it, takes its retry (trial 1), and dies in it
        worker = _worker(tmp_path / name, cfg, 1, url, 1, "hang", sync)
        _wait_for(lambda name=name: (sync / f"in-trial-{name}").exists(), [worker])  # type: ignore[misc]
        assert states()[-1] == TS.RUNNING
        _kill(worker)
        time.sleep(GRACE_S + 1)  # its heartbeat is now older than the grace
    assert states() == [TS.FAIL, TS.RUNNING]  # a's trial was failed by b; b's own is stale, not yet failed
    _finish(_worker(tmp_path / "c", cfg, 1, url, 1, "normal", sync))
    t0, t1, t2 = optuna.load_study(study_name="vit", storage=storage).trials
    assert [t0.state, t1.state, t2.state] == [TS.FAIL, TS.FAIL, TS.COMPLETE]
    assert t1.params == t0.params and t1.system_attrs["failed_trial"] == 0  # the one retry
    assert "failed_trial" not in t2.system_attrs and t2.params != t0.params  # no second retry: new settings
    assert _ran(tmp_path / "c") == [2]


@pytest.mark.slow
def test_the_study_survives_a_database_restart_between_trials(
    postgres: PostgresServer, mini_dogs: Path, tmp_path: Path
) -> None:
    """The worker's pooled connections die with the server; it reconnects for the next trial."""
    url = postgres.create_database("restart")
    cfg, sync = _config(tmp_path, mini_dogs), tmp_path / "sync"
    sync.mkdir()
    worker = _worker(tmp_path / "out", cfg, 1, url, 2, "pause", sync)
    _wait_for(lambda: (sync / "between").exists(), [worker])
    postgres.restart()
    (sync / "go").touch()
    _finish(worker)
    study = optuna.load_study(study_name="vit", storage=url)
    assert [t.state for t in study.trials] == [TS.COMPLETE, TS.COMPLETE]
    assert _ran(tmp_path / "out") == [0, 1]


def test_a_plain_postgresql_url_takes_the_installed_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLAlchemy's default driver for `postgresql://` (psycopg2 before 2.1, psycopg 3 since) when it is
    installed, else the other one, named in the URL; neither: the fix."""
    import importlib.util

    from sqlalchemy.engine import make_url

    default = make_url("postgresql://").get_dialect().driver
    other = "psycopg" if default == "psycopg2" else "psycopg2"
    installed = {other}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert search.storage_url("postgresql://u:pw@db:5432/optuna") == f"postgresql+{other}://u:pw@db:5432/optuna"
    assert search.storage_url("postgresql+psycopg://u@db/o") == "postgresql+psycopg://u@db/o"
    assert search.storage_url("sqlite:///x.db") == "sqlite:///x.db"
    installed.add(default)
    assert search.storage_url("postgresql://u@db/o") == "postgresql://u@db/o"
    installed.clear()
    with pytest.raises(ConfigError, match=r"postgresql://u:\*\*\*@db/o: .*pip install -e '\.\[postgres\]'"):
        search.storage_url("postgresql://u:pw@db/o")  # the password is not printed


def test_a_database_that_cannot_be_reached_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("psycopg")
    monkeypatch.setattr(search.time, "sleep", lambda s: None)  # the retries' pauses
    url = f"postgresql+psycopg://visionpoc:secret@127.0.0.1:{free_port()}/optuna"  # nothing listens
    with pytest.raises(VisionpocError, match=r"visionpoc:\*\*\*@127.0.0.1:\d+/optuna \(connection failed") as e:
        search.open_storage(url, TuneConfig())
    assert "secret" not in str(e.value) and "--storage URL" in str(e.value)


def test_heartbeat_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"tune.heartbeat_s \(60\) must be at least 1 and below tune.grace_s \(30\)"):
        load_config(None, ["tune.grace_s=30"])
    with pytest.raises(ConfigError, match="tune.retries"):
        load_config(None, ["tune.retries=-1"])
