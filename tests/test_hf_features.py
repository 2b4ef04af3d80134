"""Hugging Face `transformers` models (`hf:` entries) through the features around training: trained at an
`img_size` other than their processor's and exported at it (the saved processor and the weights say the
trained size), their saliency maps (attention rollout for a ViT, Grad-CAM on a ConvNeXt's last stage),
and the bench's HF model through our loop. Tiny models built offline (tests/test_hf_models.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from test_hf_models import compare_hf_models, needs_transformers, save_tiny_convnext, save_tiny_vit

VIT_AT, CNX_AT = 32, 24  # the sizes trained at; the processors say 64 (ViT) and 32 (ConvNeXt)


@pytest.fixture(scope="module")
def sized_run(tmp_path_factory: pytest.TempPathFactory, mini_dogs: Path) -> Path:
    """`compare` of a tiny ViT whose processor says 64 px, trained at 32, and a ConvNeXt (short side 32,
    crop_pct 0.8) trained at 24: one epoch each on the miniature dogs."""
    base = tmp_path_factory.mktemp("hf_sized")
    vit, cnx = save_tiny_vit(base / "vit", size=64), save_tiny_convnext(base / "cnx")
    models = [
        f"{{label: vit_hf, hf: '{vit}', img_size: {VIT_AT}, lr: 0.003}}",
        f"{{label: cnx_hf, hf: '{cnx}', img_size: {CNX_AT}, finetune: top_fraction, fraction: 0.5}}",
    ]
    return compare_hf_models(base, mini_dogs, models, "{epochs: 1, batch_size: 6, warmup_epochs: 0.0}")


@needs_transformers
@pytest.mark.slow
def test_the_export_says_the_size_the_model_was_trained_at(sized_run: Path, tmp_path: Path) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from visionpoc.serving.export import export
    from visionpoc.serving.predict import Predictor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    for label, side, crop in (("vit_hf", VIT_AT, None), ("cnx_hf", CNX_AT, 0.8)):
        saved = json.loads((sized_run / label / "hf" / "preprocessor_config.json").read_text())
        assert saved["size"] == ({"height": side, "width": side} if crop is None else {"shortest_edge": side})
        export(sized_run, "safetensors", label, tmp_path)
        folder = tmp_path / label
        processor = AutoImageProcessor.from_pretrained(folder)  # what a team without visionpoc does
        plain = AutoModelForImageClassification.from_pretrained(folder).eval()
        pixels = processor(image, return_tensors="pt")["pixel_values"]  # (1, 3, side, side)
        assert pixels.shape == (1, 3, side, side), label
        assert getattr(processor, "crop_pct", None) == crop
        predictor = Predictor(sized_run, [label])
        tm = predictor.models[0]
        ours = predictor.preprocess(tm, image)  # the tensor visionpoc feeds the model, (1, 3, side, side)
        assert (ours - pixels).abs().mean() < 0.02, label  # the same preprocessing, up to the resize filter
        with torch.inference_mode():
            torch.testing.assert_close(plain(pixel_values=ours).logits, tm.model(ours), atol=1e-5, rtol=1e-4)
            theirs = plain(pixel_values=pixels).logits.softmax(-1)[0]
        top = predictor.predict_image(image, top=len(tm.class_names))[0]["top"]
        probs = {t["label"]: t["probability"] for t in top}
        assert tm.class_names[int(theirs.argmax())] == top[0]["label"], label
        np.testing.assert_allclose(theirs.numpy(), [probs[n] for n in tm.class_names], atol=0.02)


@needs_transformers
@pytest.mark.slow
def test_hf_vit_rollout_is_timms_on_the_same_weights(tmp_path: Path) -> None:
    """The rollout read from transformers' attention matrices equals the one read from timm's attention
    modules, on the same tiny ViT converted to timm; the model's attention path is left as it was."""
    import timm

    from test_hf_models import _timm_from_hf
    from visionpoc import models
    from visionpoc.config import ModelConfig
    from visionpoc.explain import attention_rollout, explain, grad_cam, is_vit

    hf = models.create_model(ModelConfig(label="v", hf=str(save_tiny_vit(tmp_path / "vit"))), 4).eval()
    tm = timm.create_model(
        "vit_base_patch16_224", pretrained=False, num_classes=4, img_size=32, patch_size=8, embed_dim=32, depth=2,
        num_heads=2, mlp_ratio=2.0,
    ).eval()  # fmt: skip
    tm.load_state_dict(_timm_from_hf(hf.state_dict(), 2), strict=False)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = hf.config._attn_implementation
    assert is_vit(hf)
    np.testing.assert_allclose(attention_rollout(hf, x), attention_rollout(tm, x), atol=1e-4)
    assert explain(hf, x)[1] == "attention rollout" and hf.config._attn_implementation == before
    with pytest.raises(ValueError, match="ViTForImageClassification: transformers gives no spatial feature map"):
        grad_cam(hf, x)  # a ViT's hidden states are tokens: Grad-CAM does not apply, and says so


@needs_transformers
@pytest.mark.slow
def test_hf_convnext_grad_cam_reads_its_last_stage(tmp_path: Path) -> None:
    import torch.nn.functional as F

    from visionpoc import models
    from visionpoc.config import ModelConfig
    from visionpoc.explain import explain

    mcfg = ModelConfig(label="c", hf=str(save_tiny_convnext(tmp_path / "cnx")), finetune="head")
    cnx = models.create_model(mcfg, 3).eval()
    models.apply_finetune(cnx, mcfg)  # a frozen backbone still passes the gradient to its features
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    heat, method = explain(cnx, x, target=2)
    assert method == "Grad-CAM" and heat.shape == (32, 32)
    store: dict[str, torch.Tensor] = {}
    hook = cnx.convnext.encoder.stages[-1].register_forward_hook(lambda _m, _i, out: store.update(a=out))
    try:
        logits = cnx(x.clone().requires_grad_(True))  # (1, 3)
    finally:
        hook.remove()
    (grad,) = torch.autograd.grad(logits[0, 2], store["a"])  # (1, C, h, w), the last stage's output
    cam = F.relu((grad.mean((2, 3), keepdim=True) * store["a"]).sum(1))[0]
    cam = F.interpolate(cam[None, None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    expect = ((cam - cam.min()) / (cam.max() - cam.min())).detach().numpy()
    np.testing.assert_allclose(heat, expect, atol=1e-5)


@needs_transformers
@pytest.mark.slow
def test_a_trained_hf_run_explains_at_its_size(sized_run: Path) -> None:
    from PIL import Image

    from visionpoc.serving.predict import Predictor

    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    shown = Predictor(sized_run).explain_image(image, size=64)
    assert {k: method for k, (method, _) in shown.items()} == {"vit_hf": "attention rollout", "cnx_hf": "Grad-CAM"}
    assert all(picture.size == (64, 64) for _, picture in shown.values())  # 32 and 24 px crops, enlarged


@needs_transformers
@pytest.mark.slow
def test_the_bench_builds_and_measures_an_hf_model(tmp_path: Path, one_thread: None) -> None:
    """A bench spec naming an `hf:` folder goes through the peers' plain step and through our loop fed by
    the prepared store, at the spec's size (the processor says 64 px, the bench measures 32)."""
    from visionpoc.bench.ours import ours
    from visionpoc.bench.peers import peer_step
    from visionpoc.bench.workload import Spec, build_model, plan, write_jpegs
    from visionpoc.data.prepared import prepare_store
    from visionpoc.data.store_batches import place

    p = plan(smoke=True)
    spec = Spec("hf_ours", "", "full", 32, 4, hf=str(save_tiny_vit(tmp_path / "vit", size=64)))
    peer = peer_step(spec, build_model, torch.device("cpu"), p)
    assert peer["img_s"] > 0 and peer["size"] == 32
    (tmp_path / "jpg").mkdir()
    split = write_jpegs(tmp_path / "jpg", 8, size=(40, 30))
    store = prepare_store([split.path(i) for i in range(len(split))], p.store_size, tmp_path, 0)
    got = ours(spec, store, place(store.images, torch.device("cpu")), split, p, torch.device("cpu"))
    assert got["timm"] == spec.hf and got["size"] == 32
    assert got["synthetic_img_s"] > 0 and got["prepared_img_s"] > 0 and got["input_efficiency"] > 0
