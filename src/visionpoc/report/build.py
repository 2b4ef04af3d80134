"""Gather everything the report shows, from the run's files, into one `Report` value.

The order of the fields is the order of the report: summary (with each model's price at inference, what
each model was given, its training budget and any linear-probe grid), "is the difference real?", learning
curves, where they fail, what they look at, caveats, environment. Figures are PNG bytes keyed by a file-safe name; the
renderer decides whether they become data URIs (HTML) or files (Markdown).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from visionpoc.evaluate import per_class_accuracy
from visionpoc.repeats import repeats_of
from visionpoc.report import budget, plots, price, stats
from visionpoc.report.budget import BudgetRow, ProbeGrid
from visionpoc.report.caveats import Caveat, caveats, learning_checks, why_not_learned
from visionpoc.report.inputs import Predictions, align, read_predictions, shared_classes
from visionpoc.report.pictures import Picture, disagreement_gallery, what_they_look_at
from visionpoc.report.price import PriceSection
from visionpoc.report.stats import Confusion, Interval, McNemar
from visionpoc.report.tuning import Tuning, read_tuning
from visionpoc.results import Environment, ModelResult, RunResults, load_results
from visionpoc.runfiles import CONFIG_FILE, RESULTS_FILE

log = logging.getLogger(__name__)

N_RESAMPLES = 2000


@dataclass
class Row:
    """One model's line in the summary table."""

    m: ModelResult
    train_acc: Interval | None = None  # bootstrap interval from the count (no train predictions are saved)
    test_acc: Interval | None = None  # bootstrap interval from the predictions file
    top5_acc: Interval | None = None  # bootstrap interval from the predictions file's probabilities


@dataclass
class Pairwise:
    """Candidate vs baseline on the same test images."""

    baseline: str
    candidate: str
    table: McNemar | None = None
    diff: Interval | None = None
    p_holm: float | None = None  # McNemar's p after Holm's correction, when several candidates were tested
    verdict: str = ""
    scatter: str | None = None  # figure name
    gallery: str | None = None  # figure name
    notes: list[str] = field(default_factory=list)


@dataclass
class Failures:
    label: str
    pairs: list[Confusion]


@dataclass
class Report:
    title: str
    run_dir: Path
    results: RunResults
    rows: list[Row]
    pairwise: list[Pairwise]
    confusions: list[Failures]
    explain_notes: list[str]
    caveats: list[Caveat]
    environment: list[tuple[str, str]]
    config_yaml: str
    figures: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # run-level notes (e.g. missing predictions)
    tuning: Tuning | None = None  # the hyper-parameter search budget, when the run used `--tuned`
    budget: list[BudgetRow] = field(default_factory=list)  # steps, images, lr source, trials (when recorded)
    probes: list[ProbeGrid] = field(default_factory=list)  # the grid of each model trained as a cached probe
    price: PriceSection | None = None  # each model's price at inference (CPU latency, memory, file size)

    def figure(self, name: str, picture: Picture | bytes | None) -> str | None:
        """Keep a figure under `name` (None when there is nothing to show) and return the name."""
        png = picture.png if isinstance(picture, Picture) else picture
        if png is None:
            return None
        self.figures[name] = png
        return name


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def _rows(r: RunResults, preds: dict[str, Predictions]) -> list[Row]:
    rows = []
    for m in r.models:
        row = Row(m)
        if m.train_accuracy is not None and r.dataset.train_size > 0:
            # Only the count is saved, and the bootstrap of a mean of 0/1 outcomes depends only on it:
            # bootstrap a 0/1 vector with that count (`stats.bootstrap_count`).
            n = r.dataset.train_size
            row.train_acc = stats.bootstrap_count(round(m.train_accuracy * n), n, N_RESAMPLES)
        if m.label in preds:
            row.test_acc = stats.bootstrap_accuracy(preds[m.label].correct, N_RESAMPLES)
            row.top5_acc = stats.bootstrap_accuracy(preds[m.label].top5_correct, N_RESAMPLES)
        rows.append(row)
    return rows


def _per_class(m: ModelResult, p: Predictions, nc: int) -> np.ndarray:
    if len(m.test_per_class_accuracy) == nc:
        return np.asarray(m.test_per_class_accuracy, dtype=float)
    return np.asarray(per_class_accuracy(p.targets, p.preds, nc), dtype=float)


def _pairwise(rep: Report, preds: dict[str, Predictions]) -> list[Pairwise]:
    r, out = rep.results, []
    base = r.models[0]
    for cand in r.models[1:]:
        pw = Pairwise(base.label, cand.label)
        out.append(pw)
        missing = [m.label for m in (base, cand) if m.label not in preds]
        if missing:
            why = "failed" if any(r.model(x).status != "ok" for x in missing) else "has no predictions file"
            pw.notes.append(f"No test: {', '.join(missing)} {why}.")
            continue
        pa, pb = preds[base.label], preds[cand.label]
        pair = align(pa, pb)
        if pair is None:
            pw.notes.append("No test: the two prediction files do not cover the same test images.")
            continue
        ca, cb = pa.correct[pair[0]], pb.correct[pair[1]]
        shared = shared_classes(base, cand, pa.targets[pair[0]], r.dataset.class_names)
        if shared is not None:  # a deployed model without some dataset classes: only the classes both know
            pw.notes.append(_shared_note(base, cand, int((~shared).sum()), int(shared.sum())))
            ca, cb = ca[shared], cb[shared]
        if not len(ca):
            continue
        pw.table = stats.mcnemar(ca, cb)
        pw.diff = stats.bootstrap_difference(ca, cb, N_RESAMPLES)
        nc = r.dataset.num_classes
        scatter = plots.per_class_scatter(
            base.label, cand.label, _per_class(base, pa, nc), _per_class(cand, pb, nc), r.dataset.class_names
        )
        pw.scatter = rep.figure(f"per_class_{_slug(cand.label)}", scatter)
        gallery = disagreement_gallery(r, base.label, cand.label, pa, pb)
        pw.gallery = rep.figure(f"disagreements_{_slug(cand.label)}", gallery)
        pw.notes += gallery.notes
    tested = [(pw, pw.table, pw.diff) for pw in out if pw.table is not None and pw.diff is not None]
    checks = learning_checks(r, preds)  # a model at chance level, or answering one class: no lead is named
    not_learned = {x: why_not_learned(c, r.dataset.class_names) for x, c in checks.items() if not c.learned}
    adjusted = stats.holm([t.p_value for _, t, _ in tested]) if len(tested) > 1 else [None] * len(tested)
    for (pw, table, diff), p_holm in zip(tested, adjusted, strict=True):  # several candidates: Holm decides
        pw.p_holm = p_holm
        a, b = r.model(pw.baseline), r.model(pw.candidate)
        pw.verdict = stats.verdict(
            pw.baseline,
            pw.candidate,
            diff,
            table,
            p_holm,
            len(tested),
            under_trained=budget.under_trained(b) + budget.under_trained(a),
            unequal=[] if a.onnx or b.onnx else budget.unequal(b, a),  # a deployed model had no training budget
            not_learned=not_learned,
            deployed=a.onnx is not None,
        )
        if pw.baseline not in not_learned and pw.candidate not in not_learned:
            pw.verdict = " ".join(filter(None, [pw.verdict, price.latency_clause(a, b, diff)]))
    return out


def _shared_note(a: ModelResult, b: ModelResult, left_out: int, kept: int) -> str:
    """What a paired test restricted to the classes both models know leaves out."""
    who = "; ".join(f"{m.label} has no output for {', '.join(m.classes_unknown)}" for m in (a, b) if m.classes_unknown)
    return (
        f"The paired test counts only the classes both models know ({who}): {kept:,} test images, "
        f"{left_out:,} left out."
    )


def software_rows(e: Environment) -> list[tuple[str, str]]:
    """The device the run trained on ('cpu', 'cuda (NVIDIA H200)') and the software it ran: the CUDA version
    only when the run ran on CUDA (torch's build has one on a CPU run too, unused)."""
    cuda = [("CUDA", e.cuda or "unknown")] if e.device.startswith("cuda") else []
    return [
        ("device", e.device + (f" ({e.gpu_name})" if e.gpu_name else "")),
        ("platform", e.platform),
        ("python", e.python),
        ("torch", e.torch),
        ("timm", e.timm),
        *cuda,
        ("visionpoc", e.visionpoc),
    ]


def _environment(r: RunResults) -> list[tuple[str, str]]:
    e = r.environment
    return [
        *software_rows(e),
        ("seed", str(e.seed)),
        ("git commit", e.git_commit or "unknown"),
        ("run created", r.created or "unknown"),
        (
            "dataset",
            f"{r.dataset.source} at {r.dataset.root}: {r.dataset.train_size:,} train / "
            f"{r.dataset.val_size:,} val / {r.dataset.test_size:,} test images, "
            f"{r.dataset.num_classes} classes",
        ),
    ]


def _config_yaml(r: RunResults, run_dir: Path) -> str:
    path = run_dir / CONFIG_FILE
    if path.is_file():
        return path.read_text()
    cfg: dict[str, Any] = r.config
    return yaml.safe_dump(cfg, sort_keys=False) if cfg else "(no config recorded)"


def build_report(run_dir: str | Path, explain: bool = True) -> Report:
    """Read `run_dir` and compute every table, test and figure of the report."""
    run_dir = Path(run_dir)
    r = load_results(run_dir)
    if not r.models:
        from visionpoc.errors import VisionpocError

        raise VisionpocError(f"{run_dir / RESULTS_FILE} lists no model: the run did not get to train one")
    preds = {m.label: p for m in r.models if (p := read_predictions(run_dir, m)) is not None}
    labels = ", ".join(m.label for m in r.models)
    rep = Report(
        title=f"Model comparison: {labels}",
        run_dir=run_dir,
        results=r,
        rows=_rows(r, preds),
        pairwise=[],
        confusions=[],
        explain_notes=[],
        caveats=caveats(r, learned=[(None, learning_checks(r, preds))]),
        environment=_environment(r),
        config_yaml=_config_yaml(r, run_dir),
        budget=budget.budget_rows(r.models),
        probes=[g for m in r.models if m.status == "ok" and (g := budget.probe_grid(m)) is not None],
    )
    parent = repeats_of(run_dir)
    if parent is not None:
        rep.notes.append(
            f"This run is seed {r.environment.seed}, one of the repeats in {parent}: the report there "
            "compares the models across every seed."
        )
    elif sum(m.status == "ok" for m in r.models) > 1:
        rep.caveats.append(
            Caveat(
                "One training run per model",
                "The intervals and McNemar's test measure the test set's noise for the weights these runs produced, "
                "not the training's own randomness (new head, data order, augmentation): another seed can move "
                "each accuracy too. `train.repeats: 3` trains every model with three seeds and reports the spread.",
            )
        )
    no_preds = [m.label for m in r.models if m.status == "ok" and m.label not in preds]
    if no_preds:
        rep.notes.append(
            f"No test predictions file for {', '.join(no_preds)}: its test interval and tests are missing."
        )
    rep.pairwise = _pairwise(rep, preds)
    rep.tuning, tuning_figures = read_tuning(run_dir, r)
    for name, png in tuning_figures.items():
        rep.figure(name, png)
    rep.figure("learning_curves", plots.learning_curves(r.models))
    rep.figure("accuracy_vs_time", plots.accuracy_vs_time(r.models))
    rep.price = price.section(r.models, {row.m.label: row.test_acc for row in rep.rows if row.test_acc})
    rep.figure("accuracy_vs_latency", price.accuracy_vs_latency(rep.price))
    rep.confusions = [
        Failures(m.label, stats.confused_pairs(preds[m.label].targets, preds[m.label].preds, r.dataset.class_names))
        for m in r.models
        if m.label in preds
    ]
    if explain:
        picture = what_they_look_at(r, run_dir, preds)
        rep.figure("what_they_look_at", picture)
        rep.explain_notes = picture.notes
    else:
        rep.explain_notes = ["Saliency maps were not requested."]
    return rep
