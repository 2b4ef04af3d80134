"""How the report reads: the per-class scatter's labels and captions, rounded numbers, the time axis on the
table's clock, the figures' width, and the tuning figures in the report's style.

Figures are checked through their matplotlib objects (text boxes measured by the Agg renderer, tick
values), before they become PNG. Runs are the hand-built folders of `test_report.make_run`, edited through
`results.json`; one test reads the shared tiny `compare` run (`run_dir`).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import optuna
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image

from test_report import make_run
from visionpoc.report import write_report
from visionpoc.report.build import build_report
from visionpoc.report.labels import LABEL_GID
from visionpoc.report.plots import CAPTION_GID, DPI, WIDTH, accuracy_vs_time_figure, scatter_figure
from visionpoc.results import ModelResult, load_results, save_results

# ------------------------------------------------------------------------------------------ the scatter

# 12 classes: four piled near (0.50, 0.95) and two near (0.90, 0.20) (labels that would collide), three at
# (0, 0) (both models always wrong) and three with equal accuracies elsewhere
NAMES = [f"n0209{k:04d}-{'Chesapeake_Bay_retriever' if k % 2 else 'pug'}" for k in range(12)]
BASE = np.array([0.50, 0.51, 0.50, 0.49, 0.0, 0.0, 0.0, 0.90, 0.91, 0.30, 0.60, 0.75])
CAND = np.array([0.95, 0.95, 0.96, 0.94, 0.0, 0.0, 0.0, 0.20, 0.21, 0.30, 0.60, 0.75])


def _drawn(fig: Figure) -> FigureCanvasAgg:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas


def test_scatter_labels_the_largest_differences_without_overlap() -> None:
    fig = scatter_figure("lite0", "mobilenetv3_small_100", BASE, CAND, NAMES, n_labels=8)
    renderer = _drawn(fig).get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_gid() == LABEL_GID]
    # the 8 largest differences: classes 7, 8 (70 points), 0-3 (45 points), then two of the (0, 0) pile:
    # 7 points, each labelled once, the pile with how many classes it holds
    assert len(labels) == 7, [t.get_text() for t in labels]
    texts = [t.get_text() for t in labels]
    assert any(t.startswith(NAMES[4]) and t.endswith("+2") for t in texts), texts  # (0, 0) is labelled
    assert not any(NAMES[k] in t for t in texts for k in (9, 10, 11))  # equal accuracies: not among the 8
    boxes = [Text.get_window_extent(t, renderer) for t in labels]
    area = ax.get_window_extent(renderer)
    for i, box in enumerate(boxes):
        assert area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 and box.y1 <= area.y1, texts[i]
        for j in range(i):
            assert not box.overlaps(boxes[j]), (texts[i], texts[j])
    captions = {t.get_text().replace("\n", " "): t for t in ax.texts if t.get_gid() == CAPTION_GID}
    assert set(captions) == {"mobilenetv3_small_100 better", "lite0 better"}
    for box in boxes:  # no label covers a caption
        assert not any(box.overlaps(Text.get_window_extent(c, renderer)) for c in captions.values())
    to_data = ax.transData.inverted()
    for name, above in (("mobilenetv3_small_100 better", True), ("lite0 better", False)):
        box = Text.get_window_extent(captions[name], renderer)
        assert area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 and box.y1 <= area.y1, name
        (x0, y0), (x1, y1) = to_data.transform(box)
        assert (y0 > x1) if above else (x0 > y1), name  # wholly inside its triangle: clear of the diagonal


def test_scatter_of_identical_models_labels_the_shared_points() -> None:
    same = np.array([0.0, 0.0, 1.0, 1.0, 1.0])
    fig = scatter_figure("a", "b", same, same, list("pqrst"))
    texts = sorted(t.get_text() for t in fig.axes[0].texts if t.get_gid() == LABEL_GID)
    assert texts == ["p, q", "r, s, t"]  # every class is named, at its point
    assert "same accuracy" in " ".join(t.get_text() for t in fig.axes[1].texts)  # no bars to draw


@pytest.mark.slow
def test_report_figures_fill_the_page_width(tmp_path: Path) -> None:
    rep = build_report(make_run(tmp_path, images=True), explain=False)
    assert {"learning_curves", "accuracy_vs_time", "per_class_b", "disagreements_b"} <= set(rep.figures)
    for name, png in rep.figures.items():
        width = Image.open(io.BytesIO(png)).width
        assert 0.9 * WIDTH * DPI <= width <= 1.05 * WIDTH * DPI, (name, width)
    html = write_report(tmp_path / "run", explain=False).read_text()
    assert "figure img { display: block; width: 100%; }" in html  # shown at the column's width
    assert not re.search(r"<img[^>]*max-width", html)  # no figure is held to half the page


# ------------------------------------------------------------------------------------------ numbers

MANY = 0.8876087522793612
LR = 0.0004043878009515106


def _many_digits(a: ModelResult, b: ModelResult) -> None:
    for m, k in ((a, 1), (b, 2)):
        m.train_time_s, m.warmup_s, m.data_wait_s = 121.73456789 * k, 14.01234567, 3.33333333
        m.train_img_s, m.eval_img_s, m.latency_ms_b1 = 1.5634567 * k, 12.3456789 * k, 3.456789
        m.peak_memory_gib, m.fwd_gflops, m.input_store_gib = 1.23456789, 0.0123456789 * k, 0.456789
        m.val_accuracy, m.test_macro_f1, m.train_accuracy = 0.87654321, 0.812345678, 0.99123456
        m.weight_decay, m.label_smoothing, m.ema_decay = 0.0123456789 * k, 0.123456, 0.99987654321
        m.lr_source, m.optimizer_steps, m.images_seen, m.tuning_trials = "tuned", 123, 4567, 3 * k
    b.finetune, b.fraction, b.layer_decay, b.lr = "top_fraction", MANY, MANY, LR
    a.lr = 0.00123456789
    a.probe = {
        "grid": [
            {"lr": lr, "weight_decay": wd, "val_accuracy": 0.8123456789 + lr}
            for lr in (0.000123456, 0.0123456)
            for wd in (0.0, 0.000123456)
        ],
        "chosen": {"lr": 0.0123456, "weight_decay": 0.000123456},
        "cache": "miss",
        "feature_dim": 192,
        "features_s": 12.3456789,
        "views": 2,
        "epochs": 30,
        "heads_s": 3.21098765,
    }


def _tuning_record(label: str, trials: int) -> dict[str, object]:
    return {
        "label": label,
        "trials": trials,
        "complete": trials,
        "pruned": 0,
        "failed": 0,
        "epochs_per_trial": 2,
        "tuning_time_s": 123.456789,
        "device": "cpu",
        "best_val_accuracy": 0.87654321,
        "best_params": {"lr": LR, "layer_decay": MANY, "augment": "light"},
    }


def _text_outside_figures_and_config(page: str) -> str:
    page = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    page = re.sub(r"<pre>.*?</pre>", "", page, flags=re.S)  # the resolved configuration, as written
    return re.sub(r"```yaml.*?```", "", page, flags=re.S)


def test_every_number_in_the_report_is_rounded(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    r = load_results(run)
    _many_digits(*r.models)
    save_results(r, run)
    (run / "tuning").mkdir()
    summary = {"models": {"a": _tuning_record("a", 3), "b": _tuning_record("b", 6)}}
    (run / "tuning" / "tune_summary.json").write_text(json.dumps(summary))
    html = write_report(run, explain=False).read_text()
    md = (run / "report.md").read_text()
    for page in (html, md):
        text = _text_outside_figures_and_config(page)
        long = [n for n in re.findall(r"\d+\.(\d+)", text) if len(n.lstrip("0")) > 4]
        assert long == [], long  # more than 4 significant decimals
        for shown in ("0.8876", "4.0e-04", "1.56", "3.13", "87.7%", "Different budgets"):
            assert shown in text, shown  # layer decay, lr in the caveat, the two training rates, val acc


def test_small_rates_keep_significant_digits() -> None:
    from visionpoc.report.render import num, rate

    assert rate(1.56) == "1.56" and rate(45.67) == "45.7" and rate(456.7) == "457" and rate(12345.6) == "12,346"
    assert num(1.56, ",.0f") == "1.6" and num(0.0123, ".2f") == "0.012" and num(121.73, ",.1f") == "121.7"
    assert num(0, ",.1f") == "0.0" and num(None) == "–" and num(1234, ",d") == "1,234"


# ------------------------------------------------------------------------------------------ time axis


def test_accuracy_vs_time_ends_at_the_tables_training_time(run_dir: Path) -> None:
    """On a real run (the loop's history includes the warm-up, the table's training time does not)."""
    r = load_results(run_dir)
    fig = accuracy_vs_time_figure(r.models)
    assert fig is not None
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    for m in r.models:
        assert m.warmup_s and m.warmup_s > 0
        assert lines[m.label].get_xdata()[-1] == pytest.approx(m.train_time_s, rel=1e-6, abs=1e-6)
    assert "warm-up" in fig.axes[0].get_xlabel()


# ------------------------------------------------------------------------------------------ tuning figures


def _study(values: list[float]) -> optuna.Study:
    """An in-memory study of completed trials with two parameters."""
    study = optuna.create_study(direction="maximize")
    dists = {
        "lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True),
        "weight_decay": optuna.distributions.FloatDistribution(0.0, 0.1),
    }
    for i, v in enumerate(values):
        params = {"lr": 10 ** (-5 + i % 3), "weight_decay": 0.02 * (i % 4)}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=v))
    return study


def test_tuning_figures_in_the_report_style_with_whole_trials(tmp_path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    from visionpoc.report.tuning import history_figure, importance_figure
    from visionpoc.tuning.outputs import save_plots

    study = _study([0.31, 0.42, 0.40])
    assert save_plots(study, tmp_path, "vit") == []
    for kind in ("history", "importance"):  # the file names the report looks for
        assert Image.open(tmp_path / f"vit_{kind}.png").format == "PNG"
    fig = history_figure([0, 1, 2], [0.31, 0.42, 0.40], n_trials=3)
    _drawn(fig)
    ax = fig.axes[0]
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks  # no tick at half a trial
    best = [line for line in ax.get_lines() if line.get_label() == "best so far"]
    assert list(best[0].get_ydata()) == [0.31, 0.42, 0.42]
    importances = optuna.importance.get_param_importances(study)
    bars = importance_figure(importances).axes[0]
    assert [t.get_text() for t in bars.get_yticklabels()] == sorted(importances, key=lambda k: -importances[k])
