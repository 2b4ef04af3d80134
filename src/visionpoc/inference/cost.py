"""Measure the price of each model of a finished run at inference, and keep it in its `results.json`.

A trained model is exported to ONNX with the project's exporter (`serving.export.export_onnx`, checked
against PyTorch) into a temporary folder; a deployed model (`onnx:` entry) is measured as its file is.
The file is then timed on this machine's CPU with ONNX Runtime in a process of its own (`worker`), and
with torch on the GPU when CUDA is available (`gpu`). A model that cannot be exported or measured gets an
`InferenceCost` whose `error` says why; the run goes on.

`price_runs` fills the blocks a run lacks (a resumed run keeps the ones it has). The repeats of a run
(`train.repeats`) share one architecture per label: the first seed's figures stand for the others
(`measured_in` names that folder). `price_one` measures the one model `visionpoc evaluate` scores.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from visionpoc.config import Config, InferenceConfig, ModelConfig
from visionpoc.errors import VisionpocError
from visionpoc.results import InferenceCost, ModelResult, RunResults, inference_from, save_results

log = logging.getLogger(__name__)

WORKER_TIMEOUT_S = 900.0  # a guard against a hung worker, plus 2 x max_seconds per batch size


def image_shape(mcfg: ModelConfig) -> tuple[int, int, int]:
    """A deployed model's input for one image, from its `preprocess` (layout and size)."""
    pp = mcfg.preprocess
    if pp is None:
        raise VisionpocError(f"{mcfg.label}: an `onnx:` entry needs `preprocess:` (size, layout) to be timed")
    return (3, pp.size, pp.size) if pp.layout == "NCHW" else (pp.size, pp.size, 3)


def measure_onnx(path: Path, shape: tuple[int, ...], icfg: InferenceConfig) -> InferenceCost:
    """Time the ONNX file `path` (input `shape` per image) on the CPU, in a `worker` process."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise VisionpocError("measuring the price at inference needs onnxruntime: pip install 'visionpoc[export]'")
    spec = {
        "onnx": str(path),
        "image_shape": list(shape),
        **{k: v for k, v in dataclasses.asdict(icfg).items() if k != "enabled"},
    }
    with tempfile.TemporaryDirectory(prefix="visionpoc-inference-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "visionpoc.inference.worker", str(spec_path), str(out_path)]
        timeout = WORKER_TIMEOUT_S + 2 * icfg.max_seconds * len(icfg.batch_sizes)
        src = str(Path(__file__).resolve().parents[2])  # the folder holding `visionpoc`, installed or not
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise VisionpocError(f"the timing of {path} took over {timeout:.0f} s: stopped") from None
        if done.returncode != 0 or not out_path.is_file():
            tail = " ".join(done.stderr.strip().splitlines()[-3:]) or f"exit status {done.returncode}"
            raise VisionpocError(f"ONNX Runtime could not time {path}: {tail}")
        data: dict[str, Any] = json.loads(out_path.read_text())
    cost = inference_from(data)
    assert cost is not None
    return cost


def price_model(run_dir: Path, mcfg: ModelConfig, result: ModelResult, icfg: InferenceConfig) -> InferenceCost:
    """`result`'s price at inference; never raises for the model's sake (the reason goes in `error`). A trained
    model is the one `run_dir` holds under `mcfg.label`."""
    try:
        if mcfg.kind == "onnx":
            path = Path(result.onnx or mcfg.onnx or "").expanduser()
            return measure_onnx(path, image_shape(mcfg), icfg)
        return _trained(run_dir, mcfg.label, icfg)
    except Exception as e:  # the export or the runtime: a note for this model, not the end of the run
        message = str(e) if isinstance(e, VisionpocError) else f"{type(e).__name__}: {e}"
        log.warning("[%s] price at inference not measured: %s", result.label, message)
        return InferenceCost(error=message)


def _trained(run_dir: Path, label: str, icfg: InferenceConfig) -> InferenceCost:
    """Export the trained model `label` of `run_dir` to ONNX in a temporary folder and time it; on CUDA, also
    time it with torch."""
    import torch

    from visionpoc.serving.export import export_onnx
    from visionpoc.serving.loading import load_trained

    tm = load_trained(run_dir, label)
    input_size = tuple(tm.data_config["input_size"])  # (3, H, W)
    with tempfile.TemporaryDirectory(prefix="visionpoc-export-") as tmp:
        cost = measure_onnx(export_onnx(tm, Path(tmp)), input_size, icfg)
    if torch.cuda.is_available():
        from visionpoc.inference.gpu import measure_cuda

        try:
            cost.gpu, cost.gpu_batches, notes = measure_cuda(tm.model, input_size, icfg)
            cost.notes += notes
        except Exception as e:  # the CPU figures stand
            cost.notes.append(f"GPU not measured: {type(e).__name__}: {e}")
    return cost


def summary(cost: InferenceCost) -> str:
    """One log line: 'CPU (onnxruntime 1.20.1, 4 threads): p50 12.3 ms, p95 14.0 ms at batch 1; ...'."""
    if cost.error:
        return f"not measured: {cost.error}"
    parts = [f"CPU ({cost.runtime.split(',')[0]}, {cost.threads} threads)"]
    lat, thr = cost.latency(), cost.throughput()
    if lat is not None:
        parts.append(f"p50 {lat.p50_ms:.1f} ms, p95 {lat.p95_ms:.1f} ms at batch {lat.batch}")
    if thr is not None and thr is not lat:
        parts.append(f"{thr.img_s:,.0f} img/s at batch {thr.batch}")
    if cost.peak_mib is not None:
        parts.append(f"peak +{cost.peak_mib:,.0f} MiB")
    if cost.file_bytes is not None:
        parts.append(f"file {cost.file_bytes / 2**20:,.1f} MiB")
    return "; ".join(parts)


def price_one(run_dir: Path, mcfg: ModelConfig, result: ModelResult, icfg: InferenceConfig) -> InferenceCost:
    """`price_model` with its log lines: the price of one model (`result.label`), as `price_runs` measures it."""
    log.info("[%s] price at inference: timing on this machine's CPU with ONNX Runtime", result.label)
    cost = price_model(run_dir, mcfg, result, icfg)
    log.info("[%s] %s", result.label, summary(cost))
    return cost


def price_runs(cfg: Config, runs: list[tuple[Path, RunResults]]) -> None:
    """Fill the missing `inference` block of every successful model of each (folder, results) run, and save
    each run's results; a label measured in an earlier run (the first repeat) is copied, not measured again."""
    measured: dict[str, tuple[InferenceCost, Path]] = {}
    for run_dir, results in runs:
        changed = False
        for m in results.models:
            if m.status != "ok":
                continue
            if m.inference is not None and not m.inference.error:  # kept (a resumed run); a failure is retried
                measured.setdefault(m.label, (m.inference, run_dir))
                continue
            mcfg = next((x for x in cfg.models if x.label == m.label), None)
            if m.label in measured:
                cost, where = measured[m.label]
                m.inference = dataclasses.replace(cost, measured_in=cost.measured_in or str(where))
            elif mcfg is None:
                m.inference = InferenceCost(error=f"{m.label!r} is not in the run's config: nothing to measure")
            else:
                m.inference = price_one(run_dir, mcfg, m, cfg.inference)
                measured[m.label] = (m.inference, run_dir)
            changed = True
        if changed:
            save_results(results, run_dir)
