"""Clocks and throughput, airbench-style: synchronize the device before reading the clock, keep
warm-up (compilation, allocator) out of the training-time figure, and report peak memory.

`Progress` makes a long pass (an epoch, an evaluation, the probe's features) visible while it runs: in
a terminal a tqdm bar (step n/N, img/s, ETA); elsewhere (nohup, a job scheduler's log, CI) a log line
about every `PROGRESS_LOG_S` seconds with the same facts. Only the main process shows either.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

PROGRESS_LOG_S = 30.0
"""Seconds between two progress log lines of a pass when stderr is not a terminal (0: every step)."""
BAR_EVERY = 10  # steps between two updates of a bar's figures (the caller syncs the device for them)
T = TypeVar("T")


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


def duration(seconds: float) -> str:
    """`seconds` for a reader: 42s, 3m05s, 1h02m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


class Progress(Generic[T]):
    """Progress through one pass over `items` of `total` steps, `done` of them already (a resumed epoch).

    Iterate over it for the items; after each step call `step(images)`: it says whether figures are due
    (`show` them then). Under a bar they are due every `BAR_EVERY` steps, for the bar's postfix; without
    one, when `PROGRESS_LOG_S` seconds have passed since the pass began or the last line. Only then need a
    caller synchronize the device for its own figures (a running loss): never when nothing is shown.
    The rate (img/s, and the ETA's steps/s) counts from the pass's start, or from `restart_clock()`."""

    def __init__(
        self,
        items: Iterable[T],
        desc: str,
        total: int | None = None,
        done: int = 0,
        show: bool = True,
        logger: logging.Logger = log,
        unit: str = "batch",
    ) -> None:
        self.items, self.desc, self.unit, self.logger = items, desc, unit, logger
        if total is None:
            try:
                total = done + len(items)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total, self.n = total, done
        self.mode = "off" if not show else "bar" if _terminal() else "log"
        self.bar = tqdm(total=total, initial=done, desc=desc, unit=unit, leave=False) if self.mode == "bar" else None
        self._images = 0
        self.restart_clock()
        self._last_line = self._t0

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def restart_clock(self) -> None:
        """Count the rate from now on (after a warm-up step that would distort it)."""
        self._t0, self._n0, self._images0 = time.perf_counter(), self.n, self._images

    def step(self, images: int) -> bool:
        """One step of `images` done; whether figures are due now (cheap: no device sync)."""
        self.n += 1
        self._images += images
        if self.bar is not None:
            self.bar.update(1)
            return self.n % BAR_EVERY == 0
        return self.mode == "log" and time.perf_counter() - self._last_line >= PROGRESS_LOG_S

    def img_s(self) -> float:
        return (self._images - self._images0) / max(time.perf_counter() - self._t0, 1e-9)

    def eta_s(self) -> float | None:
        """Seconds left at the rate so far; None without a total or a step timed yet."""
        steps = self.n - self._n0
        if self.total is None or steps <= 0:
            return None
        return (self.total - self.n) * (time.perf_counter() - self._t0) / steps

    def show(self, **figures: str) -> None:
        """The rate, the ETA and the caller's `figures` (e.g. loss="0.693"): the bar's postfix, or a log line."""
        if self.bar is not None:
            self.bar.set_postfix(**figures, img_s=f"{self.img_s():.0f}")
        elif self.mode == "log":
            self._last_line = time.perf_counter()
            of = f"/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)" if self.total else ""
            eta = self.eta_s()
            facts = [
                f"{self.unit} {self.n}{of}",
                f"{self.img_s():.1f} img/s",
                *(f"{k} {v}" for k, v in figures.items()),
            ]
            left = f", about {duration(eta)} left" if eta is not None else ""
            self.logger.info("%s: %s%s", self.desc, ", ".join(facts), left)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
