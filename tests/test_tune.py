"""Issue 5, search: Optuna studies per model on the miniature Stanford Dogs, with a tiny ViT on the CPU.

One three-trial study is run once for the module (under the test-split guard) and shared: its outputs,
its use by `compare --tuned`, and a continued run on a copy of it. Pruning and interruption are tested
with a stand-in for `fit` that reports a chosen validation curve (no training).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from visionpoc import tune
from visionpoc.compare import run_compare
from visionpoc.config import Config, load_config
from visionpoc.data.images import load_rgb
from visionpoc.data.sources import read_dataset
from visionpoc.errors import DataError, TrainingInterrupted
from visionpoc.report import write_report
from visionpoc.results import ModelResult
from visionpoc.tune import apply_tuned, run_tune

TS = optuna.trial.TrialState
VIT = {"label": "vit", "timm": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32,
       "model_kwargs": {"depth": 2}}  # fmt: skip


def _config(tmp: Path, root: Path, **tune_kw: Any) -> Path:
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"source": "stanford_dogs", "root": str(root), "val_fraction": 0.2, "num_workers": 0,
                 "download": False},
        "models": [VIT],
        "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "device": "cpu", "deterministic": True},
        "tune": {"epochs": 2, "trials": 3, "batch_size": [4, 8], "startup_trials": 2, **tune_kw},
    }))  # fmt: skip
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
    """A three-trial study on the fixture, run once under the open guard."""
    tmp = tmp_path_factory.mktemp("tune")
    cfg = load_config(_config(tmp, mini_dogs, startup_trials=3))  # the median pruner waits for 3 trials
    ds = read_dataset("stanford_dogs", mini_dogs)
    guard = OpenGuard({os.path.realpath(ds.test.path(i)) for i in range(len(ds.test))})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", guard.wrap(builtins.open))
        mp.setattr(io, "open", guard.wrap(io.open))
        mp.setattr(os, "open", guard.wrap(os.open))
        with pytest.raises(DataError, match="test image opened while tuning"):  # the guard works
            load_rgb(ds.test.path(0))
        study = run_tune(cfg, "vit", None, None, None, None, tmp / "out")
    yield {"cfg": cfg, "study": study, "out": tmp / "out", "guard": guard}


def test_three_trials_complete_and_best_params_are_saved(study_run: dict[str, Any]) -> None:
    study, out = study_run["study"], study_run["out"]
    assert [t.state for t in study.trials] == [TS.COMPLETE] * 3
    assert all(0.0 <= (t.value or 0.0) <= 1.0 for t in study.trials)
    # the tiny ViT's family: layer decay and drop-path are searched, top_fraction (CNN only) is not
    assert {"lr", "weight_decay", "layer_decay", "drop_path", "augment", "batch_size"} <= set(
        study.trials[0].params
    )
    assert "top_fraction" not in study.trials[0].params
    doc = yaml.safe_load((out / "tuned" / "vit.yaml").read_text())
    best = study.best_trial
    assert doc["tuning"]["best_trial"] == best.number and doc["tuning"]["best_val_accuracy"] == best.value
    assert doc["model"]["lr"] == best.params["lr"] and doc["model"]["augment"] == best.params["augment"]
    assert doc["model"]["model_kwargs"] == {"drop_path_rate": best.params["drop_path"]}
    assert doc["tuning"]["trials"] == 3 and doc["tuning"]["tuning_time_s"] > 0
    summary = json.loads((out / "tune_summary.json").read_text())["models"]["vit"]
    assert summary["complete"] == 3 and summary["epochs_per_trial"] == 2
    assert (out / "plots" / "vit_history.png").is_file() and (out / "plots" / "vit_importance.png").is_file()
    for n in range(3):  # each trial trained in its own folder; its weights are gone, its history stays
        folder = out / "trials" / "vit" / str(n)
        assert len(json.loads((folder / "history.json").read_text())) == 2
        assert not list(folder.glob("*.safetensors"))


def test_the_test_split_is_never_read_while_tuning(study_run: dict[str, Any]) -> None:
    guard, splits = study_run["guard"], tune.tuning_splits(study_run["cfg"])
    val_images = {os.path.realpath(splits.val.path(i)) for i in range(len(splits.val))}
    train_images = {os.path.realpath(splits.train.path(i)) for i in range(len(splits.train))}
    # the guard saw the data path (every validation image, training images): the check is not vacuous
    assert val_images <= guard.opened and train_images & guard.opened
    assert not guard.test_files & guard.opened and len(guard.test_files) == 9


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


def test_a_second_run_adds_trials_to_the_same_study(study_run: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(study_run["out"], out)  # the module's study stays as it was
    first = {t.number: t.params for t in study_run["study"].trials}
    study = run_tune(study_run["cfg"], "vit", 2, None, None, None, out)
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert all(t.state in (TS.COMPLETE, TS.PRUNED) for t in study.trials)  # the pruner may now stop some
    assert {t.number: t.params for t in study.trials[:3]} == first  # continued, not restarted
    assert yaml.safe_load((out / "tuned" / "vit.yaml").read_text())["tuning"]["trials"] == 5


def _fake_fit(curves: list[list[float]], interrupt_at: int | None = None) -> Callable[..., ModelResult]:
    """A stand-in for `train.fit` that reports the next curve through `on_epoch`, without training."""
    calls = iter(range(len(curves)))

    def fit(cfg: Config, mcfg: Any, splits: Any, out_dir: Path, resume: bool = False, score_test: bool = True,
            on_epoch: Callable[[int, float | None], None] | None = None) -> ModelResult:  # fmt: skip
        assert not score_test and len(splits.test) == 0  # tuning never scores or even lists the test split
        k = next(calls)
        if k == interrupt_at:
            raise TrainingInterrupted("stopped by a signal")
        assert on_epoch is not None
        for epoch, v in enumerate(curves[k], start=1):
            on_epoch(epoch, v)
        return ModelResult(label=mcfg.label, timm=mcfg.timm, finetune="full", pretrained=False,
                           val_accuracy=max(curves[k]))  # fmt: skip

    return fit


def test_a_hopeless_trial_is_pruned(mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(_config(tmp_path, mini_dogs, epochs=3, pruner="median"))
    monkeypatch.setattr(tune, "fit", _fake_fit([[0.5, 0.6, 0.7], [0.6, 0.7, 0.8], [0.0, 0.0, 0.0]]))
    study = run_tune(cfg, "vit", 3, None, None, None, tmp_path / "out")
    assert [t.state for t in study.trials] == [TS.COMPLETE, TS.COMPLETE, TS.PRUNED]
    # the first epoch is never judged; the second is below the median of the others there: stopped
    assert study.trials[2].intermediate_values == {1: 0.0, 2: 0.0}
    assert json.loads((tmp_path / "out" / "tune_summary.json").read_text())["models"]["vit"]["pruned"] == 1
    assert isinstance(
        tune.make_pruner(cfg.tune.__class__(pruner="hyperband"), 3), optuna.pruners.HyperbandPruner
    )


def test_an_interrupt_ends_the_study_with_its_finished_trials(
    mini_dogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(_config(tmp_path, mini_dogs, pruner="none"))
    monkeypatch.setattr(tune, "fit", _fake_fit([[0.3, 0.5], [0.4, 0.6], [0.9, 0.9]], interrupt_at=1))
    study = run_tune(cfg, "vit", 3, None, None, None, tmp_path / "out")  # returns: no exception
    assert [t.state for t in study.trials] == [TS.COMPLETE, TS.FAIL]
    doc = yaml.safe_load((tmp_path / "out" / "tuned" / "vit.yaml").read_text())
    assert doc["tuning"]["complete"] == 1 and doc["tuning"]["best_val_accuracy"] == 0.5


WORKER = """
import logging, sys
from pathlib import Path
from visionpoc.config import load_config
from visionpoc.tune import run_tune
logging.basicConfig(level=logging.WARNING)
cfg = load_config(sys.argv[1], [f"tune.seed={sys.argv[2]}"])
study = run_tune(cfg, "vit", 2, None, None, None, Path(sys.argv[3]))
print("numbers", sorted(t.number for t in study.trials))
"""


@pytest.mark.slow
def test_two_processes_share_one_sqlite_study(mini_dogs: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, mini_dogs, epochs=1, pruner="none")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(cfg), str(k), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (1, 2)]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    study = optuna.load_study(study_name="vit", storage=f"sqlite:///{out / 'tune.db'}")
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == [0, 1, 2, 3]  # 2 + 2: none lost, none duplicated
    assert all(t.state == TS.COMPLETE for t in study.trials)
    assert sorted(int(p.name) for p in (out / "trials" / "vit").iterdir()) == [0, 1, 2, 3]


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
    record = {"trials": 20, "complete": 15, "pruned": 4, "failed": 1, "epochs_per_trial": 5, "tuning_time_s": 1234.5,
              "device": "NVIDIA H100", "best_val_accuracy": 0.8, "best_params": {"lr": 0.001, "augment": "strong"}}  # fmt: skip
    (run / "tuning").mkdir()
    (run / "tuning" / "tune_summary.json").write_text(json.dumps({"models": {"a": record}}))
    html = write_report(run).read_text()
    table = html[html.index('id="tuning-table"') : html.index("</table>", html.index('id="tuning-table"'))]
    assert (
        "15 / 4 / 1" in table
        and "1,234.5" in table
        and "80.0%" in table
        and "lr 0.001 · augment strong" in table
    )
    assert "not tuned" in table and "Not tuned: b kept its hand-set configuration" in html
    md = (run / "report.md").read_text()
    assert "| **a** | 20 | 15 / 4 / 1 | 5 | 1,234.5 |" in md
