"""Hugging Face `transformers` models (`hf:` entries): tiny ViT and ConvNeXt built from configs and saved
with `save_pretrained`, loaded through visionpoc with a new head, trained by `compare`, exported and
reloaded offline; the processor's preprocessing, the policies, the revision, preflight and the offline error.
Importing transformers takes seconds on a busy runner: the tests that build a model are marked slow."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from visionpoc import models
from visionpoc.config import ModelConfig, load_config
from visionpoc.errors import VisionpocError, WeightsError
from visionpoc.hfmodels import source
from visionpoc.hfmodels.build import processor_data_config

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="transformers is not installed (pip install '.[hf]')"
)
CUSTOM_MEAN, CUSTOM_STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)


def tiny_vit_config(size: int = 32, **changes: Any) -> Any:
    """A 2-layer ViT's config: hidden 32, patch 8, 5 classes (`changes` override any field)."""
    from transformers import ViTConfig

    fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8)
    return ViTConfig(**{**fields, "image_size": size, "num_labels": 5, **changes})


def save_tiny_vit(folder: Path, size: int = 32, mean: tuple[float, ...] = (0.5,) * 3) -> Path:
    """A 2-layer ViT (hidden 32, patch 8) with 5 classes and its processor, as `save_pretrained` writes them."""
    from transformers import ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    ViTForImageClassification(tiny_vit_config(size)).save_pretrained(folder)
    ViTImageProcessor(size={"height": size, "width": size}, image_mean=list(mean), image_std=[0.5] * 3).save_pretrained(
        folder
    )
    return folder


def save_tiny_convnext(folder: Path) -> Path:
    """A 2-stage ConvNeXt (dims 8, 16; one block each), 7 classes, a processor with its own mean/std."""
    from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessor

    torch.manual_seed(0)
    cfg = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32, num_labels=7)
    ConvNextForImageClassification(cfg).save_pretrained(folder)
    ConvNextImageProcessor(
        size={"shortest_edge": 32}, crop_pct=0.8, image_mean=list(CUSTOM_MEAN), image_std=list(CUSTOM_STD)
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hf_models")
    return {"vit": save_tiny_vit(base / "vit"), "cnx": save_tiny_convnext(base / "cnx")}


# ------------------------------------------------------------------------ fast: no transformers needed


def test_processor_maps_onto_timms_data_config() -> None:
    vit = SimpleNamespace(
        size={"height": 40, "width": 48},
        do_center_crop=False,
        resample=3,
        image_mean=CUSTOM_MEAN,
        image_std=CUSTOM_STD,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
    )
    assert processor_data_config(vit) == {
        "input_size": (3, 40, 48),
        "interpolation": "bicubic",
        "mean": pytest.approx(CUSTOM_MEAN),
        "std": pytest.approx(CUSTOM_STD),
        "crop_pct": 1.0,
        "crop_mode": "squash",  # resized to height x width whatever the aspect, as the processor does
    }
    # resize the short side to 256, center-crop 224 (DeiT, BiT); pixels scaled to [-1, 1] by a 1/127.5 factor
    deit = SimpleNamespace(
        size={"shortest_edge": 256},
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        resample=2,
        image_mean=(1.0, 1.0, 1.0),
        image_std=(1.0, 1.0, 1.0),
        do_rescale=True,
        rescale_factor=1 / 127.5,
    )
    d = processor_data_config(deit)
    assert d["input_size"] == (3, 224, 224) and d["crop_pct"] == 224 / 256 and d["crop_mode"] == "center"
    assert d["interpolation"] == "bilinear" and d["mean"] == pytest.approx((0.5,) * 3) == d["std"]
    convnext = SimpleNamespace(
        size={"shortest_edge": 224}, crop_pct=0.9, resample=3, image_mean=CUSTOM_MEAN, image_std=CUSTOM_STD
    )
    d = processor_data_config(convnext)
    assert d["input_size"] == (3, 224, 224) and d["crop_pct"] == 0.9 and d["crop_mode"] == "center"
    with pytest.raises(WeightsError, match="neither height/width nor shortest_edge"):
        processor_data_config(SimpleNamespace(size={"longest_edge": 800}, image_mean=(0,) * 3, image_std=(1,) * 3))


def fake_hub_cache(cache: Path, repo_id: str, commit: str) -> None:
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/config.json}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")


def test_source_revision_and_preflight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    fake_hub_cache(tmp_path / "cache", "owner/cached", commit)
    offline = lambda: False  # noqa: E731
    assert source.revision(source.hf_source("owner/cached")) == commit
    assert source.source_problem("owner/cached", offline) is None
    missing = source.source_problem("owner/elsewhere", offline)
    assert (
        missing is not None
        and "not in the Hugging Face hub cache" in missing
        and "hf download owner/elsewhere" in missing
    )
    assert source.source_problem("owner/elsewhere", lambda: True) is None  # online: it will be downloaded
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in str(source.source_problem(str(tmp_path / "empty"), offline))
    assert "is not a folder" in str(source.source_problem(str(tmp_path / "absent" / "model"), offline))
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert source.source_problem(str(tmp_path / "empty"), offline) is None
    assert source.revision(source.hf_source(str(tmp_path / "empty"))) == str((tmp_path / "empty").resolve())


def test_preflight_names_the_hf_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visionpoc import preflight

    cfg = load_config(None, [f"models=[{{label: mine, hf: '{tmp_path / 'nothing'}'}}]"])
    (problem,) = preflight.model_problems(cfg)
    assert problem.startswith("models.0 (mine): hf: ") and "--set models.0.hf=FOLDER_OR_ID" in problem
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a)
    )
    (problem,) = preflight.model_problems(cfg)
    assert "pip install 'visionpoc[hf]'" in problem


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(VisionpocError, match=r"pip install 'visionpoc\[hf\]'"):
        models.create_model(ModelConfig(label="x", hf="owner/model"), 3)


def test_packaged_candidates_name_an_hf_model() -> None:
    cfg = load_config(Path(models.__file__).parent / "configs" / "candidates.yaml")
    (hf,) = [m for m in cfg.models if m.kind == "hf"]
    assert hf.hf == "google/vit-base-patch16-224-in21k" and hf.name == hf.hf and hf.timm == ""


# --------------------------------------------------------------------------------- slow: real models


@needs_transformers
@pytest.mark.slow
def test_models_policies_and_attention(hf_folders: dict[str, Path]) -> None:
    vit_cfg = ModelConfig(label="v", hf=str(hf_folders["vit"]), finetune="head")
    vit = models.create_model(vit_cfg, 3)
    assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, 3)  # a tensor of logits, for the new head's 3 classes
    assert models.classifier(vit) is vit.classifier and vit.classifier.out_features == 3
    blocks = models.transformer_blocks(vit)  # vit.layers.N (transformers 5), vit.encoder.layer.N (4)
    assert models.is_transformer(vit) and len(blocks) == 2 and blocks[1].endswith(("layer.1", "layers.1"))
    models.apply_finetune(vit, vit_cfg)
    head = sum(p.numel() for p in vit.classifier.parameters())
    assert models.count_params(vit)[1] == head
    top = dataclasses.replace(vit_cfg, finetune="top_fraction", fraction=0.5)
    vit = models.create_model(top, 3)
    models.apply_finetune(vit, top)
    layers = vit.vit.layers if hasattr(vit.vit, "layers") else vit.vit.encoder.layer
    expect = sum(p.numel() for m in (layers[1], vit.vit.layernorm, vit.classifier) for p in m.parameters())
    assert models.count_params(vit)[1] == expect  # the top block, the final norm and the head
    assert not any(p.requires_grad for m in (vit.vit.embeddings, layers[0]) for p in m.parameters())

    cnx_cfg = ModelConfig(label="c", hf=str(hf_folders["cnx"]), finetune="top_fraction", fraction=0.5)
    cnx = models.create_model(cnx_cfg, 4)
    assert not models.is_transformer(cnx) and cnx(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    models.apply_finetune(cnx, cnx_cfg)
    stages = cnx.convnext.encoder.stages  # 4 conv layers: the stem, stage 0's, stage 1's downsampling and block
    assert all(p.requires_grad for p in stages[1].downsampling_layer[1].parameters())
    assert not any(p.requires_grad for m in (cnx.convnext.embeddings, stages[0]) for p in m.parameters())


@needs_transformers
@pytest.mark.slow
def test_an_hf_model_compiles_and_runs_under_bf16_autocast(hf_folders: dict[str, Path]) -> None:
    """What the loop does to a model on CUDA, here on the CPU: `torch.compile` traces the loaded HF model
    (the AOT-autograd path of inductor, without its C++ code generation) to the same logits and gradients
    as eager, and a bf16-autocast forward and backward give finite bf16 logits and float32 gradients."""
    mcfg = ModelConfig(label="v", hf=str(hf_folders["vit"]), finetune="full")
    eager = models.create_model(mcfg, 3)
    twin = models.create_model(mcfg, 3)
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, backend="aot_eager")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grads = []
    for m in (eager, compiled):
        out = m(x)
        out.square().mean().backward()
        grads.append(twin.classifier.weight.grad if m is compiled else eager.classifier.weight.grad)
        torch.testing.assert_close(out, eager(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    eager.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = eager(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().square().mean().backward()
    g = eager.classifier.weight.grad
    assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0


@needs_transformers
@pytest.mark.slow
def test_preprocessing_follows_the_processor(hf_folders: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor

    from visionpoc.data import augment

    folder = save_tiny_vit(tmp_path / "vit40", size=40, mean=CUSTOM_MEAN)
    for path in (folder, hf_folders["cnx"]):
        mcfg = ModelConfig(label="m", hf=str(path))
        dcfg = models.data_config(models.create_model(mcfg, 3), mcfg)
        processor = AutoImageProcessor.from_pretrained(path)
        assert dcfg["mean"] == pytest.approx(tuple(processor.image_mean))
        img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
        ours = augment.eval_transform(dcfg)(img)  # (3, H, W), the transform the loaders build
        theirs = processor(img, return_tensors="pt")["pixel_values"][0]  # (3, H, W)
        assert ours.shape == theirs.shape and (ours - theirs).abs().mean() < 0.02, path.name
    assert dcfg["input_size"] == (3, 32, 32) and dcfg["std"] == pytest.approx(CUSTOM_STD)


@needs_transformers
@pytest.mark.slow
def test_offline_missing_hub_id_is_a_weights_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    with pytest.raises(WeightsError) as e:
        models.create_model(ModelConfig(label="seed", hf="nobody/not-cached-vit"), 3)
    text = str(e.value)
    assert "model 'seed': could not fetch the pretrained weights" in text and "Fix: run once with internet" in text


# ------------------------------------------------------------------ slow: trained by compare, exported


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory, mini_dogs: Path, hf_folders: dict[str, Path]) -> Path:
    """`compare` of the tiny ViT (full fine-tuning) and ConvNeXt (top half) on the miniature dogs."""

    return compare_hf_models(
        tmp_path_factory.mktemp("hf_run"),
        mini_dogs,
        [
            f"{{label: vit_hf, hf: '{hf_folders['vit']}', lr: 0.003, head_init_scale: null}}",
            f"{{label: cnx_hf, hf: '{hf_folders['cnx']}', finetune: top_fraction, fraction: 0.5, lr: 0.003}}",
            f"{{label: vit_probe, hf: '{hf_folders['vit']}', finetune: head}}",  # the cached linear probe
        ],
        "{epochs: 4, batch_size: 6, warmup_epochs: 0.5, label_smoothing: 0.0}",
    )


def compare_hf_models(base: Path, mini_dogs: Path, models: list[str], train: str) -> Path:
    """`compare` of the `models` (YAML flow mappings) with `train` settings on the miniature dogs, into
    `base/run`; every model must finish."""
    from visionpoc.compare import run_compare

    cfg = base / "hf.yaml"
    cfg.write_text(
        f"data: {{source: stanford_dogs, root: '{mini_dogs}', val_fraction: 0.2, num_workers: 0, download: false}}\n"
        "models:\n" + "".join(f"  - {m}\n" for m in models) + f"train: {train}\n"
    )
    results = run_compare(load_config(cfg), base / "run")
    assert [m.status for m in results.models] == ["ok"] * len(models), [m.error for m in results.models]
    return base / "run"


@needs_transformers
@pytest.mark.slow
def test_compare_trains_hf_models_and_records_them(hf_run: Path, hf_folders: dict[str, Path]) -> None:
    from visionpoc.results import load_results

    res = {m.label: m for m in load_results(hf_run).models}
    vit, cnx, probe = res["vit_hf"], res["cnx_hf"], res["vit_probe"]
    assert probe.probe is not None and probe.trainable_params == 32 * 3 + 3  # the head on the features
    assert probe.test_accuracy is not None
    assert vit.history[-1].train_loss < vit.history[0].train_loss  # it learns through the project's loop
    assert vit.test_accuracy is not None and cnx.test_accuracy is not None
    assert vit.hf == str(hf_folders["vit"]) and vit.timm == vit.hf
    assert vit.hf_revision == str(hf_folders["vit"].resolve())  # a folder: its absolute path
    assert cnx.trainable_params is not None and cnx.params is not None and cnx.trainable_params < cnx.params
    dcfg = json.loads((hf_run / "cnx_hf" / "data_config.json").read_text())
    assert dcfg["mean"] == pytest.approx(CUSTOM_MEAN) and dcfg["crop_pct"] == pytest.approx(0.8)
    saved = json.loads((hf_run / "vit_hf" / "hf" / "config.json").read_text())
    assert len(saved["id2label"]) == 3  # the new head's classes: the run rebuilds it from this file


@needs_transformers
@pytest.mark.slow
def test_export_and_offline_reload_give_the_same_logits(
    hf_run: Path, hf_folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort

    from visionpoc.serving.export import export, load_safetensors_export
    from visionpoc.serving.loading import load_trained

    # the source folders gone and the hub off: the run's own hf/ folder rebuilds each model
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    for name, folder in hf_folders.items():
        os.rename(folder, tmp_path / name)
    try:
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        for label in ("vit_hf", "cnx_hf"):
            tm = load_trained(hf_run, label)
            with torch.inference_mode():
                ref = tm.model(x)
            export(hf_run, "safetensors", label, tmp_path / "st")
            reloaded = load_safetensors_export(tmp_path / "st" / label)
            with torch.inference_mode():
                torch.testing.assert_close(reloaded(x), ref, atol=1e-5, rtol=1e-4)
            config = json.loads((tmp_path / "st" / label / "config.json").read_text())
            assert list(config["id2label"].values()) == tm.class_names  # a plain from_pretrained names them
            export(hf_run, "onnx", label, tmp_path / "onnx")
            session = ort.InferenceSession(str(tmp_path / "onnx" / label / "model.onnx"))
            got = session.run(["logits"], {"input": x.numpy()})[0]
            np.testing.assert_allclose(got, ref.numpy(), atol=1e-4, rtol=1e-3)
    finally:
        for name, folder in hf_folders.items():
            os.rename(tmp_path / name, folder)


# ------------------------------------------------- the seed's checkpoint: HF vs timm, where both are cached

SEED_HF, SEED_TIMM = "google/vit-base-patch16-224-in21k", "vit_base_patch16_224.orig_in21k"


def _timm_from_hf(hf_state: dict[str, torch.Tensor], depth: int) -> dict[str, Any]:
    """The HF ViT's backbone weights under timm's names (q, k, v fused into one qkv)."""
    out: dict[str, Any] = {
        "cls_token": hf_state["vit.embeddings.cls_token"],
        "pos_embed": hf_state["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf_state["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf_state["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf_state["vit.layernorm.weight"],
        "norm.bias": hf_state["vit.layernorm.bias"],
    }
    for i in range(depth):
        h = f"vit.layers.{i}." if f"vit.layers.{i}.attention.q_proj.weight" in hf_state else f"vit.encoder.layer.{i}."
        new = h.startswith("vit.layers")
        att = (
            ["attention.q_proj", "attention.k_proj", "attention.v_proj"]
            if new
            else ["attention.attention.query", "attention.attention.key", "attention.attention.value"]
        )
        names = {
            "attn.proj": "attention.o_proj" if new else "attention.output.dense",
            "norm1": "layernorm_before",
            "norm2": "layernorm_after",
            "mlp.fc1": "mlp.fc1" if new else "intermediate.dense",
            "mlp.fc2": "mlp.fc2" if new else "output.dense",
        }
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([hf_state[f"{h}{a}.{kind}"] for a in att])
            for t, s in names.items():
                out[f"blocks.{i}.{t}.{kind}"] = hf_state[f"{h}{s}.{kind}"]
    return out


@needs_transformers
@pytest.mark.slow
def test_weight_conversion_on_a_tiny_vit(tmp_path: Path) -> None:
    """The conversion the seed's check uses, on a tiny ViT of both libraries: the same logits."""
    import timm
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    hf_cfg = tiny_vit_config(num_labels=4, layer_norm_eps=1e-6, hidden_act="gelu")
    ViTForImageClassification(hf_cfg).save_pretrained(tmp_path / "vit")
    save_tiny_vit(tmp_path / "proc")  # only its processor
    (tmp_path / "proc" / "preprocessor_config.json").rename(tmp_path / "vit" / "preprocessor_config.json")
    hf_model = models.create_model(ModelConfig(label="hf", hf=str(tmp_path / "vit")), 4).eval()
    tm = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        num_classes=4,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
    ).eval()
    missing, unexpected = tm.load_state_dict(_timm_from_hf(hf_model.state_dict(), 2), strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    tm.head.load_state_dict(hf_model.classifier.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(hf_model(x), tm(x), atol=1e-5, rtol=1e-4)


@needs_transformers
@pytest.mark.slow
def test_seed_checkpoint_matches_timms_vit_in21k() -> None:
    """The original PoC's ViT-B/16 from the hub is timm's `vit_base_patch16_224.orig_in21k`: the same
    backbone, so the same features and, with the same head, the same logits."""
    import timm
    from timm.models import get_pretrained_cfg

    hub = get_pretrained_cfg(SEED_TIMM).hf_hub_id  # type: ignore[union-attr]
    missing = [n for n, repo in ((SEED_HF, SEED_HF), (SEED_TIMM, hub)) if source.cached_file(repo) is None]
    if missing:
        pytest.skip(f"not in the local Hugging Face cache: {', '.join(missing)} (fill it once with `hf download`)")
    hf_model = models.create_model(ModelConfig(label="hf", hf=SEED_HF), 5)
    tm = timm.create_model(SEED_TIMM, pretrained=True, num_classes=5).eval()
    tm.load_state_dict(_timm_from_hf(hf_model.state_dict(), len(tm.blocks)), strict=False)
    tm.head.load_state_dict(hf_model.classifier.state_dict())  # the same new head on both
    reference = timm.create_model(SEED_TIMM, pretrained=True, num_classes=5).state_dict()
    converted = tm.state_dict()
    assert all(torch.allclose(reference[k], converted[k], atol=1e-6) for k in reference if not k.startswith("head"))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(hf_model.eval()(x), tm(x), atol=1e-3, rtol=1e-3)  # LayerNorm eps 1e-12 vs 1e-6
