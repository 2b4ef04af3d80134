"""Typed settings: a tree of frozen dataclasses, loaded from YAML with `--set key=value` overrides.

Unknown keys and wrong types are rejected with a message that names the key. The built-in default
(`Config()`) is the original PoC: Stanford Dogs, Xception (top 10% trainable) vs ViT-B/16 (full).
Derived values (the LR a model actually uses, the device) live in functions, not in fields.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from visionpoc.errors import ConfigError
from visionpoc.presets.table import resolve_entry
from visionpoc.runfiles import atomic_write_text
from visionpoc.typed import BoundedLoader, YamlTooLargeError, apply_override, from_dict, to_dict


@dataclass(frozen=True)
class DataConfig:
    source: Literal["stanford_dogs", "folder", "manifest", "hf", "webdataset"] = "stanford_dogs"
    """`stanford_dogs` (official layout), `folder` (root/train/<class>/*, root/test|val/<class>/*),
    `manifest` (a CSV/JSONL file of `path,label[,split]`), `hf` (a Hugging Face `datasets` dataset) or
    `webdataset` (tar shards with a `cls` label per image)."""
    root: str = "data/stanford_dogs"
    """Dataset folder; for `manifest` the CSV/JSONL file; for `hf` a `save_to_disk` folder, a parquet
    file or folder, an image folder or a hub id (from the local cache); for `webdataset` a folder of
    `train-*.tar` / `val-*.tar` / `test-*.tar` shards or a brace pattern (`shards/{000..009}.tar`)."""
    test_fraction: float = 0.2
    """`manifest`, `hf`, `webdataset` without a test split: the stratified, seeded share of the images
    held out as the test split (before validation is carved out of the rest)."""
    image_column: str = "image"
    """`hf`: the column holding the images."""
    label_column: str = "label"
    """`hf`: the column holding the labels (a `ClassLabel`'s names become the class names)."""
    class_names: str | None = None
    """Display names of the classes: a CSV file of `folder,name` rows (header optional) or a JSON file
    `{"folder": "name"}`; classes it leaves out keep their default name (the breed for Stanford Dogs and
    `n<8 digits>-<name>` folders, else the folder name). Null: the default names."""
    val_fraction: float = 0.1
    """Stratified, seeded share of train held out for validation (model selection, early stopping)."""
    limit_per_class: int | None = None
    """Keep at most this many images per class in every split, for quick runs."""
    split_seed: int | None = None
    """Seed of the validation carve-out and of `limit_per_class`; null takes `train.seed`. The repeats of
    a run (`train.repeats`) all take the first one's, so they share the same images."""
    download: bool = True
    """Stanford Dogs only: download the official archives when `root` holds no dataset."""
    base_url: str | None = None
    """Mirror for the official archives (else $VISIONPOC_DOGS_URL, else the Stanford site)."""
    num_workers: int | None = None
    """DataLoader workers; null picks min(8, CPU count)."""
    pipeline: Literal["auto", "stream", "prepared"] = "auto"
    """`stream` decodes JPEGs every epoch; `prepared` decodes once into a uint8 store and augments on
    the device; `auto` uses `prepared` on CUDA and `stream` on the CPU (and for a training split
    streamed from tar shards, which `prepared` reads once into its store)."""
    prepared_size: int = 336
    """Side (pixels) of the central square kept in the prepared store; 336 covers Xception's eval crop
    (299 / crop_pct 0.8975 = 333) without upsampling."""


@dataclass(frozen=True)
class PreprocessConfig:
    """How a deployed model file (`onnx:`) wants its input: what the team's serving code does before it."""

    size: int = 224
    """Side of the square input, in pixels (the crop)."""
    resize: int | None = None
    """Shorter side before the centre crop; null: `size` / 0.875 (timm's default crop_pct), rounded."""
    crop: Literal["center", "squash"] = "center"
    """`center`: resize the shorter side then cut the central square; `squash`: resize to size x size."""
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    """Subtracted per channel, on pixels scaled to [0, 1] (Keras' [-1, 1]: 0.5, 0.5, 0.5)."""
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    """Divided per channel, on pixels scaled to [0, 1] (raw 0..255 input: mean 0, std 0.00392157)."""
    channels: Literal["RGB", "BGR"] = "RGB"
    """Channel order the model expects."""
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    """Tensor layout: PyTorch exports are NCHW, Keras/TensorFlow exports NHWC."""


@dataclass(frozen=True)
class ModelConfig:
    label: str
    """Short name used in tables, folders and `--model`."""
    timm: str = ""
    """Full tagged timm name, e.g. `vit_base_patch16_224.orig_in21k`. Each entry names exactly one of
    `timm`, `hf` and `onnx`."""
    hf: str | None = None
    """A Hugging Face `transformers` image-classification model instead of timm: a hub id
    (`google/vit-base-patch16-224-in21k`) or a local folder written by `save_pretrained`."""
    onnx: str | None = None
    """A deployed model file (ONNX) scored as it is, not trained: the production model as it serves.
    Needs `preprocess` and `classes`."""
    preprocess: PreprocessConfig | None = None
    """For `onnx`: the model's input (size, resize/crop, mean/std, channel order, layout)."""
    classes: tuple[str, ...] | str | None = None
    """For `onnx`: the dataset class name of each output index, as a list or a file (one per line, or
    JSON list/`{"index": "name"}`)."""
    preset: str | None = None
    """The preset (`visionpoc models`) this entry was resolved from at load time; kept for the record."""
    policy: str | None = None
    """The named policy: the preset's (`full`, `linear_probe`, `production`, ...) or `linear_probe` asked as
    a finetune; null: none named (`finetune` says what trains)."""
    pretrained: bool = True
    """Start from the pretrained weights of the tag (false: from scratch)."""
    finetune: Literal["full", "head", "top_fraction"] = "full"
    """Which parameters train: all, the new head only (type `linear_probe` or `head`), or the top `fraction`
    of layers/blocks + head."""
    fraction: float = 0.1
    """For `top_fraction`: share of conv layers (CNN) or blocks (transformer) that train."""
    img_size: int | None = None
    """Input resolution; null takes the model's pretrained input size."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for `timm.create_model` (e.g. depth, drop_path_rate)."""
    pretrained_path: str | None = None
    """Local .safetensors/.pth file to load instead of the HF hub."""
    lr: float | None = None
    """Peak learning rate for this model; null takes `train.lr`, and without one the policy's default
    (`optim.default_lr`: it depends on `finetune` and scales with the batch size)."""
    lr_source: Literal["config", "preset", "tuned"] | None = None
    """Where `lr` came from, recorded at load time: a preset's policy, a tuned file; null: the config."""
    head_init_scale: float | None = 0.001
    """The new classifier's initial weights are multiplied by this and its bias zeroed, so the first
    predictions are near uniform (BEiT/MAE fine-tuning); 0 starts it at exactly uniform; null keeps
    timm's initialisation."""
    head_lr_scale: float = 10.0
    """When a pretrained backbone trains too (`full`, `top_fraction`), the new classifier's LR is this times
    the model's: it learns from scratch while the pretrained layers only adapt."""
    # Per-model training settings (e.g. written by `compare --tuned`); null takes the `train.*` value.
    batch_size: int | None = None
    """Global batch size for this model; null takes `train.batch_size`."""
    weight_decay: float | None = None
    """AdamW weight decay for this model; null takes `train.weight_decay`."""
    warmup_epochs: float | None = None
    """Warmup length for this model; null takes `train.warmup_epochs`."""
    label_smoothing: float | None = None
    """Label smoothing for this model; null takes `train.label_smoothing`."""
    layer_decay: float | None = None
    """Layer-wise LR decay for this model; null takes `train.layer_decay`."""
    augment: Literal["none", "basic", "strong"] | None = None
    """Augmentation preset for this model; null takes `train.augment`."""
    ema_decay: float | None = None
    """Weight-EMA decay for this model; null takes `train.ema_decay`."""
    tuned_from: str | None = None
    """The tuned-settings YAML these overrides came from (set by `compare --tuned`), for the record."""
    tuning_trials: int | None = None
    """Finished trials of the study behind `tuned_from` (set by `compare --tuned`), for the record."""

    @property
    def kind(self) -> Literal["timm", "hf", "onnx"]:
        """Where the model comes from: a timm name, a Hugging Face model, or a deployed ONNX file."""
        return "onnx" if self.onnx else "hf" if self.hf else "timm"

    @property
    def name(self) -> str:
        """The model's identifier for tables and records: the timm name, the HF id/folder or the ONNX path."""
        return self.onnx or self.hf or self.timm


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    """Passes over the training split."""
    batch_size: int = 64
    """Global batch size."""
    lr: float | None = None
    """Peak AdamW learning rate (after warmup) for the models that set none; null: each model's policy
    default (`full`, `top_fraction`, `head`), scaled with its batch size (`optim.default_lr`)."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to biases and norms)."""
    warmup_epochs: float = 1.0
    """Linear warmup length before the cosine decay."""
    min_lr: float = 1e-6
    """Floor of the cosine schedule."""
    augment: Literal["none", "basic", "strong"] = "basic"
    """Training augmentation (`data/augment.py`): `none` (the eval transform), `basic` (random-resized-crop
    + flip) or `strong` (basic + RandAugment + random erasing + mixup/cutmix with soft targets)."""
    layer_decay: float | None = None
    """Layer-wise LR decay (timm): each block's LR is this times the one above it; null disables."""
    ema_decay: float | None = None
    """EMA of the weights (timm ModelEmaV3, with warm-up); when set, validation, the best checkpoint and
    the final scores use the EMA weights; null disables."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing."""
    grad_clip: float | None = 1.0
    """Clip the gradient norm to this value; null disables."""
    early_stop_patience: int | None = None
    """Stop after this many epochs without a better validation accuracy; null disables."""
    seed: int = 0
    """Seed for Python, NumPy, torch, the validation split and the data order."""
    repeats: int = 1
    """`compare`/`train`: train every model this many times, with seeds seed, seed+1, ...; each repeat is a
    whole run in `OUT/seed-<s>/`, and the report gives each model's mean and spread across them."""
    deterministic: bool = False
    """Deterministic kernels: reproducible to the bit on one machine, slower on GPU."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`."""
    amp: bool = True
    """bf16 autocast on CUDA (always fp32 on the CPU)."""
    compile: bool = True
    """`torch.compile` the model on CUDA (ignored on the CPU)."""
    channels_last: bool = True
    """channels_last memory format for CNNs on CUDA."""
    eval_batch_size: int | None = None
    """Batch size for evaluation; null takes 2 x batch_size."""


@dataclass(frozen=True)
class ProbeConfig:
    """How `finetune: head` (linear_probe) models train: the frozen backbone's features are computed once
    and cached, then a grid of linear heads (every lr x weight decay) trains on them at once, and the best
    head on validation is kept (DINOv2's linear evaluation)."""

    cache: bool = True
    """Use the cached-feature probe; false trains the head through the backbone in the shared loop."""
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    """Peak AdamW learning rates of the grid (on standardized features, so they suit any backbone)."""
    weight_decays: tuple[float, ...] = (0.0, 0.05, 0.5)
    """AdamW weight decays of the grid."""
    views: int = 0
    """Augmented views of each training image added to the cached training features (0: the centre
    crop only). The views are fixed once cached: each epoch sees the same ones."""
    epochs: int | None = None
    """Epochs of head training on the cached features; null: `train.epochs`, or more when that gives fewer
    than `min_steps` steps (an epoch over cached features costs next to nothing)."""
    min_steps: int = 1000
    """With `epochs` null, train the heads for at least this many optimizer steps."""


@dataclass(frozen=True)
class TuneConfig:
    """`visionpoc tune`'s search (Optuna, TPE): a range [low, high] or a list of choices per setting; null
    leaves a setting out (the model's configured value is used). Every model gets the same trials and
    epochs; trials are scored on validation accuracy only."""

    trials: int = 20
    """Target number of finished (complete or pruned) trials per model's study, shared by all its workers; a
    rerun tops the study up to it (the same for every model: the comparison's fairness)."""
    epochs: int | None = None
    """Epochs per trial; null takes `train.epochs`."""
    pruner: Literal["median", "hyperband", "none"] = "median"
    """Stops hopeless trials early from their per-epoch validation accuracy."""
    startup_trials: int = 5
    """Trials before TPE models the space and before the median pruner may stop one."""
    seed: int | None = None
    """Sampler seed; null takes `train.seed`. Give parallel workers distinct seeds (the split stays)."""
    lr: tuple[float, ...] | None = (1e-5, 1e-2)
    """Peak LR range, log scale."""
    weight_decay: tuple[float, ...] | None = (1e-4, 0.3)
    """Weight decay range, log scale."""
    warmup_epochs: tuple[float, ...] | None = (0.0, 3.0)
    """Warmup range (epochs), capped at the trial's epochs."""
    label_smoothing: tuple[float, ...] | None = (0.0, 0.2)
    """Label smoothing range."""
    batch_size: tuple[int, ...] | None = (32, 64, 128)
    """Global batch size choices."""
    augment: tuple[Literal["none", "basic", "strong"], ...] | None = ("basic", "strong")
    """Augmentation preset choices."""
    top_fraction: tuple[float, ...] | None = (0.05, 0.5)
    """Trainable share range, only for models with `finetune: top_fraction` (the CNN baseline)."""
    layer_decay: tuple[float, ...] | None = (0.6, 1.0)
    """Layer-wise LR decay range, only for transformers (models with `blocks`)."""
    drop_path: tuple[float, ...] | None = (0.0, 0.3)
    """Stochastic-depth range (`model_kwargs.drop_path_rate`), only for models that accept it."""
    drop_rate: tuple[float, ...] | None = (0.0, 0.5)
    """Dropout range (`model_kwargs.drop_rate`, before the classifier), only for models that accept it
    (Xception, ResNets, ViTs)."""
    heartbeat_s: int = 60
    """Seconds between a running trial's heartbeats in the study's database."""
    grace_s: int = 180
    """Seconds of heartbeat silence after which another worker marks a trial failed (its worker died);
    above `heartbeat_s`."""
    retries: int = 1
    """Times a dead worker's trial is queued again, with the same settings (0: never)."""


def _default_models() -> tuple[ModelConfig, ...]:
    return (
        ModelConfig(label="xception", timm="legacy_xception.tf_in1k", finetune="top_fraction", fraction=0.10, lr=1e-3),
        ModelConfig(label="vit_b16", timm="vit_base_patch16_224.orig_in21k", finetune="full", lr=1e-4),
    )


@dataclass(frozen=True)
class TrackingConfig:
    mlflow_uri: str | None = None
    """MLflow tracking URI, e.g. `sqlite:///mlflow.db` (a local store) or `http://host:5000`; null (the
    default): no MLflow logging. Needs the `mlflow` extra."""
    experiment: str = "visionpoc"
    """The MLflow experiment each `compare` is logged under (one parent run, one nested run per model)."""


@dataclass(frozen=True)
class InferenceConfig:
    """The price of each model at inference, measured after the run on this machine's CPU with ONNX Runtime
    (each trained model exported to ONNX; a deployed `onnx:` file as it is), and with torch on CUDA when
    there is a GPU. Needs the `export` extra (onnx, onnxruntime); without it, each model gets a note."""

    enabled: bool = True
    """Measure it after the models are trained and scored; false skips it."""
    threads: int | None = None
    """ONNX Runtime's intra-op threads; null: its default (one per physical core). The number actually
    used is recorded either way."""
    batch_sizes: tuple[int, ...] = (1, 32)
    """Batch sizes timed: latency (p50, p95) is read at the smallest, throughput at the largest."""
    warmup_runs: int = 3
    """Untimed runs at each batch size before the timed ones."""
    min_runs: int = 10
    """Timed runs at each batch size, at least (even past `max_seconds`)."""
    max_runs: int = 200
    """Timed runs at each batch size, at most."""
    max_seconds: float = 10.0
    """Time budget of the timed runs at each batch size: once spent (and `min_runs` done), it stops."""


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    """Where the images come from and how they are split."""
    models: tuple[ModelConfig, ...] = field(default_factory=_default_models)
    """The baseline first, then the candidates; each goes through the same loop."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The shared training budget and loop settings."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """The hyper-parameter search space and budget of `visionpoc tune`."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """How the linear probe (`finetune: head`) trains: cached features and a grid of heads."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Optional experiment tracking (MLflow) of each finished `compare`."""
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    """The price of each model at inference (CPU latency, throughput, memory, file size)."""

    def model(self, label: str) -> ModelConfig:
        for m in self.models:
            if m.label == label:
                return m
        raise ConfigError(f"no model labelled {label!r} in the config; labels: {[m.label for m in self.models]}")


# --------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, updated by the YAML file at `path` (if any), then by `overrides`; `preset:` model entries
    resolved (`preset_entries.resolve_entry`); validated."""
    raw = to_dict(Config())
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file {p} is a folder: pass a YAML file to --config")
        if not p.is_file():
            raise ConfigError(f"config file {p} not found: pass an existing YAML file to --config")
        try:
            loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 text ({e}): save it as UTF-8 YAML") from e
        except YamlTooLargeError as e:
            raise ConfigError(f"config file {p} refused: {e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: the top level must be a mapping of sections")
        for section, value in loaded.items():
            if section in raw and isinstance(raw[section], dict) and not isinstance(value, dict):
                raise ConfigError(
                    f"config file {p}: `{section}:` must be a mapping of keys (e.g. `{section}: {{...}}`), "
                    f"got {value!r}"
                )
            if section == "models" and not isinstance(value, list):
                raise ConfigError(f"config file {p}: `models:` must be a list of model entries, got {value!r}")
            if section in raw and isinstance(raw[section], dict):
                raw[section].update(value)
            else:
                raw[section] = value  # `models` replaces the default list; unknown keys fail below
    for assignment in overrides:
        apply_override(raw, assignment)
    if isinstance(raw.get("models"), list):  # `{preset: NAME, policy: P}` entries -> ModelConfig fields
        raw["models"] = [resolve_entry(m, f"models.{i}") for i, m in enumerate(raw["models"])]
    cfg = from_dict(Config, raw, "")
    _validate(cfg)
    return cfg


class _UniqueKeyLoader(BoundedLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last silently), and an
    alias bomb (`typed.BoundedLoader`)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_label(i: int, label: str) -> None:
    """A label names the model's folder in the run: a plain name, never a path."""
    if (
        not label.strip()
        or label != label.strip()
        or label.startswith(".")
        or any(c in label for c in "/\\")
        or any(ord(c) < 32 for c in label)
    ):
        raise ConfigError(
            f"models.{i}.label: {label!r} names the model's folder in the run; use a plain name "
            "(letters, digits, '_', '-', '.'; not starting with '.', no '/' or '\\')"
        )


def _check_source(i: int, m: ModelConfig) -> None:
    """Each entry names exactly one of `timm`, `hf`, `onnx`; `preprocess`/`classes` belong to `onnx`."""
    named = [k for k in ("timm", "hf", "onnx") if getattr(m, k)]
    if len(named) != 1:
        raise ConfigError(
            f"models.{i} ({m.label}): name exactly one of `timm:` (a timm name), `hf:` (a Hugging Face model id "
            f"or folder) and `onnx:` (a deployed model file); got {named or 'none'}"
        )
    if m.onnx is None and (m.preprocess is not None or m.classes is not None):
        raise ConfigError(f"models.{i} ({m.label}): `preprocess:` and `classes:` apply to an `onnx:` entry only")


def _validate(cfg: Config) -> None:
    if not cfg.models:
        raise ConfigError("models: the list is empty; name at least one timm model")
    labels = [m.label for m in cfg.models]
    for i, label in enumerate(labels):
        _check_label(i, label)
    if len(set(labels)) != len(labels):
        raise ConfigError(f"models: labels must be unique, got {labels}")
    if cfg.train.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", cfg.train.device):
        raise ConfigError(f"train.device: {cfg.train.device!r} must be auto, cpu, cuda or cuda:N")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: {cfg.data.val_fraction} must be in [0, 1)")
    if not 0.0 < cfg.data.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction: {cfg.data.test_fraction} must be in (0, 1)")
    if cfg.data.limit_per_class is not None and cfg.data.limit_per_class < 1:
        raise ConfigError("data.limit_per_class: must be a positive integer or null")
    for i, m in enumerate(cfg.models):
        _check_source(i, m)
        if not 0.0 < m.fraction <= 1.0:
            raise ConfigError(f"models.{i}.fraction: {m.fraction} must be in (0, 1]")
    if cfg.train.epochs < 1:
        raise ConfigError("train.epochs: must be at least 1")
    if cfg.train.batch_size < 1:
        raise ConfigError("train.batch_size: must be at least 1")
    _check_rules("train", cfg.train, SHARED_RULES | TRAIN_RULES)
    if cfg.train.seed + cfg.train.repeats - 1 > MAX_SEED:
        raise ConfigError(
            f"train.seed: {cfg.train.seed} with train.repeats {cfg.train.repeats} gives seeds above {MAX_SEED}: "
            "lower the seed"
        )
    _check_rules("data", cfg.data, DATA_RULES)
    _check_rules("probe", cfg.probe, PROBE_RULES)
    _check_rules("inference", cfg.inference, INFERENCE_RULES)
    if cfg.inference.min_runs > cfg.inference.max_runs:
        raise ConfigError(
            f"inference.min_runs: {cfg.inference.min_runs} is above inference.max_runs "
            f"({cfg.inference.max_runs}): lower it or raise max_runs"
        )
    for i, m in enumerate(cfg.models):
        _check_rules(f"models.{i}", m, SHARED_RULES | MODEL_RULES)
    _validate_tune(cfg.tune)


Rules = dict[str, tuple[Callable[[Any], bool], str]]  # key -> (is the value fine, the rule in words); null passes
# Upper bounds, so that a typo (`1e23`, `.inf`) is refused at load time rather than failing mid-run
MAX_SEED = 2**32 - 1  # NumPy's seeds are 32-bit; `seed + repeats - 1` must fit too
MAX_EPOCHS = 100_000
MAX_REPEATS = 1000
MAX_BATCH = 2**20
MAX_SIDE = 8192  # pixels
SHARED_RULES: Rules = {  # `train.*` and each model's override of it (PER_MODEL)
    "lr": (lambda v: math.isfinite(v) and v >= 0, "at least 0"),  # 0: the weights stay as loaded
    "batch_size": (lambda v: 1 <= v <= MAX_BATCH, f"at least 1 and at most {MAX_BATCH}"),
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "at least 0 (and finite)"),
    "warmup_epochs": (lambda v: 0 <= v <= MAX_EPOCHS, f"at least 0 and at most {MAX_EPOCHS} (epochs)"),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "layer_decay": (lambda v: 0 < v <= 1, "in (0, 1] (or null)"),
    "ema_decay": (lambda v: 0 < v < 1, "in (0, 1) (or null)"),
}
TRAIN_RULES: Rules = {
    "min_lr": (lambda v: math.isfinite(v) and v >= 0, "at least 0"),
    "grad_clip": (lambda v: math.isfinite(v) and v > 0, "above 0 (or null: no clipping)"),
    "early_stop_patience": (lambda v: v >= 1, "at least 1 (or null)"),
    "eval_batch_size": (lambda v: 1 <= v <= MAX_BATCH, f"at least 1 and at most {MAX_BATCH} (or null)"),
    "seed": (lambda v: 0 <= v <= MAX_SEED, f"at least 0 and at most {MAX_SEED}"),
    "repeats": (lambda v: 1 <= v <= MAX_REPEATS, f"at least 1 and at most {MAX_REPEATS}"),
    "epochs": (lambda v: 1 <= v <= MAX_EPOCHS, f"at least 1 and at most {MAX_EPOCHS}"),
}
DATA_RULES: Rules = {
    "class_names": (lambda v: bool(v.strip()), "a CSV or JSON file (or null: the default names)"),
    "num_workers": (lambda v: 0 <= v <= 1024, "at least 0 and at most 1024 (or null)"),
    "split_seed": (lambda v: 0 <= v <= MAX_SEED, f"at least 0 and at most {MAX_SEED} (or null: train.seed)"),
    "prepared_size": (lambda v: 16 <= v <= MAX_SIDE, f"at least 16 and at most {MAX_SIDE} (pixels)"),
}
MODEL_RULES: Rules = {
    "img_size": (lambda v: 16 <= v <= MAX_SIDE, f"at least 16 and at most {MAX_SIDE} (pixels), or null"),
    "head_init_scale": (lambda v: math.isfinite(v) and v >= 0, "at least 0 (or null: timm's initialisation)"),
    "head_lr_scale": (lambda v: math.isfinite(v) and v > 0, "above 0"),
}
PROBE_RULES: Rules = {
    "lrs": (lambda v: len(v) > 0 and all(math.isfinite(x) and x > 0 for x in v), "a non-empty list of LRs above 0"),
    "weight_decays": (lambda v: len(v) > 0 and all(math.isfinite(x) and x >= 0 for x in v), "a non-empty list >= 0"),
    "views": (lambda v: 0 <= v <= 100, "from 0 to 100"),
    "min_steps": (lambda v: 1 <= v <= 10**9, "at least 1 and at most 1000000000"),
    "epochs": (lambda v: 1 <= v <= MAX_EPOCHS, f"at least 1 and at most {MAX_EPOCHS} (or null: train.epochs)"),
}

INFERENCE_RULES: Rules = {
    "threads": (lambda v: 1 <= v <= 1024, "at least 1 and at most 1024 (or null: ONNX Runtime's default)"),
    "batch_sizes": (
        lambda v: len(v) > 0 and all(1 <= b <= 4096 for b in v),
        "a non-empty list of batch sizes from 1 to 4096",
    ),
    "warmup_runs": (lambda v: 0 <= v <= 1000, "from 0 to 1000"),
    "min_runs": (lambda v: 1 <= v <= 100_000, "at least 1 and at most 100000"),
    "max_runs": (lambda v: 1 <= v <= 100_000, "at least 1 and at most 100000"),
    "max_seconds": (lambda v: math.isfinite(v) and 0 < v <= 3600, "above 0 and at most 3600 (seconds)"),
}


def _check_rules(where: str, section: Any, rules: Rules) -> None:
    for key, (ok, rule) in rules.items():
        v = getattr(section, key)
        if v is not None and not ok(v):
            raise ConfigError(f"{where}.{key}: {v} must be {rule}")


def _validate_tune(tc: TuneConfig) -> None:
    if tc.trials < 1 or (tc.epochs is not None and tc.epochs < 1) or tc.startup_trials < 0:
        raise ConfigError("tune.trials and tune.epochs must be at least 1, tune.startup_trials at least 0")
    if not 1 <= tc.heartbeat_s < tc.grace_s or not 0 <= tc.retries <= 100:
        raise ConfigError(
            f"tune.heartbeat_s ({tc.heartbeat_s}) must be at least 1 and below tune.grace_s ({tc.grace_s}), "
            f"tune.retries ({tc.retries}) from 0 to 100"
        )
    # (lowest low, highest high); lr and weight decay are searched on a log scale, so their low is > 0
    bounds = {
        "lr": (1e-12, math.inf),
        "weight_decay": (1e-12, math.inf),
        "warmup_epochs": (0.0, float(MAX_EPOCHS)),
        "label_smoothing": (0.0, 0.999),
        "top_fraction": (1e-9, 1.0),
        "layer_decay": (1e-9, 1.0),
        "drop_path": (0.0, 0.999),
        "drop_rate": (0.0, 0.999),
    }
    for key, (lo, hi) in bounds.items():
        r = getattr(tc, key)
        if r is not None and not (len(r) == 2 and lo <= r[0] <= r[1] <= hi):
            raise ConfigError(f"tune.{key}: {list(r)} must be [low, high] with {lo:g} <= low <= high <= {hi:g}")
    for key in ("batch_size", "augment"):
        choices = getattr(tc, key)
        if choices is not None and (not choices or (key == "batch_size" and min(choices) < 1)):
            raise ConfigError(f"tune.{key}: give a non-empty list of choices (batch sizes >= 1), or null")


PER_MODEL = (
    "lr",
    "batch_size",
    "weight_decay",
    "warmup_epochs",
    "label_smoothing",
    "layer_decay",
    "augment",
    "ema_decay",
)
"""ModelConfig fields that override the `train.*` field of the same name for that model."""


def for_model(cfg: Config, mcfg: ModelConfig) -> Config:
    """`cfg` with `train` as model `mcfg` sees it: its per-model settings replace the shared ones."""
    over = {k: getattr(mcfg, k) for k in PER_MODEL if getattr(mcfg, k) is not None}
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **over))


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (loadable again with `load_config`)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def with_model_changes(cfg: Config, label: str, changes: dict[str, Any], where: str) -> Config:
    """`cfg` with model `label` updated by `changes` (ModelConfig keys; `model_kwargs` is merged into the
    model's own), checked like a config file; errors name `where`."""
    kwargs = changes.get("model_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{where}.model_kwargs: expected a mapping, got {kwargs!r}")
    models = []
    for m in cfg.models:
        if m.label == label:
            raw = {**to_dict(m), **changes, "model_kwargs": {**m.model_kwargs, **kwargs}}
            m = from_dict(ModelConfig, raw, where)
        models.append(m)
    new = dataclasses.replace(cfg, models=tuple(models))
    _validate(new)
    return new
