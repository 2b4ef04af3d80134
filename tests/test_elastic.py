"""The pieces behind a failed rank and an elastic restart, without torchrun (fast): the collective timeout
from `VISIONPOC_DIST_TIMEOUT_S`, which folder a (re)started worker resumes, which errors are a failed
collective, and the heartbeats that name a lost rank (a real TCPStore on loopback). tests/test_multihost.py
runs them for real across two network namespaces."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from visionpoc import distributed
from visionpoc.config import load_config, save_config
from visionpoc.distributed import Dist, Heartbeat, collective_timeout_s, peer_failure
from visionpoc.errors import ConfigError
from visionpoc.preflight import elastic_resume


def test_the_collective_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VISIONPOC_DIST_TIMEOUT_S", raising=False)
    assert collective_timeout_s() == 300.0  # minutes, not PyTorch's 30 for gloo
    monkeypatch.setenv("VISIONPOC_DIST_TIMEOUT_S", "12.5")
    assert collective_timeout_s() == 12.5
    for bad in ("ten", "0", "-3"):
        monkeypatch.setenv("VISIONPOC_DIST_TIMEOUT_S", bad)
        with pytest.raises(ConfigError, match="VISIONPOC_DIST_TIMEOUT_S"):
            collective_timeout_s()


def test_a_worker_started_by_torchrun_resumes_the_run_its_folder_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("models: [{label: vit, timm: vit_tiny_patch16_224}]\n")
    out = tmp_path / "run"
    out.mkdir()
    sets = ["train.epochs=3"]
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    assert elastic_resume(cfg_file, sets, out, None) is None  # nothing to resume yet
    save_config(load_config(cfg_file, sets), out / "config.yaml")
    assert elastic_resume(cfg_file, sets, out, None) == out
    assert elastic_resume(cfg_file, ["train.epochs=4"], out, None) is None  # another run: refused later
    assert elastic_resume(cfg_file, sets, None, None) is None
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restarts: a new command, not a restarted one
    assert elastic_resume(cfg_file, sets, out, None) is None
    monkeypatch.delenv("TORCHELASTIC_MAX_RESTARTS")
    assert elastic_resume(cfg_file, sets, out, None) is None


def test_only_a_failed_collective_of_several_ranks_is_a_peer_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Heartbeat, "running", None)
    two = Dist(rank=0, world=2)
    closed = RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.0.0.2]:1234")
    assert peer_failure(two, closed) == f"another rank stopped answering: rank 0 stops too ({closed})"
    assert peer_failure(two, dist.DistBackendError("NCCL watchdog timeout")) is not None
    assert peer_failure(Dist(), closed) is None  # one process: no peers
    assert (
        peer_failure(two, RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    )  # a bug: the model fails
    assert peer_failure(two, ValueError("gloo")) is None


@pytest.mark.slow
def test_heartbeats_name_the_rank_that_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=dt.timedelta(seconds=5), wait_for_workers=False)
    monkeypatch.setattr(distributed, "BEAT_S", 0.1)
    monkeypatch.setattr(distributed, "LOST_AFTER_S", 0.5)
    ranks = [Heartbeat(Dist(rank=r, world=3), "127.0.0.1", master.port, "attempt") for r in range(3)]
    for beat in ranks[:2]:
        beat.thread.start()  # rank 2 never beats: its process ended
    try:
        time.sleep(0.3)
        assert ranks[0].lost(window_s=0.5) == [2]
        monkeypatch.setattr(Heartbeat, "running", ranks[0])
        message = peer_failure(Dist(rank=0, world=3), RuntimeError("gloo: Timed out waiting 10000ms for recv"))
        assert message is not None and message.startswith("rank 2 of 3 is lost")
        # gloo's wording varies ("Application timeout caused pair closure"): a stopped beat says it anyway
        message = peer_failure(Dist(rank=0, world=3), RuntimeError("Application timeout"))
        assert message is not None and message.startswith("rank 2 of 3 is lost")
    finally:
        for beat in ranks:
            beat.done.set()
