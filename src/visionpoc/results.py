"""Results as data: the dataclasses behind `results.json`, prediction files, and the environment record.

Training writes these; the report and the service only read them. Nothing here imports the loop.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visionpoc.runfiles import (
    REPEATS_FILE,
    RESULTS_CSV,
    RESULTS_FILE,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
)

LR_SCALING = (
    "none: lr is the peak LR for the global batch (batch_size = batch_size_per_device x world_size); "
    "it is not rescaled with the number of processes"
)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float  # running accuracy on augmented batches, not the clean pass
    val_loss: float | None
    val_accuracy: float | None
    val_top5_accuracy: float | None
    lr: float
    epoch_train_time_s: float
    cumulative_train_time_s: float
    train_img_s: float


@dataclass
class BatchTiming:
    """Timed runs of one batch size, after a warm-up."""

    batch: int
    runs: int  # timed runs
    p50_ms: float  # median time of one run (the whole batch)
    p95_ms: float
    mean_ms: float
    img_s: float  # batch x runs / total time
    # CPU: peak RSS increase so far (the session and every batch up to this one); GPU: peak allocated
    peak_mib: float | None = None


@dataclass
class InferenceCost:
    """One model's price at inference on this machine: ONNX Runtime on the CPU (`batches`), and torch on
    CUDA when there was a GPU (`gpu_batches`). `error` says why nothing was measured."""

    runtime: str = ""  # e.g. "onnxruntime 1.20.1, CPUExecutionProvider"
    cpu: str = ""  # the CPU's model name
    cpus: int | None = None  # logical CPUs this process may use
    threads: int | None = None  # intra-op threads the session used (asked, or counted when left to the default)
    threads_asked: int | None = None  # `inference.threads`; null: ONNX Runtime's default
    file_bytes: int | None = None  # the ONNX file measured
    peak_mib: float | None = None  # peak RSS increase of the measuring process: session, weights, batches
    peak_kind: str = ""  # how peak_mib was read ("VmHWM reset", "ru_maxrss delta")
    batches: list[BatchTiming] = field(default_factory=list)  # CPU, in increasing batch size
    gpu: str | None = None  # the GPU's name, when measured with torch on CUDA
    gpu_batches: list[BatchTiming] = field(default_factory=list)
    measured_in: str | None = None  # another run folder this block was measured in (repeats: the first seed's)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def latency(self) -> BatchTiming | None:
        """The CPU timing of the smallest batch (batch 1 by default): its p50/p95 are the latency."""
        return self.batches[0] if self.batches else None

    def throughput(self) -> BatchTiming | None:
        """The CPU timing of the largest batch (32 by default): its img/s is the throughput."""
        return self.batches[-1] if self.batches else None


def inference_from(data: dict[str, Any] | None) -> InferenceCost | None:
    """An `inference` block of `results.json` back into its dataclass."""
    if data is None:
        return None
    d = dict(data)
    for key in ("batches", "gpu_batches"):
        d[key] = [_build(BatchTiming, b) for b in d.get(key) or []]
    return _build(InferenceCost, d)


@dataclass
class ModelResult:
    label: str
    timm: str
    finetune: str
    pretrained: bool
    preset: str | None = None  # the config entry's `preset:` name; null: a plain timm entry
    policy: str | None = None  # the named policy (full, linear_probe, production, ...); null: none named
    status: str = "ok"  # "ok" or "failed"
    error: str | None = None
    fraction: float | None = None
    img_size: int | None = None
    lr: float | None = None  # peak LR, for the global batch (no scaling with the number of processes)
    lr_source: str | None = None  # where `lr` came from: config, preset, policy_default, tuned (or probe_grid)
    lr_scaling: str = LR_SCALING  # how `lr` relates to the batch and the number of processes
    batch_size: int | None = None  # global batch: world_size x batch_size_per_device
    batch_size_per_device: int | None = None
    world_size: int = 1
    micro_batch_size: int | None = None  # set when CUDA OOM forced gradient accumulation
    oom_events: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int | None = None
    epochs: int = 0  # planned
    epochs_run: int = 0
    best_epoch: int | None = None
    data_pipeline: str | None = None
    train_time_s: float | None = (
        None  # training epochs, synchronized wall time, input waits included; no eval, no warm-up
    )
    warmup_s: float | None = None  # first step(s): compilation and allocator warm-up
    data_wait_s: float | None = None  # host time blocked on the input path, within train_time_s
    eval_time_s: float | None = None
    train_accuracy: float | None = None  # clean pass over train, no augmentation (the original PoC's column)
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    test_top5_accuracy: float | None = None
    test_macro_f1: float | None = None
    test_per_class_accuracy: list[float] = field(default_factory=list)
    # the same metrics on the clean train pass and on validation (best-on-validation weights)
    train_top5_accuracy: float | None = None
    train_macro_f1: float | None = None
    train_per_class_accuracy: list[float] = field(default_factory=list)
    val_top5_accuracy: float | None = None
    val_macro_f1: float | None = None
    val_per_class_accuracy: list[float] = field(default_factory=list)
    params: int | None = None
    trainable_params: int | None = None
    fwd_gflops: float | None = None  # one image, forward pass, at img_size
    train_img_s: float | None = None
    eval_img_s: float | None = None
    latency_ms_b1: float | None = None  # measured forward latency at batch 1
    peak_memory_gib: float | None = None
    peak_memory_kind: str | None = None  # "cuda_max_allocated" or "process_max_rss"
    input_store_gib: float | None = None  # the prepared store resident on the GPU, excluded from the peak
    pretrained_tag: str | None = None
    license: str | None = None
    history: list[EpochRecord] = field(default_factory=list)
    # the training settings this model resolved to (per-model overrides and tuning applied)
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    label_smoothing: float | None = None
    layer_decay: float | None = None
    ema_decay: float | None = None  # set: the scored weights are the EMA of the trained ones
    drop_path_rate: float | None = None
    augment: str | None = None  # the preset asked for
    augment_applied: str | None = None  # what ran on this input path (e.g. RandAugment's GPU form on `prepared`)
    tuned_from: str | None = None  # the `tune` YAML these settings came from (`compare --tuned`)
    tuning_trials: int | None = None  # trials the tuned settings' study finished (`compare --tuned`)
    head_init_scale: float | None = None  # the new classifier's initial weights were scaled by this
    head_lr_scale: float | None = None  # the new classifier's LR multiplier (a backbone training too)
    optimizer_steps: int | None = None  # optimizer updates in training (all epochs run)
    images_seen: int | None = None  # training images (or cached feature rows) passed through, all epochs
    probe: dict[str, Any] | None = None  # the cached linear probe (`finetune: head`): its grid and choice
    flags: list[dict[str, str]] = field(default_factory=list)  # training diagnoses: {code, message}
    # a deployed model (`onnx:` entry, finetune "deployed"): scored as it is, never trained (train figures null)
    onnx: str | None = None  # the ONNX file scored (absolute path)
    # a Hugging Face transformers model (`hf:` entry): its hub id or folder, and the exact weights loaded
    hf: str | None = None
    hf_revision: str | None = None  # the hub snapshot's commit hash, or the absolute folder
    classes_unknown: list[str] = field(default_factory=list)  # dataset classes it has no output for
    classes_ignored: list[str] = field(default_factory=list)  # its classes that are not in the dataset
    inference: InferenceCost | None = None  # its price at inference (`inference.enabled`); null: not measured


@dataclass
class DatasetInfo:
    source: str
    root: str
    train_size: int
    val_size: int
    test_size: int
    num_classes: int
    class_names: list[str]  # display names, index = label (`data.class_names`); files are found by path
    test_root: str | None = None  # absolute folder the test split's file paths are relative to


@dataclass
class Environment:
    visionpoc: str
    python: str
    torch: str
    timm: str
    cuda: str | None
    device: str
    gpu_name: str | None
    git_commit: str | None
    seed: int
    platform: str


@dataclass
class RunResults:
    dataset: DatasetInfo
    models: list[ModelResult]
    environment: Environment
    config: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    def model(self, label: str) -> ModelResult:
        for m in self.models:
            if m.label == label:
                return m
        raise KeyError(label)


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


PRICE_COLUMNS = (
    "cpu_latency_batch",
    "cpu_latency_p50_ms",
    "cpu_latency_p95_ms",
    "cpu_throughput_batch",
    "cpu_throughput_img_s",
    "cpu_peak_mib",
    "onnx_file_bytes",
    "gpu_latency_p50_ms",
    "gpu_throughput_img_s",
)
"""`results.csv`'s columns of the price at inference (the `inference` block's headline figures)."""


def price_columns(cost: InferenceCost | None) -> dict[str, Any]:
    """The `PRICE_COLUMNS` of one model from its `inference` block: ONNX Runtime's CPU latency (p50, p95) at
    the smallest batch timed, its throughput at the largest, peak memory, file size, and torch's on the GPU
    when measured; None where not measured (no block, or its `error`)."""
    if cost is None or cost.error:
        return dict.fromkeys(PRICE_COLUMNS)
    lat, thr = cost.latency(), cost.throughput()
    gpu_lat, gpu_thr = (cost.gpu_batches[0], cost.gpu_batches[-1]) if cost.gpu_batches else (None, None)
    values = (
        None if lat is None else lat.batch,
        None if lat is None else lat.p50_ms,
        None if lat is None else lat.p95_ms,
        None if thr is None else thr.batch,
        None if thr is None else thr.img_s,
        cost.peak_mib,
        cost.file_bytes,
        None if gpu_lat is None else gpu_lat.p50_ms,
        None if gpu_thr is None else gpu_thr.img_s,
    )
    return dict(zip(PRICE_COLUMNS, values, strict=True))


def save_results(results: RunResults, out_dir: Path) -> Path:
    """Atomically write `results.json` and a flat `results.csv` (one row per model, with the headline figures
    of its price at inference: `PRICE_COLUMNS`)."""
    out_dir = Path(out_dir)
    data = _finite(dataclasses.asdict(results))
    path = atomic_write_json(out_dir / RESULTS_FILE, data)
    cols = [
        "label",
        "timm",
        "finetune",
        "status",
        "epochs_run",
        "train_time_s",
        "train_accuracy",
        "val_accuracy",
        "test_accuracy",
        "test_top5_accuracy",
        "test_macro_f1",
        "train_top5_accuracy",
        "train_macro_f1",
        "val_top5_accuracy",
        "val_macro_f1",
        "params",
        "trainable_params",
        "fwd_gflops",
        "train_img_s",
        "eval_img_s",
        "latency_ms_b1",
        "peak_memory_gib",
        *PRICE_COLUMNS,
    ]
    rows = [",".join(cols)]
    for m, model in zip(data["models"], results.models, strict=True):
        m = {**m, **_finite(price_columns(model.inference))}
        rows.append(",".join("" if m.get(c) is None else str(m[c]).replace(",", ";") for c in cols))
    atomic_write_text(out_dir / RESULTS_CSV, "\n".join(rows) + "\n")
    return path


def _build(cls: Any, data: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def load_results(run_dir: str | Path) -> RunResults:
    """Read `RUN_DIR/results.json` back into dataclasses."""
    import json

    from visionpoc.errors import VisionpocError

    path = Path(run_dir) / RESULTS_FILE
    seeds = (
        []
        if path.is_file()
        else sorted(
            (p.parent for p in Path(run_dir).glob("seed-*/" + RESULTS_FILE)),
            key=lambda d: int(d.name[5:]) if d.name[5:].isdigit() else -1,
        )
    )
    if not path.is_file() and ((Path(run_dir) / REPEATS_FILE).is_file() or seeds):
        listed = ", ".join(str(d) for d in seeds) or "none has finished yet"
        raise VisionpocError(
            f"{run_dir} holds the repeats of a comparison, one run per seed: pass one of them ({listed}); "
            + (
                f"`visionpoc report {run_dir}` compares them"
                if (Path(run_dir) / REPEATS_FILE).is_file()
                else f"its {REPEATS_FILE} is missing: resuming the run writes it again (`visionpoc compare --resume "
                f"{run_dir}`, or `visionpoc train --resume {run_dir} --model LABEL` for a `train` run)"
            )
        )
    if not path.is_file():
        raise VisionpocError(f"{path} not found: pass the output folder of a finished `visionpoc compare`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        models = []
        for m in data["models"]:
            m = dict(m)
            m["history"] = [_build(EpochRecord, h) for h in m.get("history", [])]
            m["inference"] = inference_from(m.get("inference"))
            models.append(_build(ModelResult, m))
        return RunResults(
            dataset=_build(DatasetInfo, data["dataset"]),
            models=models,
            environment=_build(Environment, data["environment"]),
            config=data.get("config", {}),
            created=data.get("created", ""),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # truncated, hand-edited, another tool's
        raise VisionpocError(
            f"{path} is not a readable visionpoc results file ({type(e).__name__}: {e}); it was cut short or "
            "edited: restore it, or rerun the comparison"
        ) from e


# ------------------------------------------------------------------------------------------ predictions


def save_predictions(path: Path, targets: np.ndarray, probs: np.ndarray, files: list[str]) -> None:
    """Test-set predictions: targets (N,), probs (N, C) float32, and each image's relative path."""
    assert len(targets) == len(probs) == len(files)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                targets=targets.astype(np.int64),
                probs=probs.astype(np.float32),
                preds=probs.argmax(1).astype(np.int64),
                files=np.array(files),
            )

    atomic_write(path, write)


def load_predictions(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ------------------------------------------------------------------------------------------ environment


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cpu_name() -> str:
    """The CPU's model name ('Intel(R) Xeon(R) Platinum 8480+'), or what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(device: str, seed: int) -> Environment:
    import timm
    import torch

    from visionpoc import __version__

    gpu = None
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return Environment(
        visionpoc=__version__,
        python=platform.python_version(),
        torch=torch.__version__,
        timm=timm.__version__,
        cuda=torch.version.cuda,
        device=device,
        gpu_name=gpu,
        git_commit=git_commit(),
        seed=seed,
        platform=f"{platform.system()} {platform.machine()} ({os.cpu_count()} CPUs)",
    )
