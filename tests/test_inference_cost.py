"""The price of each model at inference: the CPU measurement with ONNX Runtime (a tiny exported model and a
deployed NHWC file), its config, `compare` writing (and on resume keeping) the `inference` blocks, and the
report's "Price at inference": its table, the verdict's latency clause, the Pareto front and the figure."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from matplotlib.collections import LineCollection
from matplotlib.container import ErrorbarContainer
from onnx import TensorProto, helper, numpy_helper

from visionpoc import compare
from visionpoc.cli import main
from visionpoc.config import InferenceConfig, ModelConfig, PreprocessConfig, load_config
from visionpoc.errors import ConfigError
from visionpoc.inference.cost import measure_onnx, price_model, price_runs
from visionpoc.report import price
from visionpoc.report.build import build_report
from visionpoc.report.labels import LABEL_GID
from visionpoc.report.render import num, rate, render_html, render_markdown
from visionpoc.report.stats import Interval, pts
from visionpoc.results import BatchTiming, InferenceCost, ModelResult, inference_from, load_results
from visionpoc.runfiles import CONFIG_FILE, RESULTS_FILE

QUICK = InferenceConfig(batch_sizes=(1, 4), warmup_runs=1, min_runs=3, max_runs=8, max_seconds=0.5)
QUICK_SET = [  # the same bounds as `--set` overrides
    "inference.batch_sizes=[1,4]",
    "inference.warmup_runs=1",
    "inference.min_runs=3",
    "inference.max_runs=8",
    "inference.max_seconds=0.5",
]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CNN at 32 px exported with a dynamic batch axis (input `input`, (B, 3, 32, 32))."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    ).eval()
    path = tmp_path_factory.mktemp("tiny_onnx") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation warnings
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 32, 32),),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


def nhwc_means(path: Path, batch: int | str = 1, size: int = 32) -> Path:
    """A deployed-style model: (batch, size, size, 3) NHWC -> (batch, 3) channel means (`batch` 1: fixed)."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, size, size, 3])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, 3])
    axes = numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes")
    node = helper.make_node("ReduceMean", ["image", "axes"], ["scores"], keepdims=0)
    model = helper.make_model(
        helper.make_graph([node], "nhwc", [x], [y], [axes]), opset_imports=[helper.make_opsetid("", 18)]
    )
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


# ----------------------------------------------------------------------------------------- measurement


def test_the_measurement_of_a_tiny_exported_model(tiny_onnx: Path) -> None:
    cost = measure_onnx(tiny_onnx, (3, 32, 32), dataclasses.replace(QUICK, threads=2))
    assert cost.error is None
    assert [b.batch for b in cost.batches] == [1, 4]
    for b in cost.batches:
        assert QUICK.min_runs <= b.runs <= QUICK.max_runs
        assert 0 < b.p50_ms <= b.p95_ms
        assert b.img_s > 0
        assert b.img_s == pytest.approx(b.batch * 1000.0 / b.mean_ms)
    assert cost.file_bytes == os.path.getsize(tiny_onnx)
    assert (cost.threads, cost.threads_asked) == (2, 2)
    assert cost.runtime.startswith("onnxruntime ") and cost.cpu and cost.cpus and cost.cpus >= 1
    assert cost.peak_mib is not None and cost.peak_mib >= 0 and cost.peak_kind
    assert cost.latency() is cost.batches[0] and cost.throughput() is cost.batches[-1]


def test_a_deployed_nhwc_file_with_a_fixed_batch_is_timed_at_batch_1_only(tmp_path: Path) -> None:
    path = nhwc_means(tmp_path / "prod.onnx")
    pp = PreprocessConfig(size=32, layout="NHWC")
    mcfg = ModelConfig(label="prod", onnx=str(path), preprocess=pp, classes=("a", "b", "c"))
    result = ModelResult(label="prod", timm=str(path), finetune="deployed", pretrained=False, onnx=str(path))
    cost = price_model(tmp_path, mcfg, result, dataclasses.replace(QUICK, threads=1))
    assert cost.error is None, cost.error
    assert [b.batch for b in cost.batches] == [1] and cost.threads == 1
    assert cost.notes == ["batch 4 not timed: the model's input 'image' has a fixed batch of 1"]
    assert cost.file_bytes == os.path.getsize(path)


def test_a_model_that_cannot_be_exported_gets_a_note_not_a_crash(tmp_path: Path) -> None:
    result = ModelResult(label="cnn", timm="test_resnet", finetune="full", pretrained=False)
    cost = price_model(tmp_path / "nowhere", ModelConfig(label="cnn", timm="test_resnet"), result, QUICK)
    assert cost.batches == [] and cost.error is not None
    assert str(tmp_path / "nowhere" / RESULTS_FILE) in cost.error  # the run folder has no model to export


def test_the_inference_config_is_checked() -> None:
    assert load_config(None, ["inference.threads=3"]).inference.threads == 3
    for override, key in [
        ("inference.threads=0", "inference.threads"),
        ("inference.batch_sizes=[]", "inference.batch_sizes"),
        ("inference.batch_sizes=[1,0]", "inference.batch_sizes"),
        ("inference.max_seconds=0", "inference.max_seconds"),
        ("inference.min_runs=300", "inference.min_runs"),  # above max_runs (200)
        ("inference.enabled=maybe", "inference.enabled"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override])


def test_a_block_survives_results_json(tmp_path: Path) -> None:
    cost = InferenceCost(runtime="onnxruntime 1.0", cpu="cpu", cpus=2, threads=2, batches=[timing(1, 3.0)])
    data = json.loads(json.dumps(dataclasses.asdict(cost)))
    assert inference_from(data) == cost and inference_from(None) is None


# --------------------------------------------------------------------------------- in a run, in compare


def priced_copy(run_dir: Path, tmp_path: Path, *overrides: str) -> tuple[Path, object]:
    """A copy of the shared tiny run (trained, never priced) and its config with `overrides`."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    assert all(m.inference is None for m in load_results(out).models)
    return out, load_config(out / CONFIG_FILE, [*QUICK_SET, *overrides])


@pytest.mark.price
def test_inference_enabled_false_skips_it(run_dir: Path, tmp_path: Path) -> None:
    out, cfg = priced_copy(run_dir, tmp_path, "inference.enabled=false")
    before = (out / RESULTS_FILE).read_text()
    compare.price(cfg, out, [load_results(out)])  # type: ignore[arg-type]
    assert (out / RESULTS_FILE).read_text() == before


@pytest.mark.slow
@pytest.mark.price
def test_price_runs_writes_a_block_per_model_and_copies_it_to_the_other_seeds(run_dir: Path, tmp_path: Path) -> None:
    out, cfg = priced_copy(run_dir, tmp_path, "inference.threads=1")
    seed2 = tmp_path / "seed-1"
    shutil.copytree(run_dir, seed2)
    price_runs(cfg, [(out, load_results(out)), (seed2, load_results(seed2))])  # type: ignore[arg-type]
    first, second = load_results(out), load_results(seed2)
    for m in first.models:
        c = m.inference
        assert c is not None and c.error is None and c.threads == 1 and c.measured_in is None
        assert [b.batch for b in c.batches] == [1, 4]
        other = second.model(m.label).inference
        assert other is not None and other.measured_in == str(out)
        assert other.batches == c.batches  # measured once: the same architecture costs the same


@pytest.mark.slow
@pytest.mark.price
def test_compare_writes_the_blocks_resume_keeps_them_and_the_report_shows_them(mini_dogs: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data: {{source: stanford_dogs, root: '{mini_dogs}', val_fraction: 0.2, num_workers: 0, download: false}}\n"
        "models:\n"
        "  - {label: cnn, timm: test_resnet, pretrained: false, img_size: 32}\n"
        "  - {label: vit, timm: vit_tiny_patch16_224, pretrained: false, img_size: 32, model_kwargs: {depth: 1}}\n"
        "train: {epochs: 1, batch_size: 8, lr: 0.001, warmup_epochs: 0}\n"
    )
    out = tmp_path / "run"
    sets = [arg for s in QUICK_SET for arg in ("--set", s)]
    assert main(["compare", "--config", str(cfg), "--out", str(out), *sets]) == 0
    blocks = {m.label: m.inference for m in load_results(out).models}
    assert all(b is not None and b.error is None and len(b.batches) == 2 for b in blocks.values()), blocks
    assert main(["compare", "--resume", str(out)]) == 0
    assert {m.label: m.inference for m in load_results(out).models} == blocks  # kept, not measured again
    md = (out / "report.md").read_text()
    section = md[md.index("### Price at inference") : md.index("### What each model was given")]
    for label, b in blocks.items():
        assert b is not None
        lat, thr = b.batches
        assert f"| **{label}**" in section
        assert f" | {num(lat.p50_ms)} / {num(lat.p95_ms)} | {rate(thr.img_s)} | " in section
    assert "![Test accuracy against CPU latency" in section


@pytest.mark.slow
@pytest.mark.price
def test_a_production_onnx_file_against_a_timm_candidate_end_to_end(mini_dogs: Path, tmp_path: Path) -> None:
    prod = nhwc_means(tmp_path / "prod.onnx", batch="N")
    entry = {
        "label": "production",
        "onnx": str(prod),
        "classes": ["Chihuahua", "Shih-Tzu", "Afghan hound"],
        "preprocess": {"size": 32, "crop": "squash", "layout": "NHWC"},
    }
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data: {{source: stanford_dogs, root: '{mini_dogs}', val_fraction: 0.2, num_workers: 0, download: false}}\n"
        f"models:\n  - {json.dumps(entry)}\n"
        "  - {label: cnn, timm: test_resnet, pretrained: false, img_size: 32}\n"
        "train: {epochs: 1, batch_size: 8, lr: 0.001, warmup_epochs: 0}\n"
    )
    out = tmp_path / "run"
    assert (
        main(["compare", "--config", str(cfg), "--out", str(out), *[a for s in QUICK_SET for a in ("--set", s)]]) == 0
    )
    r = load_results(out)
    base, cand = r.model("production").inference, r.model("cnn").inference
    assert base is not None and base.error is None and base.file_bytes == os.path.getsize(prod)
    assert cand is not None and cand.error is None and [b.batch for b in cand.batches] == [1, 4]
    md = (out / "report.md").read_text()
    a, b = base.batches[0].p50_ms, cand.batches[0].p50_ms
    assert f"the CPU latency ({price.ms(a)} → {price.ms(b)} ms, median at batch 1)" in md.split("## 1. Summary")[0]
    assert (out / "report_files" / "accuracy_vs_latency.png").is_file()


# ------------------------------------------------------------------------------------------ the report


def timing(batch: int, p50: float, runs: int = 20) -> BatchTiming:
    return BatchTiming(batch, runs, p50, p50 * 1.1, p50 * 1.02, batch * 1000 / (p50 * 1.02), 50.0)


def cost_of(p50_b1: float, p50_b32: float, file_bytes: int) -> InferenceCost:
    return InferenceCost(
        runtime="onnxruntime 1.99.0, CPUExecutionProvider",
        cpu="Test CPU 9000",
        cpus=8,
        threads=4,
        file_bytes=file_bytes,
        peak_mib=123.0,
        peak_kind="VmHWM reset",
        batches=[timing(1, p50_b1), timing(32, p50_b32)],
    )


def with_blocks(run_dir: Path, tmp_path: Path, blocks: dict[str, InferenceCost]) -> Path:
    """A copy of the tiny run whose results.json carries `blocks` (as if measured)."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    data = json.loads((out / RESULTS_FILE).read_text())
    for m in data["models"]:
        m["inference"] = dataclasses.asdict(blocks[m["label"]])
    (out / RESULTS_FILE).write_text(json.dumps(data))
    return out


def test_the_report_section_and_the_verdict_clause_come_from_results_json(run_dir: Path, tmp_path: Path) -> None:
    out = with_blocks(
        run_dir, tmp_path, {"cnn": cost_of(41.2, 600.0, 3 * 2**20), "vit": cost_of(127.4, 2100.0, 9 * 2**20)}
    )
    rep = build_report(out, explain=False)
    r = load_results(out)
    assert rep.price is not None and [row.m.label for row in rep.price.rows] == ["cnn", "vit"]
    md = render_markdown(rep)
    section = md[md.index("### Price at inference") : md.index("### What each model was given")]
    assert "| CPU latency, batch 1: p50 / p95 (ms) | CPU throughput, batch 32 (img/s) |" in section
    for m in r.models:
        c = m.inference
        assert c is not None
        lat, thr = c.batches[0], c.batches[1]
        row = next(line for line in section.splitlines() if line.startswith(f"| **{m.label}**"))
        cells = [x.strip() for x in row.split("|")[2:-1]]
        assert cells[0] == f"{num(lat.p50_ms)} / {num(lat.p95_ms)}"
        assert cells[1] == rate(thr.img_s)
        assert cells[2] == f"{c.peak_mib:,.0f}" and cells[3] == f"{(c.file_bytes or 0) / 2**20:.1f}"
        assert cells[4] == f"{(m.params or 0) / 1e6:,.2f} M"
    assert "Measured on Test CPU 9000, 8 CPUs; onnxruntime 1.99.0, CPUExecutionProvider; 4 intra-op threads" in section
    # the verdict weighs the accuracy difference against the latency ratio, both from the results
    cnn, vit = r.model("cnn"), r.model("vit")
    a, b = cnn.inference.batches[0].p50_ms, vit.inference.batches[0].p50_ms  # type: ignore[union-attr]
    pw = rep.pairwise[0]
    assert pw.diff is not None
    clause = (
        f"Price at inference: {pts(pw.diff.point, True)} points at {b / a:.1f}× the CPU latency ({a:.0f} → {b:.0f} ms"
    )
    assert clause in pw.verdict and f"**{pw.verdict}**" in md
    assert "accuracy_vs_latency" in rep.figures
    assert 'id="price-table"' in render_html(rep)


def test_the_latency_clause_of_a_faster_candidate() -> None:
    base = ModelResult("prod", "p", "deployed", False, inference=cost_of(100.0, 900.0, 1))
    cand = ModelResult("small", "s", "full", True, inference=cost_of(25.0, 300.0, 1))
    diff = Interval(-0.021, -0.05, 0.01)
    assert price.latency_clause(base, cand, diff) == (
        "Price at inference: -2.1 points at 0.25× (4.0× faster) the CPU latency (100 → 25 ms, median at batch 1)."
    )
    assert price.latency_clause(base, ModelResult("x", "x", "full", True), diff) is None  # not measured


def test_the_pareto_front() -> None:
    # (latency, accuracy): lower latency and higher accuracy are better
    points = [(10.0, 0.70), (20.0, 0.80), (15.0, 0.65), (40.0, 0.80), (50.0, 0.90), (5.0, 0.50), (20.0, 0.80)]
    # 2 is dominated by 0 (slower, less accurate); 3 by 1 (as accurate, slower); 6 is a duplicate of 1
    assert price.pareto_front(points) == [5, 0, 1, 4]
    assert price.pareto_front([(1.0, 0.5)]) == [0]
    assert price.pareto_front([(1.0, 0.5), (1.0, 0.6)]) == [1]  # as fast and more accurate dominates


def test_the_figure_draws_every_measured_model_with_its_interval_and_the_front() -> None:
    models = [
        ModelResult("base", "b", "full", True, test_accuracy=0.70, inference=cost_of(40.0, 400.0, 1)),
        ModelResult("big", "g", "full", True, test_accuracy=0.85, inference=cost_of(130.0, 1500.0, 1)),
        ModelResult("worse", "w", "full", True, test_accuracy=0.60, inference=cost_of(90.0, 900.0, 1)),
        ModelResult("broken", "x", "full", True, test_accuracy=0.5, inference=InferenceCost(error="export failed")),
    ]
    sec = price.section(models, {"base": Interval(0.70, 0.65, 0.75), "big": Interval(0.85, 0.80, 0.90)})
    assert [r.pareto for r in sec.rows] == [True, True, False, False]
    assert sec.rows[3].note == "export failed" and not sec.rows[3].measured
    fig = price.accuracy_vs_latency_figure(sec)
    assert fig is not None
    ax = fig.axes[0]
    assert "CPU latency at batch 1" in ax.get_xlabel() and ax.get_ylabel().startswith("test accuracy")
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 3  # the three measured models; two have an interval
    assert sum(1 for c in bars if c.has_yerr) == 2
    segments = [seg for c in bars for seg in c.lines[2] if isinstance(seg, LineCollection)]
    spans = sorted(tuple(np.round(s[:, 1], 3)) for lc in segments for s in lc.get_segments())
    assert spans == [(0.65, 0.75), (0.8, 0.9)]
    front = [line for line in ax.get_lines() if line.get_label() == "Pareto front"]
    assert len(front) == 1 and list(front[0].get_xdata()) == [40.0, 130.0]
    assert sorted(t.get_text() for t in ax.texts if t.get_gid() == LABEL_GID) == ["base", "big", "worse"]
    assert ax.get_xscale() == "linear"  # 40 to 130 ms: a linear axis


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_gpu_figures_with_torch(run_dir: Path) -> None:
    from visionpoc.inference.gpu import measure_cuda
    from visionpoc.serving.loading import load_trained

    tm = load_trained(run_dir, "cnn")
    name, batches, notes = measure_cuda(tm.model, tuple(tm.data_config["input_size"]), QUICK)
    assert name == torch.cuda.get_device_name() and notes == []
    assert [b.batch for b in batches] == [1, 4]
    for b in batches:
        assert QUICK.min_runs <= b.runs <= QUICK.max_runs and 0 < b.p50_ms <= b.p95_ms and b.img_s > 0
        assert b.peak_mib is not None and b.peak_mib > 0  # the weights at least
    assert next(tm.model.parameters()).device.type == "cpu"  # handed back to the CPU
