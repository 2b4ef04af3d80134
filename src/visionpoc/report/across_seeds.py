"""The report of a run with repeats (`train.repeats`): the same comparison trained once per seed.

One run's intervals and McNemar test measure the test set's noise for those trained weights; the repeats
measure the training's (the new head's initialisation, data order, augmentation, dropout). This page
gives each model's mean and spread across seeds next to the test set's own sampling error, each
candidate's per-seed difference to the baseline with a paired t-test over seeds and a sentence, McNemar
per seed, a figure, each model's price at inference (measured once: it does not depend on the seed), and a
link to each seed's full report (`seed-<s>/report.html`). A model that did not learn in some seed (chance
level, or one class for most images) gets a caveat naming those seeds, and its comparisons name no lead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from visionpoc.errors import VisionpocError
from visionpoc.evaluate import Learning
from visionpoc.repeats import Spread, read_repeats, spread
from visionpoc.report import plots, stats
from visionpoc.report.build import software_rows
from visionpoc.report.caveats import Caveat, caveats, learning_checks, seeds_text, why_not_learned
from visionpoc.report.inputs import align, read_predictions, shared_classes
from visionpoc.report.price import PriceSection, section
from visionpoc.results import ModelResult, RunResults, load_results
from visionpoc.runfiles import CONFIG_FILE, REPEATS_FILE, REPORT_HTML


@dataclass
class SeedRow:
    """One model across the seeds."""

    label: str
    timm: str
    finished: int  # seeds where it trained and was scored
    test: Spread | None
    val: Spread | None
    train: Spread | None
    top5: Spread | None
    macro_f1: Spread | None
    train_time_s: Spread | None
    train_img_s: Spread | None
    per_seed: list[float | None]  # test accuracy, in the order of `SeedsReport.seeds` (None: failed or missing)
    test_se: float | None  # one run's binomial standard error of test accuracy (the test set's noise)


@dataclass
class SeedPair:
    """A candidate against the baseline, seed by seed."""

    baseline: str
    candidate: str
    per_seed: list[float | None]  # candidate minus baseline test accuracy, by seed
    diff: stats.SeedsDifference | None
    mcnemar_p: list[float | None]  # by seed (None: no predictions to pair)
    p_holm: float | None = None  # the t-test's p after Holm's correction, when several candidates were tested
    verdict: str = ""


@dataclass
class SeedsReport:
    title: str
    run_dir: Path
    seeds: list[int]
    runs: list[str]  # each seed's folder, relative to `run_dir`
    reports: list[bool]  # whether each seed's own report.html exists (for the links)
    rows: list[SeedRow]
    pairs: list[SeedPair]
    caveats: list[Caveat]
    environment: list[tuple[str, str]]
    config_yaml: str
    figures: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    price: PriceSection | None = None  # each model's price at inference, from the first seed that has it
    price_seed: dict[str, str] = field(default_factory=dict)  # label -> the seed folder its price was measured in


def _by_label(runs: list[RunResults | None], label: str) -> list[ModelResult | None]:
    out: list[ModelResult | None] = []
    for r in runs:
        m = next((m for m in r.models if m.label == label), None) if r is not None else None
        out.append(m if m is not None and m.status == "ok" else None)
    return out


def _row(label: str, ms: list[ModelResult | None], test_size: int, finished: list[RunResults]) -> SeedRow:
    ok = [m for m in ms if m is not None]
    timm = next((m.timm for r in finished for m in r.models if m.label == label), "")  # failed ones too
    test = spread([m.test_accuracy for m in ok])
    se = None
    if test is not None and test_size > 0:
        se = math.sqrt(test.mean * (1 - test.mean) / test_size)
    return SeedRow(
        label=label,
        timm=timm,
        finished=len(ok),
        test=test,
        val=spread([m.val_accuracy for m in ok]),
        train=spread([m.train_accuracy for m in ok]),
        top5=spread([m.test_top5_accuracy for m in ok]),
        macro_f1=spread([m.test_macro_f1 for m in ok]),
        train_time_s=spread([m.train_time_s for m in ok]),
        train_img_s=spread([m.train_img_s for m in ok]),
        per_seed=[m.test_accuracy if m is not None else None for m in ms],
        test_se=se,
    )


def _mcnemar_p(run_dir: Path, a: ModelResult | None, b: ModelResult | None) -> float | None:
    if a is None or b is None:
        return None
    pa, pb = read_predictions(run_dir, a), read_predictions(run_dir, b)
    pair = align(pa, pb) if pa is not None and pb is not None else None
    if pair is None or pa is None or pb is None:
        return None
    ca, cb = pa.correct[pair[0]], pb.correct[pair[1]]
    if a.classes_unknown or b.classes_unknown:  # a deployed model without some classes: only those both know
        shared = shared_classes(a, b, pa.targets[pair[0]], load_results(run_dir).dataset.class_names)
        assert shared is not None
        ca, cb = ca[shared], cb[shared]
    return stats.mcnemar(ca, cb).p_value if len(ca) else None


def _pair(
    run_dirs: list[Path], labels: tuple[str, str], base: list[ModelResult | None], cand: list[ModelResult | None]
) -> SeedPair:
    acc = [(a.test_accuracy if a else None, b.test_accuracy if b else None) for a, b in zip(base, cand, strict=True)]
    per_seed = [b - a if a is not None and b is not None else None for a, b in acc]
    known = [(a, b) for a, b in acc if a is not None and b is not None]
    diff = stats.across_seeds([a for a, _ in known], [b for _, b in known])
    return SeedPair(
        labels[0],
        labels[1],
        per_seed,
        diff,
        [_mcnemar_p(d, a, b) for d, a, b in zip(run_dirs, base, cand, strict=True)],
    )


def _learning(
    run_dirs: list[Path], seeds: list[int], runs: list[RunResults | None]
) -> list[tuple[int, dict[str, Learning]]]:
    """Each finished seed's `learning_checks`, from its test predictions."""
    out = []
    for d, s, r in zip(run_dirs, seeds, runs, strict=True):
        if r is not None:
            preds = {m.label: p for m in r.models if (p := read_predictions(d, m)) is not None}
            out.append((s, learning_checks(r, preds)))
    return out


def _not_learned(learned: list[tuple[int, dict[str, Learning]]], class_names: list[str]) -> dict[str, str]:
    """label -> 'in 2 of 4 seeds (seeds 3, 4): test accuracy 9.3%, chance level 10.0%', for each model that did not
    learn in some seed (the reason is that of the first such seed)."""
    seeds: dict[str, list[int]] = {}
    first: dict[str, Learning] = {}
    for s, checks in learned:
        for label, c in checks.items():
            if not c.learned:
                seeds.setdefault(label, []).append(s)
                first.setdefault(label, c)
    return {
        label: f"in {seeds_text(ss, len(learned))}: {why_not_learned(first[label], class_names)}"
        for label, ss in seeds.items()
    }


def _verdicts(
    pairs: list[SeedPair], never: frozenset[str] = frozenset(), not_learned: dict[str, str] | None = None
) -> None:
    """Each pair's sentence; with several tested candidates, Holm's correction of the t-tests decides.
    `never`: the models that finished in no seed; `not_learned`: those that did not learn in some seed."""
    tested = [(p, p.diff.p_value) for p in pairs if p.diff is not None and p.diff.p_value is not None]
    if len(tested) > 1:
        for (p, _), value in zip(tested, stats.holm([v for _, v in tested]), strict=True):
            p.p_holm = value
    for p in pairs:
        if never & {p.baseline, p.candidate}:
            who = " and ".join(x for x in (p.baseline, p.candidate) if x in never)
            p.verdict = f"{who} finished in no seed: there is nothing to compare."
        else:
            p.verdict = stats.seeds_verdict(
                p.baseline, p.candidate, p.diff, p.p_holm, max(len(tested), 1), not_learned=not_learned
            )


def _price(
    per_label: dict[str, list[ModelResult | None]], dirs: list[Path]
) -> tuple[PriceSection | None, dict[str, str]]:
    """Each model's price at inference, once: the block of the first seed that has one measured (else the
    first seed's note), and the seed folder it was measured in. None when no model has a measured block."""
    chosen: list[ModelResult] = []
    where: dict[str, str] = {}
    for label, ms in per_label.items():
        seeded = [(m, d) for m, d in zip(ms, dirs, strict=True) if m is not None]
        pick = next((x for x in seeded if x[0].inference is not None and not x[0].inference.error), None)
        pick = pick or next((x for x in seeded if x[0].inference is not None), None) or next(iter(seeded), None)
        if pick is not None:
            m, d = pick
            chosen.append(m)
            where[label] = Path(m.inference.measured_in).name if m.inference and m.inference.measured_in else d.name
    sec = section(chosen, {})
    return (sec if sec.machine else None), where


def _environment(first: RunResults, seeds: list[int]) -> list[tuple[str, str]]:
    e, d = first.environment, first.dataset
    return [
        *software_rows(e),
        ("seeds", ", ".join(map(str, seeds))),
        ("git commit", e.git_commit or "unknown"),
        (
            "dataset",
            f"{d.source} at {d.root}: {d.train_size:,} train / {d.val_size:,} val / "
            f"{d.test_size:,} test images, {d.num_classes} classes (the same split in every seed)",
        ),
    ]


# caveats of one run that the page across seeds does not show the figures for (each seed's report does)
NOT_HERE = ("Large train/test gap", "Memory figures are not comparable", "Peak memory is the whole process's")


def _listing(things: list[str], one: str, several: str) -> str:
    return f"{one} {things[0]}" if len(things) == 1 else f"{several} {', '.join(things[:-1])} and {things[-1]}"


def _notes(
    rep: SeedsReport, runs: list[RunResults | None], first: RunResults, labels: list[str], resume: str
) -> list[str]:
    """What the reader must know about the seeds behind the figures: missing, partial, failed, mixed."""
    notes = []
    absent = [str(s) for s, r in zip(rep.seeds, runs, strict=True) if r is None]
    partial = [
        f"{', '.join(missing)} in seed {s}"
        for s, r in zip(rep.seeds, runs, strict=True)
        if r is not None and (missing := [x for x in labels if x not in {m.label for m in r.models}])
    ]
    if absent or partial:
        what = [_listing(absent, "seed", "seeds") + (" (no results yet)" if absent else "")] if absent else []
        notes.append(
            f"Not finished (interrupted?): {'; '.join(what + partial)}. Continue the run with `{resume}`; until then "
            "each spread covers the seeds its model finished, and each comparison the seeds where both did."
        )
    failed = [
        f"{m.label} (seed {s})"
        for s, r in zip(rep.seeds, runs, strict=True)
        if r is not None
        for m in r.models
        if m.status != "ok"
    ]
    if failed:
        notes.append(f"Failed, left out of the spreads: {', '.join(failed)}; each seed's report says why.")
    setups = {
        (r.environment.device, r.environment.gpu_name, r.environment.torch, r.environment.timm)
        for r in runs
        if r is not None
    }
    if len(setups) > 1:
        notes.append(
            "The seeds did not all run on the same device and software ("
            + "; ".join(sorted(f"{d}{f' ({g})' if g else ''}, torch {t}, timm {tm}" for d, g, t, tm in setups))
            + "): their training times and img/s are not comparable across seeds."
        )
    tuned = [m.label for m in first.models if m.tuned_from]
    if tuned:
        untuned = [m.label for m in first.models if not m.tuned_from]
        notes.append(
            f"Tuned settings (`compare --tuned`): {', '.join(tuned)}"
            + (f"; not tuned: {', '.join(untuned)}" if untuned else "")
            + ". Each seed's report has the tuning table."
        )
    return notes


def _config_labels(run_dir: Path) -> list[str] | None:
    """The models of the run's config.yaml (every one `compare` trains, finished or not); None if unreadable."""
    from visionpoc.config import load_config

    try:
        return [m.label for m in load_config(run_dir / CONFIG_FILE).models]
    except VisionpocError:
        return None


def build_seeds_report(run_dir: str | Path) -> SeedsReport:
    """Read every repeat of `run_dir` and compute the across-seed tables, tests and figure."""
    from visionpoc.recovery import resume_hint

    run_dir = Path(run_dir)
    repeats = read_repeats(run_dir)
    if repeats is None:
        raise VisionpocError(f"{run_dir / REPEATS_FILE} not found: {run_dir} is not a run with train.repeats > 1")
    runs = repeats.results()
    finished = [r for r in runs if r is not None]
    if not finished:
        raise VisionpocError(f"{run_dir}: no repeat has finished yet (each writes seed-<s>/results.json)")
    # the seed whose caveats and environment the page shows: the first where every model finished
    first = next((r for r in finished if all(m.status == "ok" for m in r.models)), finished[0])
    labels = (
        repeats.labels or _config_labels(run_dir) or list(dict.fromkeys(m.label for r in finished for m in r.models))
    )
    per_label = {label: _by_label(runs, label) for label in labels}
    rows = [_row(label, per_label[label], first.dataset.test_size, finished) for label in labels]
    pairs = [_pair(repeats.dirs, (labels[0], c), per_label[labels[0]], per_label[c]) for c in labels[1:]]
    learned = _learning(repeats.dirs, repeats.seeds, runs)
    never = frozenset(row.label for row in rows if row.finished == 0)
    _verdicts(pairs, never, _not_learned(learned, first.dataset.class_names))
    config = run_dir / CONFIG_FILE
    rep = SeedsReport(
        title=f"Model comparison across {len(repeats.seeds)} seeds: {', '.join(labels)}",
        run_dir=run_dir,
        seeds=repeats.seeds,
        runs=[d.name for d in repeats.dirs],
        reports=[(d / REPORT_HTML).is_file() for d in repeats.dirs],
        rows=rows,
        pairs=pairs,
        caveats=[
            c
            for c in caveats(
                first, [(s, r) for s, r in zip(repeats.seeds, runs, strict=True) if r is not None], learned
            )
            if c.title not in NOT_HERE and not c.title.endswith(" failed")
        ],
        environment=_environment(first, repeats.seeds),
        config_yaml=config.read_text() if config.is_file() else "(no config.yaml)",
    )
    command = "train" if repeats.labels else "compare"
    world = max((m.world_size for r in finished for m in r.models), default=1)
    resume = resume_hint(command, run_dir, repeats.labels[0] if repeats.labels else None, world)
    rep.notes = _notes(rep, runs, first, labels, resume)
    rep.price, rep.price_seed = _price(per_label, repeats.dirs)
    png = plots.seeds_strip([row.label for row in rows], [row.per_seed for row in rows], repeats.seeds)
    if png is not None:
        rep.figures["test_accuracy_by_seed"] = png
    return rep
