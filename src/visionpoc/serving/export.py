"""Export the trained models of a run for deployment: ONNX (checked against PyTorch with onnxruntime)
or safetensors weights with the config to rebuild the model with timm alone. Each model's folder also
gets `preprocessing.json` (the timm data config the model expects) and `classes.json` (index -> name).

ONNX uses the TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`): it needs only torch
and `onnx`, works offline and exports timm's CNNs and ViTs at a fixed resolution with a dynamic batch
axis. The dynamo exporter (torch's default since 2.9) would add `onnxscript` and a much slower export
for no gain on these graphs. After export, onnxruntime runs a random batch and the largest logit
difference must be within `ONNX_RTOL` x max(1, largest |logit|). The check runs on the temporary file,
before it is renamed to `model.onnx`: an over-tolerance export is an error and leaves no `model.onnx`
behind; a passing check is saved next to the model (`onnx_check.json`).

The safetensors export holds the weights of a plain `timm.create_model(timm, num_classes=..., **kwargs)`
(frozen BatchNorm layers are saved as ordinary BatchNorm), so `load_safetensors_export` needs no
visionpoc code beyond ten lines. An `hf:` (transformers) model is exported as `save_pretrained` writes
it, with the class names in its config.json: `AutoModelForImageClassification.from_pretrained(folder)`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from visionpoc.config import ModelConfig
from visionpoc.errors import ConfigError, VisionpocError
from visionpoc.runfiles import EXPORT_DIR, atomic_write, atomic_write_json
from visionpoc.serving.loading import TrainedModel, load_trained, trained_labels

log = logging.getLogger(__name__)

FORMATS = ("onnx", "safetensors")
ONNX_RTOL = 1e-4  # fp32: |Δ| <= 1e-4 * max(1, max|logit|)
OPSET = 17
CHECK_FILE = "onnx_check.json"


@dataclass
class OnnxCheck:
    """onnxruntime vs PyTorch logits on a random batch."""

    label: str
    max_abs_diff: float
    tolerance: float
    max_abs_logit: float
    batch: int
    ok: bool

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (
            f"onnx check [{self.label}]: max |Δ| = {self.max_abs_diff:.2e} (tolerance {self.tolerance:.2e}, "
            f"batch of {self.batch}) {verdict}"
        )


def export(
    run_dir: str | Path, fmt: Literal["onnx", "safetensors"], label: str | None = None, out: str | Path | None = None
) -> list[Path]:
    """Export every successful model of the run (or only `label`) to `out/<label>/` (default
    `RUN_DIR/export/<label>/`); returns the files written (logged only at debug level: the caller shows them)."""
    if fmt not in FORMATS:
        raise VisionpocError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    labels = trained_labels(run_dir)
    if label is not None and label not in labels:
        raise VisionpocError(
            f"{run_dir}: no successfully trained model {label!r}; choose from {', '.join(labels) or '(none)'}"
        )
    out_dir = Path(out) if out is not None else run_dir / EXPORT_DIR
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file: give a folder (each model's files go in <out>/<label>/)")
    written: list[Path] = []
    for lab in [label] if label else labels:
        log.info("[%s] exporting to %s in %s", lab, fmt, out_dir / lab)  # the phase; the files are the result
        tm = load_trained(run_dir, lab)
        folder = out_dir / lab
        written.append(export_onnx(tm, folder) if fmt == "onnx" else export_safetensors(tm, folder))
        written += _write_sidecars(tm, folder)
        written.append(folder / (CHECK_FILE if fmt == "onnx" else "model_config.json"))
    return written


def _write_sidecars(tm: TrainedModel, folder: Path) -> list[Path]:
    pre = {
        **tm.data_config,
        "input_name": "input",
        "output_name": "logits",
        "input_layout": "NCHW, RGB, float32: resize, center-crop, scale to [0, 1], then (x - mean) / std",
    }
    return [
        atomic_write_json(folder / "preprocessing.json", pre),
        atomic_write_json(folder / "classes.json", tm.class_names),
    ]


# ---------------------------------------------------------------------------------------------- onnx


def export_onnx(tm: TrainedModel, folder: Path) -> Path:
    """`folder/model.onnx` (input `input` (B, 3, H, W), output `logits` (B, C), dynamic B), checked
    with onnxruntime; the check is logged and saved as `onnx_check.json`."""
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise VisionpocError(
            f"ONNX export needs {' and '.join(missing)}: pip install 'visionpoc[export]' (or pip install -e '.[export]')"
        )
    model = tm.model.cpu().eval()
    x = torch.zeros(1, *tm.data_config["input_size"])  # (1, 3, H, W)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
            torch.onnx.export(
                model,
                (x,),
                str(tmp),
                dynamo=False,
                opset_version=OPSET,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )

    path = folder / "model.onnx"
    checks: list[OnnxCheck] = []

    def write_and_check(tmp: Path) -> None:
        try:
            write(tmp)
        except Exception as e:
            raise VisionpocError(f"ONNX export of {tm.label!r} ({tm.mcfg.name}) failed: {type(e).__name__}: {e}") from e
        checks.append(check_onnx(tmp, model, tuple(tm.data_config["input_size"]), label=tm.label))
        if not checks[-1].ok:  # raised inside atomic_write: the temp file goes, model.onnx is never written
            raise VisionpocError(
                f"{checks[-1]}: the export does not reproduce the PyTorch model; no {path} was written"
            )

    try:
        atomic_write(path, write_and_check)
    except VisionpocError:
        for stale in (path, folder / CHECK_FILE):  # an earlier export must not pass for this one
            stale.unlink(missing_ok=True)
        raise
    atomic_write_json(folder / CHECK_FILE, asdict(checks[-1]))
    log.debug("%s -> %s; %s", tm.label, path, checks[-1])  # a result: the caller shows it (read_onnx_check)
    return path


def check_onnx(
    path: Path,
    model: nn.Module,
    input_size: tuple[int, ...],
    label: str = "",
    rtol: float = ONNX_RTOL,
    batch: int = 3,
    seed: int = 0,
) -> OnnxCheck:
    """Run `path` in onnxruntime and `model` in PyTorch on the same random batch (batch > 1 also checks
    the dynamic batch axis) and compare the logits."""
    import onnxruntime as ort

    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(seed))  # (B, 3, H, W)
    with torch.inference_mode():
        ref = model.cpu().eval()(x).float().numpy()  # (B, C)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": x.numpy()})[0]
    diff = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max())
    tol = rtol * max(1.0, scale)
    return OnnxCheck(label, diff, tol, scale, batch, bool(np.isfinite(diff) and diff <= tol))


def read_onnx_check(onnx_path: str | Path) -> OnnxCheck:
    """The check `export` saved next to `onnx_path`."""
    return OnnxCheck(**json.loads((Path(onnx_path).parent / CHECK_FILE).read_text()))


# --------------------------------------------------------------------------------------- safetensors


def _plain_timm(mcfg: ModelConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """The run's architecture as plain timm builds it (no fine-tuning wrappers), and its kwargs."""
    kwargs: dict[str, Any] = dict(mcfg.model_kwargs)
    if mcfg.img_size is not None:
        kwargs["img_size"] = mcfg.img_size
    try:
        return timm.create_model(mcfg.timm, pretrained=False, num_classes=num_classes, **kwargs), kwargs
    except TypeError:
        if "img_size" not in kwargs:
            raise
        del kwargs["img_size"]  # a CNN: any resolution, img_size only sets the data config
        return timm.create_model(mcfg.timm, pretrained=False, num_classes=num_classes, **kwargs), kwargs


def export_safetensors(tm: TrainedModel, folder: Path) -> Path:
    """`folder/model.safetensors` (weights of the plain timm model) and `folder/model_config.json`; an
    `hf:` model's folder is also what `save_pretrained` writes (config.json, preprocessor_config.json)."""
    nc = len(tm.class_names)
    if tm.mcfg.kind == "hf":
        return _export_hf(tm, folder)
    plain, kwargs = _plain_timm(tm.mcfg, nc)
    state = {k: v.detach().cpu() for k, v in tm.model.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # FrozenBatchNorm2d has no num_batches_tracked (unused in eval mode); anything else is a real mismatch
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise VisionpocError(
            f"{tm.label}: the trained weights do not fit a plain {tm.mcfg.timm}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    config = {
        "format": "visionpoc-safetensors-1",
        "label": tm.label,
        "timm": tm.mcfg.timm,
        "num_classes": nc,
        "create_kwargs": kwargs,
        "finetune": {
            "policy": tm.mcfg.finetune,
            "fraction": tm.mcfg.fraction,
            "pretrained": tm.mcfg.pretrained,
        },
        "weights": "model.safetensors",
        "rebuild": "timm.create_model(timm, pretrained=False, num_classes=num_classes, **create_kwargs)"
        ".load_state_dict(safetensors.torch.load_file(weights)); model.eval()",
    }
    weights = {k: v.contiguous() for k, v in plain.state_dict().items()}
    meta = {"timm": tm.mcfg.timm, "num_classes": str(nc), "config": json.dumps(config)}
    path = atomic_write(folder / "model.safetensors", lambda tmp: save_file(weights, str(tmp), metadata=meta))
    atomic_write_json(folder / "model_config.json", config)
    log.debug("%s -> %s", tm.label, path)  # a result: the caller shows it
    return path


def _export_hf(tm: TrainedModel, folder: Path) -> Path:
    """A transformers model: `save_pretrained`'s folder, which `from_pretrained(folder)` reloads offline."""
    from visionpoc.hfmodels.build import export_pretrained

    path, info = export_pretrained(tm.model, folder, tm.class_names, tm.data_config)
    config = {
        "format": "visionpoc-safetensors-1",
        "label": tm.label,
        "hf": tm.mcfg.hf,
        "architecture": info["hf"],
        "num_classes": len(tm.class_names),
        "finetune": {"policy": tm.mcfg.finetune, "fraction": tm.mcfg.fraction, "pretrained": tm.mcfg.pretrained},
        "weights": info["weights"],
        "rebuild": "transformers.AutoModelForImageClassification.from_pretrained(folder); model.eval(); "
        "logits = model(pixel_values=x).logits",
    }
    atomic_write_json(folder / "model_config.json", config)
    return path


def load_safetensors_export(folder: str | Path) -> nn.Module:
    """Rebuild an exported model (eval mode) from `folder/model_config.json` and its weights: with timm,
    or with transformers for an `hf:` model (its forward then returns the logits, as timm's does)."""
    folder = Path(folder)
    config = json.loads((folder / "model_config.json").read_text())
    if config.get("hf"):
        from visionpoc.hfmodels.build import load_pretrained_export

        return load_pretrained_export(folder)
    model = timm.create_model(
        config["timm"], pretrained=False, num_classes=config["num_classes"], **config["create_kwargs"]
    )
    model.load_state_dict(load_file(str(folder / config["weights"])))
    return model.eval()
