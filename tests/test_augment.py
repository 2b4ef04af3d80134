"""Augmentation and ViT regularisers: the presets' shapes and label forms, their use on the
prepared path's device batches, and a full run with `strong` + EMA that resumes exactly."""

from __future__ import annotations

import dataclasses
import json
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.loss import SoftTargetCrossEntropy

from dogs_fixture import dog_image
from visionpoc import train
from visionpoc.compare import load_data
from visionpoc.config import Config, DataConfig, ModelConfig, TrainConfig, for_model
from visionpoc.data import augment, gpu_aug
from visionpoc.errors import TrainingInterrupted

DCFG: dict[str, Any] = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.25, 0.25),
    "crop_pct": 0.9,
    "crop_mode": "center",
}
C = 5


def _image() -> Image.Image:
    return dog_image(1, 0, size=(48, 36))


@pytest.mark.parametrize("preset", augment.PRESETS)
def test_each_preset_gives_the_expected_shapes_and_label_form(preset: str) -> None:
    random.seed(0)  # timm's RandAugment draws its ops and magnitudes from `random`
    torch.manual_seed(0)
    tf = augment.train_transform(DCFG, preset)
    x = torch.stack([tf(_image()) for _ in range(6)])  # (6, 3, 32, 32)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    xb, yb = augment.batch_augment(preset, C, 0.1, torch.device("cpu"))(x.clone(), y)
    assert xb.shape == (6, 3, 32, 32)
    if preset == "strong":  # mixup/cutmix: soft targets, one row per image, summing to 1
        assert yb.shape == (6, C) and yb.dtype == torch.float32
        assert torch.allclose(yb.sum(1), torch.ones(6)) and (yb >= 0).all()
        loss = augment.loss_for(preset, 0.1)
        assert isinstance(loss, SoftTargetCrossEntropy) and torch.isfinite(loss(torch.randn(6, C), yb))
    else:  # hard targets, untouched
        assert yb is y and yb.shape == (6,)
        assert isinstance(augment.loss_for(preset, 0.1), torch.nn.CrossEntropyLoss)


def test_strong_survives_many_draws() -> None:
    """RandAugment's magnitude noise reaches its upper bound now and then; at that bound timm's
    increasing posterize asks PIL for 0 bits, which Pillow >= 12 rejects (a crash mid-epoch, about once
    in 300 images with `rand-m9-mstd0.5-inc1`). 3,000 seeded draws would hit it about 9 times."""
    random.seed(0)
    tf = augment.train_transform(DCFG, "strong")
    img = dog_image(2, 1, size=(16, 12))
    for _ in range(3000):
        assert tf(img).shape == (3, 32, 32)


def test_none_is_deterministic_and_basic_is_not() -> None:
    none, basic = augment.train_transform(DCFG, "none"), augment.train_transform(DCFG, "basic")
    torch.manual_seed(0)
    a = none(_image())
    torch.manual_seed(1)
    assert torch.equal(a, none(_image()))
    assert torch.equal(a, augment.eval_transform(DCFG)(_image()))  # `none` is the eval transform
    torch.manual_seed(0)
    b = basic(_image())
    torch.manual_seed(1)
    assert not torch.equal(b, basic(_image()))


@pytest.mark.parametrize("batch", [1, 5])
def test_strong_handles_odd_batches(batch: int) -> None:
    x, y = torch.randn(batch, 3, 32, 32), torch.arange(batch) % C
    xb, yb = augment.batch_augment("strong", C, 0.1, torch.device("cpu"))(x, y)
    assert xb.shape == (batch, 3, 32, 32) and yb.shape == (batch, C)
    assert yb[-1].argmax() == y[-1] and torch.allclose(yb.sum(1), torch.ones(batch))  # last: its own target


def test_batch_ops_work_on_the_prepared_paths_device_batches(caplog: pytest.LogCaptureFixture) -> None:
    """`gpu_aug` yields normalized float (B, 3, H, W) batches on the device; the batch ops take them as is."""
    store = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)  # a prepared store's batch
    x = gpu_aug.train_batch(store, DCFG, torch.Generator().manual_seed(0))  # (8, 3, 32, 32)
    xb, yb = augment.batch_augment("strong", C, 0.0, x.device)(x, torch.arange(8) % C)
    assert xb.shape == (8, 3, 32, 32) and yb.shape == (8, C)
    text = augment.describe("strong", "prepared")
    assert "gpu randaugment" in text and "mixup" in text
    assert "randaugment(rand-m9" in augment.describe("strong", "stream")


def test_randaugment_on_device_batches_is_seeded_and_changes_images() -> None:
    """`strong` on the prepared path: RandAugment on the batch, from the batch's own generator (the same
    ops again for the same seed, whichever thread or device), values still 0..255 before normalizing."""
    store = torch.randint(0, 256, (40, 3, 40, 40), dtype=torch.uint8)

    def run(seed: int, ra: bool) -> torch.Tensor:
        return gpu_aug.train_batch(store, DCFG, torch.Generator().manual_seed(seed), rand_augment=ra)

    plain, a, b, other = run(0, False), run(0, True), run(0, True), run(1, True)
    assert a.shape == plain.shape == (40, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, other)  # seeded by the batch's generator
    changed = [(a[i : i + 16] - plain[i : i + 16]).abs().amax().item() > 0 for i in range(0, 40, 16)]
    assert sum(changed) >= 2  # the crop and flip are the same: the difference is RandAugment's
    lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25  # DCFG's normalization of 0..255
    assert a.min() >= lo - 1e-5 and a.max() <= hi + 1e-5


def _cfg(root: Path, epochs: int) -> tuple[Config, ModelConfig]:
    mcfg = ModelConfig(
        label="vit",
        timm="vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        model_kwargs={"depth": 2, "drop_path_rate": 0.1},
        augment="strong",
        ema_decay=0.9,
        layer_decay=0.75,
    )
    cfg = Config(
        data=DataConfig(source="stanford_dogs", root=str(root), val_fraction=0.2, num_workers=0, download=False),
        models=(mcfg,),
        train=TrainConfig(epochs=epochs, batch_size=4, lr=1e-3, warmup_epochs=0.5, device="cpu", deterministic=True),
    )
    return cfg, mcfg


def test_strong_with_ema_trains_records_what_ran_and_resumes_exactly(
    mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, mcfg = _cfg(mini_dogs, epochs=2)
    assert for_model(cfg, mcfg).train.augment == "strong"  # the per-model setting wins over train.augment
    _, splits = load_data(cfg)
    straight = train.fit(cfg, mcfg, splits, tmp_path / "straight")
    assert (straight.augment, straight.ema_decay, straight.layer_decay, straight.drop_path_rate) == (
        "strong",
        0.9,
        0.75,
        0.1,
    )
    assert straight.augment_applied is not None and "mixup" in straight.augment_applied
    assert all(0.0 <= h.train_accuracy <= 1.0 for h in straight.history)  # argmax vs the soft target's argmax
    state = torch.load(tmp_path / "straight" / "last_state.pt", weights_only=True)
    assert isinstance(state["ema"], dict) and state["ema"]  # the EMA travels with the checkpoint
    best = load_file(tmp_path / "straight" / "best.safetensors")
    last = load_file(tmp_path / "straight" / "last.safetensors")
    assert any(not torch.equal(best[k], last[k]) for k in best)  # best holds the EMA, not the raw weights
    if straight.best_epoch == 2:
        assert all(torch.equal(best[k], state["ema"][k]) for k in best)

    real = train.train_one_epoch
    fired: list[int] = []

    def stop_in_epoch_two(p: Any, batches: Any, epoch: int, *args: Any, **kw: Any) -> Any:
        stop = args[2]
        if epoch == 2 and not fired:  # SIGTERM arrives: one more step, then a checkpoint
            fired.append(epoch)
            stop.signum = signal.SIGTERM
        return real(p, batches, epoch, *args, **kw)

    monkeypatch.setattr(train, "train_one_epoch", stop_in_epoch_two)
    with pytest.raises(TrainingInterrupted):
        train.fit(cfg, mcfg, splits, tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / "last_state.pt", weights_only=True)["progress"]["batches"] == 1
    monkeypatch.setattr(train, "train_one_epoch", real)
    resumed = train.fit(cfg, mcfg, splits, tmp_path / "resumed", resume=True)
    assert resumed.resumed_from_epoch == 2
    for key in ("val_accuracy", "test_accuracy", "train_accuracy", "best_epoch"):
        assert getattr(resumed, key) == getattr(straight, key), key
    assert [h.train_loss for h in resumed.history] == pytest.approx([h.train_loss for h in straight.history])
    a, b = (
        load_file(tmp_path / "straight" / "best.safetensors"),
        load_file(tmp_path / "resumed" / "best.safetensors"),
    )
    assert all(torch.allclose(a[k], b[k]) for k in a)  # the same EMA weights were kept as best
    saved = json.loads(json.dumps(dataclasses.asdict(resumed)))  # results.json-ready
    assert saved["augment_applied"] == straight.augment_applied


def _seed(k: int) -> None:
    random.seed(k)  # timm's crop, flip and RandAugment draw from `random` and NumPy
    np.random.seed(k)
    torch.manual_seed(k)


def test_strong_applies_timms_rand_augment_to_each_image() -> None:
    """`strong` holds timm's RandAugment with our config (2 ops, m9 +- 0.5, capped at 9, increasing ops),
    after the crop and flip, and it changes the images: the same transform without it, under the same
    seeds, gives the same crops and flips but not the same pixels."""
    from timm.data.auto_augment import RandAugment

    strong = augment.train_transform(DCFG, "strong")
    (ra,) = [t for t in strong.transforms if isinstance(t, RandAugment)]
    assert not any(isinstance(t, RandAugment) for t in augment.train_transform(DCFG, "basic").transforms)
    assert ra.num_layers == 2 and len(ra.ops) == 15 and "PosterizeIncreasing" in {op.name for op in ra.ops}
    assert all((op.magnitude, op.magnitude_std, op.magnitude_max) == (9, 0.5, 9) for op in ra.ops)
    without = type(strong)([t for t in strong.transforms if t is not ra])
    img = dog_image(3, 2, size=(48, 36))
    changed = 0
    for k in range(20):
        _seed(k)
        a = strong(img)
        _seed(k)
        b = without(img)
        _seed(k)
        assert torch.equal(b, without(img))  # the rest is seeded: a difference is RandAugment's
        changed += not torch.equal(a, b)
    assert changed >= 10  # each of its 2 ops fires with p=0.5: about 3 images in 4 change


def test_random_erasing_replaces_a_rectangle_of_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """One image per batch (so mixup leaves it alone): erasing, forced on, fills one rectangle with noise
    and leaves the rest; at its own probability it erases about a quarter of the images."""
    monkeypatch.setattr(augment, "ERASE_PROB", 1.0)
    _seed(0)
    op = augment.batch_augment("strong", C, 0.0, torch.device("cpu"))
    for _ in range(5):
        x, _ = op(torch.zeros(1, 3, 32, 32), torch.tensor([2]))  # (1, 3, 32, 32)
        hit = (x[0] != 0).any(0)  # (32, 32): erased pixels
        rows, cols = hit.any(1).nonzero().flatten(), hit.any(0).nonzero().flatten()
        assert 0 < hit.sum() < 32 * 32
        box = hit[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() and hit.sum() == box.numel()  # one filled rectangle, nothing outside it
    monkeypatch.setattr(augment, "ERASE_PROB", 0.25)
    op = augment.batch_augment("strong", C, 0.0, torch.device("cpu"))
    erased = sum(bool(op(torch.zeros(1, 3, 16, 16), torch.tensor([0]))[0].any()) for _ in range(400))
    assert 60 <= erased <= 140  # ~100 of 400


def test_mixup_and_cutmix_mix_the_images_and_their_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each image i is mixed with image B-1-i: either a convex combination (mixup) or a pasted box of it
    (cutmix), and its soft target gives the two classes the same shares as the pixels."""
    monkeypatch.setattr(augment, "ERASE_PROB", 0.0)  # mixing alone
    n, modes = 4, set()
    for k in range(12):
        _seed(k)
        x = torch.arange(1.0, n + 1).view(n, 1, 1, 1).expand(n, 3, 8, 8).clone()  # image i: all i + 1
        y = torch.arange(n)
        xb, yb = augment.batch_augment("strong", C, 0.0, torch.device("cpu"))(x.clone(), y)
        assert not torch.equal(xb, x)
        for i in range(n):
            own, other = float(i + 1), float(n - i)  # the partner's value
            lam = float(yb[i, i])
            assert yb[i, n - 1 - i] == pytest.approx(1 - lam) and 0 < lam < 1
            if torch.allclose(xb[i], torch.full_like(xb[i], lam * own + (1 - lam) * other)):
                modes.add("mixup")
            else:  # cutmix: every pixel is its own or the partner's, in the target's shares
                is_own = xb[i] == own
                assert (is_own | (xb[i] == other)).all()
                assert float(is_own.float().mean()) == pytest.approx(lam)
                modes.add("cutmix")
    assert modes == {"mixup", "cutmix"}  # one of the two per batch, 50/50


def test_layer_decay_gives_deeper_blocks_a_higher_lr() -> None:
    from visionpoc import models, optim

    mcfg = ModelConfig(
        label="vit", timm="vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 2}
    )
    model = models.create_model(mcfg, C, pretrained=False)

    def lrs(layer_decay: float | None) -> dict[str, float]:
        t = TrainConfig(epochs=1, warmup_epochs=0.0, layer_decay=layer_decay)
        opt = optim.make_optimizer(model, t, 1e-3, torch.device("cpu"))
        optim.make_scheduler(opt, t, 1e-3, 10).step_update(num_updates=0)
        group = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        names = {
            "embed": "patch_embed.proj.weight",
            "block0": "blocks.0.mlp.fc1.weight",
            "block1": "blocks.1.mlp.fc1.weight",
            "head": "head.weight",
        }
        params = dict(model.named_parameters())
        return {k: group[id(params[name])] for k, name in names.items()}

    flat = lrs(None)
    assert len(set(flat.values())) == 1 and flat["head"] == pytest.approx(1e-3)
    decayed = lrs(0.5)
    assert decayed["embed"] < decayed["block0"] < decayed["block1"] < decayed["head"] == pytest.approx(1e-3)
    assert decayed["block0"] / decayed["block1"] == pytest.approx(0.5)
