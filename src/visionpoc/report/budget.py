"""The training budget behind each model, and whether it was enough for the comparison to be fair.

Reads what the training loop recorded in each `ModelResult` (optimizer steps, images seen, where the
learning rate came from, the tuning trials, the linear probe's grid, and the loop's diagnoses in `flags`)
and turns it into rows and words: the "Training budget" table, the probe grids, the words of each
diagnosis (its caveat and its clause in a verdict), and the differences of budget between two models
that a verdict must mention. A field that an older results file lacks is unknown: it shows as a dash
and says nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from visionpoc.results import ModelResult


@dataclass(frozen=True)
class Diagnosis:
    """How the report speaks of one training diagnosis (`ModelResult.flags[i]["code"]`)."""

    title: str  # the caveat's title, before ": LABEL"
    said: str  # what the model did, after its name, in a verdict
    advice: str  # what to change, for the caveat


DIAGNOSES = {
    "still_improving": Diagnosis(
        "Still improving",
        "was still improving at its last epoch",
        "give it more epochs (`train.epochs`) or tune it (`visionpoc tune`)",
    ),
    "loss_not_plateaued": Diagnosis(
        "Training loss not plateaued",
        "still had a fast-falling training loss at its last epoch",
        "give it more epochs (`train.epochs`)",
    ),
    "too_few_steps": Diagnosis(
        "Too few optimizer steps",
        "took fewer optimizer steps than its policy usually needs",
        "give it more epochs (`train.epochs`) or a smaller batch (`train.batch_size`), so that it takes more steps",
    ),
    "overfits_early": Diagnosis(
        "Overfits early",
        "overfit early (its validation loss rose after an early best epoch)",
        "give it fewer epochs, more augmentation (`train.augment: strong`) or early stopping "
        "(`train.early_stop_patience`)",
    ),
}

LR_SOURCES = {
    "config": "config",
    "preset": "preset",
    "policy_default": "policy default",
    "tuned": "tuned",
    "probe_grid": "probe grid",
}


def diagnosis(code: str) -> Diagnosis:
    """The words of a diagnosis; a code this version does not know is named as it is."""
    known = DIAGNOSES.get(code)
    if known is not None:
        return known
    words = code.replace("_", " ")
    return Diagnosis(words[:1].upper() + words[1:], f"was flagged by the training loop ({words})", "check its curves")


def flags(m: ModelResult) -> list[tuple[str, str]]:
    """The model's diagnoses as (code, message), without entries a hand-edited file may have broken."""
    out = []
    for f in m.flags or []:
        if isinstance(f, dict) and isinstance(f.get("code"), str) and f["code"]:
            message = f.get("message")
            out.append((f["code"], message.strip().rstrip(".") if isinstance(message, str) else ""))
    return out


def sci(v: float | None) -> str:
    """A learning rate or weight decay for a reader: 0.0004043878 -> '4.0e-04'; zero is '0'."""
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        return "–"
    return "0" if v == 0 else f"{v:.1e}"


def lr_text(m: ModelResult) -> str:
    """'1.0e-04 (policy default)'; the source is left out when unknown."""
    if m.lr is None:
        return "–"
    source = LR_SOURCES.get(m.lr_source or "", (m.lr_source or "").replace("_", " "))
    return sci(m.lr) + (f" ({source})" if source else "")


def tuned(m: ModelResult) -> bool:
    return bool(m.tuned_from) or m.tuning_trials is not None or m.lr_source == "tuned"


def tuning_text(m: ModelResult) -> str:
    """How the model's settings were tuned, after its name: 'was tuned over 20 trials' / 'was not tuned'."""
    if not tuned(m):
        return "was not tuned"
    trials = m.tuning_trials
    return f"was tuned over {trials:,} trial{'s' if trials != 1 else ''}" if trials is not None else "was tuned"


@dataclass
class BudgetRow:
    """One model's line in the "Training budget" table."""

    m: ModelResult
    lr: str  # '1.0e-04 (policy default)'
    trials: str  # tuning trials, 'tuned' (count unknown) or a dash
    diagnoses: list[str] = field(default_factory=list)  # the titles of its flags


def budget_rows(models: list[ModelResult]) -> list[BudgetRow]:
    """The table's rows (finished models); none when no model recorded anything the other tables lack."""
    ok = [m for m in models if m.status == "ok"]
    known = any(
        m.optimizer_steps is not None
        or m.images_seen is not None
        or m.lr_source
        or m.tuning_trials is not None
        or flags(m)
        for m in ok
    )
    if not known:
        return []
    rows = []
    for m in ok:
        trials = f"{m.tuning_trials:,}" if m.tuning_trials is not None else ("tuned" if tuned(m) else "–")
        rows.append(BudgetRow(m, lr_text(m), trials, [diagnosis(code).title.lower() for code, _ in flags(m)]))
    return rows


# ------------------------------------------------------------------------------------------ probe grid


@dataclass
class ProbeGrid:
    """A linear probe's search: validation accuracy for each (lr, weight decay), the chosen cell marked."""

    label: str
    lrs: list[float]
    weight_decays: list[float]
    cells: list[list[float | None]]  # (lr, weight decay) -> validation accuracy; None: not in the grid
    chosen: tuple[int, int] | None  # (row, column) of the chosen cell
    line: str  # the cache, the epochs and the views


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def _index(values: list[float], v: float | None) -> int | None:
    return next((i for i, x in enumerate(values) if v is not None and math.isclose(x, v, rel_tol=1e-9)), None)


def _probe_line(p: dict[str, Any]) -> str:
    """'the feature cache was built: 768-dim features extracted in 12.3 s; 2 augmented views per training
    image; each head trained for 30 epochs; the whole grid 3.2 s' (what is not recorded is left out)."""
    dim, seconds = _number(p.get("feature_dim")), _number(p.get("features_s"))
    features = f"{int(dim):,}-dim features" if dim else "features"
    took = f" in {seconds:,.1f} s" if seconds is not None else ""
    cache = {
        "hit": f"the feature cache was hit: {features} read from it",
        "miss": f"the feature cache was built: {features} extracted{took}",
    }
    parts = [cache[p["cache"]]] if p.get("cache") in cache else []
    views, epochs, heads = _number(p.get("views")), _number(p.get("epochs")), _number(p.get("heads_s"))
    if views is not None:
        parts.append(f"{int(views)} augmented view{'s' if views != 1 else ''} per training image")
    if epochs is not None:
        parts.append(f"each head trained for {int(epochs)} epoch{'s' if epochs != 1 else ''}")
    if heads is not None:
        parts.append(f"the whole grid {heads:,.1f} s")
    return "; ".join(parts)


def probe_grid(m: ModelResult) -> ProbeGrid | None:
    """The grid of a model trained as a cached linear probe; None without one (or when it is unreadable)."""
    p = m.probe
    if not isinstance(p, dict):
        return None
    points = []
    for cell in p.get("grid") or []:
        if isinstance(cell, dict) and (lr := _number(cell.get("lr"))) is not None:
            points.append((lr, _number(cell.get("weight_decay")) or 0.0, _number(cell.get("val_accuracy"))))
    lrs = sorted({lr for lr, _, _ in points})
    wds = sorted({wd for _, wd, _ in points})
    cells: list[list[float | None]] = [[None] * len(wds) for _ in lrs]
    for lr, wd, acc in points:
        cells[lrs.index(lr)][wds.index(wd)] = acc
    chosen: dict[str, Any] = p["chosen"] if isinstance(p.get("chosen"), dict) else {}
    row = _index(lrs, _number(chosen.get("lr")))
    col = _index(wds, _number(chosen.get("weight_decay")) or 0.0)
    return ProbeGrid(
        m.label, lrs, wds, cells, (row, col) if row is not None and col is not None else None, _probe_line(p)
    )


# ------------------------------------------------------------------------------------------ verdicts


def under_trained(m: ModelResult) -> list[str]:
    """Clauses for a verdict: 'vit_b16 was still improving at its last epoch', one per diagnosis."""
    return [f"{m.label} {diagnosis(code).said}" for code, _ in flags(m)]


def unequal(a: ModelResult, b: ModelResult) -> list[str]:
    """How the budgets of two models differ in what a verdict must mention: tuning and planned epochs."""
    out = []
    if tuned(a) != tuned(b):
        first, second = (a, b) if tuned(a) else (b, a)  # the tuned model first
        out.append(f"{first.label} {tuning_text(first)}, {second.label} was not")
    elif a.tuning_trials is not None and b.tuning_trials is not None and a.tuning_trials != b.tuning_trials:
        out.append(f"{a.label} {tuning_text(a)}, {b.label} over {b.tuning_trials:,}")
    if a.epochs and b.epochs and a.epochs != b.epochs:
        out.append(f"{a.label} had {_epochs(a.epochs)} planned, {b.label} {b.epochs}")
    return out


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"
