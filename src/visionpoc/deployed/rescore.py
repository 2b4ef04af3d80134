"""`visionpoc evaluate`: score one model on a dataset split and write results that `visionpoc report` reads.

The model is a deployed ONNX file (with `--preprocess` and `--classes`), a folder written by `visionpoc
export --format onnx` (its `model.onnx`, `preprocessing.json` and `classes.json`), or a model of a
finished run (`RUN_DIR` and `--label`, rebuilt with its trained weights). Its classes are matched to the
dataset's by name (`spec.match_classes`), as for an `onnx:` entry of a config.

Where the results go (`--out`): a new folder gets a run of its own (config.yaml, results.json, the
predictions); a finished run's folder gets the model added to its results (under `--label`, replacing an
earlier evaluation of that label, never one of the run's own models), scored on that run's own splits, so
that `visionpoc report` puts it beside the run's models with the paired tests. `--split test` scores
validation and test (as `compare` does), `val` or `train` that split alone (its column of the table).
The model's price at inference is measured as `compare` measures it (`inference.cost.price_one`, under the
`inference` settings of the config in use: the run's own when the model joins a run), unless
`inference.enabled` is false or `--no-price` is given.
This module sits on the features floor: it reads runs through `serving.loading` and data through `compare`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from visionpoc.config import Config, ModelConfig, PreprocessConfig, save_config
from visionpoc.deployed import spec
from visionpoc.deployed.spec import Keys
from visionpoc.errors import ConfigError, VisionpocError
from visionpoc.evaluate import EvalStats, summarize
from visionpoc.results import (
    ModelResult,
    RunResults,
    load_results,
    save_predictions,
    save_results,
)
from visionpoc.runfiles import CONFIG_FILE, PREDICTIONS_FILE, RESULTS_FILE

log = logging.getLogger(__name__)

FLAGS = Keys("--model", "--preprocess", "--classes")
Split = Literal["test", "val", "train"]


@dataclass
class Evaluated:
    """What `evaluate` wrote: the results folder, the model's result, whether it joined an existing run."""

    out_dir: Path
    result: ModelResult
    added: bool


def preprocess_of(text: str | None) -> PreprocessConfig | None:
    """`--preprocess`: a YAML file, or an inline YAML mapping (`{size: 299, layout: NHWC}`)."""
    import yaml

    from visionpoc.typed import from_dict

    if text is None:
        return None
    path = Path(text).expanduser()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8") if path.is_file() else text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--preprocess: not valid YAML ({e}); give a file or a mapping like '{{size: 224}}'") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"--preprocess: {text} is neither a YAML file nor a mapping like '{{size: 224}}'")
    return from_dict(PreprocessConfig, raw, "--preprocess")


def exported_entry(folder: Path, label: str) -> ModelConfig:
    """The `onnx:` entry of a `visionpoc export --format onnx` folder, from its sidecar files."""
    pre = json.loads((folder / "preprocessing.json").read_text())
    size = int(pre["input_size"][-1])
    pp = PreprocessConfig(
        size=size,
        resize=int(size / float(pre.get("crop_pct") or 0.875)),  # timm's eval resize: floor(size / crop_pct)
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
    )
    return ModelConfig(
        label=label, onnx=str(folder / "model.onnx"), preprocess=pp, classes=str(folder / "classes.json")
    )


def model_entry(model: Path, label: str | None, preprocess: str | None, classes: str | None) -> ModelConfig:
    """The model `--model` names: an ONNX file, an exported folder, or (`timm`) a run's trained model
    (`label`: which one, `--model-label`)."""
    if model.is_dir() and (model / "model.onnx").is_file() and (model / "preprocessing.json").is_file():
        return exported_entry(model, label or model.name)
    if model.is_dir() and (model / CONFIG_FILE).is_file():
        from visionpoc.serving.loading import run_config, trained_labels

        ok = trained_labels(model)
        if label is None and len(ok) != 1:
            raise ConfigError(f"--model-label: {model} holds the models {ok}: name the one to score")
        if (label or ok[0]) not in ok:
            raise ConfigError(f"--model-label {label}: {model} has no trained model of that name; choose from {ok}")
        return run_config(model).model(label or ok[0])
    if not model.is_file():
        raise ConfigError(f"--model {model}: not found; give a deployed .onnx file, an exported folder or a run folder")
    entry = ModelConfig(
        label=label or model.stem, onnx=str(model), preprocess=preprocess_of(preprocess), classes=classes
    )
    found = spec.problems(entry, FLAGS)
    if found:
        raise ConfigError("; ".join(found))
    return entry


def torch_probs(model_dir: Path, label: str, split: Any, workers: int) -> tuple[np.ndarray, list[str], float]:
    """(N, K) softmax of run `model_dir`'s trained model `label` on `split`, its class names, the time."""
    import time

    import torch
    from torch.utils.data import DataLoader

    from visionpoc.data.augment import eval_transform
    from visionpoc.data.loaders import ImageDataset
    from visionpoc.serving.loading import load_trained

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tm = load_trained(model_dir, label, device=device)
    loader = DataLoader(ImageDataset(split, eval_transform(tm.data_config)), batch_size=32, num_workers=workers)
    out, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for x, _ in loader:
            out.append(tm.model(x.to(device)).float().softmax(1).cpu().numpy())  # (B, K)
    probs = np.concatenate(out) if out else np.zeros((0, len(tm.class_names)))
    return probs.astype(np.float64), tm.class_names, time.perf_counter() - t0


def score(
    mcfg: ModelConfig, source: Path, split: Any, ds: Any, num_classes: int, workers: int, desc: str
) -> tuple[EvalStats, spec.ClassMatch]:
    """Metrics of the model on `split` in the dataset's class space; `source`: the run of a trained model."""
    from visionpoc.deployed import score as deployed

    if mcfg.onnx:
        model = deployed.open_deployed(mcfg, FLAGS)
        match = spec.match_classes(model.names, ds.class_names, ds.class_folders, FLAGS)
        return deployed.score_split(model, match, split, num_classes, workers, desc), match
    probs, names, time_s = torch_probs(source, mcfg.label, split, workers)
    match = spec.match_classes(names, ds.class_names, ds.class_folders, Keys("--label", "--label", "--label"))
    p = deployed.in_dataset_space(probs, match, num_classes)
    targets = np.asarray(split.labels, dtype=np.int64)
    loss = float(-np.log(np.maximum(p[np.arange(len(targets)), targets], 1e-12)).mean()) if len(targets) else 0.0
    return summarize(targets, p, loss, time_s), match


def _target(out: Path, data_cfg: Config) -> tuple[Config, RunResults | None]:
    """The config whose data is scored, and the run the model joins (None: a new results folder)."""
    from visionpoc.config import load_config

    if not (out / RESULTS_FILE).is_file():
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"--out {out} is not empty and holds no {RESULTS_FILE}: choose a new folder or a run")
        return data_cfg, None
    if not (out / CONFIG_FILE).is_file():
        raise ConfigError(f"--out {out}: its {CONFIG_FILE} is missing; the model is scored on the run's own splits")
    return load_config(out / CONFIG_FILE), load_results(out)


def _result(mcfg: ModelConfig, source: Path, label: str, base: ModelResult | None) -> ModelResult:
    """The model's result before scoring: a deployed file's, or a copy of the run's own (what it is, how it
    trained), its scores cleared."""
    if base is not None and not mcfg.onnx:
        r = dataclasses.replace(base, label=label, flags=[], history=list(base.history))
        for f in dataclasses.fields(ModelResult):
            if f.name.startswith(("train_acc", "val_", "test_", "train_top5", "train_macro", "train_per")):
                setattr(r, f.name, [] if isinstance(getattr(r, f.name), list) else None)
        return r
    return ModelResult(
        label=label,
        timm=mcfg.name,
        finetune=spec.DEPLOYED,
        pretrained=False,
        policy=spec.DEPLOYED,
        img_size=mcfg.preprocess.size if mcfg.preprocess else None,
        onnx=str(Path(mcfg.name).resolve()),
    )


def _fill(result: ModelResult, which: str, stats: EvalStats) -> None:
    """`result`'s columns of split `which` from `stats`."""
    prefix = "train" if which == "train" else which
    setattr(result, f"{prefix}_accuracy", stats.accuracy)
    setattr(result, f"{prefix}_top5_accuracy", stats.top5_accuracy)
    setattr(result, f"{prefix}_macro_f1", stats.macro_f1)
    setattr(result, f"{prefix}_per_class_accuracy", stats.per_class_accuracy)
    if which == "test":
        result.eval_time_s, result.eval_img_s = stats.time_s, stats.img_s


def run_evaluate(
    model: Path,
    cfg: Config,
    out: Path,
    label: str | None,
    split: Split,
    preprocess: str | None = None,
    classes: str | None = None,
    model_label: str | None = None,
    price: bool = True,
) -> Evaluated:
    """Score `model` on `split` of `cfg.data` (or, when `out` is a finished run, of that run's data) and
    write the results in `out` under `label` (`Evaluated.added`: the model joined that run). `model_label`:
    which model of a run folder; `price` false: its price at inference is not measured."""
    from visionpoc.compare import load_data
    from visionpoc.data.loaders import default_workers

    mcfg = model_entry(model, model_label, preprocess, classes)
    label = label or mcfg.label
    cfg, run = _target(out, cfg)
    if run is not None and label in [m.label for m in cfg.models]:
        raise ConfigError(f"--label {label}: {out} already has a model {label!r} of its own; choose another label")
    ds, splits = load_data(cfg)
    source_run = model if not mcfg.onnx else out
    base = None if mcfg.onnx else load_results(model).model(mcfg.label)
    result = _result(mcfg, source_run, label, base)
    which = ["val", "test"] if split == "test" else [split]
    workers = default_workers(cfg.data)
    for name in which:
        part = getattr(splits, name)
        if not len(part):
            continue
        log.info("[%s] scoring %s on %s: %d images", label, mcfg.name, name, len(part))
        stats, match = score(mcfg, source_run, part, ds, splits.num_classes, workers, name)
        _fill(result, name, stats)
        result.classes_unknown, result.classes_ignored = list(match.unknown), list(match.ignored)
        if name == "test":
            (out / label).mkdir(parents=True, exist_ok=True)
            save_predictions(out / label / PREDICTIONS_FILE, stats.targets, stats.probs, splits.test.files)
    result.inference = None  # a run's model came with its source run's block: not this evaluation's measurement
    if price and cfg.inference.enabled:
        from visionpoc.inference.cost import price_one  # imported only when measuring, as `compare` does

        result.inference = price_one(source_run, mcfg, result, cfg.inference)
    _save(out, cfg, ds, splits, run, result, mcfg)
    return Evaluated(out, result, run is not None)


def _save(
    out: Path, cfg: Config, ds: Any, splits: Any, run: RunResults | None, result: ModelResult, mcfg: ModelConfig
) -> None:
    """Add `result` to the run in `out`, or write a results folder of its own."""
    if run is None:
        out.mkdir(parents=True, exist_ok=True)
        own = dataclasses.replace(cfg, models=(dataclasses.replace(mcfg, label=result.label),))
        save_config(own, out / CONFIG_FILE)
        from visionpoc.compare import new_results  # the orchestration floor: compare imports this module lazily

        run = new_results(own, ds, splits, "cpu")
    elif [len(splits.test), splits.class_names] != [run.dataset.test_size, run.dataset.class_names]:
        raise VisionpocError(f"{out}: the data its config names has changed since the run; the model is not added")
    run.models = [m for m in run.models if m.label != result.label] + [result]
    save_results(run, out)
