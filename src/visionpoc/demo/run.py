"""The demo run: the digits, the packaged `configs/demo.yaml`, `compare.run`, the report, what next.

`run_demo(out)` writes (or reuses) the digits in `out/digits`, loads `demo.yaml` with `data.root` pointed
there, trains both models through `compare.run` into a new `out/compare-<time>` folder (an earlier demo's
run is kept), and writes the report. `bottom_line` reads the report's verdict back for the terminal,
`next_steps` is the line that ends the demo, `free_port` the port `demo --serve` binds.
"""

from __future__ import annotations

import logging
import shlex
import socket
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from visionpoc.config import load_config
from visionpoc.demo.digits import write_digits
from visionpoc.results import RunResults
from visionpoc.runfiles import REPORT_MD

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("runs/demo")
CONFIG_FILE = "demo.yaml"
DIGITS_DIR = "digits"
PAGE_TITLE = "Which digit is it?"
REAL_POC = "visionpoc compare --dry-run, then visionpoc compare"


@dataclass
class Demo:
    """What a demo leaves: its run folder, results and report, and the report's verdict."""

    run_dir: Path
    results: RunResults
    report: Path
    bottom_line: list[str]  # the report's verdict sentences, as plain text

    @property
    def ok(self) -> bool:
        """Whether both models trained."""
        return all(m.status == "ok" for m in self.results.models)


def config_path() -> Path:
    """The packaged `configs/demo.yaml`."""
    return Path(str(resources.files("visionpoc").joinpath("configs", CONFIG_FILE)))


def run_demo(out: str | Path | None = None) -> Demo:
    """The whole demo in `out` (default `runs/demo`): digits, comparison, report."""
    from visionpoc import compare
    from visionpoc.preflight import default_out, refuse_existing_run
    from visionpoc.report import write_report

    out = Path(out) if out is not None else DEFAULT_OUT
    root = write_digits(out / DIGITS_DIR)
    cfg = load_config(config_path())
    cfg = replace(cfg, data=replace(cfg.data, root=str(root)))  # not `--set`: a path is no YAML value
    run_dir = out / default_out("compare").name  # compare-<time>: each demo keeps its own run
    refuse_existing_run(run_dir)
    log.info("demo: %s vs %s on %s, into %s", cfg.models[0].label, cfg.models[1].label, root, run_dir)
    done = compare.run("compare", cfg, run_dir, False, None)
    html = write_report(run_dir)
    return Demo(run_dir, done.runs[0], html, bottom_line(run_dir))


def bottom_line(run_dir: Path) -> list[str]:
    """The verdict sentences of the report's `Bottom line` section (report.md), without Markdown."""
    path = run_dir / REPORT_MD
    if not path.is_file():
        return []
    lines, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            if inside:
                break
            inside = line.strip() == "## Bottom line"
        elif inside and line.startswith("> "):
            lines.append(line[2:].replace("**", "").strip())
    return lines


def best_on_test(results: RunResults) -> str | None:
    """The label of the model with the highest test accuracy (None when no model finished)."""
    scored = [m for m in results.models if m.status == "ok" and m.test_accuracy is not None]
    return max(scored, key=lambda m: m.test_accuracy or 0.0).label if scored else None


def next_steps(demo: Demo) -> str:
    """The demo's last line: where its report is, how to serve its models, how to run the real PoC."""
    best = best_on_test(demo.results)
    serve = f"serve the models{f' ({best} is best on test)' if best else ''}: visionpoc serve {shlex.quote(str(demo.run_dir))}"
    return f"demo done: report {demo.report}; {serve}; the real PoC (Stanford Dogs): {REAL_POC}"


def free_port(port: int, host: str = "127.0.0.1") -> int:
    """`port`, or for 0 a port that is free on `host` now (so that the printed URL is the real one)."""
    if port:
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
