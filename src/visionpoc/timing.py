"""Clocks and throughput, airbench-style: synchronize the device before reading the clock, keep
warm-up (compilation, allocator) out of the training-time figure, and report peak memory."""

from __future__ import annotations

import resource
import sys
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """Peak GPU memory allocated by torch on CUDA; on the CPU, the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "process_max_rss"


@torch.inference_mode()
def latency_ms(
    model: torch.nn.Module, input_size: tuple[int, int, int], device: torch.device, warmup: int = 3, iters: int = 10
) -> float:
    """Median forward latency at batch 1, in milliseconds."""
    model.eval()
    x = torch.randn(1, *input_size, device=device)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        model(x)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]
