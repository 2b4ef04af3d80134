"""How fit wraps a model under torchrun: SyncBatchNorm on CUDA only, DDP then torch.compile, and
gradient accumulation that skips the all-reduce on every micro-batch but the last, also when the DDP
module is compiled. A one-process gloo group stands in for torchrun."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import timm.layers
import timm.scheduler
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.ops.misc import FrozenBatchNorm2d  # what timm.utils.freeze makes of frozen BatchNorm

from visionpoc import step, train
from visionpoc.distributed import Dist

TWO = Dist(0, 2)  # what fit sees under torchrun with two processes


def _bn_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU), nn.BatchNorm2d(4), FrozenBatchNorm2d(4)
    )


def test_batchnorm_is_synchronized_on_cuda_only() -> None:
    model = _bn_model().eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    synced = train.sync_batchnorm(model, TWO, torch.device("cuda", 0)).eval()
    kinds = [type(m).__name__ for m in synced]
    assert kinds == ["Conv2d", "SyncBatchNormAct", "SyncBatchNorm", "FrozenBatchNorm2d"]
    assert torch.allclose(synced(x), expected)  # BatchNormAct keeps its activation
    cpu = _bn_model()
    assert train.sync_batchnorm(cpu, TWO, torch.device("cpu")) is cpu  # gloo: no SyncBatchNorm
    assert train.sync_batchnorm(cpu, Dist(), torch.device("cuda", 0)) is cpu  # one process: nothing to sync


@pytest.fixture
def process_group() -> Iterator[None]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_is_compiled_after_wrapping(process_group: None, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[nn.Module] = []
    monkeypatch.setattr(train.torch, "compile", lambda m: compiled.append(m) or m)
    model = nn.Linear(3, 2)
    step_model, eval_model = train.wrap_model(model, TWO, torch.device("cpu"), compile_=True)
    assert compiled == [] and isinstance(step_model, DistributedDataParallel)  # no compilation on the CPU
    monkeypatch.setattr(train, "DistributedDataParallel", lambda m, device_ids: ("ddp", m))
    step_model, eval_model = train.wrap_model(model, TWO, torch.device("cuda", 0), compile_=True)
    assert compiled == [("ddp", model)] and eval_model is model  # compile(DDP(model)); eval: the plain module


def test_micro_batches_skip_the_all_reduce_also_when_ddp_is_compiled(
    process_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    ddp = DistributedDataParallel(nn.Linear(6, 3))
    skipped = []
    real = DistributedDataParallel.no_sync

    def counting_no_sync(self: DistributedDataParallel):  # type: ignore[no-untyped-def]
        skipped.append(1)
        return real(self)

    monkeypatch.setattr(DistributedDataParallel, "no_sync", counting_no_sync)
    model = torch.compile(ddp, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = step.StepParts(
        model,
        opt,
        timm.scheduler.CosineLRScheduler(opt, t_initial=2),
        nn.CrossEntropyLoss(),  # type: ignore[arg-type]
        torch.device("cpu"),
        None,
        None,
        False,
        micro_batch=2,
    )
    step._step(p, torch.randn(8, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    assert len(skipped) == 3  # 4 micro-batches: the first 3 accumulate locally, the last all-reduces
