"""The price at inference beyond the single-run report: `results.csv`'s columns, the page across seeds
(each model's price once, from the first seed that has it), and `visionpoc evaluate` measuring the model it
adds to a run (`--no-price` and `inference.enabled: false` leave it out)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from test_inference_cost import QUICK, QUICK_SET, cost_of, nhwc_means, timing
from visionpoc.cli import main
from visionpoc.config import InferenceConfig, ModelConfig, load_config, save_config
from visionpoc.inference.cost import price_model
from visionpoc.repeats import save_repeats
from visionpoc.report import price
from visionpoc.report.across_seeds import build_seeds_report
from visionpoc.report.render import num, rate, render_html, render_markdown
from visionpoc.results import PRICE_COLUMNS, InferenceCost, ModelResult, load_results, save_results
from visionpoc.runfiles import CONFIG_FILE, RESULTS_CSV, RESULTS_FILE

DOGS = ["Chihuahua", "Shih-Tzu", "Afghan hound"]  # the miniature dataset's classes, in its order


def csv_rows(run: Path) -> dict[str, dict[str, str]]:
    with open(run / RESULTS_CSV, newline="") as f:
        return {row["label"]: row for row in csv.DictReader(f)}


def section_of(md: str, title: str = "### Price at inference") -> str:
    start = md.index(title)
    return md[start : md.index("\n## ", start)]


def row_cells(section: str, label: str) -> list[str]:
    row = next(line for line in section.splitlines() if line.startswith(f"| **{label}**"))
    return [x.strip() for x in row.split("|")[2:-1]]


# ------------------------------------------------------------------------------------------ results.csv


def test_the_csv_columns_hold_the_numbers_of_results_json(run_dir: Path, tmp_path: Path) -> None:
    results = load_results(run_dir)
    measured = cost_of(41.25, 600.5, 3 * 2**20 + 7)
    measured.gpu, measured.gpu_batches = "Test GPU", [timing(1, 0.75), timing(32, 9.5)]
    results.model("cnn").inference = measured
    results.model("vit").inference = InferenceCost(error="the export failed")  # not measured: empty cells
    save_results(results, tmp_path)
    rows = csv_rows(tmp_path)
    header = (tmp_path / RESULTS_CSV).read_text().splitlines()[0].split(",")
    assert header[-len(PRICE_COLUMNS) :] == list(PRICE_COLUMNS)
    block = json.loads((tmp_path / RESULTS_FILE).read_text())["models"][0]["inference"]
    lat, thr = block["batches"][0], block["batches"][-1]
    want = {
        "cpu_latency_batch": lat["batch"],
        "cpu_latency_p50_ms": lat["p50_ms"],
        "cpu_latency_p95_ms": lat["p95_ms"],
        "cpu_throughput_batch": thr["batch"],
        "cpu_throughput_img_s": thr["img_s"],
        "cpu_peak_mib": block["peak_mib"],
        "onnx_file_bytes": block["file_bytes"],
        "gpu_latency_p50_ms": block["gpu_batches"][0]["p50_ms"],
        "gpu_throughput_img_s": block["gpu_batches"][-1]["img_s"],
    }
    assert {c: float(rows["cnn"][c]) for c in PRICE_COLUMNS} == {k: float(v) for k, v in want.items()}
    assert (want["cpu_latency_batch"], want["cpu_throughput_batch"], want["onnx_file_bytes"]) == (1, 32, 3 * 2**20 + 7)
    assert all(rows["vit"][c] == "" for c in PRICE_COLUMNS)
    assert rows["cnn"]["test_accuracy"] == str(results.model("cnn").test_accuracy)  # the other columns stand


# ------------------------------------------------------------------------------------- the page across seeds


def seeds_run(run_dir: Path, tmp_path: Path, blocks: list[dict[str, InferenceCost | None]]) -> Path:
    """A run with repeats: a copy of the tiny run per seed (seed-0, seed-1, ...), each model's `inference`
    block that seed's entry of `blocks`."""
    out = tmp_path / "repeats"
    for seed, by_label in enumerate(blocks):
        d = out / f"seed-{seed}"
        shutil.copytree(run_dir, d)
        r = load_results(d)
        for m in r.models:
            m.inference = by_label[m.label]
        save_results(r, d)
    shutil.copy(run_dir / CONFIG_FILE, out / CONFIG_FILE)
    save_repeats(out, list(range(len(blocks))))
    return out


def test_the_page_across_seeds_shows_each_models_price_once(run_dir: Path, tmp_path: Path) -> None:
    cnn, vit = cost_of(41.2, 600.0, 3 * 2**20), cost_of(127.4, 2100.0, 9 * 2**20)
    copied = dataclasses.replace(cnn, measured_in=str(tmp_path / "repeats" / "seed-0"))  # as `price_runs` copies it
    out = seeds_run(
        run_dir,
        tmp_path,
        [
            {"cnn": cnn, "vit": InferenceCost(error="ONNX Runtime could not time it")},  # vit: not in seed 0
            {"cnn": copied, "vit": vit},
            {"cnn": copied, "vit": cost_of(999.0, 9999.0, 1)},  # a later seed's figures are not shown
        ],
    )
    rep = build_seeds_report(out)
    assert rep.price is not None and rep.price_seed == {"cnn": "seed-0", "vit": "seed-1"}
    md = render_markdown(rep)
    section = section_of(md)
    assert "| CPU latency, batch 1: p50 / p95 (ms) | CPU throughput, batch 32 (img/s) |" in section
    for label, c, seed in [("cnn", cnn, "seed-0"), ("vit", vit, "seed-1")]:
        lat, thr = c.batches
        cells = row_cells(section, label)
        assert cells[:2] == [f"{num(lat.p50_ms)} / {num(lat.p95_ms)}", rate(thr.img_s)]
        assert cells[3] == f"{(c.file_bytes or 0) / 2**20:.1f}" and cells[-1] == seed
    assert num(999.0) not in section
    assert "Measured on Test CPU 9000, 8 CPUs" in section and "does not depend on the seed" in section
    html = render_html(rep)
    assert 'id="price-table"' in html and f"{num(vit.batches[0].p50_ms)} / {num(vit.batches[0].p95_ms)}" in html


def test_the_page_across_seeds_says_when_the_price_was_not_measured(run_dir: Path, tmp_path: Path) -> None:
    out = seeds_run(run_dir, tmp_path, [{"cnn": None, "vit": None}] * 2)
    rep = build_seeds_report(out)
    assert rep.price is None
    assert "_Not measured in this run (`inference.enabled: false`" in section_of(render_markdown(rep))


# --------------------------------------------------------------------------------- visionpoc evaluate


def run_to_join(run_dir: Path, tmp_path: Path, *overrides: str) -> Path:
    """A copy of the tiny run whose own models carry measured blocks (batch 1 and 4, as `QUICK_SET` times)
    and whose config has `QUICK_SET` and `overrides`."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    r = load_results(run)
    for m, p50 in zip(r.models, (2.0, 3.0), strict=True):
        m.inference = dataclasses.replace(cost_of(p50, 4 * p50, 2**20), batches=[timing(1, p50), timing(4, 4 * p50)])
    save_results(r, run)
    save_config(load_config(run / CONFIG_FILE, [*QUICK_SET, *overrides]), run / CONFIG_FILE)
    return run


def evaluate_into(run: Path, tmp_path: Path, *extra: str) -> list[str]:
    prod = nhwc_means(tmp_path / "prod.onnx", batch="N")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(DOGS) + "\n")
    pre = "{size: 32, crop: squash, layout: NHWC}"
    return ["evaluate", "--model", str(prod), "--classes", str(classes), "--preprocess", pre, "--out", str(run), *extra]


@pytest.mark.slow
@pytest.mark.price
def test_evaluate_measures_the_model_it_adds_to_a_run(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = run_to_join(run_dir, tmp_path)
    assert main(evaluate_into(run, tmp_path, "--label", "production")) == 0
    r = load_results(run)
    c = r.model("production").inference
    assert c is not None and c.error is None, c
    assert [b.batch for b in c.batches] == [1, 4] and c.file_bytes == os.path.getsize(tmp_path / "prod.onnx")
    assert "price at inference: CPU (onnxruntime " in capsys.readouterr().out
    row = csv_rows(run)["production"]
    assert float(row["cpu_latency_p50_ms"]) == c.batches[0].p50_ms and int(row["onnx_file_bytes"]) == c.file_bytes
    md = (run / "report.md").read_text()
    cells = row_cells(section_of(md, "### Price at inference"), "production")
    assert cells[0] == f"{num(c.batches[0].p50_ms)} / {num(c.batches[0].p95_ms)}" and cells[1] == rate(
        c.batches[1].img_s
    )
    a = r.model("cnn").inference.batches[0].p50_ms  # type: ignore[union-attr]
    verdict = next(x for x in md.splitlines() if x.startswith("> **") and "production" in x)
    assert f"the CPU latency ({price.ms(a)} → {price.ms(c.batches[0].p50_ms)} ms, median at batch 1)" in verdict


@pytest.mark.slow
def test_no_price_and_inference_disabled_leave_the_added_models_price_out(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int]] = []

    def measured(run_dir: Path, mcfg: ModelConfig, result: ModelResult, icfg: InferenceConfig) -> InferenceCost:
        calls.append((result.label, icfg.min_runs))
        return cost_of(5.0, 20.0, 2**20)

    monkeypatch.setattr("visionpoc.inference.cost.price_one", measured)
    run = run_to_join(run_dir, tmp_path)
    args = evaluate_into(run, tmp_path, "--label", "production")
    assert main(args) == 0  # measured, under the run's own `inference` settings (QUICK_SET: min_runs 3)
    assert calls == [("production", 3)] and load_results(run).model("production").inference is not None
    for skip in ("--no-price", "inference.enabled=false"):  # each evaluation replaces the one before
        if skip.startswith("inference."):
            save_config(load_config(run / CONFIG_FILE, [skip]), run / CONFIG_FILE)
        assert main([*args, *([skip] if skip.startswith("--") else [])]) == 0
        assert len(calls) == 1, skip
        assert load_results(run).model("production").inference is None
        assert all(csv_rows(run)["production"][c] == "" for c in PRICE_COLUMNS)
        md = (run / "report.md").read_text()
        assert row_cells(section_of(md), "production")[0] == "not measured"


@pytest.mark.price
def test_a_runs_model_under_a_new_label_is_measured_from_its_own_run(run_dir: Path) -> None:
    mcfg = load_config(run_dir / CONFIG_FILE).model("cnn")
    result = dataclasses.replace(load_results(run_dir).model("cnn"), label="cnn-on-new-data")  # `evaluate --label`
    cost = price_model(run_dir, mcfg, result, dataclasses.replace(QUICK, threads=1))
    assert cost.error is None, cost.error
    assert [b.batch for b in cost.batches] == [1, 4] and cost.file_bytes
