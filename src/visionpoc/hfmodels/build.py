"""A `transformers` image classifier as a visionpoc model: built with a new head (`create`), given a
logits-only forward and timm's attributes (`pretrained_cfg`, `get_classifier`), its processor mapped
onto timm's data config (`processor_data_config`), its architecture kept in the run (`save_architecture`)
and exported as a `save_pretrained` folder (`export_pretrained`, `load_pretrained_export`)."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import torch
from torch import nn

from visionpoc.config import ModelConfig
from visionpoc.errors import VisionpocError, WeightsError
from visionpoc.hfmodels.source import ARCH_DIR, HF_EXTRA, hf_source, hf_weights_error, revision

log = logging.getLogger(__name__)

RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL's codes
HEAD_NAMES = ("classifier", "head", "fc")  # what transformers calls the classifier of its image models


def transformers_module() -> ModuleType:
    """`transformers`, or an error naming the extra that installs it."""
    try:
        import transformers
    except ImportError as e:
        raise VisionpocError(f"`hf:` models need the `transformers` package: {HF_EXTRA}") from e
    return transformers


@contextmanager
def _quiet(tf: ModuleType) -> Iterator[None]:
    """No progress bars or load reports (the new head's 'mismatch' is intended) while loading."""
    tlog = tf.utils.logging
    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def create(mcfg: ModelConfig, num_classes: int, pretrained: bool, hub_online: Callable[[], bool]) -> nn.Module:
    """The `hf:` model with a new head for `num_classes` (its pretrained weights, or its architecture
    only), in float32. A hub id is read from the local cache only when `hub_online()` says the hub does
    not answer (then a missing model fails at once); a folder never touches the hub."""
    tf = transformers_module()
    assert mcfg.hf is not None
    src = hf_source(mcfg.hf)
    local_only = src.local or not hub_online()
    names = {i: f"LABEL_{i}" for i in range(num_classes)}
    kwargs: dict[str, Any] = {
        **mcfg.model_kwargs,
        "num_labels": num_classes,
        "id2label": names,
        "label2id": {v: k for k, v in names.items()},
    }
    with _quiet(tf):
        try:
            if pretrained:
                model = tf.AutoModelForImageClassification.from_pretrained(
                    src.ref, ignore_mismatched_sizes=True, local_files_only=local_only, dtype=torch.float32, **kwargs
                )
            else:
                config = tf.AutoConfig.from_pretrained(src.ref, local_files_only=local_only, **kwargs)
                model = tf.AutoModelForImageClassification.from_config(config, dtype=torch.float32)
            processor = tf.AutoImageProcessor.from_pretrained(src.ref, local_files_only=local_only)
        except OSError as e:
            raise hf_weights_error(mcfg.label, src, e) from e
        except ValueError as e:  # a config transformers has no image-classification class for
            raise WeightsError(
                f"model {mcfg.label!r}: {src.ref} is not an image classifier transformers can build "
                f"(AutoModelForImageClassification): {e}"
            ) from e
    return as_visionpoc(model, processor, mcfg, revision(src))


@functools.cache
def _logits_class(base: Any) -> type:
    """`base` (a transformers image classifier) whose forward takes the (B, 3, H, W) batch and returns
    the (B, classes) logits, and which names its classifier as timm models do."""
    interpolates = "interpolate_pos_encoding" in inspect.signature(base.forward).parameters

    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        extra = {"interpolate_pos_encoding": True} if interpolates and self.visionpoc_interpolate else {}
        out = base.forward(self, pixel_values=x, **extra)
        return out.logits if hasattr(out, "logits") else out[0]  # (B, C)

    def get_classifier(self: Any) -> nn.Module:
        head = self.get_submodule(self.pretrained_cfg["classifier"])
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        return linears[-1] if linears else head  # `Sequential(Flatten, Linear)`: its Linear

    return type(base.__name__, (base,), {"forward": forward, "get_classifier": get_classifier})


def as_visionpoc(model: Any, processor: Any, mcfg: ModelConfig, rev: str | None) -> nn.Module:
    """`model` with the logits forward and the attributes `visionpoc.models` reads, in place."""
    head = next((n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)), None)
    if head is None:
        raise WeightsError(
            f"model {mcfg.label!r}: {type(model).__name__} has no classifier module named {' or '.join(HEAD_NAMES)}"
        )
    model.__class__ = _logits_class(model.__class__)
    dcfg = processor_data_config(processor)
    size = getattr(model.config, "image_size", None)
    model.visionpoc_interpolate = mcfg.img_size is not None and mcfg.img_size != size
    model.pretrained_cfg = {**dcfg, "classifier": head, "hf_revision": rev}
    model.hf_processor = processor
    return cast(nn.Module, model.float())


def _pair(d: Any, *keys: str) -> dict[str, int]:
    """The processor's `size`/`crop_size` (a dict or transformers' SizeDict) as a plain dict of ints."""
    if d is None:
        return {}
    if isinstance(d, int):
        return {"shortest_edge": d}
    get = d.get if isinstance(d, dict) else lambda k: getattr(d, k, None)
    values = {k: get(k) for k in keys}
    return {k: int(v) for k, v in values.items() if v is not None}


def _interpolation(resample: Any) -> str:
    value = getattr(resample, "value", resample)  # PIL's Resampling enum, or torchvision's InterpolationMode
    if isinstance(value, str):
        return value.lower()
    return RESAMPLE.get(int(value), "bilinear") if value is not None else "bilinear"


def _geometry(p: Any) -> tuple[int, int, float, str]:
    """(height, width, crop_pct, crop_mode) of the processor's resize and crop, in timm's terms."""
    size = _pair(getattr(p, "size", None), "height", "width", "shortest_edge")
    crop = _pair(getattr(p, "crop_size", None), "height", "width") if getattr(p, "do_center_crop", False) else {}
    if "height" in size:  # resized to height x width whatever the aspect, then maybe center-cropped
        if crop:
            return crop["height"], crop["width"], crop["height"] / size["height"], "squash"
        return size["height"], size["width"], 1.0, "squash"
    if "shortest_edge" in size:
        side = size["shortest_edge"]
        if crop:
            return crop["height"], crop["width"], crop["height"] / side, "center"
        pct = getattr(p, "crop_pct", None)
        if pct is not None:  # ConvNeXt: under 384, short side to side / crop_pct then crop; from 384, warp
            return (side, side, float(pct), "center") if side < 384 else (side, side, 1.0, "squash")
        return side, side, 1.0, "center"  # a bare short-side resize: its central square
    raise WeightsError(
        f"{type(p).__name__}: its size {getattr(p, 'size', None)} is neither height/width nor shortest_edge; "
        "visionpoc cannot map it onto a fixed input size"
    )


def processor_data_config(p: Any) -> dict[str, Any]:
    """timm's data config (input_size, interpolation, mean, std, crop_pct, crop_mode) for an
    `AutoImageProcessor`: the same transforms then serve timm and transformers models."""
    h, w, crop_pct, mode = _geometry(p)
    factor = getattr(p, "rescale_factor", 1 / 255) if getattr(p, "do_rescale", True) else 1.0
    scale = 1.0 / (255.0 * factor)  # timm's pixels are in [0, 1]: mean/std rescaled to them
    mean, std = (p.image_mean, p.image_std) if getattr(p, "do_normalize", True) else ((0.0,) * 3, (1.0,) * 3)
    return {
        "input_size": (3, int(h), int(w)),
        "interpolation": _interpolation(getattr(p, "resample", None)),
        "mean": tuple(float(m) * scale for m in mean),
        "std": tuple(float(v) * scale for v in std),
        "crop_pct": float(crop_pct),
        "crop_mode": mode,
    }


# --------------------------------------------------------------------------------------- run files


def save_architecture(model: Any, model_dir: Path) -> Path:
    """`model_dir/hf/`: config.json (the new head's size included) and preprocessor_config.json, so a
    run's model rebuilds offline, without the hub."""
    folder = model_dir / ARCH_DIR
    model.config.save_pretrained(folder)
    model.hf_processor.save_pretrained(folder)
    return folder


def architecture_source(model_dir: Path, mcfg: ModelConfig) -> str:
    """What rebuilds the trained model: the run's own `hf/` folder, else (an older run) the entry's `hf:`."""
    folder = model_dir / ARCH_DIR
    if (folder / "config.json").is_file():
        return str(folder)
    log.warning("%s: no %s/config.json in the run; rebuilding from %s", mcfg.label, ARCH_DIR, mcfg.hf)
    return str(mcfg.hf)


def export_pretrained(model: Any, folder: Path, class_names: list[str]) -> tuple[Path, dict[str, Any]]:
    """`folder/` as `save_pretrained` writes it (config.json with the class names, model.safetensors,
    preprocessor_config.json) from a clean copy of the architecture (frozen layers as ordinary ones)."""
    tf = transformers_module()
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.id2label = dict(enumerate(class_names))
    config.label2id = {n: i for i, n in enumerate(class_names)}
    with _quiet(tf):
        plain = tf.AutoModelForImageClassification.from_config(config, dtype=torch.float32)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # FrozenBatchNorm2d has none
    if missing or unexpected:
        raise VisionpocError(f"the trained weights do not fit {type(plain).__name__}: {missing[:5]}, {unexpected[:5]}")
    plain.save_pretrained(folder)
    model.hf_processor.save_pretrained(folder)
    info = {"hf": type(plain).__name__, "weights": "model.safetensors"}
    return folder / "model.safetensors", info


def load_pretrained_export(folder: Path) -> nn.Module:
    """An `export_pretrained` folder rebuilt (eval mode, logits forward), offline."""
    tf = transformers_module()
    with _quiet(tf):
        model = tf.AutoModelForImageClassification.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        processor = tf.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    mcfg = ModelConfig(label=folder.name, hf=str(folder))
    return as_visionpoc(model, processor, mcfg, str(folder)).eval()
