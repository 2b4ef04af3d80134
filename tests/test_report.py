"""The report: statistics against hand-computed values, and write_report on hand-built run folders.

The run folders are built from the result dataclasses with known agreement counts: on 70 test images
the baseline `a` and the candidate `b` are both right on 50, only `a` on 10, only `b` on 3, both
wrong on 7. No training happens here.
"""

from __future__ import annotations

import base64
import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionpoc.report import write_report
from visionpoc.report.build import build_report
from visionpoc.report.stats import bootstrap_accuracy, bootstrap_difference, mcnemar, verdict, wilson
from visionpoc.results import (
    DatasetInfo,
    Environment,
    EpochRecord,
    ModelResult,
    RunResults,
    save_predictions,
    save_results,
)

CLASSES = ["beagle", "boxer", "collie", "pug", "whippet"]
BOTH_RIGHT, ONLY_A, ONLY_B, BOTH_WRONG = 50, 10, 3, 7
N = BOTH_RIGHT + ONLY_A + ONLY_B + BOTH_WRONG


def correctness() -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness of models a and b with the known 2x2 counts (shuffled, seeded)."""
    a = np.array([1] * BOTH_RIGHT + [1] * ONLY_A + [0] * ONLY_B + [0] * BOTH_WRONG, dtype=bool)
    b = np.array([1] * BOTH_RIGHT + [0] * ONLY_A + [1] * ONLY_B + [0] * BOTH_WRONG, dtype=bool)
    perm = np.random.default_rng(0).permutation(N)
    return a[perm], b[perm]


def _probs(targets: np.ndarray, correct: np.ndarray, wrong_shift: int) -> np.ndarray:
    preds = np.where(correct, targets, (targets + wrong_shift) % len(CLASSES))
    probs = np.full((len(targets), len(CLASSES)), 0.05, dtype=np.float32)
    probs[np.arange(len(targets)), preds] = 0.8
    return probs


def _model(label: str, timm: str, acc: float, **kw: object) -> ModelResult:
    history = [EpochRecord(epoch=e, train_loss=2.0 / e, train_accuracy=0.5 + 0.1 * e, val_loss=1.5 / e,
                           val_accuracy=min(acc + 0.02 * e - 0.04, 1.0), val_top5_accuracy=1.0, lr=1e-4,
                           epoch_train_time_s=10.0, cumulative_train_time_s=10.0 * e, train_img_s=100.0)
               for e in (1, 2, 3)]  # fmt: skip
    fields: dict[str, object] = dict(
        label=label, timm=timm, finetune="full", pretrained=False, img_size=32, lr=1e-3, batch_size=8,
        epochs=3, epochs_run=3, best_epoch=3, train_time_s=30.0, warmup_s=1.0, data_wait_s=3.0, eval_time_s=0.5,
        train_accuracy=0.99, val_accuracy=acc, test_accuracy=acc, test_top5_accuracy=0.97, test_macro_f1=acc - 0.01,
        params=1_234_567, trainable_params=1_000_000, fwd_gflops=0.0123, train_img_s=456.7, eval_img_s=1234.5,
        latency_ms_b1=3.21, peak_memory_gib=1.5, peak_memory_kind="process_max_rss", history=history,
    )  # fmt: skip
    fields.update(kw)
    return ModelResult(**fields)  # type: ignore[arg-type]


def make_run(
    root: Path, n_models: int = 2, images: bool = False, failed: bool = False, weights: bool = False
) -> Path:
    """A finished-run folder: results.json and one predictions file per model.

    With `images`, the dataset is a `folder` dataset whose test images exist, so the gallery renders.
    With `weights`, config.yaml and untrained best.safetensors of two tiny models (a CNN and a ViT) are
    written too, so that the saliency section can load them.
    """
    run_dir, data = root / "run", root / "data"
    targets = np.arange(N) % len(CLASSES)
    files = [f"{CLASSES[t]}/img_{i:03d}.png" for i, t in enumerate(targets)]
    if images:
        for i, (f, t) in enumerate(zip(files, targets, strict=True)):
            (data / "test" / f).parent.mkdir(parents=True, exist_ok=True)
            (data / "train" / CLASSES[t]).mkdir(parents=True, exist_ok=True)
            colour = (40 * t + 20, 200 - 30 * t, (7 * i) % 255)
            Image.new("RGB", (40, 30), colour).save(data / "test" / f)
    ca, cb = correctness()
    corrects = [ca, cb] + [np.roll(cb, 7 * k) for k in range(1, n_models - 1)]
    models = []
    for k, correct in enumerate(corrects):
        label = "abcdefgh"[k]
        timm = "test_resnet" if k == 0 else "vit_tiny_patch16_224"
        models.append(_model(label, timm, float(correct.mean())))
        save_predictions(
            run_dir / label / "test_predictions.npz", targets, _probs(targets, correct, 1 + k), files
        )
    if failed:
        models.append(ModelResult(label="broken", timm="nope_model", finetune="full", pretrained=True,
                                  status="failed", error="RuntimeError: out of memory"))  # fmt: skip
    results = RunResults(
        dataset=DatasetInfo(source="folder" if images else "stanford_dogs", root=str(data), test_root=str(data / "test"), train_size=200,
                            val_size=20, test_size=N, num_classes=len(CLASSES), class_names=CLASSES),
        models=models,
        environment=Environment(visionpoc="0.1.0", python="3.11.9", torch="2.4.0", timm="1.0.20", cuda=None,
                                device="cpu", gpu_name=None, git_commit="abc1234", seed=0, platform="Linux"),
        config={"train": {"epochs": 3, "seed": 0}},
        created="2025-01-01T00:00:00+00:00",
    )  # fmt: skip
    save_results(results, run_dir)
    if weights:
        _write_weights(run_dir, data)
    return run_dir


def _write_weights(run_dir: Path, data: Path) -> None:
    from visionpoc import checkpoint, models
    from visionpoc.config import load_config

    (run_dir / "config.yaml").write_text(
        f"data: {{source: folder, root: {data}, download: false}}\n"
        "models:\n"
        "  - {label: a, timm: test_resnet, pretrained: false, img_size: 48}\n"
        "  - {label: b, timm: vit_tiny_patch16_224, pretrained: false, img_size: 32, model_kwargs: {depth: 2}}\n"
    )
    for mcfg in load_config(run_dir / "config.yaml").models:
        model = models.create_model(mcfg, len(CLASSES))
        models.apply_finetune(model, mcfg)
        meta = {"timm": mcfg.timm, "num_classes": str(len(CLASSES)), "label": mcfg.label}
        checkpoint.save_weights(model, run_dir / mcfg.label / "best.safetensors", meta)


# ------------------------------------------------------------------------------------------ statistics


def test_mcnemar_table_and_exact_p_value() -> None:
    a, b = correctness()
    t = mcnemar(a, b)
    assert (t.both_right, t.only_a, t.only_b, t.both_wrong) == (BOTH_RIGHT, ONLY_A, ONLY_B, BOTH_WRONG)
    n, k = ONLY_A + ONLY_B, ONLY_B  # two-sided exact binomial test, p = 1/2, on the discordant pairs
    expected = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    assert expected == pytest.approx(0.09228515625)
    assert t.p_value == pytest.approx(expected, rel=1e-12)
    assert mcnemar(a, a).p_value == 1.0


def test_bootstrap_contains_point_and_narrows_with_more_data() -> None:
    a, b = correctness()
    small = bootstrap_accuracy(a)
    assert small.point == pytest.approx((BOTH_RIGHT + ONLY_A) / N)
    assert small.low <= small.point <= small.high
    big = bootstrap_accuracy(np.tile(a, 4))
    assert big.point == pytest.approx(small.point)
    assert big.high - big.low < 0.75 * (small.high - small.low)  # about half as wide with 4x the data
    diff = bootstrap_difference(a, b)
    assert diff.point == pytest.approx((ONLY_B - ONLY_A) / N)
    assert diff.low <= diff.point <= diff.high
    big_diff = bootstrap_difference(np.tile(a, 4), np.tile(b, 4))
    assert big_diff.high - big_diff.low < 0.75 * (diff.high - diff.low)
    assert bootstrap_accuracy(a, seed=3) == bootstrap_accuracy(a, seed=3)  # seeded


def test_wilson_interval() -> None:
    iv = wilson(9, 10)
    assert iv.low < 0.9 < iv.high <= 1.0
    assert wilson(10, 10).high == pytest.approx(1.0)


def test_verdict_sentences() -> None:
    a, b = correctness()
    unclear = verdict("a", "b", bootstrap_difference(a, b), mcnemar(a, b))
    assert (
        unclear.startswith("a is ahead of b by 10.0 points on 70 test images")
        and "cannot tell them apart" in unclear
    )
    a4, b4 = np.tile(a, 4), np.tile(b, 4)
    clear = verdict("a", "b", bootstrap_difference(a4, b4), mcnemar(a4, b4))
    assert clear.startswith("a is more accurate than b by 10.0 points") and "unlikely to be chance" in clear


# ------------------------------------------------------------------------------------------ the report


def _imgs(html: str) -> list[str]:
    return re.findall(r"<img\s[^>]*src=\"([^\"]+)\"", html)


def _summary(html: str) -> str:
    m = re.search(r'<table id="summary">.*?</table>', html, re.S)
    assert m, "no summary table"
    return m.group(0)


def test_write_report_without_images_or_weights(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    html_path = write_report(run_dir)
    assert html_path == run_dir / "report.html"
    html, md = html_path.read_text(), (run_dir / "report.md").read_text()
    srcs = _imgs(html)
    assert len(srcs) >= 3  # learning curves, accuracy vs time, per-class scatter
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.verify()
        assert img.format == "PNG"
    assert "<script" not in html and "<link" not in html and "http://" not in html and "https://" not in html
    table = _summary(html)
    for text in ("a", "b", "85.7%", "75.7%", "30.0", "0.01", "457", "1,234", "3.2", "1.23 M", "1.00 M",
                 "10% waiting for data"):  # fmt: skip
        assert text in table, text
    assert "McNemar" in html and "0.0923" in html
    assert f">{BOTH_RIGHT} <" in html and f">{ONLY_A} <" in html and f">{ONLY_B} <" in html
    assert "cannot tell them apart" in html
    assert "not on this machine" in html  # gallery and saliency degrade gracefully
    assert "Stanford Dogs is built from ImageNet" not in html  # both trained from scratch
    assert "trained from scratch" in html and "Small test set" in html
    # markdown: the same numbers, figures as files in report_files/
    assert "85.7%" in md and "0.0923" in md and "| **a right** | 50 (both right) | 10 (only a) |" in md
    for ref in re.findall(r"\]\((report_files/[^)]+\.png)\)", md):
        assert Image.open(run_dir / ref).format == "PNG"
    assert re.findall(r"\]\((report_files/[^)]+\.png)\)", md)


def test_gallery_with_test_images_and_missing_weights(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, images=True)
    rep = build_report(run_dir)
    assert "disagreements_b" in rep.figures
    gallery = Image.open(io.BytesIO(rep.figures["disagreements_b"]))
    assert gallery.width > 200
    assert any("could not load the trained model" in n for n in rep.explain_notes)
    html = write_report(run_dir).read_text()
    assert "where they disagree" in html and len(_imgs(html)) >= 4


def test_saliency_maps_with_images_and_weights(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, images=True, weights=True)
    rep = build_report(run_dir)
    assert "what_they_look_at" in rep.figures
    assert Image.open(io.BytesIO(rep.figures["what_they_look_at"])).format == "PNG"
    assert any(n.startswith("a: Grad-CAM") for n in rep.explain_notes), rep.explain_notes
    assert any(n.startswith("b: attention rollout") for n in rep.explain_notes), rep.explain_notes


def test_three_models_give_two_pairwise_tests_and_failed_model_is_shown(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, n_models=3, failed=True)
    rep = build_report(run_dir, explain=False)
    assert [(p.baseline, p.candidate) for p in rep.pairwise] == [("a", "b"), ("a", "c"), ("a", "broken")]
    assert [p.table is not None for p in rep.pairwise] == [True, True, False]
    html = write_report(run_dir).read_text()
    assert html.count('class="mcnemar"') == 2
    assert "b vs a" in html and "c vs a" in html
    assert "failed: RuntimeError: out of memory" in _summary(html)
    assert "No test: broken failed." in html
    assert "per_class_c.png" in (run_dir / "report.md").read_text()


def test_report_rejects_a_folder_without_results(tmp_path: Path) -> None:
    from visionpoc.errors import VisionpocError

    with pytest.raises(VisionpocError, match="results.json not found"):
        write_report(tmp_path)


def test_caveats_follow_the_facts(tmp_path: Path) -> None:
    from visionpoc.report.caveats import caveats
    from visionpoc.results import load_results

    r = load_results(make_run(tmp_path))
    r.models[0] = _model(
        "a", "legacy_xception", 0.8, pretrained=True, pretrained_tag="legacy_xception.tf_in1k"
    )
    r.models[1] = _model("b", "vit_tiny_patch16_224", 0.8, img_size=64, train_accuracy=0.85)
    text = {c.title: c.text for c in caveats(r)}
    overlap = text["Pretraining may have seen the test images"]
    assert "Stanford Dogs is built from ImageNet" in overlap and "a (legacy_xception.tf_in1k)" in overlap
    assert "b was trained from scratch" in text["No pretraining overlap for models trained from scratch"]
    assert "input size (px): a 32, b 64" in text["Different budgets"]
    assert (
        "a: train 99.0% vs test 80.0%" in text["Large train/test gap"]
        and "b:" not in text["Large train/test gap"]
    )


def test_failed_candidate_single_model_and_escaping(tmp_path: Path) -> None:
    from visionpoc.results import load_results

    run_dir = make_run(tmp_path, failed=True)
    r = load_results(run_dir)
    r.models = [r.models[0], r.models[2]]  # the baseline and a failed candidate
    r.models[1].error = "ValueError: <script>alert(1)</script>"
    save_results(r, run_dir)
    html = write_report(run_dir).read_text()
    assert "No test: broken failed." in html
    assert "<script>" not in html and "&lt;script&gt;" in html  # HTML is autoescaped
    r.models = r.models[:1]
    save_results(r, run_dir)
    html = write_report(run_dir).read_text()
    assert "the run has one model" in html and "85.7%" in _summary(html)
