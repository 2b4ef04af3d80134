"""Render a `Report` with Jinja2: `report.html` (one self-contained file, figures as base64 PNG data
URIs, no external CSS or JS: it works offline and can be mailed) and `report.md` (for a README or a
pull request; its figures are PNG files in `report_files/`). Both come from the same `Report` value
and the same number formatting, so they never disagree.
"""

from __future__ import annotations

import base64
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import jinja2

from visionpoc.repeats import Spread, read_repeats
from visionpoc.report.across_seeds import SeedsReport, build_seeds_report
from visionpoc.report.budget import sci
from visionpoc.report.build import N_RESAMPLES, Report, build_report
from visionpoc.report.stats import Interval, format_p, p_is, pts
from visionpoc.runfiles import (
    REPORT_FILES_DIR,
    REPORT_HTML,
    REPORT_MD,
    RESULTS_FILE,
    atomic_write_bytes,
    atomic_write_text,
)

log = logging.getLogger(__name__)

DASH = "–"


def _missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and not math.isfinite(v))


def pct(v: float | None, digits: int = 1) -> str:
    """0.8531 -> '85.3%'."""
    return DASH if _missing(v) else f"{100 * v:.{digits}f}%"  # type: ignore[operator]


def ci(iv: Interval | None) -> str:
    """The interval of an accuracy in percent: '[82.1, 88.4]'."""
    return "" if iv is None else f"[{100 * iv.low:.1f}, {100 * iv.high:.1f}]"


def points(v: float | None, signed: bool = True) -> str:
    """A difference of accuracies in percentage points: 0.0123 -> '+1.2'."""
    return DASH if _missing(v) else pts(v, signed)  # type: ignore[arg-type]


def num(v: float | int | None, spec: str = ",.1f", sig: int = 2) -> str:
    """A number with `spec`; a fixed-point spec keeps at least `sig` significant digits, so that a small value
    is not rounded away: num(1.56, ",.0f") -> '1.6', num(0.0123, ".2f") -> '0.012' (zero keeps `spec`)."""
    if _missing(v):
        return DASH
    m = re.fullmatch(r"(,?)\.(\d+)f", spec)
    if m and v:
        magnitude = math.floor(math.log10(abs(v)))  # type: ignore[arg-type]
        spec = f"{m[1]}.{max(int(m[2]), sig - 1 - magnitude)}f"
    return format(v, spec)


def rate(v: float | int | None) -> str:
    """A throughput (img/s): whole numbers from 100 up, three significant digits below ('45.7', '1.56')."""
    return num(v, ",.0f", sig=3)


def decimal(v: float | int | None) -> str:
    """A setting such as an EMA or layer decay: four significant digits (0.8876087522 -> '0.8876')."""
    return DASH if _missing(v) else f"{v:.4g}"


def count(v: float | int | None) -> str:
    """A count for a reader: 1234567 -> '1,234,567'."""
    return DASH if _missing(v) else f"{round(v):,}"  # type: ignore[arg-type]


def millions(v: int | None) -> str:
    return DASH if v is None else f"{v / 1e6:,.2f} M"


# backslash, code, emphasis, links, inline HTML, cell separators; `_` only at a word's edge (snake_case
# names never emphasize, and stay readable in the .md file)
_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|]|(?<![^\W_])_|_(?![^\W_]))")


def md_cell(text: object) -> str:
    """Text shown as is inside a Markdown table cell: a class named `a_b*c*` or `<b>` stays that text
    (Markdown's emphasis, links, inline HTML and cell separators are backslash-escaped)."""
    return _MD_SPECIAL.sub(r"\\\1", str(text)).replace("\n", " ")


def spread_pct(s: Spread | None) -> str:
    """An accuracy across seeds: '85.3% ± 0.4' (mean, sample standard deviation in points)."""
    if s is None:
        return DASH
    return pct(s.mean) + ("" if s.std is None else f" ± {100 * s.std:.1f}")


def range_pct(s: Spread | None) -> str:
    """The lowest and highest seed of an accuracy, in percent: '[84.9, 85.7]'."""
    return "" if s is None or len(s.values) < 2 else f"[{100 * s.low:.1f}, {100 * s.high:.1f}]"


def spread_num(s: Spread | None, spec: str = ",.1f", sig: int = 2) -> str:
    """Any other figure across seeds: '123.4 ± 5.6'."""
    if s is None:
        return DASH
    return num(s.mean, spec, sig) + ("" if s.std is None else f" ± {num(s.std, spec, sig)}")


def p_or_dash(p: float | None) -> str:
    return DASH if p is None else format_p(p)


def _environment(image_src: Callable[[str], str]) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("visionpoc.report", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(
        pct=pct,
        ci=ci,
        points=points,
        num=num,
        rate=rate,
        decimal=decimal,
        count=count,
        sci=sci,
        millions=millions,
        p=format_p,
        p_is=p_is,
        md=md_cell,
        spread_pct=spread_pct,
        range_pct=range_pct,
        spread_num=spread_num,
        p_or_dash=p_or_dash,
    )
    env.globals["img"] = image_src
    env.globals["n_resamples"] = N_RESAMPLES
    return env


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(rep: Report | SeedsReport) -> str:
    template = "seeds.html.j2" if isinstance(rep, SeedsReport) else "report.html.j2"
    return _environment(lambda name: _data_uri(rep.figures[name])).get_template(template).render(r=rep)


def render_markdown(rep: Report | SeedsReport) -> str:
    template = "seeds.md.j2" if isinstance(rep, SeedsReport) else "report.md.j2"
    return _environment(lambda name: f"{REPORT_FILES_DIR}/{name}.png").get_template(template).render(r=rep)


def write_report(run_dir: str | Path, explain: bool = True) -> Path:
    """Write `RUN_DIR/report.html`, `RUN_DIR/report.md` and `RUN_DIR/report_files/*.png`; return the HTML path.

    For a run with repeats (`RUN_DIR/repeats.json`), each finished seed's folder gets its own report first,
    and `RUN_DIR`'s report compares the seeds.
    """
    run_dir = Path(run_dir)
    repeats = read_repeats(run_dir)
    if repeats is not None:
        for seed_dir in repeats.dirs:
            if (seed_dir / RESULTS_FILE).is_file():
                write_report(seed_dir, explain=explain)
    rep: Report | SeedsReport = build_seeds_report(run_dir) if repeats is not None else build_report(run_dir, explain)
    files = run_dir / REPORT_FILES_DIR
    for old in files.glob("*.png") if files.is_dir() else []:
        old.unlink()  # figures of an earlier report that this one may not have
    for name, png in rep.figures.items():
        atomic_write_bytes(files / f"{name}.png", png)
    atomic_write_text(run_dir / REPORT_MD, render_markdown(rep))
    html = atomic_write_text(run_dir / REPORT_HTML, render_html(rep))
    log.debug("report: %s (%d figures)", html, len(rep.figures))
    return html
