"""A `transformers` image classifier as a visionpoc model: built with a new head (`create`), given a
logits-only forward and timm's attributes (`pretrained_cfg`, `get_classifier`), its processor mapped
onto timm's data config (`processor_data_config`) and back at the size it trained at (`processor_at`), its
architecture kept in the run (`save_architecture`) and exported as a `save_pretrained` folder
(`export_pretrained`, `load_pretrained_export`). Its whole transformers output (attentions, hidden states)
is at `hf_output`, for the saliency maps."""

from __future__ import annotations

import functools
import inspect
import logging
import math
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

    def hf_output(self: Any, x: torch.Tensor, **flags: Any) -> Any:
        """transformers' whole output for the batch (`flags` such as `output_attentions=True`), at the
        size the model is trained at (position embeddings interpolated where it needs them)."""
        extra = {"interpolate_pos_encoding": True} if interpolates and self.visionpoc_interpolate else {}
        return base.forward(self, pixel_values=x, **extra, **flags)

    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        out = hf_output(self, x)
        return out.logits if hasattr(out, "logits") else out[0]  # (B, C)

    def get_classifier(self: Any) -> nn.Module:
        head = self.get_submodule(self.pretrained_cfg["classifier"])
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        return linears[-1] if linears else head  # `Sequential(Flatten, Linear)`: its Linear

    methods = {"forward": forward, "hf_output": hf_output, "get_classifier": get_classifier}
    return type(base.__name__, (base,), methods)


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


def processor_at(processor: Any, dcfg: dict[str, Any]) -> Any:
    """`processor`, or a copy whose resize and crop give the input of `dcfg` (the data config the model
    was trained and scored with: an entry's `img_size` changes its input size, and the crop follows at
    the same `crop_pct`), so that `AutoImageProcessor.from_pretrained` on a saved folder feeds the model
    what it learnt from. Everything else (mean, std, resample) stays the processor's."""
    h, w = (int(v) for v in dcfg["input_size"][-2:])
    if processor_data_config(processor)["input_size"][-2:] == (h, w):
        return processor
    pct = float(dcfg.get("crop_pct") or 1.0)
    size = _pair(getattr(processor, "size", None), "height", "width", "shortest_edge")
    crop = getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None) is not None
    changes: dict[str, Any] = {"crop_size": {"height": h, "width": w}} if crop else {}
    if "height" in size:  # a squash: timm resizes to input / crop_pct, then crops the input's size
        changes["size"] = (
            {"height": math.floor(h / pct), "width": math.floor(w / pct)} if crop else {"height": h, "width": w}
        )
    else:  # the short side: to input / crop_pct then a crop; ConvNeXt's own crop_pct does the same from its size
        changes["size"] = {"shortest_edge": math.floor(h / pct) if crop else h}
    resized = type(processor).from_dict({**processor.to_dict(), **changes})
    got = processor_data_config(resized)
    wanted = ((3, h, w), dcfg.get("crop_mode", got["crop_mode"]), round(pct, 3))
    if (got["input_size"], got["crop_mode"], round(got["crop_pct"], 3)) != wanted:  # e.g. ConvNeXt from 384 px
        log.warning(
            "%s cannot say the input visionpoc used (%s); it gives %s: preprocess with the run's data_config.json",
            type(processor).__name__,
            wanted,
            (got["input_size"], got["crop_mode"], got["crop_pct"]),
        )
    return resized


# --------------------------------------------------------------------------------------- run files


def save_architecture(model: Any, model_dir: Path, dcfg: dict[str, Any]) -> Path:
    """`model_dir/hf/`: config.json (the new head's size included) and preprocessor_config.json at the
    input size the model was trained at (`dcfg`), so a run's model rebuilds offline, without the hub."""
    folder = model_dir / ARCH_DIR
    model.config.save_pretrained(folder)
    processor_at(model.hf_processor, dcfg).save_pretrained(folder)
    return folder


def architecture_source(model_dir: Path, mcfg: ModelConfig) -> str:
    """What rebuilds the trained model: the run's own `hf/` folder, else (an older run) the entry's `hf:`."""
    folder = model_dir / ARCH_DIR
    if (folder / "config.json").is_file():
        return str(folder)
    log.warning("%s: no %s/config.json in the run; rebuilding from %s", mcfg.label, ARCH_DIR, mcfg.hf)
    return str(mcfg.hf)


def _positions_at(model: Any, plain: nn.Module, state: dict[str, torch.Tensor], side: tuple[int, int]) -> None:
    """`state`'s position embeddings resampled, in place, to `plain`'s (the trained input size `side`),
    as the model's own `interpolate_pos_encoding` did at every step: the export needs no flag at its forward."""
    for key, target in plain.state_dict().items():
        if key not in state or state[key].shape == target.shape:
            continue
        owner = model.get_submodule(key.rpartition(".")[0])
        resample = getattr(owner, "interpolate_pos_encoding", None)
        if not key.endswith("position_embeddings") or not callable(resample):
            raise VisionpocError(
                f"{type(model).__name__}: {key} is {tuple(state[key].shape)} for the processor's size and "
                f"{tuple(target.shape)} at the {side[0]}x{side[1]} input it trained at; visionpoc cannot resample "
                "it: export with --format onnx, or train without img_size"
            )
        with torch.no_grad():
            state[key] = resample(torch.zeros(target.shape), *side).detach().cpu()  # (1, prefix + patches, D)


def export_pretrained(
    model: Any, folder: Path, class_names: list[str], dcfg: dict[str, Any]
) -> tuple[Path, dict[str, Any]]:
    """`folder/` as `save_pretrained` writes it (config.json with the class names, model.safetensors,
    preprocessor_config.json) from a clean copy of the architecture (frozen layers as ordinary ones), at
    the input size the model was trained at (`dcfg`): a model that interpolated its position embeddings
    to an `img_size` is saved with them resampled and that `image_size`, its processor at that size."""
    tf = transformers_module()
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.id2label = dict(enumerate(class_names))
    config.label2id = {n: i for i, n in enumerate(class_names)}
    side = (int(dcfg["input_size"][-2]), int(dcfg["input_size"][-1]))
    if getattr(model, "visionpoc_interpolate", False):
        config.image_size = side[0] if isinstance(config.image_size, int) else list(side)
    with _quiet(tf):
        plain = tf.AutoModelForImageClassification.from_config(config, dtype=torch.float32)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _positions_at(model, plain, state, side)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # FrozenBatchNorm2d has none
    if missing or unexpected:
        raise VisionpocError(f"the trained weights do not fit {type(plain).__name__}: {missing[:5]}, {unexpected[:5]}")
    plain.save_pretrained(folder)
    processor_at(model.hf_processor, dcfg).save_pretrained(folder)
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
