"""The report: statistics against hand-computed values, and write_report on hand-built run folders.

The run folders are built from the result dataclasses with known agreement counts: on 70 test images
the baseline `a` and the candidate `b` are both right on 50, only `a` on 10, only `b` on 3, both
wrong on 7. Of each model's mistakes, those on even-numbered images keep the truth second (inside the
top 5 of the 7 classes), the others put it last. No training happens here.
"""

from __future__ import annotations

import base64
import io
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionpoc.report import write_report
from visionpoc.report.build import build_report
from visionpoc.report.inputs import Predictions
from visionpoc.report.stats import (
    bootstrap_accuracy,
    bootstrap_count,
    bootstrap_difference,
    confused_pairs,
    holm,
    mcnemar,
    p_is,
    verdict,
)
from visionpoc.results import (
    DatasetInfo,
    Environment,
    EpochRecord,
    ModelResult,
    RunResults,
    save_predictions,
    save_results,
)

CLASSES = ["beagle", "boxer", "collie", "pug", "whippet", "basenji", "saluki"]
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
    rows = np.arange(len(targets))
    wrong = ~correct
    # a wrong image's truth: second (in the top 5) on even images, last (out of it) on odd ones
    probs[rows[wrong], targets[wrong]] = np.where(rows[wrong] % 2 == 0, 0.1, 0.001)
    probs[rows, preds] = 0.6
    return probs


def top5_correct(correct: np.ndarray) -> np.ndarray:
    """What `_probs` puts in the top 5: the right images and the wrong even-numbered ones."""
    return correct | (np.arange(len(correct)) % 2 == 0)


def _model(label: str, timm: str, acc: float, **kw: object) -> ModelResult:
    history = [
        EpochRecord(
            epoch=e,
            train_loss=2.0 / e,
            train_accuracy=0.5 + 0.1 * e,
            val_loss=1.5 / e,
            val_accuracy=min(acc + 0.02 * e - 0.04, 1.0),
            val_top5_accuracy=1.0,
            lr=1e-4,
            epoch_train_time_s=10.0 + (e == 1),  # as the loop records it: the warm-up (1 s) in the first epoch
            cumulative_train_time_s=10.0 * e + 1.0,
            train_img_s=100.0,
        )
        for e in (1, 2, 3)
    ]
    fields: dict[str, object] = dict(
        label=label,
        timm=timm,
        finetune="full",
        pretrained=False,
        img_size=32,
        lr=1e-3,
        batch_size=8,
        epochs=3,
        epochs_run=3,
        best_epoch=3,
        train_time_s=30.0,
        warmup_s=1.0,
        data_wait_s=3.0,
        eval_time_s=0.5,
        train_accuracy=0.99,
        val_accuracy=acc,
        test_accuracy=acc,
        test_top5_accuracy=0.97,
        test_macro_f1=acc - 0.01,
        params=1_234_567,
        trainable_params=1_000_000,
        fwd_gflops=0.0123,
        train_img_s=456.7,
        eval_img_s=1234.5,
        latency_ms_b1=3.21,
        peak_memory_gib=1.5,
        peak_memory_kind="process_max_rss",
        history=history,
    )
    fields.update(kw)
    return ModelResult(**fields)  # type: ignore[arg-type]


def make_run(root: Path, n_models: int = 2, images: bool = False, failed: bool = False, weights: bool = False) -> Path:
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
            colour = (35 * t + 20, 200 - 28 * t, (7 * i) % 255)
            Image.new("RGB", (40, 30), colour).save(data / "test" / f)
    ca, cb = correctness()
    corrects = [ca, cb] + [np.roll(cb, 7 * k) for k in range(1, n_models - 1)]
    models = []
    for k, correct in enumerate(corrects):
        label = "abcdefgh"[k]
        timm = "test_resnet" if k == 0 else "vit_tiny_patch16_224"
        models.append(
            _model(label, timm, float(correct.mean()), test_top5_accuracy=float(top5_correct(correct).mean()))
        )
        save_predictions(run_dir / label / "test_predictions.npz", targets, _probs(targets, correct, 1 + k), files)
    if failed:
        models.append(
            ModelResult(
                label="broken",
                timm="nope_model",
                finetune="full",
                pretrained=True,
                status="failed",
                error="RuntimeError: out of memory",
            )
        )
    results = RunResults(
        dataset=DatasetInfo(
            source="folder" if images else "stanford_dogs",
            root=str(data),
            test_root=str(data / "test"),
            train_size=200,
            val_size=20,
            test_size=N,
            num_classes=len(CLASSES),
            class_names=CLASSES,
        ),
        models=models,
        environment=Environment(
            visionpoc="0.1.0",
            python="3.11.9",
            torch="2.4.0",
            timm="1.0.20",
            cuda=None,
            device="cpu",
            gpu_name=None,
            git_commit="abc1234",
            seed=0,
            platform="Linux",
        ),
        config={"train": {"epochs": 3, "seed": 0}},
        created="2025-01-01T00:00:00+00:00",
    )
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
    assert small.low < small.point < small.high
    big = bootstrap_accuracy(np.tile(a, 4))
    assert big.point == pytest.approx(small.point)
    assert big.low < big.point < big.high
    assert big.high - big.low < 0.75 * (small.high - small.low)  # about half as wide with 4x the data
    diff = bootstrap_difference(a, b)
    assert diff.point == pytest.approx((ONLY_B - ONLY_A) / N)
    assert diff.low < diff.point < diff.high
    big_diff = bootstrap_difference(np.tile(a, 4), np.tile(b, 4))
    assert big_diff.low < big_diff.point < big_diff.high
    assert big_diff.high - big_diff.low < 0.75 * (diff.high - diff.low)
    assert bootstrap_accuracy(a, seed=3) == bootstrap_accuracy(a, seed=3)  # seeded


def test_bootstrap_matches_the_normal_approximation() -> None:
    """The percentile interval of an accuracy is close to p +- 1.96 sqrt(p (1 - p) / n) for a large n."""
    correct = np.random.default_rng(1).permutation(np.arange(4000) < 3000)  # p = 0.75
    iv = bootstrap_accuracy(correct)
    half = 1.96 * math.sqrt(0.75 * 0.25 / 4000)
    assert (iv.low, iv.high) == pytest.approx((0.75 - half, 0.75 + half), abs=0.003)
    a, b = correctness()  # paired: the discordant images alone carry the difference's variance
    d = b.astype(float) - a.astype(float)
    iv = bootstrap_difference(np.tile(a, 20), np.tile(b, 20))
    half = 1.96 * d.std() / math.sqrt(20 * N)
    assert (iv.low, iv.high) == pytest.approx((d.mean() - half, d.mean() + half), abs=0.004)


def test_bootstrap_of_degenerate_data_is_the_point() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning from scipy or numpy may leak
        for correct, p in ((np.ones(30, bool), 1.0), (np.zeros(30, bool), 0.0)):
            iv = bootstrap_accuracy(correct)
            assert (iv.point, iv.low, iv.high) == (p, p, p)
        a, _ = correctness()
        same = bootstrap_difference(a, a)  # the same mistakes: no difference at all
        assert (same.point, same.low, same.high) == (0.0, 0.0, 0.0)
        flip = bootstrap_difference(np.zeros(30, bool), np.ones(30, bool))
        assert (flip.point, flip.low, flip.high) == (1.0, 1.0, 1.0)
        full = bootstrap_count(200, 200)
        assert (full.low, full.high) == (1.0, 1.0)


def test_bootstrap_count_depends_only_on_the_count() -> None:
    iv = bootstrap_count(150, 200)
    assert iv.point == 0.75
    for seed in (1, 2):  # any order of 150 right and 50 wrong outcomes gives about the same interval
        shuffled = np.random.default_rng(seed).permutation(np.arange(200) < 150)
        other = bootstrap_accuracy(shuffled, seed=seed)
        assert other.low == pytest.approx(iv.low, abs=0.01) and other.high == pytest.approx(iv.high, abs=0.01)
    assert bootstrap_count(150, 200) == bootstrap_accuracy(np.arange(200) < 150)
    with pytest.raises(ValueError, match="n > 0"):
        bootstrap_count(0, 0)


def test_confused_pairs_counts_shares_order_and_limit() -> None:
    names = [f"c{i}" for i in range(6)]
    mistakes = {(0, 1): 5, (2, 3): 5, (1, 0): 2, (4, 5): 7}  # (true, predicted) -> images
    right = (3, 4, 1, 9, 3, 9)  # right answers per class: supports 8, 6, 6, 9, 10, 9
    pairs_made = [*((t, p, n) for (t, p), n in mistakes.items()), *((c, c, n) for c, n in enumerate(right))]
    targets = np.array([t for t, _, n in pairs_made for _ in range(n)])
    preds = np.array([p for _, p, n in pairs_made for _ in range(n)])
    pairs = confused_pairs(targets, preds, names)
    got = [(c.true, c.predicted, c.count) for c in pairs]
    assert got == [("c4", "c5", 7), ("c0", "c1", 5), ("c2", "c3", 5), ("c1", "c0", 2)]  # ties: class order
    assert [c.share for c in pairs] == pytest.approx([7 / 10, 5 / 8, 5 / 6, 2 / 6])
    assert confused_pairs(np.arange(6), np.arange(6), names) == []  # no mistakes, no pairs
    # 20 different mistakes, made 1 to 20 times: only the 15 most frequent are kept, most frequent first
    off = [(t, p) for t in range(6) for p in range(6) if t != p][:20]
    counts = [int(c) for c in np.random.default_rng(0).permutation(np.arange(1, 21))]
    t = np.array([i for (i, _), n in zip(off, counts, strict=True) for _ in range(n)])
    p = np.array([j for (_, j), n in zip(off, counts, strict=True) for _ in range(n)])
    top = confused_pairs(t, p, names)
    assert [c.count for c in top] == list(range(20, 5, -1))
    made = [off[counts.index(c.count)] for c in top]  # the (true, predicted) pair made that many times
    assert [(names.index(c.true), names.index(c.predicted)) for c in top] == made
    assert len(confused_pairs(t, p, names, k=3)) == 3


def test_the_scatter_labels_the_classes_that_differ_most() -> None:
    from visionpoc.report.plots import most_different

    names = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    base = np.array([0.5, 0.9, 0.2, 0.75, np.nan, 0.5])
    cand = np.array([0.5, 0.3, 0.9, 0.5, 1.0, 0.25])  # gaps: 0, 0.6, 0.7, 0.25, absent, 0.25
    assert most_different(base, cand, names, n_labels=2) == {(0.2, 0.9): ["charlie"], (0.9, 0.3): ["bravo"]}
    three = most_different(base, cand, names, n_labels=3)
    assert [n for v in three.values() for n in v] == ["charlie", "bravo", "delta"]  # ties: class order
    assert "alpha" not in [n for v in most_different(base, cand, names, n_labels=4).values() for n in v]
    every = [n for v in most_different(base, cand, names, n_labels=10).values() for n in v]
    assert "alpha" in every and "echo" not in every  # equal accuracy only when there is room; absent: never
    shared = most_different(np.array([0.0, 0.0, 1.0]), np.array([1.0, 1.0, 1.0]), ["x", "y", "z"], n_labels=2)
    assert shared == {(0.0, 1.0): ["x", "y"]}  # one label at one point
    pile = most_different(np.array([0.0, 0.0, 0.0, 1.0]), np.array([0.0, 0.0, 0.0, 0.0]), list("pqrs"), n_labels=2)
    assert pile == {(1.0, 0.0): ["s"], (0.0, 0.0): ["p", "q", "r"]}  # a labelled pile names every class in it


def test_verdict_sentences() -> None:
    a, b = correctness()
    unclear = verdict("a", "b", bootstrap_difference(a, b), mcnemar(a, b))
    assert (
        unclear.startswith("a is ahead of b by 10.0 points on 70 test images") and "cannot tell them apart" in unclear
    )
    a4, b4 = np.tile(a, 4), np.tile(b, 4)
    clear = verdict("a", "b", bootstrap_difference(a4, b4), mcnemar(a4, b4))
    assert clear.startswith("a is more accurate than b by 10.0 points") and "unlikely to be chance" in clear


def test_points_are_never_negative_zero() -> None:
    from visionpoc.report.render import points
    from visionpoc.report.stats import pts

    assert (points(-0.0), points(-1e-17), points(-0.0004), points(-0.0006)) == (
        "+0.0",
        "+0.0",
        "+0.0",
        "-0.1",
    )
    assert (pts(-0.0, True), pts(-1e-17), pts(0.1234, True)) == ("+0.0", "0.0", "+12.3")


def test_holm_correction() -> None:
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04 -> kept non-decreasing: 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped
    assert holm([0.02]) == [0.02]  # one comparison: nothing to correct
    assert holm([]) == []


def test_a_win_that_does_not_survive_holms_correction_is_not_called_one() -> None:
    a, b = correctness()
    a4, b4 = np.tile(a, 4), np.tile(b, 4)
    table, diff = mcnemar(a4, b4), bootstrap_difference(a4, b4)
    assert table.p_value < 0.05 and "unlikely to be chance" in verdict("a", "b", diff, table)
    corrected = verdict("a", "b", diff, table, p_adjusted=0.2, family=3)
    assert "cannot tell them apart" in corrected
    assert f"McNemar {p_is(table.p_value)}, 0.2 after Holm's correction for 3 candidates" in corrected
    assert p_is(0.0001) == "p < 0.001" and p_is(0.0123) == "p = 0.0123"


@pytest.mark.slow
def test_several_candidates_get_holm_adjusted_p_values(tmp_path: Path) -> None:
    rep = build_report(make_run(tmp_path / "three", n_models=3), explain=False)
    raw = [pw.table.p_value for pw in rep.pairwise if pw.table]
    assert len(raw) == 2 and [pw.p_holm for pw in rep.pairwise] == pytest.approx(holm(raw))
    assert all("after Holm's correction for 2 candidates" in pw.verdict for pw in rep.pairwise)
    write_report(rep.run_dir, explain=False)
    assert "after Holm's correction (every candidate)" in (rep.run_dir / "report.html").read_text()
    one = build_report(make_run(tmp_path / "two", n_models=2), explain=False)
    assert one.pairwise[0].p_holm is None and "Holm" not in one.pairwise[0].verdict
    # one run per model: the page says what its tests do not cover, and how to measure it
    (single,) = [c for c in one.caveats if c.title == "One training run per model"]
    assert "`train.repeats: 3`" in single.text


# ------------------------------------------------------------------------------------------ the report


def _imgs(html: str) -> list[str]:
    return re.findall(r"<img\s[^>]*src=\"([^\"]+)\"", html)


def _decode_all(html: str) -> list[tuple[int, int]]:
    """Decode every <img> of the page (all must be PNG data URIs) with PIL; their sizes."""
    sizes = []
    for src in _imgs(html):
        assert src.startswith("data:image/png;base64,"), src[:40]
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        assert img.format == "PNG"
        img.load()  # decodes every pixel: a truncated or corrupt PNG raises here
        assert img.width > 0 and img.height > 0
        sizes.append(img.size)
    return sizes


def _summary(html: str) -> str:
    m = re.search(r'<table id="summary">.*?</table>', html, re.S)
    assert m, "no summary table"
    return m.group(0)


def _summary_rows(html: str) -> dict[str, list[str]]:
    """The summary table's body rows, keyed by the model label in the row's first cell: its cells' HTML."""
    body = re.search(r"<tbody>(.*?)</tbody>", _summary(html), re.S)
    assert body
    rows = {}
    for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", body.group(1), re.S):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", tr, re.S)
        label = re.match(r"<b>([^<]*)</b>", cells[0])
        assert label, cells[0]
        rows[label.group(1)] = cells
    return rows


def _md_rows(md: str) -> dict[str, list[str]]:
    """The Markdown summary table's rows, keyed by the bold label of the first cell."""
    section = md[md.index("## 1. Summary") : md.index("### What each model was given")]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| \*\*([^*]+)\*\*", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in line.strip("|").split(" | ")]
    return rows


def test_write_report_without_images_or_weights(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    html_path = write_report(run_dir)
    assert html_path == run_dir / "report.html"
    html, md = html_path.read_text(), (run_dir / "report.md").read_text()
    assert len(_decode_all(html)) >= 3  # learning curves, accuracy vs time, per-class scatter
    assert "<script" not in html and "<link" not in html and "http://" not in html and "https://" not in html
    rows = _summary_rows(html)
    assert list(rows) == ["a", "b"]  # one row per model, labelled in its first cell, in run order
    a, b = rows["a"], rows["b"]
    assert "85.7%" in a[4] and "75.7%" in b[4]  # test accuracy, each on its own row
    for text in ("30.0", "0.01", "457", "1,234", "3.2", "1.23 M", "1.00 M", "10% waiting for data"):
        assert text in " ".join(a), text
    assert "McNemar" in html and "0.0923" in html
    assert f">{BOTH_RIGHT} <" in html and f">{ONLY_A} <" in html and f">{ONLY_B} <" in html
    assert "cannot tell them apart" in html
    assert "not on this machine" in html  # gallery and saliency degrade gracefully
    assert "Stanford Dogs is built from ImageNet" not in html  # both trained from scratch
    assert "trained from scratch" in html and "Small test set" in html
    # markdown: the same numbers, figures as files in report_files/
    assert "0.0923" in md and "| **a right** | 50 (both right) | 10 (only a) |" in md
    md_rows = _md_rows(md)
    assert list(md_rows) == ["a", "b"] and "85.7%" in md_rows["a"][4] and "75.7%" in md_rows["b"][4]
    refs = re.findall(r"\]\((report_files/[^)]+\.png)\)", md)
    assert refs
    for ref in refs:
        assert Image.open(run_dir / ref).format == "PNG"


def test_summary_shows_intervals_for_test_top5_and_train_accuracy(tmp_path: Path) -> None:
    """Each accuracy cell carries its 95% bootstrap interval: test and top-5 from the predictions file, train
    from the count of right images (train accuracy 0.99 of 200 images)."""
    from visionpoc.report.build import N_RESAMPLES
    from visionpoc.report.render import ci

    run_dir = make_run(tmp_path)
    write_report(run_dir)
    rows = _summary_rows((run_dir / "report.html").read_text())
    md_rows = _md_rows((run_dir / "report.md").read_text())
    ca, cb = correctness()
    train = ci(bootstrap_count(198, 200, N_RESAMPLES))
    assert train == "[97.5, 100.0]"  # percentile bootstrap: (Wilson's score interval would be [96.4, 99.7])
    for label, correct in (("a", ca), ("b", cb)):
        test = ci(bootstrap_accuracy(correct, N_RESAMPLES))
        top5 = ci(bootstrap_accuracy(top5_correct(correct), N_RESAMPLES))
        assert test != top5
        cells = rows[label]
        assert f'<span class="ci">{train}</span>' in cells[2], cells[2]  # train acc
        assert cells[3] == f"{100 * correct.mean():.1f}%"  # val acc (make_run sets it to the test accuracy)
        assert f'<span class="ci">{test}</span>' in cells[4], cells[4]  # test acc
        assert f'<span class="ci">{top5}</span>' in cells[5], cells[5]  # top-5
        assert f"{100 * top5_correct(correct).mean():.1f}%" in cells[5]
        md = md_rows[label]
        assert train in md[2] and md[3] == cells[3] and test in md[4] and top5 in md[5]


@pytest.mark.slow
def test_gallery_with_test_images_and_missing_weights(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, images=True)
    rep = build_report(run_dir)
    assert "disagreements_b" in rep.figures
    gallery = Image.open(io.BytesIO(rep.figures["disagreements_b"]))
    assert gallery.width > 200
    # only a 10, only b 3, both wrong 7 with different wrong answers: 20 disagreements, 8 shown
    assert "8 of the 20 test images where they disagree (green: right, red: wrong)." in rep.pairwise[0].notes
    assert any("could not load the trained model" in n for n in rep.explain_notes)
    html = write_report(run_dir).read_text()
    assert "where they disagree" in html and len(_decode_all(html)) >= 4


def _hand_predictions(targets: list[int], preds: list[int], conf: list[float], nc: int = 3) -> Predictions:
    probs = np.full((len(targets), nc), 0.0, dtype=np.float32)
    probs[np.arange(len(targets)), preds] = conf  # (N, C): the predicted class at the given confidence
    files = [f"img{i}.png" for i in range(len(targets))]
    return Predictions(np.array(targets), probs, np.array(preds), files)


def test_disagreement_gallery_picks_only_disagreements_and_captions_both_predictions() -> None:
    from visionpoc.report.pictures import _disagreement_captions, _pick_disagreements

    names = ["beagle", "boxer", "pug"]
    t = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    # per image: 0 both right, 1 only a, 2 only b, 3 both wrong (differently), 4 both wrong (the same),
    # 5 only b, 6 only a, 7 both right, 8 only b, 9 both wrong (differently)
    conf = [0.9, 0.2, 0.9, 0.5, 0.5, 0.3, 0.9, 0.9, 0.6, 0.4]  # each model's top probability
    pa = _hand_predictions(t, [0, 1, 0, 1, 0, 0, 0, 1, 0, 1], conf)
    pb = _hand_predictions(t, [0, 0, 2, 2, 0, 2, 1, 1, 2, 2], conf[:-1] + [0.3])
    idx = np.arange(len(t))
    # half where only the candidate is right, half where only the baseline is, most confident first
    assert _pick_disagreements(pa, pb, idx, idx, 4) == [2, 8, 6, 1]
    # up to k/2 of each, then the rest: both wrong with different answers, most confident first
    assert _pick_disagreements(pa, pb, idx, idx, 6) == [2, 8, 5, 6, 1, 3]
    every = _pick_disagreements(pa, pb, idx, idx, 20)
    assert sorted(every) == [1, 2, 3, 5, 6, 8, 9]  # never an image where they agree (0, 4, 7)
    same = _pick_disagreements(pa, pa, idx, idx, 8)
    assert same == []
    # the aligned order: b's files in reverse, picks are positions in a's order
    rev = idx[::-1].copy()
    pb_rev = Predictions(pb.targets[rev], pb.probs[rev], pb.preds[rev], [pb.files[i] for i in rev])
    assert _pick_disagreements(pa, pb_rev, idx, rev, 4) == [2, 8, 6, 1]
    caps = _disagreement_captions(names, "base", "cand", pa, pb_rev, idx, rev, [2, 6, 3])
    assert [[(c.text, c.right) for c in cap] for cap in caps] == [
        [("truth: pug", None), ("base: beagle", False), ("cand: pug", True)],
        [("truth: beagle", None), ("base: beagle", True), ("cand: boxer", False)],
        [("truth: beagle", None), ("base: boxer", False), ("cand: pug", False)],
    ]


@pytest.mark.slow
def test_saliency_maps_and_every_image_of_a_full_run_decode(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, n_models=3, images=True, weights=True, failed=True)
    rep = build_report(run_dir)
    assert "what_they_look_at" in rep.figures
    assert Image.open(io.BytesIO(rep.figures["what_they_look_at"])).format == "PNG"
    assert any(n.startswith("a: Grad-CAM") for n in rep.explain_notes), rep.explain_notes
    assert any(n.startswith("b: attention rollout") for n in rep.explain_notes), rep.explain_notes
    html = write_report(run_dir).read_text()
    sizes = _decode_all(html)
    assert len(sizes) == len(rep.figures) >= 7  # curves, time, 2 scatters, 2 galleries, saliency
    assert html.count("<img") == len(sizes)  # every <img> has a decodable data URI


@pytest.mark.slow
def test_the_report_never_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training, optimizers and backward passes all raise: the report (saliency included) still builds."""
    import torch

    import visionpoc.compare
    import visionpoc.optim
    import visionpoc.train

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the report must not train")

    for module, name in (
        (visionpoc.train, "fit"),
        (visionpoc.train, "train_one_epoch"),
        (visionpoc.optim, "make_optimizer"),
        (visionpoc.compare, "run_compare"),
        (torch.optim.Optimizer, "__init__"),
        (torch.Tensor, "backward"),
    ):
        monkeypatch.setattr(module, name, forbidden)
    with pytest.raises(AssertionError, match="must not train"):
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # the patches bite
    run_dir = make_run(tmp_path, images=True, weights=True)
    html = write_report(run_dir).read_text()
    assert (run_dir / "report.md").is_file()
    assert "per_class_b.png" in (run_dir / "report.md").read_text() and "where they disagree" in html
    notes = re.findall(r'<p class="note">([ab]: [^<]*)</p>', html)  # one per model, saying how it went
    assert [n.split(",")[0] for n in notes] == ["a: Grad-CAM", "b: attention rollout"], notes


@pytest.mark.slow
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
    r.models[0] = _model("a", "legacy_xception", 0.8, pretrained=True, pretrained_tag="legacy_xception.tf_in1k")
    r.models[1] = _model("b", "vit_tiny_patch16_224", 0.8, img_size=64, train_accuracy=0.85)
    text = {c.title: c.text for c in caveats(r)}
    overlap = text["Pretraining may have seen the test images"]
    assert "Stanford Dogs is built from ImageNet" in overlap and "a (legacy_xception.tf_in1k)" in overlap
    assert "b was trained from scratch" in text["No pretraining overlap for models trained from scratch"]
    assert "input size (px): a 32, b 64" in text["Different budgets"]
    assert "a: train 99.0% vs test 80.0%" in text["Large train/test gap"] and "b:" not in text["Large train/test gap"]


def test_overlap_caveat_names_only_models_whose_tags_indicate_imagenet(tmp_path: Path) -> None:
    from visionpoc.report.caveats import caveats
    from visionpoc.results import load_results

    r = load_results(make_run(tmp_path, n_models=3))
    r.models = [
        _model("xcep", "legacy_xception", 0.8, pretrained=True, pretrained_tag="tf_in1k"),
        _model("siglip", "vit_base_patch16_siglip_224", 0.8, pretrained=True, pretrained_tag="v2_webli"),
        _model("clip", "vit_base_patch16_clip_224", 0.8, pretrained=True, pretrained_tag="laion2b"),
        _model("ft", "vit_base_patch16_clip_224", 0.8, pretrained=True, pretrained_tag="laion2b_ft_in1k"),
    ]
    text = {c.title: c.text for c in caveats(r)}
    seen = text["Pretraining may have seen the test images"]
    assert "may be in the pretraining data of xcep (tf_in1k), ft (laion2b_ft_in1k)," in seen
    assert "siglip" not in seen and "(laion2b)" not in seen
    unknown = text["Pretraining data not known to include ImageNet"]
    assert "of siglip (v2_webli), clip (laion2b) is not known to include ImageNet" in unknown
    assert "xcep" not in unknown and "ft (" not in unknown
    r.models = r.models[1:3]  # web-crawl pretraining only: no model is said to have seen ImageNet
    titles = [c.title for c in caveats(r)]
    assert "Pretraining may have seen the test images" not in titles
    assert "Pretraining data not known to include ImageNet" in titles


def test_licence_caveats_and_the_policy_column(tmp_path: Path) -> None:
    from visionpoc.report.caveats import caveats
    from visionpoc.results import load_results

    r = load_results(make_run(tmp_path, n_models=3))
    r.models = [
        _model("base", "legacy_xception", 0.8, pretrained=True, pretrained_tag="tf_in1k", license="apache-2.0"),
        _model("nc", "vit_base_patch16_224", 0.8, pretrained=True, pretrained_tag="x", license="cc-by-nc-4.0"),
        _model(
            "own",
            "vit_base_patch16_dinov3",
            0.8,
            pretrained=True,
            pretrained_tag="lvd1689m",
            license="dinov3-license",
        ),
        _model("none", "vit_base_patch16_224", 0.8, pretrained=True, pretrained_tag="y", license=None),
        _model("scratch", "vit_base_patch16_224", 0.8, pretrained=False, license=None),
    ]
    text = {c.title: c.text for c in caveats(r)}
    assert "nc (cc-by-nc-4.0) are licensed for non-commercial use only" in text["Non-commercial weights"]
    assert "own (dinov3-license)" in text["Licences to review"] and "nc (" not in text["Licences to review"]
    assert "weights of none;" in text["Licence not recorded"]  # from scratch: no weights, no licence
    assert all("base" not in t for k, t in text.items() if "icen" in k)  # apache-2.0: nothing to say
    # the fairness table names the preset and the policy asked for, and what it meant
    from visionpoc.report import write_report
    from visionpoc.results import save_results

    run = tmp_path / "policy_run"
    r.models = r.models[:2]
    r.models[0].preset, r.models[0].policy, r.models[0].finetune, r.models[0].fraction = (
        "xception",
        "production",
        "top_fraction",
        0.1,
    )
    r.models[1].policy, r.models[1].finetune = "linear_probe", "head"
    save_results(r, run)
    html = write_report(run, explain=False).read_text()
    md = (run / "report.md").read_text()
    for doc in (html, md):
        assert "xception: production (top_fraction 10.0%)" in doc and "linear_probe (head)" in doc


def test_budget_caveat_when_a_model_stopped_early(tmp_path: Path) -> None:
    from visionpoc.report.caveats import caveats
    from visionpoc.results import load_results

    r = load_results(make_run(tmp_path))
    assert "Different budgets" not in {c.title for c in caveats(r)}  # the same budget: no caveat
    r.models[1].epochs_run = 2  # of 3 (early stopping, or an interrupted run)
    text = {c.title: c.text for c in caveats(r)}["Different budgets"]
    assert "epochs run: a 3, b 2" in text and "b ran 2 of 3 epochs" in text and "a ran" not in text
    r.models[0].epochs_run = 2  # both stopped after 2 of 3: the same epochs, but short of the plan
    text = {c.title: c.text for c in caveats(r)}["Different budgets"]
    assert "epochs run:" not in text and text.endswith("a ran 2 of 3 epochs; b ran 2 of 3 epochs.")


def _with_environment(run_dir: Path, **changes: object) -> Path:
    from visionpoc.results import load_results

    r = load_results(run_dir)
    for key, value in changes.items():
        setattr(r.environment, key, value)
    save_results(r, run_dir)
    return run_dir


def test_environment_section_shows_device_versions_seed_and_commit(tmp_path: Path) -> None:
    """A CPU run shows the CPU and no CUDA version, even when torch was built with CUDA."""
    run_dir = _with_environment(make_run(tmp_path), cuda="13.0")  # a CUDA build of torch, run on the CPU
    html, md = write_report(run_dir).read_text(), (run_dir / "report.md").read_text()
    section = html[html.index("<h2>7. Environment</h2>") :]
    env = dict(re.findall(r"<dt>([^<]+)</dt><dd>([^<]*)</dd>", section))
    expected = {
        "device": "cpu",
        "python": "3.11.9",
        "torch": "2.4.0",
        "timm": "1.0.20",
        "visionpoc": "0.1.0",
        "seed": "0",
        "git commit": "abc1234",
        "platform": "Linux",
    }
    assert {k: env.get(k) for k in expected} == expected
    assert "CUDA" not in env and "13.0" not in section[: section.index("Resolved configuration")]
    assert "epochs: 3" in section[section.index("Resolved configuration") :]  # the config, collapsed
    md_section = md[md.index("## 7. Environment") :]
    for key, value in expected.items():
        assert f"- {key}: {value}\n" in md_section, key
    assert "CUDA" not in md_section


def test_environment_section_of_a_cuda_run_names_the_gpu_and_cuda(tmp_path: Path) -> None:
    from visionpoc.report.across_seeds import _environment as seeds_environment
    from visionpoc.results import load_results

    run_dir = _with_environment(make_run(tmp_path), device="cuda", gpu_name="NVIDIA H200", cuda="12.8")
    html, md = write_report(run_dir).read_text(), (run_dir / "report.md").read_text()
    env = dict(re.findall(r"<dt>([^<]+)</dt><dd>([^<]*)</dd>", html[html.index("<h2>7. Environment</h2>") :]))
    assert env["device"] == "cuda (NVIDIA H200)" and env["CUDA"] == "12.8"
    assert "- CUDA: 12.8\n" in md[md.index("## 7. Environment") :]
    seeds = dict(seeds_environment(load_results(run_dir), [0, 1]))  # the page across seeds: the same rule
    assert seeds["device"] == "cuda (NVIDIA H200)" and seeds["CUDA"] == "12.8"
    on_cpu = dict(seeds_environment(load_results(_with_environment(run_dir, device="cpu", gpu_name=None)), [0, 1]))
    assert on_cpu["device"] == "cpu" and "CUDA" not in on_cpu


@pytest.mark.slow
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


def test_markdown_cells_show_names_as_they_are() -> None:
    from visionpoc.report.render import md_cell

    # a class named like Markdown: no italics, no inline HTML, no broken table; snake_case stays readable
    assert md_cell("under_score*star*") == "under_score\\*star\\*"
    assert md_cell("<b>bold<") == "\\<b\\>bold\\<"
    assert md_cell("a|b\nc") == "a\\|b c"
    assert md_cell("_x_ [link](u) `code`") == "\\_x\\_ \\[link\\](u) \\`code\\`"
    assert md_cell("dinov3_b16") == "dinov3_b16"
