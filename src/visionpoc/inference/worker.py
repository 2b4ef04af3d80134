"""The measuring process: one ONNX file timed with ONNX Runtime on the CPU, in a fresh Python process.

`python -m visionpoc.inference.worker SPEC.json OUT.json`: SPEC holds the file, the input's shape for one
image, the thread count and the run bounds; OUT receives the timings. A process of its own keeps the
training process's threads, allocator and imported libraries out of the figures, and makes the memory
figure honest: the peak resident set (RSS) of this process from just before the session is created to the
last run, minus the RSS at that moment. On Linux the kernel's high-water mark (VmHWM) is reset first
(`/proc/self/clear_refs`), so the peak is exactly that; elsewhere the growth of `ru_maxrss` is used (a
lower bound if importing the runtime peaked higher). It counts the session (weights, graph optimisation,
the memory arena) and the batches' inputs and outputs, i.e. what a serving process would hold.

It imports only the standard library, NumPy, ONNX Runtime and `visionpoc.results` (no torch).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from visionpoc.results import cpu_name

DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity, where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _os_threads() -> int | None:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def _vm_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class PeakMemory:
    """The peak RSS increase from `start()` on (MiB), and how it was read."""

    def start(self) -> None:
        self.kind = "ru_maxrss delta"
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            if _vm_kib("VmHWM") is not None:
                self.kind = "VmHWM reset"
        except OSError:
            pass
        self.base_kib = (_vm_kib("VmRSS") if self.kind == "VmHWM reset" else None) or self._maxrss_kib()

    @staticmethod
    def _maxrss_kib() -> int:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux

    def mib(self) -> float:
        peak = _vm_kib("VmHWM") if self.kind == "VmHWM reset" else None
        return max(0, (peak or self._maxrss_kib()) - self.base_kib) / 1024


def time_runs(run: Any, spec: dict[str, Any]) -> list[float]:
    """Seconds of each timed call of `run()`, after `warmup_runs` untimed ones: at least `min_runs`, at most
    `max_runs`, stopping once `max_seconds` are spent."""
    for _ in range(spec["warmup_runs"]):
        run()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < spec["max_runs"] and (
        len(times) < spec["min_runs"] or time.perf_counter() - start < spec["max_seconds"]
    ):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def timing(batch: int, times: list[float], peak_mib: float | None) -> dict[str, Any]:
    """A `results.BatchTiming` as a dict: percentiles of the runs, and the throughput."""
    ms = np.asarray(times) * 1000.0
    return {
        "batch": batch,
        "runs": len(times),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "mean_ms": float(ms.mean()),
        "img_s": batch * len(times) / float(np.sum(times)),
        "peak_mib": peak_mib,
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Time `spec["onnx"]` at each batch size of `spec["batch_sizes"]` (increasing) on the CPU."""
    import onnxruntime as ort

    peak = PeakMemory()
    threads_before = _os_threads()
    peak.start()
    options = ort.SessionOptions()
    if spec["threads"] is not None:
        options.intra_op_num_threads = spec["threads"]
    session = ort.InferenceSession(spec["onnx"], options, providers=["CPUExecutionProvider"])
    threads_after = _os_threads()
    counted = None if threads_before is None or threads_after is None else threads_after - threads_before + 1
    port = session.get_inputs()[0]
    fixed = port.shape[0] if port.shape and isinstance(port.shape[0], int) else None
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {
        "runtime": f"onnxruntime {ort.__version__}, CPUExecutionProvider",
        "cpu": cpu_name(),
        "cpus": usable_cpus(),
        "threads": spec["threads"] or counted,
        "threads_asked": spec["threads"],
        "file_bytes": os.path.getsize(spec["onnx"]),
        "peak_kind": peak.kind,
        "batches": [],
        "notes": [],
    }
    for b in sorted(spec["batch_sizes"]):
        if fixed is not None and fixed != b:
            out["notes"].append(f"batch {b} not timed: the model's input {port.name!r} has a fixed batch of {fixed}")
            continue
        x = rng.standard_normal((b, *spec["image_shape"])).astype(DTYPES.get(port.type, np.float32))
        feed = {port.name: x}  # (B, 3, H, W) or (B, H, W, 3)
        times = time_runs(lambda feed=feed: session.run(None, feed), spec)
        out["batches"].append(timing(b, times, peak.mib()))
    out["peak_mib"] = peak.mib()
    return out


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    Path(out_path).write_text(json.dumps(measure(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
