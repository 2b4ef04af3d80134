"""Every model trained well: policy-aware learning rates and their source, a neutral new head, the cached
linear probe and its grid, and the training diagnoses (flags), on tiny models and on real ImageNet weights
(EfficientNet-Lite0) with real photos."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from real_weights import converged_probe_accuracy
from visionpoc import models, optim
from visionpoc.compare import run_compare
from visionpoc.config import ConfigError, ModelConfig, load_config
from visionpoc.evaluate import training_flags
from visionpoc.report import write_report


def _tiny(tmp_path: Path, mini_dogs: Path, models_yaml: str, train: str = "epochs: 2, batch_size: 4") -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data: {{root: '{mini_dogs}', val_fraction: 0.2, num_workers: 0, download: false}}\n"
        f"models:\n{models_yaml}train: {{{train}}}\n"
    )
    return cfg


VIT = "timm: vit_tiny_patch16_224, pretrained: false, img_size: 32, model_kwargs: {depth: 1}"


def _photos(tmp_path: Path, photo_crops: Path, weights: Path, models_yaml: str, train: str) -> Path:
    cfg = tmp_path / "photos.yaml"
    cfg.write_text(
        f"data: {{source: folder, root: '{photo_crops}', val_fraction: 0.1, num_workers: 0}}\n"
        f"models:\n{models_yaml.replace('WEIGHTS', str(weights))}train: {{{train}}}\n"
    )
    return cfg


# ------------------------------------------------------------------------------------------ learning rates


def test_default_lr_follows_the_policy_and_the_square_root_of_the_batch() -> None:
    assert optim.default_lr("full", 256) == pytest.approx(2e-4)
    assert optim.default_lr("full", 64) == pytest.approx(1e-4)  # sqrt(64 / 256) = 1/2
    assert optim.default_lr("top_fraction", 1024) == pytest.approx(2e-3)
    assert optim.default_lr("head", 256) / optim.default_lr("full", 256) == pytest.approx(100)
    own = ModelConfig(label="m", timm="x", lr=3e-4)
    assert optim.resolve_lr(3e-4, own, 64) == (3e-4, "config")
    assert optim.resolve_lr(3e-4, ModelConfig(label="m", timm="x", lr=3e-4, lr_source="tuned"), 64) == (3e-4, "tuned")
    assert optim.resolve_lr(5e-4, ModelConfig(label="m", timm="x"), 64) == (5e-4, "config")  # train.lr
    assert optim.resolve_lr(None, ModelConfig(label="m", timm="x", finetune="head"), 64) == (
        pytest.approx(1e-2),
        "policy_default",
    )


def test_results_record_the_lr_its_source_and_the_budget(tmp_path: Path, mini_dogs: Path) -> None:
    models_yaml = (
        f"  - {{label: own, {VIT}, lr: 0.002}}\n"
        f"  - {{label: policy, {VIT}, finetune: top_fraction, fraction: 0.5}}\n"
        f"  - {{label: loop_head, {VIT}, finetune: head}}\n"
    )
    cfg = load_config(_tiny(tmp_path, mini_dogs, models_yaml), ["probe.cache=false"])
    assert cfg.train.lr is None
    res = {m.label: m for m in run_compare(cfg, tmp_path / "run").models}
    assert all(m.status == "ok" for m in res.values()), [m.error for m in res.values()]
    assert (res["own"].lr, res["own"].lr_source) == (0.002, "config")
    assert (res["policy"].lr, res["policy"].lr_source) == (
        pytest.approx(optim.default_lr("top_fraction", 4)),
        "policy_default",
    )
    assert (res["loop_head"].lr, res["loop_head"].lr_source) == (
        pytest.approx(optim.default_lr("head", 4)),
        "policy_default",
    )
    # 12 training images, batch 4 (the last full batch kept): 3 steps and 12 images an epoch, 2 epochs
    for m in res.values():
        assert (m.optimizer_steps, m.images_seen) == (6, 24)
        assert m.head_init_scale == 0.001
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["models"][1]
    assert saved["lr_source"] == "policy_default" and saved["optimizer_steps"] == 6 and saved["images_seen"] == 24
    # a shared train.lr is the config's choice for every model without its own
    shared = run_compare(
        load_config(_tiny(tmp_path, mini_dogs, f"  - {{label: v, {VIT}}}\n"), ["train.lr=0.0007"]), tmp_path / "r2"
    )
    assert (shared.models[0].lr, shared.models[0].lr_source) == (0.0007, "config")


def test_a_preset_lr_is_recorded_as_the_presets(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models:\n  - {preset: xception}\n  - {preset: vit_b16, lr: 0.0002}\n")
    xception, vit = load_config(cfg).models
    assert xception.lr is not None and xception.lr_source == "preset"
    assert (vit.lr, vit.lr_source) == (0.0002, None)  # the entry's own: the config's


@pytest.mark.parametrize(
    "override,key",
    [
        ("probe.lrs=[]", "probe.lrs"),
        ("probe.weight_decays=[-1]", "probe.weight_decays"),
        ("probe.views=-1", "probe.views"),
        ("models.0.head_init_scale=-0.5", "models.0.head_init_scale"),
        ("models.0.head_lr_scale=0", "models.0.head_lr_scale"),
    ],
)
def test_probe_and_head_settings_are_checked(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


# ------------------------------------------------------------------------------------------ a neutral head


def test_the_new_head_starts_neutral_with_real_weights(lite0_weights: Path, photo_crops: Path) -> None:
    """The first loss is ln(classes) with the scaled head; timm's own initialisation starts far from it."""
    from PIL import Image

    from visionpoc.data.augment import eval_transform

    files = sorted((photo_crops / "train").glob("*/*.jpg"))[::10]
    classes = sorted(p.name for p in (photo_crops / "train").iterdir())
    y = torch.tensor([classes.index(f.parent.name) for f in files])
    losses = {}
    for scale in (0.001, None):
        mcfg = ModelConfig(
            label="l",
            timm="tf_efficientnet_lite0",
            pretrained_path=str(lite0_weights),
            img_size=64,
            head_init_scale=scale,
        )
        torch.manual_seed(0)
        model = models.create_model(mcfg, len(classes))
        models.init_head(model, mcfg.head_init_scale)
        tf = eval_transform(models.data_config(model, mcfg))
        x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
        with torch.no_grad():
            losses[scale] = float(F.cross_entropy(model.eval()(x), y))
    assert losses[0.001] == pytest.approx(math.log(len(classes)), abs=0.02)
    assert losses[None] > math.log(len(classes)) + 0.5


# ------------------------------------------------------------------------------------------ the linear probe


@pytest.mark.slow
def test_linear_probe_grid_cache_and_saved_head(tmp_path: Path, lite0_weights: Path, photo_crops: Path) -> None:
    """The chosen head is the grid's best on validation; the features are computed once and cached (a
    changed image computes them again); the saved model predicts what the probe scored."""
    from visionpoc.serving.predict import Predictor

    yaml_models = (
        "  - {label: probe, timm: tf_efficientnet_lite0, pretrained_path: WEIGHTS, finetune: head, img_size: 64}\n"
    )
    cfg = load_config(_photos(tmp_path, photo_crops, lite0_weights, yaml_models, "epochs: 2, batch_size: 32"))
    cache = photo_crops / ".visionpoc-cache" / "features"
    before = set(cache.glob("*.safetensors")) if cache.is_dir() else set()
    first = run_compare(cfg, tmp_path / "a").models[0]
    assert first.status == "ok", first.error
    p = first.probe
    assert p is not None and p["cache"] == ("hit" if before else "miss")
    grid = p["grid"]
    assert len(grid) == len(cfg.probe.lrs) * len(cfg.probe.weight_decays)
    assert all(p["chosen"]["val_accuracy"] >= g["val_accuracy"] for g in grid)
    assert p["chosen"] in grid and (first.lr, first.weight_decay) == (p["chosen"]["lr"], p["chosen"]["weight_decay"])
    assert first.lr_source == "probe_grid" and first.val_accuracy == pytest.approx(p["chosen"]["val_accuracy"])
    assert first.optimizer_steps is not None and first.optimizer_steps >= cfg.probe.min_steps
    assert first.test_accuracy is not None and first.test_accuracy > 0.8  # chance: 1/8

    second = run_compare(cfg, tmp_path / "b").models[0]
    assert second.probe is not None and second.probe["cache"] == "hit"
    assert second.test_accuracy == first.test_accuracy and second.probe["grid"] == p["grid"]

    # the saved weights are the probe's head folded into the model: predictions through the whole model agree
    preds = np.load(tmp_path / "a" / "probe" / "test_predictions.npz")
    test_files = [photo_crops / "test" / f for f in preds["files"][:24]]
    rows = Predictor(tmp_path / "a").predict_paths(test_files, top=1)
    agree = [r["models"][0]["top"][0]["index"] == int(k) for r, k in zip(rows, preds["preds"][:24], strict=True)]
    assert sum(agree) >= 23, agree  # the same images, the same weights (a near tie may flip)

    # an image changed on disk: the features are computed again
    image = next((photo_crops / "train").glob("*/*.jpg"))
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    try:
        third = run_compare(cfg, tmp_path / "c").models[0]
    finally:
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert third.probe is not None and third.probe["cache"] == "miss"


def test_the_grid_trains_every_head_at_once_and_keeps_the_best_on_validation() -> None:
    """Synthetic features (3 Gaussian classes, offset and scaled): every grid point is scored, the chosen
    one is the best on validation, and its head, folded back onto the raw features, predicts as trained."""
    from visionpoc.config import ProbeConfig
    from visionpoc.probe import Features, probs_of, train_heads

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3

    def part(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 3
        return 50 + 10 * (centres[y] + torch.randn(n, 16, generator=g)), y  # far from standardized

    x, y = {}, {}
    for name, n in (("train", 90), ("val", 30), ("test", 30)):
        x[name], y[name] = part(n)
    x["train_eval"], y["train_eval"] = x["train"], y["train"]
    pc = ProbeConfig(lrs=(1e-5, 1e-3, 1e-1), weight_decays=(0.0, 0.5))
    grid = train_heads(
        Features(x, y, {}), pc, 3, epochs=20, batch_size=16, warmup_epochs=1, min_lr=0.0, label_smoothing=0.1, seed=0
    )
    assert [(p["lr"], p["weight_decay"]) for p in grid.points] == [(a, b) for a in pc.lrs for b in pc.weight_decays]
    best = grid.points[grid.chosen]["val_accuracy"]
    assert all(best >= p["val_accuracy"] for p in grid.points) and best > 0.9
    assert grid.steps == 20 * 6 and grid.rows_seen == 20 * 90 and len(grid.history) == 20
    probs, _ = probs_of(Features(x, y, {}), "val", grid.weight, grid.bias)
    assert (probs.argmax(1) == y["val"].numpy()).mean() == pytest.approx(best)


@pytest.mark.slow
def test_defaults_transfer_within_a_few_points_of_a_converged_probe(
    tmp_path: Path, lite0_weights: Path, photo_crops: Path
) -> None:
    """Real ImageNet weights, real photos, no lr anywhere: the linear probe and the top 10% of layers
    land within a few points of scikit-learn's converged logistic regression on the same features."""
    reference = converged_probe_accuracy(lite0_weights, photo_crops, 64)
    yaml_models = (
        "  - {label: head, timm: tf_efficientnet_lite0, pretrained_path: WEIGHTS, finetune: head, img_size: 64}\n"
        "  - {label: top10, timm: tf_efficientnet_lite0, pretrained_path: WEIGHTS, finetune: top_fraction,\n"
        "     fraction: 0.1, img_size: 64}\n"
    )
    cfg = load_config(_photos(tmp_path, photo_crops, lite0_weights, yaml_models, "epochs: 5, batch_size: 32"))
    assert cfg.train.lr is None and all(m.lr is None for m in cfg.models)
    res = {m.label: m for m in run_compare(cfg, tmp_path / "run").models}
    assert [m.lr_source for m in res.values()] == ["probe_grid", "policy_default"]
    for label in ("head", "top10"):
        acc = res[label].test_accuracy
        assert acc is not None and acc >= reference - 0.05, (label, acc, reference)


# ------------------------------------------------------------------------------------------ diagnoses


def _history(val: list[float], loss: list[float], val_loss: list[float] | None = None) -> list[dict[str, float]]:
    vl = val_loss or [1.0] * len(val)
    return [{"val_accuracy": v, "train_loss": t, "val_loss": w} for v, t, w in zip(val, loss, vl, strict=True)]


def test_training_flags_from_the_history() -> None:
    healthy = _history([0.5, 0.7, 0.8, 0.81, 0.81], [2.0, 1.2, 0.9, 0.85, 0.84])
    assert training_flags(healthy, 4, 1000, "full") == []
    rising = _history([0.5, 0.7, 0.8], [2.0, 1.2, 0.9])
    assert [f["code"] for f in training_flags(rising, 3, 1000, "full")] == ["still_improving", "loss_not_plateaued"]
    assert "best epoch 3 of 3" in training_flags(rising, 3, 1000, "full")[0]["message"]
    one = training_flags(_history([0.4], [2.0]), 1, 57, "head")
    assert [f["code"] for f in one] == ["still_improving", "too_few_steps"] and "57 optimizer steps" in one[1][
        "message"
    ]
    overfit = _history([0.7, 0.6, 0.55, 0.5, 0.5, 0.5], [1.0, 0.5, 0.3, 0.2, 0.1, 0.1], [0.8, 1.0, 1.2, 1.4, 1.5, 1.6])
    assert [f["code"] for f in training_flags(overfit, 1, 1000, "full")] == ["overfits_early"]


@pytest.mark.slow
def test_an_under_trained_run_is_flagged_in_results_and_report(tmp_path: Path, mini_dogs: Path) -> None:
    models_yaml = f"  - {{label: base, {VIT}}}\n  - {{label: cand, {VIT}, lr: 0.003}}\n"
    cfg = load_config(_tiny(tmp_path, mini_dogs, models_yaml, "epochs: 1, batch_size: 4"))
    run_compare(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["models"]
    for m in saved:
        codes = [f["code"] for f in m["flags"]]
        assert "too_few_steps" in codes and "still_improving" in codes, codes
    write_report(tmp_path / "run")
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Still improving: cand" in md and "Too few optimizer steps: base" in md
    verdict = next(line for line in md.splitlines() if "cand" in line and "budget" in line)
    assert "still improving" in verdict


@pytest.mark.slow
def test_a_probe_without_a_validation_split_keeps_the_lowest_training_loss(tmp_path: Path, fresh_dogs: Path) -> None:
    cfg = load_config(
        _tiny(tmp_path, fresh_dogs, f"  - {{label: probe, {VIT}, finetune: head}}\n"), ["data.val_fraction=0"]
    )
    (m,) = run_compare(cfg, tmp_path / "run").models
    assert m.status == "ok", m.error
    assert m.val_accuracy is None and m.test_accuracy is not None and m.probe is not None
    assert all(math.isnan(g["val_accuracy"]) for g in m.probe["grid"]) and m.history[0].val_accuracy is None
