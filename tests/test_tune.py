"""Search: Optuna studies per model on the miniature Stanford Dogs, with a tiny ViT on the CPU.

One three-trial study is run once for the module (under the test-split guard) and shared: its outputs,
its use by `compare --tuned`, and a continued run on a copy of it. Pruning and interruption are tested
with a stand-in for `fit` that reports a chosen validation curve (no training).
"""

from __future__ import annotations

import builtins
import gc
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from dogs_fixture import TINY_VIT
from visionpoc.compare import run_compare
from visionpoc.config import Config, load_config
from visionpoc.data.images import load_rgb
from visionpoc.data.sources import read_dataset
from visionpoc.errors import DataError, TrainingInterrupted
from visionpoc.report import write_report
from visionpoc.results import ModelResult
from visionpoc.tuning import outputs as tuned
from visionpoc.tuning import search as tune
from visionpoc.tuning.search import apply_tuned, run_tune

TS = optuna.trial.TrialState


CNN = {
    "label": "cnn",
    "timm": "test_resnet",
    "pretrained": False,
    "finetune": "top_fraction",
    "fraction": 0.9,
    "img_size": 32,
}


def _config(tmp: Path, root: Path, models: tuple[dict[str, Any], ...] = (TINY_VIT,), **tune_kw: Any) -> Path:
    path = tmp / "c.yaml"
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
                "models": list(models),
                "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "device": "cpu", "deterministic": True},
                "tune": {"epochs": 2, "trials": 3, "batch_size": [4, 8], "startup_trials": 2, **tune_kw},
            }
        )
    )
    return path


@dataclass
class OpenGuard:
    """Fails any open of a test image and records every other path opened.

    The tests run as root, and chmod 000 does not stop root from reading a file, so unreadable
    permissions would prove nothing here. Instead `builtins.open`, `io.open` and `os.open` (every way
    PIL, NumPy and the prepared store open files) are wrapped: opening a listed test image raises
    PermissionError, as an unreadable file would; a stat (the reader's existence check) still works.
    """

    test_files: set[str]
    opened: set[str] = field(default_factory=set)

    def check(self, file: Any) -> None:
        if isinstance(file, (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(file))
            if path in self.test_files:
                raise PermissionError(f"test image opened while tuning: {path}")
            self.opened.add(path)

    def wrap(self, opener: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(file: Any, *args: Any, **kwargs: Any) -> Any:
            self.check(file)
            return opener(file, *args, **kwargs)

        return guarded


@pytest.fixture(scope="module")
def study_run(mini_dogs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A three-trial study on the fixture, run once under the open guard. Each trial trains for real; its
    score is then lowered by 0.001 x its number: on the fixture's four validation images every trial often
    scores the same, and `tune` names no best trial from a tie (test_flags.py). The offsets keep any real
    difference (a quarter of a point) and break a tie in favour of the earliest trial."""
    real_fit = tune.fit

    def fit(*args: Any, **kwargs: Any) -> ModelResult:
        result = real_fit(*args, **kwargs)
        trial = int(Path(args[3]).name)  # OUT/trials/<label>/<number>
        result.val_accuracy = (result.val_accuracy or 0.0) - 0.001 * trial
        return result

    tmp = tmp_path_factory.mktemp("tune")
    cfg = load_config(_config(tmp, mini_dogs, startup_trials=3))  # the median pruner waits for 3 trials
    ds = read_dataset("stanford_dogs", mini_dogs)
    guard = OpenGuard({os.path.realpath(ds.test.path(i)) for i in range(len(ds.test))})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tune, "fit", fit)
        mp.setattr(builtins, "open", guard.wrap(builtins.open))
        mp.setattr(io, "open", guard.wrap(io.open))
        mp.setattr(os, "open", guard.wrap(os.open))
        with pytest.raises(DataError, match="test image opened while tuning"):  # the guard works
            load_rgb(ds.test.path(0))
        study = run_tune(cfg, "vit", None, None, None, None, tmp / "out")
    yield {"cfg": cfg, "study": study, "out": tmp / "out", "guard": guard}


@pytest.mark.slow
def test_three_trials_complete_and_best_params_are_saved(study_run: dict[str, Any]) -> None:
    study, out = study_run["study"], study_run["out"]
    assert [t.state for t in study.trials] == [TS.COMPLETE] * 3
    assert all(0.0 <= (t.value or 0.0) <= 1.0 for t in study.trials)
    # the tiny ViT's family: layer decay, drop-path and dropout are searched, top_fraction (CNN only) is not
    assert {"lr", "weight_decay", "layer_decay", "drop_path", "drop_rate", "augment", "batch_size"} <= set(
        study.trials[0].params
    )
    assert "top_fraction" not in study.trials[0].params
    doc = yaml.safe_load((out / "tuned" / "vit.yaml").read_text())
    best = study.best_trial
    assert doc["tuning"]["best_trial"] == best.number and doc["tuning"]["best_val_accuracy"] == best.value
    assert doc["model"]["lr"] == best.params["lr"] and doc["model"]["augment"] == best.params["augment"]
    assert doc["model"]["model_kwargs"] == {
        "drop_path_rate": best.params["drop_path"],
        "drop_rate": best.params["drop_rate"],
    }
    assert doc["tuning"]["trials"] == 3 and doc["tuning"]["tuning_time_s"] > 0
    summary = json.loads((out / "tune_summary.json").read_text())["models"]["vit"]
    assert summary["complete"] == 3 and summary["epochs_per_trial"] == 2
    assert (out / "plots" / "vit_history.png").is_file() and (out / "plots" / "vit_importance.png").is_file()
    for n in range(3):  # each trial trained in its own folder; its weights are gone, its history stays
        folder = out / "trials" / "vit" / str(n)
        assert len(json.loads((folder / "history.json").read_text())) == 2
        assert not list(folder.glob("*.safetensors"))


@pytest.mark.slow
def test_the_test_split_is_never_read_while_tuning(study_run: dict[str, Any]) -> None:
    guard, splits = study_run["guard"], tune.tuning_splits(study_run["cfg"])
    val_images = {os.path.realpath(splits.val.path(i)) for i in range(len(splits.val))}
    train_images = {os.path.realpath(splits.train.path(i)) for i in range(len(splits.train))}
    # the guard saw the data path (every validation image, training images): the check is not vacuous
    assert val_images <= guard.opened and train_images & guard.opened
    assert not guard.test_files & guard.opened and len(guard.test_files) == 9


@pytest.mark.slow
def test_compare_tuned_trains_with_the_best_params(study_run: dict[str, Any], tmp_path: Path) -> None:
    cfg: Config = study_run["cfg"]
    doc = yaml.safe_load((study_run["out"] / "tuned" / "vit.yaml").read_text())
    run = tmp_path / "run"
    tuned = apply_tuned(cfg, study_run["out"], run)
    m = tuned.model("vit")
    assert (m.lr, m.batch_size, m.augment) == (
        doc["model"]["lr"],
        doc["model"]["batch_size"],
        doc["model"]["augment"],
    )
    assert m.model_kwargs == {"depth": 2, **doc["model"]["model_kwargs"]}  # merged, not replaced
    run_compare(tuned, run)
    result = json.loads((run / "results.json").read_text())["models"][0]
    for key in (
        "lr",
        "batch_size",
        "weight_decay",
        "warmup_epochs",
        "label_smoothing",
        "layer_decay",
        "augment",
    ):
        assert result[key] == doc["model"][key], key
    assert result["drop_path_rate"] == doc["model"]["model_kwargs"]["drop_path_rate"]
    assert result["tuned_from"] == str((study_run["out"] / "tuned" / "vit.yaml").resolve())
    assert result["test_accuracy"] is not None  # compare scores test; tuning never did
    saved = yaml.safe_load((run / "config.yaml").read_text())["models"][0]
    assert saved["lr"] == doc["model"]["lr"] and saved["tuned_from"] == result["tuned_from"]
    assert json.loads((run / "tuning" / "tune_summary.json").read_text())["models"]["vit"]["trials"] == 3
    html = write_report(run).read_text()
    assert "Hyper-parameter search" in html and "vit: optimisation history" in html
    assert "Not tuned" not in html


@pytest.mark.slow
def test_a_second_run_adds_trials_to_the_same_study(study_run: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(study_run["out"], out)  # the module's study stays as it was
    first = {t.number: t.params for t in study_run["study"].trials}
    study = run_tune(study_run["cfg"], "vit", 5, None, None, None, out)  # a target of 5: 2 more
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert all(t.state in (TS.COMPLETE, TS.PRUNED) for t in study.trials)  # the pruner may now stop some
    assert {t.number: t.params for t in study.trials[:3]} == first  # continued, not restarted
    assert yaml.safe_load((out / "tuned" / "vit.yaml").read_text())["tuning"]["trials"] == 5


def _fake_fit(curves: list[list[float]], interrupt_at: int | None = None) -> Callable[..., ModelResult]:
    """A stand-in for `train.fit` that reports the next curve through `on_epoch`, without training."""
    calls = iter(range(len(curves)))

    def fit(
        cfg: Config,
        mcfg: Any,
        splits: Any,
        out_dir: Path,
        resume: bool = False,
        score_test: bool = True,
        on_epoch: Callable[[int, float | None], None] | None = None,
    ) -> ModelResult:
        assert not score_test and len(splits.test) == 0  # tuning never scores or even lists the test split
        k = next(calls)
        if k == interrupt_at:
            raise TrainingInterrupted("stopped by a signal")
        assert on_epoch is not None
        for epoch, v in enumerate(curves[k], start=1):
            on_epoch(epoch, v)
        return ModelResult(
            label=mcfg.label, timm=mcfg.timm, finetune="full", pretrained=False, val_accuracy=max(curves[k])
        )

    return fit


@pytest.mark.slow
def test_a_hopeless_trial_is_pruned(mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(_config(tmp_path, mini_dogs, epochs=3, pruner="median"))
    monkeypatch.setattr(tune, "fit", _fake_fit([[0.5, 0.6, 0.7], [0.6, 0.7, 0.8], [0.0, 0.0, 0.0]]))
    study = run_tune(cfg, "vit", 3, None, None, None, tmp_path / "out")
    assert [t.state for t in study.trials] == [TS.COMPLETE, TS.COMPLETE, TS.PRUNED]
    # the first epoch is never judged; the second is below the median of the others there: stopped
    assert study.trials[2].intermediate_values == {1: 0.0, 2: 0.0}
    assert json.loads((tmp_path / "out" / "tune_summary.json").read_text())["models"]["vit"]["pruned"] == 1


@pytest.mark.slow
def test_an_interrupt_ends_the_study_with_its_finished_trials(
    mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(_config(tmp_path, mini_dogs, pruner="none"))
    monkeypatch.setattr(tune, "fit", _fake_fit([[0.3, 0.5], [0.4, 0.6], [0.9, 0.9]], interrupt_at=1))
    with pytest.raises(TrainingInterrupted, match="1 finished trial.*run the same command"):
        run_tune(cfg, "vit", 3, None, None, None, tmp_path / "out")  # stops, and says so (exit 130)
    study = optuna.load_study(study_name="vit", storage=f"sqlite:///{tmp_path / 'out' / 'tune.db'}")
    assert [t.state for t in study.trials] == [TS.COMPLETE, TS.FAIL]
    doc = yaml.safe_load((tmp_path / "out" / "tuned" / "vit.yaml").read_text())  # the best so far is written
    assert doc["tuning"]["complete"] == 1 and doc["tuning"]["best_val_accuracy"] == 0.5


WORKER = """
import logging, sys
from pathlib import Path
from visionpoc.config import load_config
from visionpoc.tuning.search import run_tune
logging.basicConfig(level=logging.WARNING)
cfg = load_config(sys.argv[1], [f"tune.seed={sys.argv[2]}"])
study = run_tune(cfg, "vit", 4, None, None, None, Path(sys.argv[3]))
print("numbers", sorted(t.number for t in study.trials))
"""


@pytest.mark.slow
def test_two_processes_share_one_sqlite_study(mini_dogs: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, mini_dogs, epochs=1, pruner="none")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(cfg), str(k), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in (1, 2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    study = optuna.load_study(study_name="vit", storage=f"sqlite:///{out / 'tune.db'}")
    numbers = sorted(t.number for t in study.trials)
    # one shared target of 4: both stop there (the other worker may finish the trial it was running)
    assert numbers in ([0, 1, 2, 3], [0, 1, 2, 3, 4])  # none lost, none duplicated
    assert all(t.state == TS.COMPLETE for t in study.trials)
    assert sorted(int(p.name) for p in (out / "trials" / "vit").iterdir()) == numbers


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("tune.colour=1", "'tune.colour'"),
        ("tune.lr=[0, 1e-2]", "tune.lr:"),  # log scale: no zero
        ("tune.drop_path=[0.3, 0.1]", "tune.drop_path:"),
        ("tune.augment=[basic, wild]", "tune.augment.1"),
        ("tune.batch_size=[]", "tune.batch_size"),
        ("tune.pruner=asha", "tune.pruner"),
        ("models.1.ema_decay=1.0", "models.1.ema_decay"),
    ],
)
def test_the_search_space_is_validated_like_the_rest_of_the_config(override: str, needle: str) -> None:
    from visionpoc.errors import ConfigError

    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    assert load_config(None, ["tune.lr=null", "tune.trials=4"]).tune.lr is None  # null: not searched


def test_the_report_flags_a_model_that_was_not_tuned(tmp_path: Path) -> None:
    from test_report import make_run  # a finished two-model run (a, b), built without training

    run = make_run(tmp_path)
    record = {
        "trials": 20,
        "complete": 15,
        "pruned": 4,
        "failed": 1,
        "epochs_per_trial": 5,
        "tuning_time_s": 1234.5,
        "device": "NVIDIA H100",
        "best_val_accuracy": 0.8,
        "best_params": {"lr": 0.001, "augment": "strong"},
    }
    (run / "tuning").mkdir()
    (run / "tuning" / "tune_summary.json").write_text(json.dumps({"models": {"a": record}}))
    html = write_report(run).read_text()
    table = html[html.index('id="tuning-table"') : html.index("</table>", html.index('id="tuning-table"'))]
    assert "15 / 4 / 1" in table and "1,234.5" in table and "80.0%" in table and "lr 1.0e-03 · augment strong" in table
    assert "not tuned" in table and "Not tuned: b kept its hand-set configuration" in html
    md = (run / "report.md").read_text()
    assert "| **a** | 20 | 15 / 4 / 1 | 5 | 1,234.5 |" in md


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip Optuna's figures (about a second per study) and its full garbage collection after each trial
    (about a second in a test process) where a test trains nothing and looks at no figure."""
    monkeypatch.setattr(tuned, "save_plots", lambda *args: [])
    monkeypatch.setattr(gc, "collect", lambda *args: 0)


def test_a_cnn_searches_its_trainable_fraction_and_dropout(mini_dogs: Path, tmp_path: Path, one_thread: None) -> None:
    """The CNN side of the space: `top_fraction` (-> `fraction`), drop-path and dropout (-> model_kwargs),
    no layer decay; `compare --tuned` builds the model with them."""
    from visionpoc import models

    path = _config(tmp_path, mini_dogs, (CNN,), epochs=1, top_fraction=[0.05, 0.2], pruner="none")
    cfg = load_config(path)
    study = run_tune(cfg, "cnn", 1, None, None, None, tmp_path / "out")
    (trial,) = study.trials
    assert trial.state == TS.COMPLETE
    assert {"top_fraction", "drop_rate", "drop_path"} <= set(trial.params) and "layer_decay" not in trial.params
    doc = yaml.safe_load((tmp_path / "out" / "tuned" / "cnn.yaml").read_text())
    assert doc["model"]["fraction"] == trial.params["top_fraction"] <= 0.2
    assert doc["model"]["model_kwargs"] == {
        "drop_path_rate": trial.params["drop_path"],
        "drop_rate": trial.params["drop_rate"],
    }
    tuned = apply_tuned(cfg, tmp_path / "out").model("cnn")
    assert tuned.fraction == trial.params["top_fraction"] and tuned.model_kwargs == doc["model"]["model_kwargs"]

    def trainable(mcfg: Any) -> tuple[int, float]:
        model = models.create_model(mcfg, 3, pretrained=False)
        models.apply_finetune(model, mcfg)
        return models.count_params(model)[1], float(model.drop_rate)

    (n_tuned, drop), (n_hand, _) = trainable(tuned), trainable(cfg.model("cnn"))
    assert n_tuned < n_hand  # a share <= 0.2 of the conv layers trains, not the configured 0.9
    assert drop == trial.params["drop_rate"]  # timm built the model with the tuned dropout


def test_xception_gets_dropout_but_no_drop_path() -> None:
    """legacy_xception's constructor takes `drop_rate` only: that is its regulariser search."""
    from visionpoc.config import ModelConfig, TuneConfig

    family = tune.model_family(ModelConfig(label="x", timm="legacy_xception", pretrained=False), 3)
    assert (family.drop_rate, family.drop_path, family.layer_decay) == (True, False, False)
    trial = optuna.trial.FixedTrial(
        {
            "lr": 1e-3,
            "weight_decay": 0.01,
            "warmup_epochs": 0.5,
            "label_smoothing": 0.1,
            "drop_rate": 0.25,
            "batch_size": 32,
            "augment": "basic",
        }
    )
    changes = tune.suggest(trial, TuneConfig(top_fraction=None), family, 5)
    assert changes["model_kwargs"] == {"drop_rate": 0.25}


def test_trials_is_the_studys_target_of_finished_trials(
    mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_plots: None
) -> None:
    """`--trials N` tops the study up to N finished trials; an interrupted (failed) trial does not count."""
    cfg = load_config(_config(tmp_path, mini_dogs, pruner="none"))
    out = tmp_path / "out"
    monkeypatch.setattr(tune, "fit", _fake_fit([[0.3, 0.5]] * 2))
    assert len(run_tune(cfg, "vit", 2, None, None, None, out).trials) == 2
    monkeypatch.setattr(tune, "fit", _fake_fit([[0.4, 0.6]] * 3, interrupt_at=0))  # Ctrl-C, then rerun
    with pytest.raises(TrainingInterrupted):
        run_tune(cfg, "vit", 3, None, None, None, out)
    monkeypatch.setattr(tune, "fit", _fake_fit([[0.4, 0.6]] * 3))
    study = run_tune(cfg, "vit", 3, None, None, None, out)
    assert [t.state for t in study.trials] == [TS.COMPLETE, TS.COMPLETE, TS.FAIL, TS.COMPLETE]
    monkeypatch.setattr(tune, "fit", _fake_fit([]))  # the target is met: no trial starts
    assert len(run_tune(cfg, "vit", 3, None, None, None, out).trials) == 4
    assert yaml.safe_load((out / "tuned" / "vit.yaml").read_text())["tuning"]["trials"] == 3


def test_workers_with_different_seeds_and_counts_draw_different_points(
    mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_plots: None
) -> None:
    """Seed 1 joining a study with one trial must not replay seed 2's stream on an empty study (the old
    seed was their sum: 2 both times)."""
    monkeypatch.setattr(tune, "fit", _fake_fit([[0.5, 0.5]] * 3))

    def first_new_point(seed: int, existing: int, name: str) -> dict[str, Any]:
        cfg = load_config(_config(tmp_path, mini_dogs, pruner="none", startup_trials=10), [f"tune.seed={seed}"])
        url = f"sqlite:///{tmp_path / 'tune.db'}"
        if existing:
            s = optuna.create_study(storage=url, study_name=name, direction="maximize")
            s.add_trial(optuna.trial.create_trial(value=0.1))
        return run_tune(cfg, "vit", existing + 1, url, name, None, tmp_path / name).trials[existing].params

    assert tune.sampler_seed(1, 1) != tune.sampler_seed(2, 0)
    a = first_new_point(2, 0, "a")
    assert first_new_point(2, 0, "a_again") == a  # the same (seed, count): the same point
    assert first_new_point(1, 1, "b") != a


def test_a_killed_workers_trial_is_failed_and_retried(
    mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_plots: None
) -> None:
    """A worker killed mid-trial leaves it RUNNING with a heartbeat that stops; the next worker fails it
    and runs its parameters again."""
    import sqlite3

    db = tmp_path / "out" / "tune.db"
    db.parent.mkdir()
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    dead = optuna.create_study(storage=storage, study_name="vit", direction="maximize").ask()
    lr = dead.suggest_float("lr", 1e-5, 1e-2, log=True)
    storage.record_heartbeat(dead._trial_id)  # its last sign of life, long ago:
    with sqlite3.connect(db) as con:
        con.execute("UPDATE trial_heartbeats SET heartbeat = '2000-01-01 00:00:00.000000'")
    monkeypatch.setattr(tune, "fit", _fake_fit([[0.5, 0.6]]))
    study = run_tune(
        load_config(_config(tmp_path, mini_dogs, pruner="none")), "vit", 1, None, None, None, tmp_path / "out"
    )
    assert [t.state for t in study.trials] == [TS.FAIL, TS.COMPLETE]
    assert study.trials[1].params["lr"] == lr  # the retry
    assert yaml.safe_load((tmp_path / "out" / "tuned" / "vit.yaml").read_text())["tuning"]["running"] == 0


def test_a_study_without_a_completed_trial_leaves_the_model_untuned(
    mini_dogs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    no_plots: None,
) -> None:
    from test_report import make_run  # a finished two-model run (a, b), built without training

    def crash(*args: Any, **kwargs: Any) -> ModelResult:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(tune, "fit", crash)
    cfg = load_config(_config(tmp_path, mini_dogs, pruner="none"))
    study = run_tune(cfg, "vit", 2, None, None, None, tmp_path / "out")
    assert [t.state for t in study.trials] == [TS.FAIL, TS.FAIL]
    assert not (tmp_path / "out" / "tuned" / "vit.yaml").exists()
    # a tuned folder holding an empty file (as older versions wrote): ignored, the report says "Not tuned"
    run = make_run(tmp_path)
    folder = tmp_path / "tuned"
    folder.mkdir()
    record = {"trials": 2, "complete": 2, "pruned": 0, "failed": 0, "best_trial": 1, "best_val_accuracy": 0.8}
    (folder / "a.yaml").write_text(yaml.safe_dump({"timm": "test_resnet", "model": {"lr": 0.01}, "tuning": record}))
    (folder / "b.yaml").write_text(
        yaml.safe_dump(
            {
                "timm": "vit_tiny_patch16_224",
                "model": {},
                "tuning": {**record, "complete": 0, "failed": 2, "best_trial": None},
            }
        )
    )
    two = load_config(None, ["models=[{label: a, timm: test_resnet}, {label: b, timm: vit_tiny_patch16_224}]"])
    tuned = apply_tuned(two, folder, run)
    assert tuned.model("a").tuned_from and tuned.model("b").tuned_from is None
    assert "b: " in caplog.text and "no tuned settings" in caplog.text
    assert "Not tuned: b kept its hand-set configuration" in write_report(run).read_text()


def test_hyperband_prunes_a_hopeless_trial(
    mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_plots: None
) -> None:
    cfg = load_config(_config(tmp_path, mini_dogs, epochs=3, pruner="hyperband"))
    good = [[0.5, 0.6, 0.7], [0.6, 0.7, 0.8], [0.55, 0.65, 0.75], [0.5, 0.7, 0.8]]
    monkeypatch.setattr(tune, "fit", _fake_fit([*good, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    study = run_tune(cfg, "vit", 6, None, None, None, tmp_path / "out")
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner)
    states = [t.state for t in study.trials]
    assert states[:4] == [TS.COMPLETE] * 4 and TS.PRUNED in states[4:]
    assert all(len(t.intermediate_values) < 3 for t in study.trials[4:] if t.state == TS.PRUNED)


def test_warmup_is_capped_at_the_trials_epochs(
    mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_plots: None
) -> None:
    cfg = load_config(_config(tmp_path, mini_dogs, epochs=2, warmup_epochs=[0.5, 3.0], pruner="none"))
    monkeypatch.setattr(tune, "fit", _fake_fit([[0.5, 0.6]] * 3))
    study = run_tune(cfg, "vit", 3, None, None, None, tmp_path / "out")
    dist = study.trials[0].distributions["warmup_epochs"]
    assert isinstance(dist, optuna.distributions.FloatDistribution) and (dist.low, dist.high) == (0.5, 2.0)
    assert all(t.params["warmup_epochs"] <= 2.0 for t in study.trials)


@pytest.mark.slow
def test_the_cli_prints_the_trial_the_yaml_records_and_honours_timeout(
    mini_dogs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_plots: None,
) -> None:
    import time

    from visionpoc.cli import main

    path = _config(tmp_path, mini_dogs, pruner="none")
    monkeypatch.setattr(tune, "fit", _fake_fit([[0.5, 0.5], [0.5, 0.6], [0.5, 0.6]]))  # a tie for the best
    # which tied trial Optuna calls best is up to the database (SQLite: the first; say this one: the last)
    last = lambda self, study_id: self.get_all_trials(study_id, deepcopy=False)[-1]  # noqa: E731
    monkeypatch.setattr(optuna.storages.RDBStorage, "get_best_trial", last)
    assert main(["tune", "--config", str(path), "--model", "vit", "--trials", "3", "--out", str(tmp_path / "a")]) == 0
    doc = yaml.safe_load((tmp_path / "a" / "tuned" / "vit.yaml").read_text())
    assert doc["tuning"]["best_trial"] == 1  # the earliest of equals
    printed = capsys.readouterr().out
    assert str(doc["tuning"]["best_params"]) in printed and "trial 1" in printed

    slow = _fake_fit([[0.5, 0.5 + 0.01 * k] for k in range(10)])  # no tie: a tie names no settings

    def slow_fit(*args: Any, **kwargs: Any) -> ModelResult:
        time.sleep(0.4)
        return slow(*args, **kwargs)

    monkeypatch.setattr(tune, "fit", slow_fit)
    args = ["tune", "--config", str(path), "--model", "vit", "--trials", "10", "--timeout", "0.5"]
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    n = len(optuna.load_study(study_name="vit", storage=f"sqlite:///{tmp_path / 'b' / 'tune.db'}").trials)
    assert 1 <= n <= 2  # no trial starts after 0.5 s


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_stops_tuning(mini_dogs: Path, tmp_path: Path) -> None:
    """A terminal's Ctrl-C signals the whole process group, DataLoader workers included: the tuning
    stops (exit 130, the best settings so far written), instead of a worker's death failing one trial
    and the study going on, or the signal being lost between trials."""
    cfg = _config(tmp_path, mini_dogs, epochs=3, pruner="none", trials=50)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "visionpoc",
            "tune",
            "--config",
            str(cfg),
            "--model",
            "vit",
            "--out",
            str(out),
            "--set",
            "data.num_workers=2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:  # wait until the first trial is done: the second is training
        lines.append(line)
        if "Trial 0 finished" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: every process of the group
    _, rest = proc.communicate(timeout=120)
    err = "".join(lines) + rest
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted: tuning of 'vit' stopped" in err and "Traceback" not in err
    study = optuna.load_study(study_name="vit", storage=f"sqlite:///{out / 'tune.db'}")
    assert len(study.trials) <= 3  # stopped, not run to 50
    assert (out / "tuned" / "vit.yaml").is_file()  # the best so far


def test_tuned_settings_are_refused_for_another_model_timm_or_hugging_face(tmp_path: Path) -> None:
    """A tuned file records the model it was tuned for (a timm name, or an `hf:` id or folder): another
    model under the same label is refused, an `hf:` entry included (its `timm` is empty)."""
    from visionpoc.config import ModelConfig
    from visionpoc.errors import ConfigError

    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "vit.yaml").write_text(yaml.safe_dump({"label": "vit", "timm": "org/vit-a", "model": {}}))
    same = Config(models=(ModelConfig(label="vit", hf="org/vit-a"),))
    assert apply_tuned(same, tmp_path).model("vit").hf == "org/vit-a"
    for other in (ModelConfig(label="vit", hf="org/vit-b"), ModelConfig(label="vit", timm="vit_tiny_patch16_224")):
        with pytest.raises(ConfigError, match="was tuned for 'org/vit-a', but model 'vit' is"):
            apply_tuned(Config(models=(other,)), tmp_path)
