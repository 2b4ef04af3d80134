"""Test hosts on this machine: two Linux network namespaces ("hosts" A and B) joined by a veth pair, each
with its own address on a private /24 that exists only inside them, as two real machines on one network.

`two_hosts(tag, net)` makes them and removes them at the end, after killing the whole tree of every
process started in them (`Hosts.popen`, `Hosts.torchrun`). Without root or iproute2's `ip` it skips, and
fails instead when `VISIONPOC_REQUIRE_NETNS=1` (as in CI). Each test module uses its own `net` (and each
test its own `tag`), so several can run in one session. Used by test_multihost.py (torchrun over two
hosts) and test_postgres_study.py (tune workers on two hosts, the database on host A).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

RDZV_PORT = 29400


class Hosts:
    """Two namespaces joined by a veth pair: host A (`NET.1`, where the servers are) and host B (`NET.2`).
    Every process started through `popen` is remembered and killed (its whole tree) by `close`."""

    def __init__(self, tag: str, net: str) -> None:
        self.ns = {"A": f"vpoc{tag}a", "B": f"vpoc{tag}b"}
        self.dev = {"A": f"vp{tag}a0", "B": f"vp{tag}b0"}  # interface names: 15 characters at most
        self.addr = {"A": f"{net}.1", "B": f"{net}.2"}
        self.subnet = f"{net}.0/24"
        self.procs: list[subprocess.Popen[Any]] = []

    def up(self) -> None:
        for h in "AB":
            _ip("netns", "add", self.ns[h])
        _ip("link", "add", self.dev["A"], "type", "veth", "peer", "name", self.dev["B"])
        for h in "AB":
            _ip("link", "set", self.dev[h], "netns", self.ns[h])
            _ip("-n", self.ns[h], "addr", "add", f"{self.addr[h]}/24", "dev", self.dev[h])
            _ip("-n", self.ns[h], "link", "set", "lo", "up")
            _ip("-n", self.ns[h], "link", "set", self.dev[h], "up")

    def prefix(self, host: str) -> list[str]:
        """The command prefix that runs a command on `host` (`ip netns exec NS`)."""
        return ["ip", "netns", "exec", self.ns[host]]

    def popen(self, host: str, cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """`cmd` on `host`, in a session of its own; `kwargs` go to `subprocess.Popen`."""
        proc = subprocess.Popen([*self.prefix(host), *cmd], start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def torchrun(self, host: str, args: list[str], log: Path, restarts: int = 0, **env: str) -> subprocess.Popen[bytes]:
        """`torchrun --nnodes 2 --nproc-per-node 1 ... ARGS` on `host`, its output in `log`."""
        cmd = [
            *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"),
            *("--rdzv-backend", "c10d", "--rdzv-endpoint", f"{self.addr['A']}:{RDZV_PORT}", "--rdzv-id", "poc"),
            # host A holds the rendezvous store; each agent announces its own address (the machine's name
            # resolves to 127.0.0.1 in every namespace)
            *("--rdzv-conf", f"is_host={int(host == 'A')}", "--local-addr", self.addr[host]),
            *("--max-restarts", str(restarts), *args),
        ]
        # a fresh store for each attempt: the agents' shared one would hand the restarted workers the
        # previous attempt's addresses (docs/operations.md)
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": self.dev[host], **env}
        full_env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        with log.open("wb") as f:
            return self.popen(host, cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env)

    def lose(self, host: str) -> None:
        """`host` vanishes: its link goes down first (its peers get no FIN or reset), then every process of
        it is killed and its namespace deleted."""
        _ip("-n", self.ns[host], "link", "set", self.dev[host], "down")
        for proc in self.procs:
            if self.ns[host] in proc.args:  # type: ignore[operator]
                kill_tree(proc.pid)
        subprocess.run(["ip", "netns", "del", self.ns[host]], check=False)

    def close(self) -> None:
        for proc in self.procs:
            kill_tree(proc.pid)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for h in "AB":
            subprocess.run(["ip", "netns", "del", self.ns[h]], check=False, capture_output=True)
        # a pair left behind by an `up` that failed half-way (gone with its namespace otherwise)
        subprocess.run(["ip", "link", "del", self.dev["A"]], check=False, capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def kill_tree(pid: int) -> None:
    for p in reversed(descendants(pid)):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def two_hosts(tag: str, net: str) -> Iterator[Hosts]:
    """Hosts A and B on `net` (three octets, e.g. "10.231.0"), removed at the end whatever happens."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        _skip("network namespaces need root and iproute2's `ip`")
    hosts = Hosts(tag, net)
    try:
        hosts.up()
    except subprocess.CalledProcessError as e:
        hosts.close()
        _skip(f"cannot create network namespaces here: {e.stderr.strip()}")
    try:
        yield hosts
    finally:
        hosts.close()


def _skip(reason: str) -> None:
    if os.environ.get("VISIONPOC_REQUIRE_NETNS") == "1":
        pytest.fail(f"{reason} (VISIONPOC_REQUIRE_NETNS=1)")
    pytest.skip(reason)
