"""Load the trained models of a finished run (for the report, prediction, serving and export):
the resolved config, the architecture with the run's fine-tuning policy, the best-on-validation
weights (safetensors), the model's preprocessing config and the class names."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionpoc import checkpoint, models
from visionpoc.config import Config, ModelConfig, load_config
from visionpoc.errors import VisionpocError
from visionpoc.results import RunResults, load_results
from visionpoc.runfiles import CONFIG_FILE, DATA_CONFIG_FILE


@dataclass
class TrainedModel:
    label: str
    mcfg: ModelConfig
    model: nn.Module  # in eval mode
    data_config: dict[str, Any]  # input_size, mean, std, crop_pct, interpolation, ...
    class_names: list[str]


def run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise VisionpocError(f"{path} not found: {run_dir} is not the output folder of a visionpoc run")
    return load_config(path)


def load_trained(
    run_dir: str | Path, label: str, results: RunResults | None = None, device: torch.device | str = "cpu"
) -> TrainedModel:
    """Rebuild model `label` of the run in `run_dir` and load its best weights."""
    run_dir = Path(run_dir)
    results = results or load_results(run_dir)
    mcfg = run_config(run_dir).model(label)
    nc = results.dataset.num_classes
    build = mcfg
    if mcfg.kind == "hf":  # the architecture the run kept beside the weights: no hub needed
        from visionpoc.hfmodels.build import architecture_source

        build = dataclasses.replace(mcfg, hf=architecture_source(run_dir / label, mcfg))
    model = models.create_model(build, nc, pretrained=False)
    models.apply_finetune(model, mcfg)  # same module types (FrozenBatchNorm2d) as when it was saved
    checkpoint.load_weights(model, run_dir / label / checkpoint.BEST, {"timm": mcfg.timm, "num_classes": str(nc)})
    dcfg_path = run_dir / label / DATA_CONFIG_FILE
    dcfg = json.loads(dcfg_path.read_text()) if dcfg_path.is_file() else models.data_config(model, mcfg)
    dcfg["input_size"] = tuple(dcfg["input_size"])
    dcfg["mean"], dcfg["std"] = tuple(dcfg["mean"]), tuple(dcfg["std"])
    return TrainedModel(label, mcfg, model.to(device).eval(), dcfg, list(results.dataset.class_names))


def trained_labels(run_dir: str | Path) -> list[str]:
    """Labels of the models of the run that trained successfully: not a deployed model (not trained here),
    nor one `visionpoc evaluate` added from another run (its config.yaml cannot rebuild it)."""
    own = {m.label for m in run_config(Path(run_dir)).models}
    return [m.label for m in load_results(run_dir).models if m.status == "ok" and not m.onnx and m.label in own]
