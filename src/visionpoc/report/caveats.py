"""Caveats, generated from the run's facts rather than written by hand.

Each check reads `RunResults` and returns zero or more `Caveat`s: a model that did not learn (test
accuracy at chance level, or one class answered for most images: `learning_checks`, from the test
predictions when the report has them; it comes first, since every other figure of that model is
noise), pretraining that may have seen the test images (Stanford Dogs is built from ImageNet), a large
train/test gap, unequal budgets between the models (tuning and planned epochs included), the training
loop's diagnoses of each model (still improving, overfitting early...), licences that restrict production
use, a small test set, CPU timings, memory figures of different kinds, failed models; a deployed model
(scored as it is, once across repeats, and the classes it does not share with the dataset).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from visionpoc.evaluate import Learning, learning, learning_from_accuracy
from visionpoc.presets.facts import (
    hf_pretrain_name,
    licence_kind,
    may_have_seen_imagenet,
    pretrain_data,
    tagged_name,
)
from visionpoc.report import budget
from visionpoc.report.inputs import Predictions
from visionpoc.results import ModelResult, RunResults

GAP = 0.10  # train minus test accuracy above which we call it a large gap
SMALL_TEST = 1000


@dataclass(frozen=True)
class Caveat:
    title: str
    text: str


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def pretraining_source(m: ModelResult) -> str | None:
    """'ImageNet', 'web-scale', 'other' or 'unknown' for a pretrained model, from its full timm tag or its
    Hugging Face id (via `presets.may_have_seen_imagenet`); None if trained from scratch."""
    if not m.pretrained:
        return None
    name = hf_pretrain_name(m.hf) if m.hf else tagged_name(m.timm, m.pretrained_tag)
    seen = may_have_seen_imagenet(name)
    if seen:
        return "ImageNet"
    if seen is None:
        return "web-scale" if pretrain_data(name) else "unknown"
    return "other"  # documented pretraining data without ImageNet (e.g. satellite images)


LEARN_ADVICE = (
    "check the learning rate (`lr`: too high and the training diverges, too low and the weights barely move), "
    "the number of epochs (`train.epochs`) and the data (one folder per class, labels that match the images), "
    "and train it again"
)


def learning_checks(r: RunResults, preds: Mapping[str, Predictions] | None = None) -> dict[str, Learning]:
    """Whether each finished model learned (`evaluate.Learning`): from its test predictions when `preds` has
    them (chance level from the test set's classes, and the class it answers most), else from its recorded
    test accuracy (chance level 1/classes)."""
    out = {}
    for m in r.models:
        p = (preds or {}).get(m.label)
        if m.status != "ok":
            continue
        if p is not None and len(p.targets) > 0:
            out[m.label] = learning(p.targets, p.preds, r.dataset.num_classes)
        elif m.test_accuracy is not None and r.dataset.test_size > 0:
            out[m.label] = learning_from_accuracy(m.test_accuracy, r.dataset.test_size, r.dataset.num_classes)
    return out


def why_not_learned(check: Learning, class_names: list[str]) -> str:
    """A verdict's short reason: 'test accuracy 9.3%, chance level 10.0%, beagle answered for 93% of the
    test images'."""
    parts = []
    if check.near_chance:
        parts.append(f"test accuracy {100 * check.accuracy:.1f}%, chance level {100 * check.chance:.1f}%")
    if check.one_class and check.top_class is not None:
        name = class_names[check.top_class] if check.top_class < len(class_names) else f"class {check.top_class}"
        parts.append(f"{name} answered for {100 * check.top_share:.0f}% of the test images")
    return ", ".join(parts)


def _not_learned(runs: Sequence[tuple[int | None, Mapping[str, Learning]]], class_names: list[str]) -> list[Caveat]:
    """One caveat per model that did not learn, in the run's order; over several seeds (`runs` pairs each
    seed with its checks; None: a single run), it names the seeds where it did not."""
    found: dict[str, list[tuple[int | None, Learning]]] = {}
    for seed, checks in runs:
        for label, check in checks.items():
            if not check.learned:
                found.setdefault(label, []).append((seed, check))
    out = []
    for label, where in found.items():
        seeds = [str(s) for s, _ in where if s is not None]
        when = f" in {seeds_text(seeds, len(runs))}" if seeds else ""
        reasons = where[0][1].reasons(class_names)
        first = f" (seed {seeds[0]})" if len(seeds) > 1 else ""
        out.append(
            Caveat(
                f"Did not learn: {label}",
                f"{label} did not learn{when}: {' and '.join(reasons)}{first}. Its figures and every comparison "
                f"with it say nothing about the model until it does: {LEARN_ADVICE}.",
            )
        )
    return out


def seeds_text(seeds: Sequence[object], of: int) -> str:
    """'1 of 3 seeds (seed 4)', '2 of 3 seeds (seeds 3, 5)'."""
    return f"{len(seeds)} of {of} seeds (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"


def _name(m: ModelResult) -> str:
    return f"{m.label} ({m.pretrained_tag or m.timm})"


def overlap(r: RunResults) -> list[Caveat]:
    ok = [m for m in r.models if m.status == "ok"]  # a failed model reports nothing to be wary of
    sources = {m.label: pretraining_source(m) for m in ok}
    imagenet = [m for m in ok if sources[m.label] == "ImageNet"]
    web = [m for m in ok if sources[m.label] == "web-scale"]
    unknown = [m for m in ok if sources[m.label] == "unknown"]
    scratch = [m.label for m in ok if not m.pretrained and not m.onnx]  # a deployed file: its training is unknown
    out = []
    dogs = r.dataset.source == "stanford_dogs"
    if imagenet:  # only models whose tags name ImageNet: the others are not known to have seen it
        what = (
            "Stanford Dogs is built from ImageNet images, so its test images may be in the pretraining data of "
            if dogs
            else "ImageNet pretraining may include images like (or identical to) this test set's: "
        )
        out.append(
            Caveat(
                "Pretraining may have seen the test images",
                what + ", ".join(_name(m) for m in imagenet) + ", whose pretraining tags indicate "
                "ImageNet. Their test accuracy can be optimistic; compare with that in mind, or hold "
                "out images collected elsewhere.",
            )
        )
    if web:
        risk = "Stanford Dogs' test images (built from ImageNet)" if dogs else "this test set's images"
        out.append(
            Caveat(
                "Pretraining data not known to include ImageNet",
                "The pretraining data of " + ", ".join(_name(m) for m in web) + " is not known to "
                "include ImageNet: the tag names a web-scale crawl that documents no de-duplication "
                f"against it, so overlap with {risk} can be neither confirmed nor ruled out.",
            )
        )
    if unknown:
        out.append(
            Caveat(
                "Pretraining data unknown",
                "The pretraining data of " + ", ".join(_name(m) for m in unknown) + " is not recorded "
                "in its timm tag; check its model card for overlap with the test set.",
            )
        )
    if scratch:
        out.append(
            Caveat(
                "No pretraining overlap for models trained from scratch",
                ", ".join(scratch) + (" was" if len(scratch) == 1 else " were") + " trained from "
                "scratch (pretrained: false): there is no risk that pretraining saw the test images.",
            )
        )
    return out


def train_test_gap(r: RunResults) -> list[Caveat]:
    gaps = [
        (m, m.train_accuracy - m.test_accuracy)
        for m in r.models
        if m.train_accuracy is not None and m.test_accuracy is not None
    ]
    big = [(m, g) for m, g in gaps if g > GAP]
    if not big:
        return []
    facts = "; ".join(
        f"{m.label}: train {_pct(m.train_accuracy or 0)} vs test {_pct(m.test_accuracy or 0)} ({100 * g:.1f} points)"
        for m, g in big
    )
    who = big[0][0].label if len(big) == 1 else "These models"
    return [
        Caveat(
            "Large train/test gap",
            f"{facts}. {who} fit the training set much better than the test set "
            "(overfitting); more data, stronger augmentation or regularization, or fewer epochs may "
            "close the gap.",
        )
    ]


def _finetune(m: ModelResult) -> str:
    return f"{m.finetune} ({m.fraction:.3g})" if m.fraction is not None else m.finetune


def _value(v: object) -> str:
    if v is None:
        return "unknown"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


BUDGET_FIELDS: dict[str, Callable[[ModelResult], object]] = {
    "epochs run": lambda m: m.epochs_run,
    "epochs planned": lambda m: m.epochs or None,
    "input size (px)": lambda m: m.img_size,
    "fine-tuning policy": _finetune,
    "learning rate": lambda m: None if m.lr is None else budget.sci(m.lr),
    "batch size": lambda m: m.batch_size,
}


def _tuning(ok: list[ModelResult]) -> list[str]:
    """Which models were tuned (and over how many trials) when that differs between them."""
    trials = {m.tuning_trials for m in ok if budget.tuned(m) and m.tuning_trials is not None}
    if len({budget.tuned(m) for m in ok}) < 2 and len(trials) < 2:
        return []
    return ["tuning: " + ", ".join(f"{m.label} {budget.tuning_text(m)}" for m in ok)]


def budgets(r: RunResults) -> list[Caveat]:
    ok = [m for m in r.models if m.status == "ok" and not m.onnx]  # a deployed model had no budget here
    if len(ok) < 2:
        return []
    diffs = []
    for name, get in BUDGET_FIELDS.items():
        values = [get(m) for m in ok]
        if name == "epochs planned" and None in values:
            continue  # not recorded: nothing to say
        if len({repr(v) for v in values}) > 1:
            diffs.append(f"{name}: " + ", ".join(f"{m.label} {_value(v)}" for m, v in zip(ok, values, strict=True)))
    diffs += _tuning(ok)
    stopped = [f"{m.label} ran {m.epochs_run} of {m.epochs} epochs" for m in ok if m.epochs and m.epochs_run < m.epochs]
    if not diffs and not stopped:
        return []
    text = (
        "The models did not get the same budget, so part of the difference may come from it. "
        + "; ".join(diffs + stopped)
        + "."
    )
    return [Caveat("Different budgets", text)]


def _diagnoses(runs: list[tuple[int | None, RunResults]]) -> list[Caveat]:
    """One caveat per model and training diagnosis, in the run's order; over several seeds (`runs` pairs
    each seed with its results; None: a single run), it names the seeds where the loop flagged it."""
    found: dict[tuple[str, str], list[tuple[int | None, str]]] = {}
    for seed, r in runs:
        for m in r.models:
            if m.status == "ok":
                for code, message in budget.flags(m):
                    found.setdefault((m.label, code), []).append((seed, message))
    out = []
    for (label, code), where in found.items():
        d = budget.diagnosis(code)
        said = where[0][1]  # the loop's sentence; without one, ours (led by the label, kept as it is)
        message = f"{said[:1].upper()}{said[1:]}" if said else f"{label} {d.said}"
        seeds = [str(s) for s, _ in where if s is not None]
        if seeds:
            message += f" (in seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)} of {len(runs)})"
        out.append(
            Caveat(
                f"{d.title}: {label}",
                f"{message}: this comparison may reflect the training budget, not the model; {d.advice}.",
            )
        )
    return out


def diagnoses(r: RunResults) -> list[Caveat]:
    """The training loop's diagnoses (`ModelResult.flags`): a model that was still improving, overfit early..."""
    return _diagnoses([(None, r)])


def small_test(r: RunResults) -> list[Caveat]:
    n = r.dataset.test_size
    if n >= SMALL_TEST:
        return []
    return [
        Caveat(
            "Small test set",
            f"The test set has only {n:,} images: one image is {100 / max(n, 1):.2f} "
            "points of accuracy and the intervals above are wide. Treat small differences as noise.",
        )
    ]


def timing(r: RunResults) -> list[Caveat]:
    out = []
    if r.environment.device == "cpu":
        out.append(
            Caveat(
                "Timed on CPU",
                "This run trained on the CPU: times, throughput and latency say little "
                "about a GPU deployment. Rerun on the target hardware before comparing costs.",
            )
        )
    kinds = {m.peak_memory_kind for m in r.models if m.peak_memory_kind}
    if len(kinds) > 1:
        out.append(
            Caveat(
                "Memory figures are not comparable",
                f"Peak memory was measured in different ways ({', '.join(sorted(kinds))}).",
            )
        )
    elif kinds == {"process_max_rss"}:
        out.append(
            Caveat(
                "Peak memory is the whole process's",
                "Peak memory is the process's maximum resident set size (CPU run), which includes "
                "Python, the data loader and earlier models of the run, not only this model.",
            )
        )
    return out


def licences(r: RunResults) -> list[Caveat]:
    """Weights whose licence restricts or may restrict production use (the decision this PoC informs)."""
    ok = [m for m in r.models if m.status == "ok" and m.pretrained]
    kinds = {m.label: licence_kind(m.license) for m in ok}
    out = []
    nc = [f"{m.label} ({m.license})" for m in ok if kinds[m.label] == "non-commercial"]
    if nc:
        out.append(
            Caveat(
                "Non-commercial weights",
                f"The pretrained weights of {', '.join(nc)} are licensed for non-commercial use only: "
                "they cannot go into a commercial product as they are, whatever their accuracy.",
            )
        )
    custom = [f"{m.label} ({m.license})" for m in ok if kinds[m.label] == "custom"]
    if custom:
        out.append(
            Caveat(
                "Licences to review",
                f"The pretrained weights of {', '.join(custom)} come under a licence of their own: have "
                "someone read its terms (use, redistribution, attribution) before production.",
            )
        )
    unknown = [m.label for m in ok if kinds[m.label] == "unknown"]
    if unknown:
        out.append(
            Caveat(
                "Licence not recorded",
                f"No licence is recorded for the pretrained weights of {', '.join(unknown)}; check the "
                "model card before any production use.",
            )
        )
    return out


def deployed(r: RunResults) -> list[Caveat]:
    """A deployed model (`onnx:`): scored as it is, never trained here; scored once across repeats; the
    classes it does not share with the dataset."""
    out = []
    for m in r.models:
        if m.status != "ok" or not m.onnx:
            continue
        text = (
            f"{m.label} is the production model as deployed ({m.onnx}), scored as it is with its own preprocessing "
            "and class map: it was not trained in this run, so it has no train accuracy, training time or learning "
            "curve, and its pretraining data is unknown here. With `train.repeats`, it is scored once and the same "
            "scores stand in every seed: a seed changes nothing in a model that is not trained, so its spread "
            "across seeds is zero and the differences across seeds measure the candidates' training alone."
        )
        if m.classes_unknown:
            text += (
                f" It has no output for {len(m.classes_unknown)} of the dataset's classes "
                f"({', '.join(m.classes_unknown)}): it never predicts them, so their test images count as its "
                "errors in its own accuracy, and the paired tests against it count only the classes both know."
            )
        if m.classes_ignored:
            text += (
                f" Its {len(m.classes_ignored)} classes that the dataset lacks ({', '.join(m.classes_ignored)}) are "
                "dropped: its prediction is its most probable class among the dataset's."
            )
        out.append(Caveat(f"Deployed model: {m.label}", text))
    return out


def failures(r: RunResults) -> list[Caveat]:
    return [
        Caveat(f"{m.label} failed", f"{m.label} did not finish: {m.error}. It is absent from the comparison.")
        for m in r.models
        if m.status != "ok"
    ]


CHECKS = (deployed, overlap, licences, train_test_gap, budgets, diagnoses, small_test, timing, failures)


def caveats(
    r: RunResults,
    seeds: list[tuple[int, RunResults]] | None = None,
    learned: Sequence[tuple[int | None, Mapping[str, Learning]]] | None = None,
) -> list[Caveat]:
    """Every caveat that applies to the run, in reading order. With `seeds` (each repeat's seed and results),
    `r` is one of them and the training diagnoses are those of every seed. `learned`: each run's
    `learning_checks` (the report passes those of the test predictions, which can tell a model that
    answers one class); without it, each run's recorded test accuracies decide."""
    runs: list[tuple[int | None, RunResults]] = [(None, r)] if seeds is None else [(s, x) for s, x in seeds]
    checks = learned if learned is not None else [(s, learning_checks(x)) for s, x in runs]
    pooled = _diagnoses(runs)
    rest = [c for check in CHECKS for c in (pooled if check is diagnoses else check(r))]
    return _not_learned(checks, r.dataset.class_names) + rest
