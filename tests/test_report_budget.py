"""The report on whether the comparison was fair: the training loop's diagnoses (caveats and verdicts),
the "Training budget" table, unequal budgets (tuning, planned epochs) and the linear probe's grid.

Runs are the hand-built folders of `test_report.make_run` (baseline `a` ahead of candidate `b` on 70 test
images, not significantly), edited through `results.json`. No training happens here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from test_report import make_run
from visionpoc.report import write_report
from visionpoc.report.build import build_report
from visionpoc.report.stats import Interval, McNemar, verdict
from visionpoc.results import ModelResult, load_results, save_results

STILL = "validation accuracy was still rising at the last epoch (best epoch 3 of 3)"
OVERFITS = "validation loss rose after epoch 1 (best epoch 1 of 3)"


def _edit(run: Path, edit: Any) -> Path:
    """Apply `edit(a, b)` to the run's two models and write results.json back."""
    r = load_results(run)
    edit(*r.models)
    save_results(r, run)
    return run


def _pages(run: Path) -> tuple[str, str]:
    html = write_report(run, explain=False).read_text()
    return html, (run / "report.md").read_text()


def _html_rows(html: str, table_id: str) -> dict[str, list[str]]:
    """A table's body rows, keyed by the bold label of the first cell: each cell's text (tags removed)."""
    table = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', html, re.S)
    assert table, f"no table {table_id}"
    rows = {}
    for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", table.group(1), re.S):
        cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", tr, re.S)]
        rows[cells[0]] = cells
    return rows


def _md_rows(md: str, heading: str) -> dict[str, list[str]]:
    """The rows of the Markdown table under `heading`, keyed by the bold label of the first cell."""
    section = md[md.index(heading) :]
    section = section[: section.index("\n#", 1)]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| \*\*([^*]+)\*\* \|", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in line.strip().strip("|").split(" | ")]
    return rows


def _verdicts(html: str, md: str) -> tuple[str, str]:
    (in_html,) = set(re.findall(r'<p class="verdict">([^<]*)</p>', html))  # bottom line and section 2 agree
    in_md = re.findall(r"^> \*\*(.*)\*\*$", md, re.M)
    assert len(set(in_md)) == 1, in_md
    return in_html, in_md[0]


@pytest.mark.slow
def test_a_flagged_model_gets_a_caveat_and_the_verdict_names_it(tmp_path: Path) -> None:
    def flag(a: ModelResult, b: ModelResult) -> None:
        b.flags = [{"code": "still_improving", "message": STILL}]

    run = _edit(make_run(tmp_path / "flagged"), flag)
    rep = build_report(run, explain=False)
    caveat = {c.title: c.text for c in rep.caveats}["Still improving: b"]
    assert caveat == (
        "Validation accuracy was still rising at the last epoch (best epoch 3 of 3): this comparison may reflect "
        "the training budget, not the model; give it more epochs (`train.epochs`) or tune it (`visionpoc tune`)."
    )
    clause = "; and b was still improving at its last epoch, so the gap may reflect the budget, not the model."
    assert rep.pairwise[0].verdict.endswith("(McNemar p = 0.0923)" + clause)
    html, md = _pages(run)
    for page, text in zip((html, md), _verdicts(html, md), strict=True):
        assert text.endswith(clause) and "Still improving: b." in page
    assert _html_rows(html, "budget-table")["b"][-1] == "still improving"
    assert _html_rows(html, "budget-table")["a"][-1] == "–"

    # a flag on the baseline (the leader here) counts too, with its own advice; an unknown code is named as it is
    def both(a: ModelResult, b: ModelResult) -> None:
        a.flags = [{"code": "overfits_early", "message": OVERFITS}, {"code": "new_check", "message": ""}]

    rep = build_report(_edit(run, both), explain=False)
    text = {c.title: c.text for c in rep.caveats}
    assert text["Overfits early: a"].startswith("Validation loss rose after epoch 1 (best epoch 1 of 3): this")
    assert "fewer epochs, more augmentation (`train.augment: strong`) or early stopping" in text["Overfits early: a"]
    assert text["New check: a"].startswith("a was flagged by the training loop (new check): this comparison")
    assert rep.pairwise[0].verdict.endswith(
        "; and b was still improving at its last epoch, a overfit early (its validation loss rose after an early "
        "best epoch) and a was flagged by the training loop (new check), so the gap may reflect the budget, not "
        "the model."
    )

    # no flag: no diagnosis caveat, the plain verdict
    def clear(a: ModelResult, b: ModelResult) -> None:
        a.flags, b.flags = [], []

    rep = build_report(_edit(run, clear), explain=False)
    assert not [c.title for c in rep.caveats if ": " in c.title]
    assert rep.pairwise[0].verdict.endswith("(McNemar p = 0.0923).") and "budget" not in rep.pairwise[0].verdict


def test_verdict_wording_with_a_budget() -> None:
    clear_win = McNemar(50, 2, 15, 3, 0.002)
    lead = Interval(0.186, 0.08, 0.3)
    text = verdict(
        "xception", "vit_b16", lead, clear_win, under_trained=["vit_b16 was still improving at its last epoch"]
    )
    assert text.endswith(
        "the difference is unlikely to be chance; but vit_b16 was still improving at its last epoch, so the gap "
        "may reflect the budget, not the model."
    )
    same = verdict("a", "b", Interval(0.0, 0.0, 0.0), McNemar(60, 0, 0, 10, 1.0), unequal=["b was tuned, a was not"])
    assert same == (
        "b and a make exactly the same mistakes on 70 test images: there is no difference to test; the two models "
        "did not have the same budget (b was tuned, a was not)."
    )
    flagged = verdict("a", "b", Interval(0.0, 0.0, 0.0), McNemar(60, 0, 0, 10, 1.0), under_trained=["a overfit"])
    assert flagged.endswith(
        "no difference to test; but a overfit, so the result may reflect the budget, not the model."
    )


def test_the_budget_table_shows_steps_images_lr_source_and_trials(tmp_path: Path) -> None:
    def budget(a: ModelResult, b: ModelResult) -> None:
        a.optimizer_steps, a.images_seen, a.lr, a.lr_source = 7_500, 1_200_000, 1e-4, "policy_default"
        a.train_time_s = 1234.5678
        b.optimizer_steps, b.images_seen, b.lr, b.lr_source = 300, 48_000, 0.0004043878009515106, "tuned"
        b.tuned_from, b.tuning_trials, b.epochs, b.epochs_run = "/out/tuned/b.yaml", 20, 5, 4

    html, md = _pages(_edit(make_run(tmp_path), budget))
    assert ">Training budget</h3>" in html and "### Training budget" in md
    rows = _html_rows(html, "budget-table")
    assert rows == {
        "a": ["a", "3 / 3", "7,500", "1,200,000", "1.0e-04 (policy default)", "–", "1,234.6", "–"],
        "b": ["b", "4 / 5", "300", "48,000", "4.0e-04 (tuned)", "20", "30.0", "–"],
    }
    md_rows = _md_rows(md, "### Training budget")
    assert md_rows == {
        "a": ["**a**", "3 / 3", "7,500", "1,200,000", "1.0e-04 (policy default)", "–", "1,234.6", "–"],
        "b": ["**b**", "4 / 5", "300", "48,000", "4.0e-04 (tuned)", "20", "30.0", "–"],
    }
    assert "0.000404" not in html and "0.000404" not in md  # every lr rounded, in the caveat too


@pytest.mark.slow
def test_an_unequal_budget_is_named_in_the_verdict_and_the_caveat(tmp_path: Path) -> None:
    def tune_b(a: ModelResult, b: ModelResult) -> None:
        b.tuned_from, b.tuning_trials, b.lr, b.lr_source = "/out/tuned/b.yaml", 20, 0.0004043878009515106, "tuned"
        b.epochs = b.epochs_run = 5

    run = _edit(make_run(tmp_path), tune_b)
    html, md = _pages(run)
    expected = "; the two models did not have the same budget (b was tuned over 20 trials, a was not; b had 5 epochs planned, a 3)."
    for text in _verdicts(html, md):
        assert text.endswith("(McNemar p = 0.0923)" + expected), text
    caveat = {c.title: c.text for c in build_report(run, explain=False).caveats}["Different budgets"]
    assert "epochs planned: a 3, b 5" in caveat and "learning rate: a 1.0e-03, b 4.0e-04" in caveat
    assert "tuning: a was not tuned, b was tuned over 20 trials." in caveat and "0.000404" not in caveat

    # both tuned, over different numbers of trials
    def tune_a(a: ModelResult, b: ModelResult) -> None:
        a.tuned_from, a.tuning_trials, a.lr_source = "/out/tuned/a.yaml", 5, "tuned"
        b.epochs = b.epochs_run = 3

    rep = build_report(_edit(run, tune_a), explain=False)
    assert rep.pairwise[0].verdict.endswith(
        "; the two models did not have the same budget (b was tuned over 20 trials, a over 5)."
    )
    assert (
        "tuning: a was tuned over 5 trials, b was tuned over 20 trials"
        in {c.title: c.text for c in rep.caveats}["Different budgets"]
    )


def _grid() -> dict[str, Any]:
    cells = [
        {"lr": lr, "weight_decay": wd, "val_accuracy": acc}
        for lr, row in ((1e-3, (0.412, 0.405)), (1e-2, (0.633, 0.651)), (1e-1, (0.598, 0.587)))
        for wd, acc in zip((0.0, 1e-3), row, strict=True)
    ]
    chosen = {"lr": 1e-2, "weight_decay": 1e-3, "val_accuracy": 0.651}
    return {"grid": cells, "chosen": chosen, "cache": "hit", "views": 2, "epochs": 30, "feature_dim": 768}


@pytest.mark.slow
def test_the_probe_grid_marks_the_chosen_cell(tmp_path: Path) -> None:
    def probe(a: ModelResult, b: ModelResult) -> None:
        b.finetune, b.lr, b.lr_source, b.weight_decay, b.probe = "head", 1e-2, "probe_grid", 1e-3, _grid()

    run = _edit(make_run(tmp_path), probe)
    html, md = _pages(run)
    section = html[html.index("Linear-probe grid: b</h3>") : html.index("<h2>2.")]
    assert re.findall(r"<th>([^<]*)</th>", section) == [
        "lr / weight decay",
        "0",
        "1.0e-03",
        "1.0e-03",
        "1.0e-02",
        "1.0e-01",
    ]
    body = section[section.index("<tbody>") : section.index("</tbody>")]
    rows = re.findall(r"<tr><th>([^<]+)</th>(.*?)</tr>", body)
    cells = {lr: re.findall(r"<td[^>]*>(.*?)</td>", tds) for lr, tds in rows}
    assert cells == {
        "1.0e-03": ["41.2%", "40.5%"],
        "1.0e-02": ["63.3%", "<b>65.1%</b>"],
        "1.0e-01": ["59.8%", "58.7%"],
    }
    assert (
        "The feature cache was hit: 768-dim features read from it; 2 augmented views per training image; each head trained for 30 epochs."
        in section
    )
    md_section = md[md.index("### Linear-probe grid: b") : md.index("## 2.")]
    assert "| lr / weight decay | 0 | 1.0e-03 |" in md_section
    assert "| 1.0e-02 | 63.3% | **65.1%** |" in md_section and "| 1.0e-03 | 41.2% | 40.5% |" in md_section
    assert md_section.count("**") == 2 and "The feature cache was hit" in md_section
    assert "1.0e-02 (probe grid)" in _html_rows(html, "budget-table")["b"]
    assert "Linear-probe grid: a" not in html  # a trained no probe

    # a grid cut short or hand-edited: what is readable shows, nothing breaks
    def broken(a: ModelResult, b: ModelResult) -> None:
        b.probe = {"grid": [{"lr": 1e-2, "val_accuracy": 0.5}, "junk", {"lr": "x"}], "chosen": None, "cache": "miss"}

    html, md = _pages(_edit(run, broken))
    section = html[html.index("Linear-probe grid: b</h3>") : html.index("<h2>2.")]
    assert re.findall(r"<td[^>]*>(.*?)</td>", section) == ["50.0%"] and "<b>" not in section
    assert "The feature cache was built: features extracted." in section


def _strip(run: Path, labels: set[str]) -> None:
    """Write results.json as an older version did: without the budget fields, for the models in `labels`."""
    path = run / "results.json"
    data = json.loads(path.read_text())
    new = ("lr_source", "tuning_trials", "optimizer_steps", "images_seen", "probe", "flags")
    for m in data["models"]:
        if m["label"] in labels:
            for key in new:
                del m[key]
    path.write_text(json.dumps(data))


@pytest.mark.slow
def test_results_of_an_older_version_still_render(tmp_path: Path) -> None:
    def new_b(a: ModelResult, b: ModelResult) -> None:
        b.optimizer_steps, b.images_seen, b.lr_source, b.tuning_trials = 120, 960, "config", None

    run = _edit(make_run(tmp_path), new_b)
    _strip(run, {"a"})  # a from an older version, b from this one
    html, md = _pages(run)
    rows = _html_rows(html, "budget-table")
    assert rows["a"] == ["a", "3 / 3", "–", "–", "1.0e-03", "–", "30.0", "–"]  # unknown: a dash, no source
    assert rows["b"] == ["b", "3 / 3", "120", "960", "1.0e-03 (config)", "–", "30.0", "–"]
    assert _md_rows(md, "### Training budget")["a"][1:] == ["3 / 3", "–", "–", "1.0e-03", "–", "30.0", "–"]
    _strip(run, {"b"})  # all old: no budget table, no probe grid, no diagnosis, the plain verdict
    html, md = _pages(run)
    assert "Training budget" not in html and "Training budget" not in md and "Linear-probe grid" not in html
    (text, _) = _verdicts(html, md)
    assert text.endswith("(McNemar p = 0.0923).") and "budget" not in text
    assert "Different budgets" not in html


def test_across_seeds_each_diagnosis_names_its_seeds(tmp_path: Path) -> None:
    from visionpoc.repeats import repeat_dir, save_repeats
    from visionpoc.report.across_seeds import build_seeds_report

    run = tmp_path / "repeats"
    for seed in (0, 1, 2):
        one = make_run(tmp_path / f"s{seed}")
        if seed > 0:

            def flag(a: ModelResult, b: ModelResult) -> None:
                b.flags = [
                    {"code": "too_few_steps", "message": "only 40 optimizer steps, where full usually needs 500"}
                ]

            _edit(one, flag)
        shutil.copytree(one, run / repeat_dir(seed))
    save_repeats(run, [0, 1, 2], ["a", "b"])
    rep = build_seeds_report(run)
    text = {c.title: c.text for c in rep.caveats}["Too few optimizer steps: b"]
    assert text == (
        "Only 40 optimizer steps, where full usually needs 500 (in seeds 1, 2 of 3): this comparison may reflect "
        "the training budget, not the model; give it more epochs (`train.epochs`) or a smaller batch "
        "(`train.batch_size`), so that it takes more steps."
    )
