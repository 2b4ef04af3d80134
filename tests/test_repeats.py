"""Repeats (`train.repeats`): the same comparison trained once per seed on the same splits, resumable, and
a report of each model's spread across seeds with a paired test over seeds."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml

from dogs_fixture import TINY_VIT
from visionpoc.cli import main
from visionpoc.compare import load_data
from visionpoc.config import ConfigError, load_config
from visionpoc.errors import VisionpocError
from visionpoc.repeats import spread
from visionpoc.report import stats
from visionpoc.report.render import pct
from visionpoc.results import load_predictions, load_results

CNN = {  # learns in one epoch (the report flags a model at chance level and then names no lead)
    "label": "cnn",
    "timm": "test_resnet",
    "pretrained": False,
    "finetune": "top_fraction",
    "fraction": 0.9,
    "img_size": 48,
    "lr": 0.01,
}


def _config(path: Path, root: Path, models: list[dict], **train_kw: object) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "source": "stanford_dogs",
                    "root": str(root),
                    "val_fraction": 0.2,
                    "num_workers": 0,
                    "download": False,
                },
                "models": models,
                "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "warmup_epochs": 0.5, "device": "cpu", **train_kw},
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def repeats_run(mini_dogs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`compare` with two models and repeats=2 from seed 3: folders seed-3 and seed-4, and the report."""
    tmp = tmp_path_factory.mktemp("repeats")
    cfg = _config(tmp / "c.yaml", mini_dogs, [CNN, TINY_VIT], seed=3, repeats=2)
    assert main(["compare", "--config", str(cfg), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


@pytest.mark.slow
def test_each_seed_is_a_whole_run_on_the_same_splits(repeats_run: Path) -> None:
    assert json.loads((repeats_run / "repeats.json").read_text()) == {
        "seeds": [3, 4],
        "runs": ["seed-3", "seed-4"],
        "labels": None,  # compare: every model of the config
    }
    runs = {seed: load_results(repeats_run / f"seed-{seed}") for seed in (3, 4)}
    for seed, r in runs.items():
        assert r.environment.seed == seed
        assert [m.status for m in r.models] == ["ok", "ok"]
        saved = yaml.safe_load((repeats_run / f"seed-{seed}" / "config.yaml").read_text())
        assert (saved["train"]["seed"], saved["train"]["repeats"], saved["data"]["split_seed"]) == (
            seed,
            1,
            3,
        )
    assert runs[3].dataset == runs[4].dataset  # same train / val / test sizes and classes
    a, b = (load_predictions(repeats_run / f"seed-{s}" / "vit" / "test_predictions.npz") for s in (3, 4))
    assert list(a["files"]) == list(b["files"])  # the same test images, in the same order
    assert not np.array_equal(a["probs"], b["probs"])  # but another training: the seed changed it
    assert yaml.safe_load((repeats_run / "config.yaml").read_text())["train"]["repeats"] == 2


def test_the_repeats_share_the_first_seeds_validation_split(mini_dogs: Path, tmp_path: Path) -> None:
    def val_files(**kw: object) -> list[str]:
        cfg = load_config(_config(tmp_path / "c.yaml", mini_dogs, [TINY_VIT]), [f"{k}={v}" for k, v in kw.items()])
        _, splits = load_data(cfg)
        return [splits.val.path(i).name for i in range(len(splits.val))]

    first = val_files(**{"train.seed": 3})
    assert val_files(**{"train.seed": 4, "data.split_seed": 3}) == first
    assert any(val_files(**{"train.seed": s}) != first for s in (4, 5, 6))  # the split does follow the seed


@pytest.mark.slow
def test_the_report_compares_the_seeds(repeats_run: Path) -> None:
    md = (repeats_run / "report.md").read_text()
    html = (repeats_run / "report.html").read_text()
    runs = [load_results(repeats_run / f"seed-{s}") for s in (3, 4)]
    cnn = [r.model("cnn").test_accuracy for r in runs]
    vit = [r.model("vit").test_accuracy for r in runs]
    # each model's mean across seeds, and every seed's own accuracy, in the table
    for accs in (cnn, vit):
        assert f"**{pct(float(np.mean(accs)))}" in md
        for acc in accs:
            assert pct(acc) in md
    diff = stats.across_seeds([a or 0.0 for a in cnn], [v or 0.0 for v in vit])
    assert stats.seeds_verdict("cnn", "vit", diff) in md
    for seed in (3, 4):
        assert (repeats_run / f"seed-{seed}" / "report.html").is_file()  # every seed's full report, linked
        assert f'href="seed-{seed}/report.html"' in html
        assert (
            f"This run is seed {seed}, one of the repeats" in (repeats_run / f"seed-{seed}" / "report.md").read_text()
        )
    assert (repeats_run / "report_files" / "test_accuracy_by_seed.png").stat().st_size > 1000
    from visionpoc.report.build import build_report

    seed = build_report(repeats_run / "seed-3", explain=False)  # the seeds' spread is measured: no such caveat
    assert "One training run per model" not in [c.title for c in seed.caveats]


def test_commands_that_need_one_run_name_the_seed_folders(
    repeats_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(VisionpocError, match=r"one run per seed: pass one of them \(.*seed-3, .*seed-4\)"):
        load_results(repeats_run)
    assert main(["predict", str(repeats_run), str(repeats_run / "report_files" / "test_accuracy_by_seed.png")]) == 2
    assert f"visionpoc report {repeats_run}" in capsys.readouterr().err


@pytest.mark.slow
def test_an_interrupted_repeat_resumes_and_the_finished_ones_are_kept(
    mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from visionpoc import train

    real, calls = train.train_step, {"n": 0}
    steps_per_run = 3  # 15 training images, batches of 4, the partial one dropped; one epoch, one model

    def step_then_sigterm(p, x, y, where):  # type: ignore[no-untyped-def]
        out = real(p, x, y, where)
        calls["n"] += 1
        if calls["n"] == steps_per_run + 1:  # the first step of the second seed
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(train, "train_step", step_then_sigterm)
    run = tmp_path / "run"
    cfg = _config(tmp_path / "c.yaml", mini_dogs, [TINY_VIT], repeats=3)
    assert main(["compare", "--config", str(cfg), "--out", str(run), "--no-report"]) == 130
    assert f"Resume with: visionpoc compare --resume {run}\n" in capsys.readouterr().err
    first = (run / "seed-0" / "results.json").stat().st_mtime_ns
    assert not (run / "seed-1" / "results.json").exists() and not (run / "seed-2").exists()
    assert main(["compare", "--config", str(cfg), "--out", str(run)]) == 2  # a new run may not reuse it
    monkeypatch.setattr(train, "train_step", real)
    # the seeds of a run with repeats may be fewer, down to the last one started (seed 1), never 1
    assert main(["compare", "--resume", str(run), "--set", "train.repeats=1"]) == 2
    assert "would change train.repeats" in capsys.readouterr().err
    assert main(["compare", "--resume", str(run / "seed-1")]) == 2  # one seed alone: the others wait
    assert f"is one seed of the repeats in {run}: resume them all with --resume {run}" in capsys.readouterr().err
    assert main(["compare", "--resume", str(run), "--set", "train.repeats=2"]) == 0
    assert (run / "seed-0" / "results.json").stat().st_mtime_ns == first  # not trained again
    assert load_results(run / "seed-1").models[0].resumed_from_epoch == 1
    assert not (run / "seed-2").exists()
    assert "across 2 seeds" in capsys.readouterr().out
    assert (run / "report.html").is_file()
    # more seeds later: the finished ones are kept; fewer than those started is refused
    assert main(["compare", "--resume", str(run), "--set", "train.repeats=3", "--no-report"]) == 0
    assert json.loads((run / "repeats.json").read_text())["seeds"] == [0, 1, 2]
    assert load_results(run / "seed-2").models[0].status == "ok"
    assert (run / "seed-0" / "results.json").stat().st_mtime_ns == first
    assert main(["compare", "--resume", str(run), "--set", "train.repeats=2"]) == 2
    assert "down to its last started seed" in capsys.readouterr().err


def test_a_single_run_cannot_become_repeats_on_resume(
    mini_dogs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    (run).mkdir()
    _config(run / "config.yaml", mini_dogs, [TINY_VIT])  # an interrupted single run's saved config
    assert main(["compare", "--resume", str(run), "--set", "train.repeats=2"]) == 2
    assert "would change train.repeats" in capsys.readouterr().err


def test_repeats_and_split_seed_are_checked(mini_dogs: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path / "c.yaml", mini_dogs, [TINY_VIT])
    with pytest.raises(ConfigError, match=r"train\.repeats: 0 must be at least 1"):
        load_config(cfg, ["train.repeats=0"])
    with pytest.raises(ConfigError, match=r"data\.split_seed: -1 must be at least 0"):
        load_config(cfg, ["data.split_seed=-1"])


def test_spread_drops_missing_values() -> None:
    s = spread([0.8, None, 0.9, math.nan])
    assert s is not None and s.values == [0.8, 0.9]
    assert s.mean == pytest.approx(0.85) and s.std == pytest.approx(math.sqrt(0.005))
    assert (s.low, s.high) == (0.8, 0.9)
    one = spread([0.7])
    assert one is not None and one.std is None
    assert spread([None]) is None


def test_paired_t_test_over_seeds() -> None:
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t = 0.2 / (0.1 / sqrt 3) = 2 sqrt 3 with 2 degrees of
    # freedom, whose two-sided p has the closed form 1 - t / sqrt(t^2 + 2)
    d = stats.across_seeds([0.5, 0.5, 0.5], [0.6, 0.7, 0.8])
    assert d is not None
    assert d.mean == pytest.approx(0.2) and d.std == pytest.approx(0.1)
    t = 2 * math.sqrt(3)
    assert d.p_value == pytest.approx(1 - t / math.sqrt(t * t + 2))
    assert stats.across_seeds([], []) is None
    with pytest.raises(ValueError, match="paired by seed"):
        stats.across_seeds([0.5], [0.5, 0.6])


def test_seeds_verdicts() -> None:
    v = stats.seeds_verdict
    never_behind = stats.across_seeds([0.5, 0.5, 0.5], [0.6, 0.7, 0.8])
    assert v("a", "b", never_behind) == (
        "b is ahead of a in 3 of 3 seeds, by 20.0 points on average (standard deviation across seeds 10.0 "
        "points; paired t-test over seeds p = 0.0742): never behind, but 3 seeds are too few to rule out the "
        "training's randomness."
    )
    holds = stats.across_seeds([0.5] * 5, [0.6, 0.61, 0.62, 0.6, 0.61])
    assert v("a", "b", holds).endswith("): the lead holds across training runs.")
    mixed = stats.across_seeds([0.5, 0.5, 0.5], [0.7, 0.45, 0.6])
    assert "b is ahead of a in 2 of 3 seeds" in v("a", "b", mixed)
    assert v("a", "b", mixed).endswith(
        "the seeds disagree (a leads in 1), so the training's randomness can reverse this result."
    )
    baseline_leads = stats.across_seeds([0.7, 0.7, 0.7], [0.6, 0.7, 0.5])
    assert v("a", "b", baseline_leads).startswith("a is ahead of b in 2 of 3 seeds, tied in 1, by 10.0 points")
    same = stats.across_seeds([0.5, 0.6], [0.6, 0.7])
    assert (
        v("a", "b", same)
        == "b is ahead of a in 2 of 2 seeds, by 10.0 points on average: the same difference in every seed."
    )
    assert v("a", "b", stats.across_seeds([0.5], [0.6])).startswith("Only one seed finished with both a and b")
    assert v("a", "b", None).startswith("No seed finished with both")
    assert (
        v("a", "b", stats.across_seeds([0.5, 0.6], [0.6, 0.5]))
        == "b and a are equally accurate on average over 2 seeds."
    )


@pytest.mark.slow
def test_report_logs_one_mlflow_run_per_seed(repeats_run: Path, tmp_path: Path) -> None:
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["report", str(repeats_run), "--mlflow-uri", uri, "--mlflow-experiment", "seeds"]) == 0
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("seeds")
    runs = client.search_runs([exp.experiment_id])
    parents = sorted(r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parents == [f"{repeats_run.name}/seed-3", f"{repeats_run.name}/seed-4"]
    assert len(runs) == 2 * 3  # each seed: its run and one nested run per model
    assert {r.data.tags.get("visionpoc.repeats_of") for r in runs if "mlflow.parentRunId" not in r.data.tags} == {
        str(repeats_run.resolve())
    }
    # logging again (a retry, or a resumed run that added seeds) does not log the finished seeds twice;
    # a logging attempt cut short (here: seed 4's, marked FAILED) does not count as logged
    (cut,) = [r for r in runs if r.info.run_name.endswith("seed-4")]
    client.set_terminated(cut.info.run_id, status="FAILED")
    assert main(["report", str(repeats_run), "--mlflow-uri", uri, "--mlflow-experiment", "seeds"]) == 0
    again = client.search_runs([exp.experiment_id])
    assert len(again) == 2 * 3 + 3  # seed 4 logged once more (its run and its two models)
    assert sorted(r.info.status for r in again if r.info.run_name.endswith("seed-4")) == [
        "FAILED",
        "FINISHED",
    ]


@pytest.mark.slow
def test_the_report_of_unfinished_repeats_says_which_seeds_are_missing(repeats_run: Path, tmp_path: Path) -> None:
    import shutil

    from visionpoc.report.across_seeds import build_seeds_report

    run = Path(shutil.copytree(repeats_run, tmp_path / "run"))
    (run / "seed-4" / "results.json").unlink()  # interrupted before its first model finished
    rep = build_seeds_report(run)
    assert [row.finished for row in rep.rows] == [1, 1]
    assert rep.rows[0].per_seed[1] is None and rep.pairs[0].per_seed[1] is None
    assert any(
        n.startswith("Not finished (interrupted?): seed 4 (no results yet).")
        and f"`visionpoc compare --resume {run}`" in n
        for n in rep.notes
    )
    assert rep.pairs[0].verdict.startswith("Only one seed finished with both cnn and vit")
    (run / "seed-3" / "results.json").unlink()
    with pytest.raises(VisionpocError, match="no repeat has finished yet"):
        build_seeds_report(run)


def test_several_candidates_across_seeds_get_holms_correction() -> None:
    from visionpoc.report.across_seeds import SeedPair, _verdicts

    strong = stats.across_seeds([0.5] * 3, [0.6, 0.7, 0.8])
    weak = stats.across_seeds([0.5] * 3, [0.55, 0.5, 0.6])
    assert strong is not None and weak is not None and strong.p_value is not None and weak.p_value is not None
    pairs = [SeedPair("a", c, list(d.diffs), d, [None] * 3) for c, d in (("b", strong), ("c", weak))]
    _verdicts(pairs)
    assert [p.p_holm for p in pairs] == pytest.approx(stats.holm([strong.p_value, weak.p_value]))
    assert all("after Holm's correction for 2 candidates" in p.verdict for p in pairs)
    alone = [SeedPair("a", "b", list(strong.diffs), strong, [None] * 3)]
    _verdicts(alone)
    assert alone[0].p_holm is None and "Holm" not in alone[0].verdict


def test_a_resume_trains_the_models_the_run_was_started_with(
    repeats_run: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    assert main(["train", "--resume", str(repeats_run), "--model", "vit"]) == 2
    assert f"was started by `visionpoc compare`: resume it with `visionpoc compare --resume {repeats_run}`" in (
        capsys.readouterr().err
    )
    # a single run resumed for one model keeps the other's finished results
    one = Path(shutil.copytree(run_dir, tmp_path / "one"))
    assert main(["train", "--resume", str(one), "--model", "cnn", "--set", "data.num_workers=0"]) == 0
    assert [m.label for m in load_results(one).models] == ["cnn", "vit"]


def test_equal_leads_are_equal_despite_floating_point() -> None:
    # 0.8 - 0.7 and 0.7 - 0.6 differ in the last bit: the same lead must give no spread, not p ~ 1e-31
    same = stats.across_seeds([0.7, 0.6], [0.8, 0.7])
    assert same is not None and same.std == 0 and same.p_value is None
    assert stats.seeds_verdict("a", "b", same).endswith("the same difference in every seed.")
    three = stats.across_seeds([0.7, 0.6, 0.5], [0.8, 0.7, 0.6])  # rounded differences, and their std too
    assert three is not None and three.std == 0 and three.p_value is None
    even = stats.across_seeds([0.5, 0.6, 0.7], [0.55, 0.55, 0.7])
    assert even is not None and even.mean == 0
    assert stats.seeds_verdict("a", "b", even) == "b and a are equally accurate on average over 3 seeds."


def _edit_results(run: Path, seed: int, edit) -> None:  # type: ignore[no-untyped-def]
    path = run / f"seed-{seed}" / "results.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.slow
def test_the_report_names_partial_failed_and_mixed_seeds(repeats_run: Path, tmp_path: Path) -> None:
    import shutil

    from visionpoc.report.across_seeds import build_seeds_report

    run = Path(shutil.copytree(repeats_run, tmp_path / "run"))
    # seed 4 stopped between its two models, on another device
    _edit_results(run, 4, lambda d: (d["models"].pop(), d["environment"].update(device="cuda:0", gpu_name="H100")))
    rep = build_seeds_report(run)
    assert [row.finished for row in rep.rows] == [2, 1] and rep.pairs[0].per_seed[1] is None
    assert any("Not finished (interrupted?): vit in seed 4." in n for n in rep.notes)
    assert any("did not all run on the same device" in n and "cuda:0 (H100)" in n for n in rep.notes)
    assert "Peak memory is the whole process's" not in [c.title for c in rep.caveats]  # not shown here
    # vit never finished anywhere (stopped in seed 3's vit, seed 4 not started): still named, from the config
    empty = Path(shutil.copytree(repeats_run, tmp_path / "empty"))
    _edit_results(empty, 3, lambda d: d["models"].pop())
    shutil.rmtree(empty / "seed-4")
    rep = build_seeds_report(empty)
    assert [row.label for row in rep.rows] == ["cnn", "vit"] and rep.rows[1].finished == 0
    assert rep.pairs[0].verdict == "vit finished in no seed: there is nothing to compare."
    assert any("Not finished (interrupted?): seed 4 (no results yet); vit in seed 3." in n for n in rep.notes)
    # vit failed in every seed: its timm name is still shown, and the verdict says why there is none
    for seed in (3, 4):
        _edit_results(
            run,
            seed,
            lambda d: (
                d["models"][-1].update(status="failed", error="boom") if d["models"][-1]["label"] == "vit" else None
            ),
        )
    _edit_results(
        run,
        4,
        lambda d: d["models"].append(
            dict(d["models"][0], label="vit", timm="vit_tiny_patch16_224", status="failed", error="boom")
        ),
    )
    rep = build_seeds_report(run)
    assert rep.rows[1].finished == 0 and rep.rows[1].timm == "vit_tiny_patch16_224"
    assert rep.pairs[0].verdict == "vit finished in no seed: there is nothing to compare."
    assert any(n.startswith("Failed, left out of the spreads: vit (seed 3), vit (seed 4)") for n in rep.notes)


def test_a_misspelt_model_or_a_taken_folder_leaves_nothing_behind(
    mini_dogs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path / "c.yaml", mini_dogs, [TINY_VIT], repeats=2)
    out = tmp_path / "out"
    assert main(["train", "--config", str(cfg), "--model", "vti", "--out", str(out)]) == 2
    assert "no model labelled 'vti'" in capsys.readouterr().err and not out.exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.yaml").write_text("data: {}\n")
    assert main(["compare", "--config", str(cfg), "--tuned", str(tmp_path / "tune"), "--out", str(taken)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in taken.iterdir()) == ["config.yaml"]  # no tuning records copied into it


@pytest.mark.slow
def test_seed_folders_without_their_list_are_named(repeats_run: Path, tmp_path: Path) -> None:
    import shutil

    run = Path(shutil.copytree(repeats_run, tmp_path / "run"))
    (run / "repeats.json").unlink()
    with pytest.raises(VisionpocError) as e:
        load_results(run)
    assert f"({run / 'seed-3'}, {run / 'seed-4'})" in str(e.value)
    assert f"resuming the run writes it again (`visionpoc compare --resume {run}`" in str(e.value)
