"""What makes our loop cost no more than a plain PyTorch loop, and keeps it correct: frozen BatchNorm
fused into one kernel with the same numbers, a frozen backbone trained in eval mode under `finetune:
head` (its statistics untouched), and per-sample augmentation seeding that touches only torch's CPU
generator (no accelerator seeding per image), with the same draws as before."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.layers.norm_act import FrozenBatchNormAct2d
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from visionpoc import models
from visionpoc.bench.plain import photo_folder
from visionpoc.config import Config, DataConfig, ModelConfig, ProbeConfig, TrainConfig, for_model
from visionpoc.data.images import load_rgb
from visionpoc.data.loaders import ImageDataset, sample_seed, train_transform
from visionpoc.data.splits import Splits
from visionpoc.recovery import StopRequest, seed_streams
from visionpoc.train import EpochProgress, build_run, train_one_epoch


def _unfused(model: nn.Module) -> nn.Module:
    slow = copy.deepcopy(model)
    for m in slow.modules():
        if isinstance(m, models.FusedFrozenBatchNormAct2d):
            m.__class__ = FrozenBatchNormAct2d
        elif isinstance(m, models.FusedFrozenBatchNorm2d):
            m.__class__ = FrozenBatchNorm2d
    return slow


@pytest.mark.parametrize("name", ["resnet10t", "tf_efficientnet_lite0"])  # BatchNorm2d, BatchNormAct2d
def test_frozen_batchnorm_is_fused_with_the_same_numbers_and_state(name: str, one_thread: None) -> None:
    torch.manual_seed(0)
    mcfg = ModelConfig(label="m", timm=name, pretrained=False, finetune="head", img_size=32)
    model = models.create_model(mcfg, 5)
    for m in model.modules():  # statistics that are not the identity, so the affine map is tested
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    models.apply_finetune(model, mcfg)
    kinds = {type(m) for m in model.modules()}
    assert kinds & {models.FusedFrozenBatchNorm2d, models.FusedFrozenBatchNormAct2d}
    assert not kinds & {FrozenBatchNorm2d, FrozenBatchNormAct2d}  # every frozen BatchNorm swapped
    slow = _unfused(model)
    assert model.state_dict().keys() == slow.state_dict().keys()  # checkpoints are unchanged
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), slow.eval()(x), rtol=1e-4, atol=1e-5)


def _head_run(tmp_path: Path) -> tuple[nn.Module, object]:
    split = photo_folder(tmp_path / "photos", 8, (40, 48))
    empty = split.subset(np.arange(0))
    mcfg = ModelConfig(
        label="h", timm="resnet10t", pretrained=False, finetune="head", img_size=32,
        model_kwargs={"drop_path_rate": 0.5},
    )  # fmt: skip
    cfg = Config(
        data=DataConfig(root=str(tmp_path), num_workers=0, pipeline="stream", download=False),
        models=(mcfg,),
        train=TrainConfig(epochs=1, batch_size=4, device="cpu"),
        probe=ProbeConfig(cache=False),
    )
    run = build_run(for_model(cfg, mcfg), mcfg, Splits(split, empty, empty, [f"c{i}" for i in range(8)]), tmp_path)
    return run.model, run


def test_head_trains_its_frozen_backbone_in_eval_mode(tmp_path: Path, one_thread: None) -> None:
    model, run = _head_run(tmp_path)
    assert run.parts.eval_frozen  # type: ignore[attr-defined]
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    train_one_epoch(run.parts, run.loaders.train, 1, 0, EpochProgress(), StopRequest())  # type: ignore[attr-defined]
    head = model.get_classifier()
    assert model.training and head.training  # the head (and its parents) train
    frozen = [m for n, m in model.named_modules() if n and not n.startswith("fc") and list(m.parameters())]
    assert frozen and not any(m.training for m in frozen)  # every frozen block: eval (no drop-path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())  # statistics unmoved
    x = torch.randn(2, 3, 32, 32)
    feats = [model.forward_features(x) for _ in range(2)]  # drop-path 0.5 would make these differ
    torch.testing.assert_close(feats[0], feats[1])


def test_eval_frozen_keeps_parameter_free_modules_on_a_trainable_path() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    model.train()
    models.eval_frozen(model)
    assert not model[0].training and model[1].training and model[2].training


def test_sample_seeding_touches_only_the_cpu_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    split = photo_folder(tmp_path, 4, (40, 48))
    dcfg = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    ds = ImageDataset(split, train_transform(dcfg), seed=7)
    expected = []
    for i in range(len(split)):  # the draws of every stream seeded the old way (torch.manual_seed)
        with torch.random.fork_rng(devices=[]):
            seed_streams(sample_seed(7, 3, i))
            expected.append(ds.transform(load_rgb(split.path(i))))
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    before = torch.random.get_rng_state()
    got = [ds[(i, 3)][0] for i in range(len(split))]
    assert calls == []  # no accelerator seeded (nor a stack trace queued) per image
    assert torch.equal(torch.random.get_rng_state(), before)  # the training stream is left as it was
    for x, e in zip(got, expected, strict=True):
        torch.testing.assert_close(x, e)  # the same augmentation as before
