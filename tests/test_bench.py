"""`visionpoc bench --smoke` on the CPU: it runs, and reports every figure and ratio it promises.
No speed is asserted here: performance targets belong to the benchmark itself (docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visionpoc.bench import plain
from visionpoc.bench import run as bench
from visionpoc.bench.run import SECTIONS, format_bench, run_bench


@pytest.mark.slow
def test_smoke_bench_reports_every_figure(tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "bench.json"
    d = run_bench(smoke=True, device="cpu", out=out)
    assert json.loads(out.read_text())["ratios"] == pytest.approx(d["ratios"])
    assert d["environment"]["device"] == "cpu" and d["environment"]["smoke"] is True
    inp = d["input"]
    assert inp["pil"]["img_s"] > 0 and inp["prepared"]["img_s"] > 0 and inp["prepared"]["build_s"] > 0
    assert inp["ratio_prepared_vs_pil"] == pytest.approx(inp["prepared"]["img_s"] / inp["pil"]["img_s"])
    assert [m["name"] for m in d["ours"]] == ["vit_b16", "xception_top10", "vit_b16_bs8"]  # the variant last
    for m in d["ours"]:
        assert "error" not in m, m
        assert m["synthetic_img_s"] > 0 and m["prepared_img_s"] > 0 and m["input_efficiency"] > 0
        assert m["micro_batch"] is None  # no out-of-memory fallback
    variant = d["ours"][-1]
    assert variant["bs"] == 2 * d["ours"][0]["bs"] and variant["peer"] == "vit_b16"
    vit_eager = next(m["img_s"] for m in d["peer"] if m["name"] == "vit_b16")  # compared with its base's peer
    assert d["ratios"]["vit_b16_bs8 vs timm eager"] == pytest.approx(variant["prepared_img_s"] / vit_eager)
    assert ("vit_b16_bs8 vs hf" in d["ratios"]) == bool(d["hf"])
    assert {(m["name"], m["compile"]) for m in d["peer"]} == {("vit_b16", False), ("xception_top10", False)}
    assert all(m["img_s"] > 0 for m in d["peer"])
    assert set(d["ratios"]) >= {
        "input prepared/pil",
        "vit_b16 input efficiency",
        "vit_b16 vs timm eager",
        "xception_top10 input efficiency",
        "xception_top10 vs timm eager",
        "vit_b16_bs8 input efficiency",
    }
    assert "xception_top10 vs hf" not in d["ratios"]  # HF's peer is a ViT
    if not d["hf"]:
        assert d["skipped"]["hf"] == "transformers is not installed"
    assert "targets" not in d  # the targets are for an H100, not a smoke run
    lp = d["probe"]
    assert "error" not in lp, lp
    assert lp["epochs"] == 10 and lp["through_backbone_s"] > 0 and lp["cached_s"] > 0
    assert d["ratios"]["linear probe cached vs through the backbone"] == pytest.approx(
        lp["through_backbone_s"] / lp["cached_s"]
    )
    assert lp["val_accuracy"]["cached"] is not None and lp["images"]["train"] == 42
    pl = d["plain"]
    assert "error" not in pl, pl
    assert [c["finetune"] for c in pl["cases"]] == ["full", "head"]
    for c in pl["cases"]:
        assert c["plain_img_s"] > 0 and c["ours_img_s"] > 0 and len(c["rates"]["ours"]) == len(c["rates"]["plain"])
        assert c["ratio"] == pytest.approx(c["ours_img_s"] / c["plain_img_s"])  # one round: its own ratio
        assert d["ratios"][f"{c['finetune']} vs the plain loop"] == c["ratio"]
        lo = c["loop"]  # the loops alone, over the same built batches
        assert lo["plain_img_s"] > 0 and lo["ours_img_s"] > 0
        assert lo["ratio"] == pytest.approx(lo["ours_img_s"] / lo["plain_img_s"])
        assert d["ratios"][f"{c['finetune']} vs the plain loop, loops alone"] == lo["ratio"]
    text = format_bench(d)
    assert "the loops alone on built batches: ratio" in text
    assert "our loop vs a plain loop, resnet10t full at 32px" in text
    assert "prepared store + gpu_aug" in text and "ratio input prepared/pil" in text and "vit_b16_bs8" in text
    assert "linear probe, vit_tiny_patch16_224 at 32px, 10 epochs on 42 images" in text
    assert "out of memory" not in text
    d["ours"][-1]["micro_batch"] = 4  # as the step's fallback leaves it: said, not hidden
    assert "vit_b16_bs8: out of memory at batch 8, measured with micro-batches of 4" in format_bench(d)


@pytest.mark.slow
def test_on_a_cpu_the_full_bench_measures_the_input_path_and_the_probe(
    monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    toy, toy_plain = bench.plan(smoke=True), plain.plain_plan(smoke=True)
    monkeypatch.setattr(bench, "plan", lambda smoke: toy)  # the non-smoke rules, on toy sizes
    monkeypatch.setattr(plain, "plain_plan", lambda smoke: toy_plain)
    d = run_bench(smoke=False, device="cpu")  # the model steps measure a GPU: `input`, `probe`, `plain` run
    assert d["input"]["prepared"]["img_s"] > 0 and not d["ours"] and not d["peer"] and d["probe"]["ratio"] > 0
    assert d["ratios"]["head vs the plain loop"] > 0
    assert set(d["skipped"]) == set(SECTIONS) - {"input", "probe", "plain"}
    assert run_bench(smoke=True, device="cpu", sections=("input",))["skipped"]["ours"] == "not asked for"


def test_bench_command_runs_chosen_sections(
    tmp_path: Path, one_thread: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from visionpoc.cli import main

    out = tmp_path / "b.json"
    assert main(["bench", "--smoke", "--device", "cpu", "--sections", "input", "--out", str(out)]) == 0
    measured = json.loads(out.read_text())
    assert measured["input"] and not measured.get("peer")
    assert "img/s" in capsys.readouterr().out
    assert main(["bench", "--smoke", "--device", "cpu", "--sections", "input,gpu_magic"]) == 2
