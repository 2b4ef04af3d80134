"""Results that mean nothing are flagged, not ranked: a model at chance level or answering one class
(caveat, verdict, the page across seeds, the terminal), a tuning study whose trials all tie, CNNs with
`.blocks` taken for transformers, and a SIGTERM sent to the whole process group (DataLoader workers
included), which must stop like Ctrl-C.

The report tests write run folders from the results dataclasses (10 classes, 200 test images), as
tests/test_report.py does; nothing trains there.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import timm
import yaml
from torch import nn

from test_report import _model
from test_tune import _config as tune_config
from test_tune import _fake_fit, no_plots  # noqa: F401  (a fixture)
from visionpoc import models, recovery, train
from visionpoc.config import ModelConfig, TuneConfig, load_config
from visionpoc.errors import TrainingInterrupted
from visionpoc.evaluate import EvalStats, learning, learning_from_accuracy
from visionpoc.report import write_report
from visionpoc.report.across_seeds import build_seeds_report
from visionpoc.report.build import build_report
from visionpoc.report.caveats import caveats
from visionpoc.report.tuning import tie_advice
from visionpoc.results import DatasetInfo, Environment, RunResults, load_results, save_predictions, save_results
from visionpoc.runfiles import TUNE_SUMMARY_FILE
from visionpoc.tuning import outputs as tuned
from visionpoc.tuning import search as tune

CLASSES = [f"n020{i:05d}-breed{i}" for i in range(10)]
N = 200
TARGETS = np.arange(N) % len(CLASSES)  # balanced: 20 test images per class, chance level 10%


def healthy(accuracy: float, seed: int) -> np.ndarray:
    """Predictions right on `accuracy` of the images (seeded), each mistake a neighbouring class."""
    right = np.random.default_rng(seed).permutation(N) < round(accuracy * N)
    return np.where(right, TARGETS, (TARGETS + 1) % len(CLASSES))


def one_class(cls: int, right: int = 0) -> np.ndarray:
    """`cls` for every image but the first `right` (answered correctly): a collapsed model."""
    preds = np.full(N, cls)
    preds[:right] = TARGETS[:right]
    return preds


def write_run(run_dir: Path, preds: dict[str, np.ndarray], with_predictions: bool = True) -> Path:
    """A finished run folder: results.json and (with `with_predictions`) each model's predictions file."""
    files = [f"{CLASSES[t]}/img_{i:03d}.jpg" for i, t in enumerate(TARGETS)]
    results = []
    for label, p in preds.items():
        acc = float((p == TARGETS).mean())
        results.append(_model(label, "test_resnet", acc, train_accuracy=acc, val_accuracy=acc))
        if with_predictions:
            probs = np.full((N, len(CLASSES)), 0.01, dtype=np.float32)
            probs[np.arange(N), p] = 0.91
            save_predictions(run_dir / label / "test_predictions.npz", TARGETS, probs, files)
    save_results(
        RunResults(
            dataset=DatasetInfo("stanford_dogs", "/nowhere", 1000, 100, N, len(CLASSES), CLASSES, "/nowhere/Images"),
            models=results,
            environment=Environment("0.1.0", "3.11.9", "2.4.0", "1.0.20", None, "cpu", None, "abc1234", 0, "Linux"),
            config={"train": {"epochs": 3, "seed": 0}},
            created="2025-01-01T00:00:00+00:00",
        ),
        run_dir,
    )
    return run_dir


def bottom_line(html: str) -> list[str]:
    section = html[html.index('<section class="bottom-line">') : html.index("</section>")]
    return [re.sub(r"<[^>]+>", "", v) for v in re.findall(r'<p class="verdict">(.*?)</p>', section, re.S)]


# ------------------------------------------------------------------------------ did the model learn?


def test_the_learning_check_tells_guessing_and_collapse_from_learning() -> None:
    collapsed = learning(TARGETS, one_class(3), len(CLASSES))
    assert (collapsed.near_chance, collapsed.one_class, collapsed.learned) == (True, True, False)
    assert collapsed.reasons(CLASSES) == [
        "its test accuracy, 10.0%, is no better than chance level (10.0%)",
        f"it answers {CLASSES[3]} for 100% of the test images (10% of them are {CLASSES[3]})",
    ]
    good = learning(TARGETS, healthy(0.8, 0), len(CLASSES))
    assert good.learned and good.reasons(CLASSES) == []
    # one class for most images while scoring above chance: still a collapse (55% answers, 10% truth)
    mostly = learning(TARGETS, np.where(np.arange(N) < 90, TARGETS, 7), len(CLASSES))
    assert mostly.one_class and not mostly.near_chance and not mostly.learned
    # an unbalanced test set: always answering its majority class is chance level, not 1/classes
    skewed = np.where(np.arange(N) < 150, 0, TARGETS)
    majority = learning(skewed, np.zeros(N, dtype=int), len(CLASSES))
    assert majority.chance == 0.775 and majority.near_chance and not majority.one_class  # 155 of 200 are class 0
    assert "always answering the most common class" in majority.reasons(CLASSES)[0]
    # from a recorded accuracy alone: near chance is under 14.5% on 10 classes, 52.5% on 2, 1.25% on 120
    assert [learning_from_accuracy(a, 1000, 10).learned for a in (0.093, 0.14, 0.15)] == [False, False, True]
    assert [learning_from_accuracy(a, 1000, 2).learned for a in (0.52, 0.6)] == [False, True]
    assert [learning_from_accuracy(a, 3000, 120).learned for a in (0.012, 0.02)] == [False, True]
    assert learning_from_accuracy(0.12, 1000, 10).reasons([]) == [
        "its test accuracy, 12.0%, is barely above chance level (10.0%)"
    ]
    # on 3 classes (a third of the images each), one class answered for 5 of 9 images is no collapse; 7 of 9 is
    three = np.arange(9) % 3
    assert learning(three, np.array([0, 1, 2, 0, 1, 0, 0, 0, 2]), 3).learned  # 7 of 9 right, class 0 for 5
    assert learning(three, np.array([0, 0, 0, 0, 0, 0, 0, 1, 2]), 3).one_class  # class 0 for 7 of 9 (78%)


@pytest.mark.slow
def test_models_that_answer_one_class_get_a_caveat_and_no_lead(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", {"lite0": one_class(3, right=0), "mnv3s": one_class(7, right=2)})
    rep = build_report(run, explain=False)
    text = {c.title: c.text for c in rep.caveats}
    assert rep.caveats[0].title == "Did not learn: lite0"  # before anything else: every other figure is noise
    assert text["Did not learn: mnv3s"].startswith(
        f"mnv3s did not learn: its test accuracy, 11.0%, is barely above chance level (10.0%) and it answers "
        f"{CLASSES[7]} for 99% of the test images (10% of them are {CLASSES[7]})."
    )
    assert "learning rate (`lr`" in text["Did not learn: lite0"] and "`train.epochs`" in text["Did not learn: lite0"]
    (pw,) = rep.pairwise
    assert pw.verdict.startswith(
        f"Neither mnv3s nor lite0 learned (mnv3s: test accuracy 11.0%, chance level 10.0%, {CLASSES[7]} answered for "
        f"99% of the test images; lite0: test accuracy 10.0%, chance level 10.0%, {CLASSES[3]} answered for 100% of "
        "the test images): the difference between them says nothing about the models until they do."
    )
    assert "says nothing about the models" in pw.verdict and "learning rate" in pw.verdict
    assert "ahead" not in pw.verdict and "more accurate" not in pw.verdict
    (line,) = bottom_line(write_report(run).read_text())
    assert line.startswith("Neither mnv3s nor lite0 learned") and "points" not in line
    assert "Did not learn: lite0" in (run / "report.md").read_text()

    # one model learned, the other did not: the sentence names the one that did not
    one = build_report(write_run(tmp_path / "one", {"a": healthy(0.8, 0), "b": one_class(2, right=20)}), explain=False)
    assert one.pairwise[0].verdict.startswith(
        f"b did not learn ({CLASSES[2]} answered for 91% of the test images), "
        "so its comparison with a says nothing about the models until it does."
    )
    assert [c.title for c in one.caveats if c.title.startswith("Did not learn")] == ["Did not learn: b"]


@pytest.mark.slow
def test_a_healthy_pair_keeps_the_usual_verdict(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", {"a": healthy(0.8, 0), "b": healthy(0.6, 1)})
    rep = build_report(run, explain=False)
    assert not [c for c in rep.caveats if c.title.startswith("Did not learn")]
    assert rep.pairwise[0].verdict.startswith("a is more accurate than b by 20.0 points on 200 test images")


def test_without_predictions_the_recorded_accuracy_decides(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", {"a": healthy(0.8, 0), "b": healthy(0.095, 1)}, with_predictions=False)
    titles = [c.title for c in caveats(load_results(run))]
    assert "Did not learn: b" in titles and "Did not learn: a" not in titles


@pytest.mark.slow
def test_the_page_across_seeds_names_the_seeds_where_a_model_did_not_learn(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for seed, b in ((3, healthy(0.7, 1)), (4, one_class(5))):
        write_run(run / f"seed-{seed}", {"a": healthy(0.8, seed), "b": b})
    (run / "repeats.json").write_text(json.dumps({"seeds": [3, 4], "runs": ["seed-3", "seed-4"], "labels": None}))
    rep = build_seeds_report(run)
    (pair,) = rep.pairs
    assert pair.verdict.startswith(
        "b did not learn (in 1 of 2 seeds (seed 4): test accuracy 10.0%, chance level 10.0%,"
    )
    assert "ahead" not in pair.verdict
    text = {c.title: c.text for c in rep.caveats}
    assert text["Did not learn: b"].startswith("b did not learn in 1 of 2 seeds (seed 4): its test accuracy, 10.0%")
    # the seed's own report says it too
    write_report(run)
    assert bottom_line((run / "seed-4" / "report.html").read_text())[0].startswith("b did not learn")
    assert "more accurate than b" in bottom_line((run / "seed-3" / "report.html").read_text())[0]


def test_the_terminal_warns_when_a_model_did_not_learn(caplog: pytest.LogCaptureFixture) -> None:
    def scores(preds: np.ndarray) -> EvalStats:
        probs = np.eye(len(CLASSES), dtype=np.float32)[preds]  # (N, C)
        return EvalStats(N, 2.3, 0.1, 0.5, 0.02, [], 1.0, 200.0, TARGETS, probs)

    with caplog.at_level(logging.WARNING, logger="visionpoc.train"):
        train.warn_if_not_learned("lite0", scores(one_class(3)), CLASSES)
        train.warn_if_not_learned("fine", scores(healthy(0.8, 0)), CLASSES)
    (record,) = caplog.records
    assert record.getMessage().startswith("[lite0] did not learn: its test accuracy, 10.0%, is no better than chance")
    assert "check the learning rate, the number of epochs and the data" in record.getMessage()


# ------------------------------------------------------------------------------ a tuning study that ties


def _study(values: list[float]) -> optuna.Study:
    """An in-memory study whose completed trials scored `values` (a searched lr each)."""
    study = optuna.create_study(direction="maximize", study_name="vit")
    dist = {"lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)}
    for k, v in enumerate(values):
        lr = 1e-4 * (k + 1)
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": lr}, distributions=dist, value=v, user_attrs={"overrides": {"lr": lr}}
            )
        )
    return study


def test_a_study_whose_trials_all_tie_names_no_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_report import make_run

    monkeypatch.setattr(tuned, "save_plots", lambda *args: [])
    assert tuned.tied_value(_study([0.1, 0.1, 0.1])) == 0.1 and tuned.best_trial(_study([0.1, 0.1, 0.1])) is None
    assert tuned.tied_value(_study([0.1, 0.2, 0.2])) is None and tuned.best_trial(_study([0.1, 0.2, 0.2])).number == 1
    assert tuned.tied_value(_study([0.1])) is None  # one trial: nothing to compare it with
    mcfg = ModelConfig(label="vit", timm="vit_tiny_patch16_224")
    out = tmp_path / "out"
    assert tuned.write_outputs(_study([0.1, 0.1, 0.1]), mcfg, out, "memory", 2) is None
    text = (out / "tuned" / "vit.yaml").read_text()
    doc = yaml.safe_load(text)
    assert doc["model"] == {} and doc["tuning"]["tied_value"] == 0.1 and doc["tuning"]["best_trial"] is None
    assert text.startswith("# No tuned settings for 'vit': all 3 completed trials scored 0.100 validation accuracy")
    assert json.loads((out / TUNE_SUMMARY_FILE).read_text())["models"]["vit"]["tied_value"] == 0.1
    # compare --tuned: the configured settings stand, and the report's tuning section says why
    run = make_run(tmp_path)
    two = load_config(None, ["models=[{label: a, timm: test_resnet}, {label: vit, timm: vit_tiny_patch16_224}]"])
    applied = tuned.apply_tuned(two, out, run)
    assert applied.model("vit") == two.model("vit")  # tuned_from None: untouched
    results = json.loads((run / "results.json").read_text())
    results["models"][1]["label"] = "vit"
    (run / "results.json").write_text(json.dumps(results))
    shutil.move(run / "b", run / "vit")
    rep = build_report(run, explain=False)
    assert rep.tuning is not None
    row = next(r for r in rep.tuning.rows if r.label == "vit")
    assert row.tied == 0.1 and row.params.startswith("none: all trials scored 0.100")
    assert any(
        n.startswith("The search of vit found nothing: all 3 completed trials scored 0.100") for n in rep.tuning.notes
    )


@pytest.mark.usefixtures("no_plots")
def test_tune_says_the_search_found_nothing(
    mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from visionpoc.cli import main

    monkeypatch.setattr(tune, "fit", _fake_fit([[0.1, 0.1]] * 3))  # three trials at chance level on 10 classes
    path = tune_config(tmp_path, mini_dogs, pruner="none")
    assert main(["tune", "--config", str(path), "--model", "vit", "--trials", "3", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "all 3 completed trials of study 'vit' scored 0.100 validation accuracy: the search found nothing" in err
    assert "no tuned settings written (the defaults stand)" in err and "best params" not in err
    assert yaml.safe_load((tmp_path / "o" / "tuned" / "vit.yaml").read_text())["model"] == {}
    assert "check the learning-rate range (`tune.lr`)" in err  # a tie below 100%: nothing learned
    assert "`data.val_fraction`" in tie_advice(1.0)  # every trial perfect: the validation split cannot tell


# ------------------------------------------------------------------------------ what is a transformer?

TRANSFORMERS = {
    "test_vit": {},
    "deit_tiny_patch16_224": {"depth": 2},
    "swin_tiny_patch4_window7_224": {"depths": (1, 1, 1, 1), "embed_dim": 32, "num_heads": (1, 2, 4, 8)},
    "eva02_tiny_patch14_224": {"depth": 2},
    "vit_small_patch14_dinov2": {"depth": 2, "img_size": 56},
}
CNNS = {"efficientnet_b0": {}, "mobilenetv3_small_050": {}, "test_convnext": {}, "test_resnet": {}}


@pytest.mark.parametrize(("name", "kwargs"), [*TRANSFORMERS.items(), *CNNS.items()])
def test_a_transformer_is_told_by_its_attention_not_its_attribute_names(name: str, kwargs: dict[str, Any]) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs)
    assert models.is_transformer(model) == (name in TRANSFORMERS)
    if name in ("efficientnet_b0", "mobilenetv3_small_050"):
        assert isinstance(model.blocks, nn.Sequential)  # the `.blocks` that fooled the old check


def test_top_fraction_counts_conv_layers_of_a_cnn_with_blocks_and_blocks_of_swin() -> None:
    cnn = ModelConfig(label="e", timm="efficientnet_b0", pretrained=False, finetune="top_fraction", fraction=0.1)
    model = models.create_model(cnn, 3)
    models.apply_finetune(model, cnn)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    k = -(-len(convs) // 10)  # ceil(0.1 x conv layers), not a tenth of the 7 stages in `.blocks`
    assert [n for n in convs if model.get_submodule(n).weight.requires_grad] == convs[-k:]
    swin = ModelConfig(
        label="s",
        timm="swin_tiny_patch4_window7_224",
        pretrained=False,
        finetune="top_fraction",
        fraction=0.5,
        model_kwargs=TRANSFORMERS["swin_tiny_patch4_window7_224"],
    )
    model = models.create_model(swin, 3)
    models.apply_finetune(model, swin)
    trains = [any(p.requires_grad for p in model.layers[i].blocks.parameters()) for i in range(4)]
    assert trains == [False, False, True, True]  # its 4 blocks sit in `.layers[i].blocks`: the top 2 train
    assert not model.patch_embed.proj.weight.requires_grad


def test_tuning_searches_layer_decay_for_transformers_only() -> None:
    cnn = tune.model_family(ModelConfig(label="e", timm="efficientnet_b0", pretrained=False), 3)
    vit = tune.model_family(ModelConfig(label="v", timm="test_vit", pretrained=False), 3)
    assert (cnn.layer_decay, vit.layer_decay) == (False, True)
    study = optuna.create_study(direction="maximize")
    for family in (cnn, vit):
        trial = study.ask()
        tune.suggest(trial, TuneConfig(), family, 5)
    assert "layer_decay" not in study.trials[0].params and "layer_decay" in study.trials[1].params


# ------------------------------------------------------------------------------ SIGTERM to the process group


def test_a_worker_dying_after_a_stop_request_is_an_interruption() -> None:
    died = RuntimeError("DataLoader worker (pid(s) 123) exited unexpectedly")
    with pytest.raises(TrainingInterrupted, match="SIGTERM received, and a DataLoader worker ended"):
        with recovery.stop_on_signals() as stop:
            stop(signal.SIGTERM, None)  # what the handler does when the signal arrives
            raise died
    with pytest.raises(RuntimeError, match="exited unexpectedly"), recovery.stop_on_signals():
        raise died  # no stop asked for: a worker's death is the model's failure
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
