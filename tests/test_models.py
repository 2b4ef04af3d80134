"""timm creation, fine-tuning policies, pretrained weights from a local file, and the offline error."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from visionpoc import checkpoint, models
from visionpoc.config import ModelConfig
from visionpoc.errors import CheckpointError, WeightsError

VIT = dict(timm="vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 4})


def _step(model: nn.Module, size: int) -> None:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 0])
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_top_fraction_xception_trains_top_convs_and_freezes_bn() -> None:
    mcfg = ModelConfig(label="x", timm="legacy_xception", pretrained=False, finetune="top_fraction", fraction=0.1)
    model = models.create_model(mcfg, num_classes=3)
    models.apply_finetune(model, mcfg)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    k = math.ceil(0.1 * len(convs))
    trainable_convs = [n for n, m in convs if m.weight.requires_grad]
    assert trainable_convs == [n for n, _ in convs[-k:]]
    assert model.get_classifier().weight.requires_grad
    frozen_bn = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen_bn, "BatchNorm layers of the frozen part must become FrozenBatchNorm2d"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats_before = frozen_bn[0].running_mean.clone()
    _step(model, 64)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(model.get_parameter(n).requires_grad for n in changed)
    assert torch.equal(frozen_bn[0].running_mean, stats_before)  # frozen statistics never move
    total, trainable = models.count_params(model)
    assert 0 < trainable < total / 2


def test_top_fraction_transformer_means_blocks() -> None:
    mcfg = ModelConfig(label="v", finetune="top_fraction", fraction=0.5, **VIT)  # type: ignore[arg-type]
    model = models.create_model(mcfg, num_classes=3)
    models.apply_finetune(model, mcfg)
    block_trainable = [any(p.requires_grad for p in b.parameters()) for b in model.blocks]
    assert block_trainable == [False, False, True, True]
    assert not model.patch_embed.proj.weight.requires_grad and not model.pos_embed.requires_grad
    assert model.head.weight.requires_grad and model.norm.weight.requires_grad


def test_head_policy_is_a_linear_probe() -> None:
    mcfg = ModelConfig(label="v", finetune="head", **VIT)  # type: ignore[arg-type]
    model = models.create_model(mcfg, num_classes=5)
    models.apply_finetune(model, mcfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}


def test_preprocessing_comes_from_the_model() -> None:
    x = ModelConfig(label="x", timm="legacy_xception.tf_in1k", pretrained=False)
    cfg = models.data_config(models.create_model(x, 3), x)
    assert cfg["input_size"] == (3, 299, 299) and cfg["mean"] == (0.5, 0.5, 0.5)
    v = ModelConfig(label="v", **VIT)  # type: ignore[arg-type]
    assert models.data_config(models.create_model(v, 3), v)["input_size"] == (3, 32, 32)


def test_pretrained_path_loads_a_local_safetensors_file(tmp_path: Path) -> None:
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=4)  # 1000-class head
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    mcfg = ModelConfig(
        label="v",
        timm="vit_tiny_patch16_224",
        pretrained=True,
        img_size=32,
        model_kwargs={"depth": 4},
        pretrained_path=str(tmp_path / "w.safetensors"),
    )
    model = models.create_model(mcfg, num_classes=3)
    assert torch.equal(model.blocks[2].attn.qkv.weight, source.blocks[2].attn.qkv.weight)
    assert model.head.out_features == 3  # the head is new, for our classes


def test_missing_pretrained_path_is_named(tmp_path: Path) -> None:
    mcfg = ModelConfig(label="v", timm="vit_tiny_patch16_224", pretrained_path=str(tmp_path / "none.safetensors"))
    with pytest.raises(WeightsError, match="none.safetensors not found"):
        models.create_model(mcfg, 3)


def test_offline_weights_error_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    mcfg = ModelConfig(label="vit_b16", timm="vit_tiny_patch16_224.augreg_in21k", pretrained=True, img_size=32)
    with pytest.raises(WeightsError) as e:
        models.create_model(mcfg, 3)
    msg = str(e.value)
    assert "vit_b16" in msg and "timm/vit_tiny_patch16_224.augreg_in21k" in msg and "pretrained_path" in msg


def test_without_the_hub_weights_load_offline_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: huggingface_hub's offline mode for the load (cache only, no minute of retries), and
    the flag is put back afterwards."""
    import huggingface_hub.constants as hc
    import requests

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def unreachable(*a: object, **k: object) -> None:
        raise requests.ConnectionError("no network (simulated)")

    monkeypatch.setattr(requests, "head", unreachable)
    assert models.hub_reachable.__wrapped__() is False  # type: ignore[attr-defined]
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    seen: list[bool] = []
    real = timm.create_model

    def spy(*a: object, **k: object) -> object:
        seen.append(hc.HF_HUB_OFFLINE)
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(timm, "create_model", spy)
    mcfg = ModelConfig(label="vit_b16", timm="vit_tiny_patch16_224.augreg_in21k", pretrained=True, img_size=32)
    with pytest.raises(WeightsError, match="vit_b16"):
        models.create_model(mcfg, 3)
    assert seen == [True] and hc.HF_HUB_OFFLINE is False
    models.create_model(dataclasses.replace(mcfg, pretrained=False), 3)  # no weights: no offline switch
    assert seen == [True, False]


def test_unknown_model_is_named() -> None:
    with pytest.raises(WeightsError, match="no model 'not_a_model_xyz'"):
        models.create_model(ModelConfig(label="a", timm="not_a_model_xyz", pretrained=False), 3)


def test_forward_gflops_counts_the_forward_pass() -> None:
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    assert models.forward_gflops(lin, (3, 4, 4), torch.device("cpu")) == pytest.approx(2 * 48 * 10 / 1e9)


def test_checkpoint_errors(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    path = tmp_path / "m.safetensors"
    checkpoint.save_weights(model, path, {"timm": "lin", "num_classes": "2"})
    fresh = nn.Linear(4, 2)
    checkpoint.load_weights(fresh, path, {"timm": "lin"})
    assert torch.equal(fresh.weight, model.weight)
    with pytest.raises(CheckpointError, match="saved for timm='lin', not 'other'"):
        checkpoint.load_weights(fresh, path, {"timm": "other"})
    with pytest.raises(CheckpointError, match="does not fit"):
        checkpoint.load_weights(nn.Linear(5, 2), path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load_weights(fresh, path)
