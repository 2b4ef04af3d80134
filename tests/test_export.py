"""Export: ONNX round-trip through onnxruntime within tolerance (any batch size), and the safetensors
export rebuilt with plain timm giving the trained model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from test_predict import LABELS
from visionpoc.errors import VisionpocError
from visionpoc.serving.export import export, load_safetensors_export, read_onnx_check
from visionpoc.serving.loading import load_trained


def test_onnx_round_trip(run_dir: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    paths = export(run_dir, "onnx", out=tmp_path)
    for label in LABELS:
        folder = tmp_path / label
        assert {p for p in paths if p.parent == folder} == {
            folder / n for n in ("model.onnx", "preprocessing.json", "classes.json", "onnx_check.json")
        }
        check = read_onnx_check(folder / "model.onnx")
        assert check.ok and check.max_abs_diff <= check.tolerance
        assert check.tolerance == pytest.approx(1e-4 * max(1, check.max_abs_logit))
        assert str(check).startswith(f"onnx check [{label}]: max |Δ| = ") and str(check).endswith("OK")
        pre = json.loads((folder / "preprocessing.json").read_text())
        assert json.loads((folder / "classes.json").read_text()) == ["Chihuahua", "Shih-Tzu", "Afghan hound"]
        tm = load_trained(run_dir, label)
        assert tuple(pre["input_size"]) == tm.data_config["input_size"]
        assert tuple(pre["mean"]) == tm.data_config["mean"]
        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        for batch in (1, 5):  # the batch axis is dynamic
            x = torch.rand(batch, *pre["input_size"])
            with torch.inference_mode():
                ref = tm.model(x).numpy()
            got = session.run(["logits"], {"input": x.numpy()})[0]
            assert got.shape == (batch, 3)
            assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize(
    "label,timm_name,policy,kwargs",
    [
        ("cnn", "test_resnet", "top_fraction", {}),
        ("vit", "vit_tiny_patch16_224", "full", {"img_size": 32, "depth": 2}),
    ],
)
def test_safetensors_rebuilds_with_timm(
    run_dir: Path, tmp_path: Path, label: str, timm_name: str, policy: str, kwargs: dict[str, int]
) -> None:
    paths = export(run_dir, "safetensors", label=label, out=tmp_path)
    assert {p.name for p in paths} == {
        "model.safetensors",
        "model_config.json",
        "preprocessing.json",
        "classes.json",
    }
    assert [p.name for p in tmp_path.iterdir()] == [label]  # only the model asked for
    config = json.loads((tmp_path / label / "model_config.json").read_text())
    assert config["timm"] == timm_name and config["num_classes"] == 3
    assert config["finetune"]["policy"] == policy
    assert config["create_kwargs"] == kwargs
    model = load_safetensors_export(tmp_path / label)  # plain timm: BatchNorm2d, not FrozenBatchNorm2d
    if label == "cnn":
        assert any(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    tm = load_trained(run_dir, label)
    x = torch.randn(4, *tm.data_config["input_size"])
    with torch.inference_mode():
        torch.testing.assert_close(model(x), tm.model(x), rtol=0, atol=1e-6)


def test_a_failed_onnx_check_leaves_no_model(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An export that does not reproduce PyTorch is an error and no model.onnx is left to deploy, neither
    the new one nor an earlier one."""
    import visionpoc.serving.export as ex

    real = ex.check_onnx
    monkeypatch.setattr(ex, "check_onnx", lambda *a, **kw: real(*a, **{**kw, "rtol": -1.0}))  # always over
    folder = tmp_path / "cnn"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"an earlier export")
    (folder / "onnx_check.json").write_text("{}")
    with pytest.raises(VisionpocError, match=r"onnx check \[cnn\]: .* FAILED: .* no .*model\.onnx was written"):
        export(run_dir, "onnx", label="cnn", out=tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == []  # no model, no check, no temporary file


def test_export_errors(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(VisionpocError, match="choose from cnn, vit"):
        export(run_dir, "onnx", label="nope", out=tmp_path)
    with pytest.raises(VisionpocError, match="unknown export format"):
        export(run_dir, "tflite", out=tmp_path)  # type: ignore[arg-type]


def test_onnx_without_the_export_extra_says_what_to_install(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(VisionpocError, match=r"needs onnxruntime: pip install 'visionpoc\[export\]'"):
        export(run_dir, "onnx", out=tmp_path)
