"""Real servers for the tests, on loopback, each stopped by the test run that started it.

- `PostgresServer`: a throwaway PostgreSQL cluster (Debian's `postgresql` package: `initdb`, `pg_ctl`)
  in a temporary folder, on 127.0.0.1 and a free port, trust authentication, durability off (a test
  database). As root it runs as the `postgres` user (PostgreSQL refuses root). With a command prefix
  (`ip netns exec NS`) it runs inside a test host, listening on that host's address and trusting the
  test subnet; the test process itself reaches it through its Unix socket (a file, in no network).
- `MlflowServer`: `mlflow server` with a SQLite backend store and a local artifact root, waited for on
  its `/health` page.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SERVER_START_S = 60.0  # a cold start on a busy 2-core runner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_bindir() -> Path | None:
    """Debian keeps the server binaries off PATH, in /usr/lib/postgresql/<version>/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def postgres_missing() -> str:
    """Why the PostgreSQL tests cannot run here ("" when they can)."""
    if postgres_bindir() is None:
        return "no PostgreSQL server binaries (initdb): apt-get install postgresql"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "no psycopg 3: pip install -e '.[postgres]' (the test extra has it)"
    return ""


def require_postgres() -> Path:
    """The server binaries' folder; without them or psycopg the test skips, and fails instead when
    `VISIONPOC_REQUIRE_POSTGRES=1` (as in CI)."""
    import pytest

    missing = postgres_missing()
    if missing:
        (pytest.fail if os.environ.get("VISIONPOC_REQUIRE_POSTGRES") == "1" else pytest.skip)(missing)
    bindir = postgres_bindir()
    assert bindir is not None
    return bindir


class PostgresServer:
    """`initdb`, then `start()` / `stop()` / `restart()` on `host`:`port`; `url(db)` for SQLAlchemy.

    `prefix` runs the server tools (and so the postmaster) through a command such as `ip netns exec NS`;
    `trust` is a further subnet (CIDR) allowed in `pg_hba.conf` without a password."""

    user = "visionpoc"

    def __init__(self, bindir: Path, prefix: list[str] | None = None, host: str = "127.0.0.1", trust: str = "") -> None:
        self.bindir = bindir
        self.prefix = prefix or []
        self.host = host
        self.port = free_port()  # free here; a fresh namespace has every port free
        self.root = Path(tempfile.mkdtemp(prefix="visionpoc-pg-"))  # not under pytest's 0700 tmp: postgres reads it
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync")
        if trust:
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {trust} trust\n")

    def _run(self, tool: str, *args: str, in_host: bool = True) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        if in_host:
            cmd = [*self.prefix, *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=SERVER_START_S, cwd=self.root)
        if done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr[-2000:]}\n{log}")

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses={self.host} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c log_connections=on"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", opts, "start")

    def stop(self) -> None:
        # a signal to the postmaster's pid, then a wait for its pid file: from any namespace, so a server
        # whose test host is already gone is stopped too
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop", in_host=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy URL (psycopg 3)."""
        import psycopg

        with psycopg.connect(host=str(self.root), port=self.port, user=self.user, dbname="postgres") as con:
            con.autocommit = True
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{db}"

    def socket_url(self, db: str) -> str:
        """The same database through the server's Unix socket: for the test process, outside the hosts."""
        return f"postgresql+psycopg://{self.user}@/{db}?host={self.root}&port={self.port}"

    def remove(self) -> None:
        """Stop the server if it runs, and delete its folder."""
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def mlflow_command() -> str:
    """The `mlflow` command of this Python's environment (the full package, not mlflow-skinny), or ""."""
    here = Path(sys.executable).with_name("mlflow")
    return str(here) if here.exists() else (shutil.which("mlflow") or "")


class MlflowServer:
    """`mlflow server` on 127.0.0.1:`port` with its store and artifacts under `root`."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The command the tests run (docs/operations.md shows the same)."""
        return [
            mlflow_command(),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health: {(self.root / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM to its process group (the server and its workers), then SIGKILL after 5 s (a graceful
        shutdown waits for the test's idle keep-alive connections; the store has committed everything)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
