"""DDP under torchrun on the CPU (gloo, two processes): a compare completes, its distributed test
accuracy equals a single-process evaluation of the same checkpoint, and 2 processes x batch b train
like 1 process x batch 2b (same seed, same global batches).

Tolerance for the last point: per-epoch train loss within 1e-4 relative and identical test accuracy;
the only difference is the order of the floating-point gradient all-reduce."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dogs_fixture import make_mini_dogs
from visionpoc.data.loaders import eval_transform, stream_loader
from visionpoc.data.sources import read_stanford_dogs
from visionpoc.data.splits import make_splits
from visionpoc.evaluate import evaluate
from visionpoc.results import load_predictions
from visionpoc.trained import load_trained

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, Path]:
    tmp = tmp_path_factory.mktemp("ddp")
    root = make_mini_dogs(tmp / "dogs")  # 6 train images per class: 4 train + 2 val, an even 12 in all
    cfg = tmp / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"source": "stanford_dogs", "root": str(root), "val_fraction": 0.34, "num_workers": 0,
                 "download": False},
        "models": [{"label": "vit", "timm": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32,
                    "model_kwargs": {"depth": 2}}],
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "warmup_epochs": 0.5, "augment": "none",
                  "deterministic": True, "device": "cpu"},
    }))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp, single = tmp / "ddp", tmp / "single"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "visionpoc",
         "compare", "--config", str(cfg), "--out", str(ddp), "--no-report"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    subprocess.run([sys.executable, "-m", "visionpoc", "compare", "--config", str(cfg), "--out", str(single),
                    "--no-report"], check=True, capture_output=True, env=env, timeout=300)  # fmt: skip
    return ddp, single, proc.stderr, root


def _model(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())["models"][0]


def test_ddp_compare_completes(runs: tuple[Path, Path, str, Path]) -> None:
    ddp, _, stderr, _ = runs
    m = _model(ddp)
    assert m["status"] == "ok" and m["world_size"] == 2
    assert m["batch_size"] == 4 and m["batch_size_per_device"] == 2
    assert "[rank 0/2]" in stderr and "[rank 1/2]" in stderr  # logs say which process speaks
    assert len(load_predictions(ddp / "vit" / "test_predictions.npz")["files"]) == 9


def test_distributed_test_accuracy_equals_single_process_eval(runs: tuple[Path, Path, str, Path]) -> None:
    ddp, _, _, root = runs
    trained = load_trained(ddp, "vit")
    test = make_splits(read_stanford_dogs(root), 0.34, None, 0).test
    cfg = trained.mcfg  # only for the loader's worker settings below
    from visionpoc.config import load_config

    loader = stream_loader(test, eval_transform(trained.data_config), 4, False,
                           load_config(ddp / "config.yaml"), torch.device("cpu"))  # fmt: skip
    stats = evaluate(trained.model, loader, torch.device("cpu"), 3, len(test))
    assert cfg.label == "vit"
    assert stats.accuracy == _model(ddp)["test_accuracy"]
    saved = load_predictions(ddp / "vit" / "test_predictions.npz")
    assert list(saved["files"]) == test.files  # gathered back into the split's order
    assert np.allclose(saved["probs"], stats.probs, atol=1e-5)


def test_two_processes_match_one_process_with_the_same_global_batch(
    runs: tuple[Path, Path, str, Path],
) -> None:
    ddp, single, _, _ = runs
    a, b = _model(ddp), _model(single)
    assert np.allclose(
        [h["train_loss"] for h in a["history"]], [h["train_loss"] for h in b["history"]], rtol=1e-4
    )
    assert a["test_accuracy"] == b["test_accuracy"] and a["val_accuracy"] == b["val_accuracy"]
    pa = load_predictions(ddp / "vit" / "test_predictions.npz")["probs"]
    pb = load_predictions(single / "vit" / "test_predictions.npz")["probs"]
    assert np.allclose(pa, pb, atol=1e-4)
