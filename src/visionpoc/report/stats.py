"""The report's statistics: is a difference in test accuracy real, and how sure are we?

- `mcnemar`: the exact McNemar test on paired predictions (a two-sided binomial test with p = 1/2 on
  the discordant pairs, `scipy.stats.binomtest`), with its 2x2 table.
- `bootstrap_accuracy` / `bootstrap_difference`: percentile bootstrap intervals over test images
  (`scipy.stats.bootstrap`, seeded; paired: both models are scored on the same resampled images).
- `bootstrap_count`: the same interval for a proportion known only as a count (the train accuracy,
  which has no predictions file).
- `verdict`: one plain sentence a decision-maker can read, with its uncertainty (and, via `with_budget`,
  whether an under-trained model or an unequal budget may explain the result). When a model did not
  learn (at chance level, or one class for most images), `no_learning` replaces it: no lead is named.
  When the baseline is the production model as deployed, `deployed_verdict` gives the candidate's signed
  gain over it.
- `holm`: Holm's step-down correction when several candidates are tested against the baseline (the
  chance that at least one "win" is a fluke stays at 5%, not 1 - 0.95^k).
- `across_seeds` / `seeds_verdict`: the same question over repeated trainings (`train.repeats`): the
  per-seed differences, a paired t-test over seeds (`scipy.stats.ttest_1samp`) and a sentence (or
  `no_learning`'s, when a model did not learn in some seed).
- `confused_pairs`: the most frequent (true class, predicted class) mistakes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binomtest, bootstrap, ttest_1samp

ALPHA = 0.05
BATCH = 250  # resamples scipy draws at once: (BATCH, N) floats in memory


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval (same units)."""

    point: float
    low: float
    high: float
    level: float = 0.95


@dataclass(frozen=True)
class McNemar:
    """Paired correctness of baseline A and candidate B on the same test images."""

    both_right: int
    only_a: int  # A right, B wrong
    only_b: int  # B right, A wrong
    both_wrong: int
    p_value: float

    @property
    def n(self) -> int:
        return self.both_right + self.only_a + self.only_b + self.both_wrong

    @property
    def discordant(self) -> int:
        return self.only_a + self.only_b


def _as_bool(correct: np.ndarray) -> np.ndarray:
    arr = np.asarray(correct).astype(bool).ravel()
    if arr.size == 0:
        raise ValueError("no test predictions to score")
    return arr


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """Exact McNemar test: under H0 each discordant pair is equally likely to favour either model."""
    a, b = _as_bool(correct_a), _as_bool(correct_b)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same images: {a.size} vs {b.size} predictions")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_b, only_a + only_b, 0.5).pvalue)
    return McNemar(int((a & b).sum()), only_a, only_b, int((~a & ~b).sum()), min(p, 1.0))


def _percentile_bootstrap(
    samples: tuple[np.ndarray, ...],
    statistic: Callable[..., Any],
    point: float,
    n_resamples: int,
    seed: int,
    level: float,
    paired: bool = False,
) -> Interval:
    """`scipy.stats.bootstrap`'s percentile interval of `statistic` over `samples`, each (N,).

    Constant data (every image right, or every image wrong, or two models that agree everywhere) has a
    bootstrap distribution of one value: the interval is that value, without asking scipy, whose
    degenerate-data handling differs between versions (warnings, NaN).
    """
    if all(np.ptp(s) == 0 for s in samples):
        return Interval(point, point, point, level)
    # `random_state`, not `rng` (new in scipy 1.15): the package supports scipy >= 1.10
    res = bootstrap(
        samples,
        statistic,
        n_resamples=n_resamples,
        batch=BATCH,
        vectorized=True,
        paired=paired,
        axis=-1,
        confidence_level=level,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    ci = res.confidence_interval
    return Interval(point, float(ci.low), float(ci.high), level)


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(b, axis=axis) - np.mean(a, axis=axis)


def bootstrap_accuracy(correct: np.ndarray, n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """Accuracy of a boolean (N,) correctness vector with its percentile bootstrap interval."""
    c = _as_bool(correct).astype(np.float64)
    return _percentile_bootstrap((c,), np.mean, float(c.mean()), n_resamples, seed, level)


def bootstrap_count(successes: int, n: int, n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """`bootstrap_accuracy` of a proportion known only as a count (the train accuracy: no per-image train
    predictions are saved). Resampling a 0/1 vector draws its mean from Binomial(n, k/n) / n whatever the
    order of the outcomes, so the vector with `successes` ones and `n - successes` zeros gives exactly the
    interval the per-image outcomes would."""
    if n <= 0:
        raise ValueError("an accuracy interval needs n > 0")
    k = min(max(int(successes), 0), n)
    return bootstrap_accuracy(np.arange(n) < k, n_resamples, seed, level)


def bootstrap_difference(
    correct_a: np.ndarray, correct_b: np.ndarray, n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> Interval:
    """Accuracy of B minus accuracy of A, with a paired bootstrap interval (same resampled images)."""
    a, b = _as_bool(correct_a), _as_bool(correct_b)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same images: {a.size} vs {b.size} predictions")
    fa, fb = a.astype(np.float64), b.astype(np.float64)
    point = float(fb.mean() - fa.mean())
    if np.array_equal(a, b):  # no discordant image: every resample gives 0
        return Interval(point, point, point, level)
    return _percentile_bootstrap((fa, fb), _mean_difference, point, n_resamples, seed, level, paired=True)


def pts(v: float, signed: bool = False) -> str:
    """0.0123 -> '1.2' (or '+1.2'); a value that rounds to zero is '0.0', never '-0.0'."""
    x = round(100 * v, 1) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of `p_values` (in their order): the k-th smallest of m is multiplied
    by m - k + 1, kept non-decreasing in that order, and capped at 1. A single p-value is unchanged."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda j: p_values[j])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def p_is(p: float) -> str:
    """'p = 0.0123' or 'p < 0.001'."""
    text = format_p(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def _p_text(name: str, p: float, adjusted: float | None, family: int) -> str:
    text = f"{name} {p_is(p)}"
    return text if adjusted is None else f"{text}, {format_p(adjusted)} after Holm's correction for {family} candidates"


def _and(things: list[str]) -> str:
    return things[0] if len(things) == 1 else f"{', '.join(things[:-1])} and {things[-1]}"


def with_budget(sentence: str, under_trained: list[str], unequal: list[str], gap: bool = True) -> str:
    """`sentence` with what may make its comparison unfair: models the training loop flagged
    (`under_trained`: 'vit_b16 was still improving at its last epoch') and differences of budget
    (`unequal`: 'vit_b16 was tuned over 20 trials, xception was not')."""
    if not under_trained and not unequal:
        return sentence
    out = sentence.removesuffix(".")
    if under_trained:
        but = "and" if " but " in sentence else "but"  # 'ahead, but this test set cannot tell ...; and X ...'
        out += (
            f"; {but} {_and(under_trained)}, so the {'gap' if gap else 'result'} may reflect the budget, not the model"
        )
    if unequal:
        out += f"; the two models did not have the same budget ({'; '.join(unequal)})"
    return out + "."


def no_learning(
    baseline: str, candidate: str, not_learned: dict[str, str], under_trained: list[str] | None = None
) -> str:
    """The verdict when the baseline, the candidate or both did not learn (`not_learned`: label -> why,
    e.g. 'test accuracy 9.3%, chance level 10.0%'): no lead is named, since a difference between models
    that guess says nothing about them. The training loop's diagnoses (`under_trained`) follow as hints."""
    who = [x for x in (candidate, baseline) if x in not_learned]
    reasons = [(x, not_learned[x]) for x in who if not_learned[x]]
    why = "; ".join(f"{x}: {reason}" if len(who) > 1 else reason for x, reason in reasons)
    why = f" ({why})" if why else ""
    if len(who) > 1:
        out = (
            f"Neither {candidate} nor {baseline} learned{why}: the difference between them says nothing about the "
            "models until they do. Check the learning rate, the number of epochs and the data, and train them again"
        )
    else:
        other = baseline if who[0] == candidate else candidate
        out = (
            f"{who[0]} did not learn{why}, so its comparison with {other} says nothing about the models until it "
            "does. Check its learning rate, number of epochs and data, and train it again"
        )
    hints = under_trained or []
    return out + (f"; the training loop noted that {_and(hints)}." if hints else ".")


def verdict(
    baseline: str,
    candidate: str,
    diff: Interval,
    test: McNemar,
    p_adjusted: float | None = None,
    family: int = 1,
    under_trained: list[str] | None = None,
    unequal: list[str] | None = None,
    not_learned: dict[str, str] | None = None,
    deployed: bool = False,
) -> str:
    """One sentence: which model is more accurate on test, by how much, and whether chance explains it.

    `diff` is candidate minus baseline; the sentence states it as the leader's lead, interval included.
    With several candidates (`family` > 1), `p_adjusted` (Holm) decides, and both p-values are shown.
    `under_trained` and `unequal` (see `with_budget`) end it with why the comparison may not be fair.
    `not_learned` (label -> why) names the models that did not learn: then `no_learning` speaks instead.
    `deployed`: the baseline is the production model as deployed (`deployed_verdict`).
    """
    if not_learned and {baseline, candidate} & not_learned.keys():
        return no_learning(baseline, candidate, not_learned, under_trained)
    if deployed:
        sentence = deployed_verdict(baseline, candidate, diff, test, p_adjusted, family)
    else:
        sentence = _verdict(baseline, candidate, diff, test, p_adjusted, family)
    gap = test.discordant > 0 and diff.point != 0
    return with_budget(sentence, under_trained or [], unequal or [], gap)


def _verdict(
    baseline: str, candidate: str, diff: Interval, test: McNemar, p_adjusted: float | None, family: int
) -> str:
    n = f"on {test.n:,} test images"
    p = _p_text("McNemar", test.p_value, p_adjusted, family)
    decisive = test.p_value if p_adjusted is None else p_adjusted
    if test.discordant == 0:
        return f"{candidate} and {baseline} make exactly the same mistakes {n}: there is no difference to test."
    if diff.point == 0:
        return (
            f"{candidate} and {baseline} are equally accurate {n}, though they err on different images "
            f"(95% CI on the difference {pts(diff.low, True)} to {pts(diff.high, True)} points; {p})."
        )
    ahead, other = (candidate, baseline) if diff.point > 0 else (baseline, candidate)
    lead = diff if diff.point > 0 else Interval(-diff.point, -diff.high, -diff.low, diff.level)
    if decisive < ALPHA and lead.low > 0:
        return (
            f"{ahead} is more accurate than {other} by {pts(lead.point)} points {n} "
            f"(95% CI {pts(lead.low)} to {pts(lead.high)} points; {p}): the difference is unlikely "
            "to be chance."
        )
    return (
        f"{ahead} is ahead of {other} by {pts(lead.point)} points {n}, but this test set cannot tell "
        f"them apart: the 95% CI on that lead runs from {pts(lead.low, True)} to {pts(lead.high, True)} "
        f"points ({p})."
    )


def deployed_verdict(
    baseline: str, candidate: str, diff: Interval, test: McNemar, p_adjusted: float | None = None, family: int = 1
) -> str:
    """The sentence when the baseline is the production model as deployed: the candidate's signed gain over
    it, its interval and McNemar's p, then what they say ('vit vs the production model as deployed
    (production): +9.7 points on 1,200 test images (95% CI +6.1 to +13.2 points; McNemar p < 0.001): ...')."""
    head = f"{candidate} vs the production model as deployed ({baseline}): {pts(diff.point, True)} points on {test.n:,} test images"
    if test.discordant == 0:
        return f"{head}: they make exactly the same mistakes, so there is no difference to test."
    p = _p_text("McNemar", test.p_value, p_adjusted, family)
    decisive = test.p_value if p_adjusted is None else p_adjusted
    if decisive < ALPHA and diff.low > 0:
        tail = f"{candidate} is more accurate, and the difference is unlikely to be chance."
    elif decisive < ALPHA and diff.high < 0:
        tail = f"the production model is more accurate than {candidate}, and the difference is unlikely to be chance."
    else:
        tail = "this test set cannot tell them apart."
    return f"{head} (95% CI {pts(diff.low, True)} to {pts(diff.high, True)} points; {p}): {tail}"


@dataclass(frozen=True)
class SeedsDifference:
    """Candidate minus baseline test accuracy, one value per seed where both finished."""

    diffs: tuple[float, ...]
    mean: float
    std: float | None  # sample standard deviation across seeds (ddof=1); None for one seed
    p_value: float | None  # paired t-test over seeds (H0: mean difference 0); None below 2 seeds or no spread


def across_seeds(baseline_acc: list[float], candidate_acc: list[float]) -> SeedsDifference | None:
    """The per-seed differences of two models' test accuracies (paired by seed); None without a seed."""
    if len(baseline_acc) != len(candidate_acc):
        raise ValueError(f"paired by seed: {len(baseline_acc)} vs {len(candidate_acc)} accuracies")
    # accuracies are counts over a finite test set: equal leads (e.g. 3 images in every seed) must compare
    # equal, not differ by 1e-17 and give the t-test a spread of rounding errors to divide by
    d = np.round(np.asarray(candidate_acc, dtype=np.float64) - np.asarray(baseline_acc, dtype=np.float64), 12)
    if d.size == 0:
        return None
    std = float(np.round(d.std(ddof=1), 12)) if d.size > 1 else None  # (0.1, 0.1, 0.1): 0, not 1.7e-17
    # identical differences in every seed: the t statistic is undefined (no spread to scale by)
    p = float(ttest_1samp(d, 0.0).pvalue) if std is not None and std > 0 else None
    return SeedsDifference(tuple(float(x) for x in d), float(np.round(d.mean(), 12)), std, p)


def seeds_verdict(
    baseline: str,
    candidate: str,
    diff: SeedsDifference | None,
    p_adjusted: float | None = None,
    family: int = 1,
    not_learned: dict[str, str] | None = None,
) -> str:
    """One sentence: which model leads across the seeds, how often, and whether the training's own
    randomness could explain it. With several candidates, `p_adjusted` (Holm) decides, as in `verdict`.
    `not_learned` (label -> why, e.g. 'in 2 of 4 seeds (seeds 3, 4): ...'): `no_learning` speaks instead."""
    if not_learned and {baseline, candidate} & not_learned.keys():
        return no_learning(baseline, candidate, not_learned)
    if diff is None:
        return f"No seed finished with both {baseline} and {candidate}: nothing to compare."
    k = len(diff.diffs)
    if k == 1:
        return (
            f"Only one seed finished with both {baseline} and {candidate}: one training run cannot say how "
            "much the training's randomness moves the result."
        )
    if diff.mean == 0:
        return f"{candidate} and {baseline} are equally accurate on average over {k} seeds."
    ahead, other = (candidate, baseline) if diff.mean > 0 else (baseline, candidate)
    lead = [x if diff.mean > 0 else -x for x in diff.diffs]  # the leader's lead in each seed
    wins, losses = sum(1 for x in lead if x > 0), sum(1 for x in lead if x < 0)
    ties = f", tied in {k - wins - losses}" if wins + losses < k else ""
    head = f"{ahead} is ahead of {other} in {wins} of {k} seeds{ties}, by {pts(abs(diff.mean))} points on average"
    spread = f"standard deviation across seeds {pts(diff.std or 0.0)} points"
    if diff.p_value is None:
        return f"{head}: the same difference in every seed."
    p = _p_text("paired t-test over seeds", diff.p_value, p_adjusted, family)
    if (diff.p_value if p_adjusted is None else p_adjusted) < ALPHA:
        return f"{head} ({spread}; {p}): the lead holds across training runs."
    if losses == 0:
        return f"{head} ({spread}; {p}): never behind, but {k} seeds are too few to rule out the training's randomness."
    return (
        f"{head} ({spread}; {p}): the seeds disagree ({other} leads in {losses}), so the training's "
        "randomness can reverse this result."
    )


def format_p(p: float) -> str:
    """p-values as a reader expects them: 3 significant digits, or '< 0.001'."""
    return "< 0.001" if p < 1e-3 else f"{p:.3g}"


@dataclass(frozen=True)
class Confusion:
    true: str
    predicted: str
    count: int
    share: float  # of the true class's test images


def confused_pairs(targets: np.ndarray, preds: np.ndarray, class_names: list[str], k: int = 15) -> list[Confusion]:
    """The `k` most frequent mistakes (true class -> predicted class), most frequent first."""
    nc = len(class_names)
    t, p = np.asarray(targets, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    cm = np.bincount(t * nc + p, minlength=nc * nc).reshape(nc, nc)  # (true, predicted)
    support = cm.sum(1)
    np.fill_diagonal(cm, 0)
    flat = np.argsort(-cm, axis=None, kind="stable")[:k]
    pairs = [divmod(int(i), nc) for i in flat]
    return [
        Confusion(class_names[i], class_names[j], int(cm[i, j]), float(cm[i, j] / max(int(support[i]), 1)))
        for i, j in pairs
        if cm[i, j] > 0
    ]
