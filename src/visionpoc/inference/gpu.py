"""The same figures with torch on a CUDA GPU, at each batch size (fp32, eval mode, `inference_mode`), when
the machine has one: each run is synchronized before the clock is read, and the memory figure is the peak
allocated by the model, its input and its activations (`torch.cuda.max_memory_allocated`, from before the
weights were moved to the GPU)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from visionpoc.config import InferenceConfig
from visionpoc.inference.worker import time_runs, timing
from visionpoc.results import BatchTiming

log = logging.getLogger(__name__)


def measure_cuda(
    model: nn.Module, input_size: tuple[int, ...], icfg: InferenceConfig
) -> tuple[str, list[BatchTiming], list[str]]:
    """The GPU's name, a timing per batch size, and notes (a batch that did not fit). Needs CUDA."""
    device = torch.device("cuda")
    notes: list[str] = []
    out: list[BatchTiming] = []
    bounds: dict[str, Any] = {
        "warmup_runs": max(icfg.warmup_runs, 1),  # the first call also loads CUDA kernels
        "min_runs": icfg.min_runs,
        "max_runs": icfg.max_runs,
        "max_seconds": icfg.max_seconds,
    }
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    model = model.to(device).eval()
    try:
        for b in sorted(icfg.batch_sizes):
            x = torch.randn(b, *input_size, device=device)  # (B, 3, H, W)
            torch.cuda.reset_peak_memory_stats(device)

            def run(x: torch.Tensor = x) -> None:
                with torch.inference_mode():
                    model(x)
                torch.cuda.synchronize(device)

            try:
                times = time_runs(run, bounds)
            except torch.cuda.OutOfMemoryError:
                notes.append(f"GPU: batch {b} did not fit in memory")
                break
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            out.append(BatchTiming(**timing(b, times, peak)))
            del x
    finally:
        model.cpu()
        torch.cuda.empty_cache()
    return torch.cuda.get_device_name(device), out, notes
