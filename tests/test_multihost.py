"""Several hosts on this machine: two Linux network namespaces ("hosts" A and B) joined by a veth pair,
each with its own address, and torchrun on each (`--nnodes 2`, c10d rendezvous on host A, gloo on the
CPU, GLOO_SOCKET_IFNAME the host's own interface), as on two real machines.

- A two-host `compare` trains on both hosts, scores every test image exactly once, is written by one
  host only, and matches a single-process run (per-epoch train loss within 1e-4 relative, identical
  test accuracy, test probabilities within 1e-4: the tolerance of docs/operations.md; what differs is
  the order of the floating-point gradient all-reduce).
- A worker SIGKILLed while it trains: torchrun (`--max-restarts 1`) restarts the workers of both hosts,
  and they resume the run from its last checkpoint by themselves; it ends with the metrics of the
  uninterrupted two-host run.
- A host lost for good (its link down, its processes killed, its namespace deleted): the surviving
  rank stops after the short collective timeout (`VISIONPOC_DIST_TIMEOUT_S`, not PyTorch's 30 minutes)
  with a message naming the lost rank and the command that resumes the run; nothing is lost: that
  command (on one host, two processes) finishes it with the uninterrupted run's metrics.

Both hosts give the same `--out`: a cluster's run folder is on a shared filesystem, since every rank
reads the best weights back from it to score them (the namespaces share this machine's filesystem). That
only host A's rank writes in it is shown by an audit hook that records every write of each process
(`ddp_probe.py`). The namespaces (`netns.py`) and every process the tests start are removed at
teardown; traffic stays inside the namespaces. Without root or `ip` the tests skip, and fail instead
when `VISIONPOC_REQUIRE_NETNS=1` (as in CI).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from dogs_fixture import make_mini_dogs
from netns import descendants, two_hosts
from visionpoc.results import load_predictions

pytestmark = pytest.mark.slow
PROBE = Path(__file__).parent / "ddp_probe.py"
NET = "10.231.0"  # a private range unlikely to be in use; it exists only inside the test namespaces
EPOCHS = 6


def _worker_of(proc: subprocess.Popen[bytes]) -> int:
    """The pid of the visionpoc worker that `proc`'s torchrun agent started."""
    for p in descendants(proc.pid):
        try:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"visionpoc" in cmdline and b"torch.distributed.run" not in cmdline and b"-c" not in cmdline:
            return p
    raise AssertionError(f"no worker under torchrun {proc.pid}")


def _config(path: Path, root: Path) -> Path:
    """One tiny ViT (1 block, 32 px) on the miniature dogs (4 train + 2 val images per class: an even 12)."""
    model = {"label": "vit", "timm": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32}
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"source": "stanford_dogs", "root": str(root), "val_fraction": 0.34, "num_workers": 0},
                "models": [{**model, "model_kwargs": {"depth": 1}}],
                "train": {
                    **{"batch_size": 4, "device": "cpu", "epochs": EPOCHS, "lr": 1e-3, "warmup_epochs": 0.5},
                    **{"augment": "basic", "deterministic": True},
                },
                "inference": {"enabled": False},  # the price is not what these runs are about
            }
        )
    )
    return path


def _wait(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]


def _model(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())["models"][0]


def _same_metrics(a: Path, b: Path, rtol: float) -> None:
    ma, mb = _model(a), _model(b)
    losses = [[h["train_loss"] for h in m["history"]] for m in (ma, mb)]
    assert np.allclose(losses[0], losses[1], rtol=rtol, atol=0), losses
    assert (ma["test_accuracy"], ma["val_accuracy"]) == (mb["test_accuracy"], mb["val_accuracy"])
    pa, pb = (load_predictions(r / "vit" / "test_predictions.npz")["probs"] for r in (a, b))
    assert np.allclose(pa, pb, atol=rtol, rtol=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("hosts")
    yield tmp, _config(tmp / "c.yaml", make_mini_dogs(tmp / "dogs"))


@pytest.fixture(scope="module")
def two_host_run(setup: tuple[Path, Path]) -> Iterator[dict]:
    """A `compare` over hosts A and B (with the write-recording probe), and the same run in one process."""
    tmp, cfg = setup
    run, single, probe = tmp / "run", tmp / "single", tmp / "probe"
    probe.mkdir()
    args = [str(PROBE), "compare", "--config", str(cfg), "--out", str(run), "--no-report"]
    with two_hosts(str(os.getpid() % 100000), NET) as hosts:
        env = {"PROBE_DIR": str(probe), "PROBE_WATCH": str(run)}
        procs = [hosts.torchrun(h, args, tmp / f"host{h}.log", **env) for h in "AB"]
        assert _wait(procs, 240) == [0, 0], [(tmp / f"host{h}.log").read_text()[-3000:] for h in "AB"]
    subprocess.run(
        [sys.executable, "-m", "visionpoc", "compare", "--config", str(cfg), "--out", str(single), "--no-report"],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    logs = {h: (tmp / f"host{h}.log").read_text() for h in "AB"}
    yield {"run": run, "single": single, "probe": probe, "logs": logs, "tmp": tmp, "cfg": cfg}


def test_compare_trains_on_both_hosts(two_host_run: dict) -> None:
    logs = two_host_run["logs"]
    assert f"[rank 0/2] INFO visionpoc.train: [vit] epoch {EPOCHS}/{EPOCHS}" in logs["A"]
    assert f"[rank 1/2] INFO visionpoc.train: [vit] epoch {EPOCHS}/{EPOCHS}" in logs["B"]
    assert "[rank 1/2]" not in logs["A"] and "[rank 0/2]" not in logs["B"]  # one rank per host
    m = _model(two_host_run["run"])
    assert (m["status"], m["world_size"], m["batch_size_per_device"]) == ("ok", 2, 2)


def test_every_test_image_is_scored_once(two_host_run: dict) -> None:
    run = two_host_run["run"]
    results = json.loads((run / "results.json").read_text())
    assert results["dataset"]["test_size"] == 9
    files = list(load_predictions(run / "vit" / "test_predictions.npz")["files"])
    single = list(load_predictions(two_host_run["single"] / "vit" / "test_predictions.npz")["files"])
    assert len(files) == len(set(files)) == 9 and files == single  # each once, in the split's order


def test_only_host_a_writes_the_run_folder(two_host_run: dict) -> None:
    probe, run = two_host_run["probe"], two_host_run["run"]
    writes = {r: json.loads((probe / f"rank{r}.json").read_text())["writes"] for r in (0, 1)}
    assert str(run / "results.json") in writes[0] and any(p.endswith("last.safetensors") for p in writes[0])
    assert writes[1] == []


def test_two_hosts_match_one_process(two_host_run: dict) -> None:
    _same_metrics(two_host_run["run"], two_host_run["single"], rtol=1e-4)


def test_a_killed_worker_is_restarted_and_the_run_resumes_by_itself(two_host_run: dict) -> None:
    tmp, cfg = two_host_run["tmp"], two_host_run["cfg"]
    run = tmp / "restarted"
    args = ["-m", "visionpoc", "compare", "--config", str(cfg), "--out", str(run), "--no-report"]
    with two_hosts(str(os.getpid() % 100000 + 1), NET) as hosts:
        logs = {h: tmp / f"restart{h}.log" for h in "AB"}
        procs = [hosts.torchrun(h, args, logs[h], restarts=1, VISIONPOC_DIST_TIMEOUT_S="20") for h in "AB"]
        _after_first_checkpoint(run, procs)
        os.kill(_worker_of(procs[1]), signal.SIGKILL)  # host B's worker, while the run trains
        rcs = _wait(procs, 240)
        text = {h: logs[h].read_text() for h in "AB"}
        assert rcs == [0, 0], [t[-3000:] for t in text.values()]
    assert "exitcode: -9" in text["B"]  # torchrun saw the kill, and restarted
    for t in text.values():
        assert f"resuming it from its last checkpoint, as --resume {run} would" in t
    resumed = [
        int(line.split("resuming at epoch ")[1].split(",")[0])
        for line in text["A"].splitlines()
        if "resuming at epoch" in line
    ]
    assert resumed and 2 <= resumed[0] <= EPOCHS  # from a checkpoint, not from scratch
    _same_metrics(run, two_host_run["run"], rtol=0)  # exactly


def _after_first_checkpoint(run: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 180
    while not (run / "vit" / "last_state.pt").is_file():
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.02)


def test_a_lost_host_ends_the_run_with_its_resume_command(two_host_run: dict) -> None:
    tmp, cfg = two_host_run["tmp"], two_host_run["cfg"]
    run, timeout = tmp / "lost", 6
    args = ["-m", "visionpoc", "compare", "--config", str(cfg), "--out", str(run), "--no-report"]
    with two_hosts(str(os.getpid() % 100000 + 2), NET) as hosts:
        log = tmp / "lostA.log"
        procs = [
            hosts.torchrun(h, args, log if h == "A" else tmp / "lostB.log", VISIONPOC_DIST_TIMEOUT_S=str(timeout))
            for h in "AB"
        ]
        _after_first_checkpoint(run, procs)
        hosts.lose("B")
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=300)
        took = time.monotonic() - t0
    text = log.read_text()
    print(f"host A's run ended {took:.1f}s after host B was lost (collective timeout {timeout}s)")
    assert rc != 0 and took < 60, text[-3000:]  # PyTorch's default would wait 30 minutes
    assert "[rank 0/2]" in text and "rank 1 of 2 is lost" in text, text[-3000:]
    hint = f"Resume with: torchrun <the same options> -m visionpoc compare --resume {run}"
    assert hint in text
    assert (run / "vit" / "last.safetensors").is_file() and (run / "vit" / "last_state.pt").is_file()
    # nothing lost: the command it gives (here on one host, two processes) finishes the run exactly
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + ["-m", "visionpoc", "compare", "--resume", str(run), "--no-report"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _same_metrics(run, two_host_run["run"], rtol=0)  # exactly
