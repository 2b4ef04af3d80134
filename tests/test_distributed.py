"""DDP under torchrun on the CPU (gloo, two processes): a compare completes, its distributed test
accuracy equals a single-process evaluation of the same checkpoint, and 2 processes x batch b train
like 1 process x batch 2b (same seed, same global batches, same augmentation: each image's crop is
seeded by the sample, not by the process that draws it). Rank 1 writes nothing, and each rank has its
own random stream after an identical model init. `tune` runs each trial on both processes, with one
study written by rank 0 and its pruning decisions followed by rank 1.

Tolerance for the 2 x b == 1 x 2b point: per-epoch train loss within 1e-4 relative and identical test
accuracy; the only difference is the order of the floating-point gradient all-reduce. (On the CPU,
BatchNorm layers would normalize per process: gloo has no SyncBatchNorm; this ViT has none.)"""

from __future__ import annotations

import json
import os
import shutil
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
from visionpoc.serving.loading import load_trained

pytestmark = pytest.mark.slow
PROBE = Path(__file__).parent / "ddp_probe.py"  # records each rank's writes and first-step streams
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(PROBE)]


def _config(path: Path, root: Path, depth: int, train: dict, **sections: dict) -> Path:
    """The tiny run these tests share: the miniature dogs (val_fraction 0.34: 4 train + 2 val images per
    class, an even 12 in all) and one ViT of `depth` blocks on the CPU; `train` and `sections` add to it."""
    path.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "source": "stanford_dogs",
                    "root": str(root),
                    "val_fraction": 0.34,
                    "num_workers": 0,
                    "download": False,
                },
                "models": [
                    {
                        "label": "vit",
                        "timm": "vit_tiny_patch16_224",
                        "pretrained": False,
                        "img_size": 32,
                        "model_kwargs": {"depth": depth},
                    }
                ],
                "train": {"batch_size": 4, "device": "cpu", **train},
                "inference": {"enabled": False},  # the price is not what these runs are about
                **sections,
            }
        )
    )
    return path


def _probe(probe: Path, rank: int) -> dict:
    return json.loads((probe / f"rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, Path, Path]:
    tmp = tmp_path_factory.mktemp("ddp")
    root = make_mini_dogs(tmp / "dogs")
    cfg = _config(
        tmp / "c.yaml",
        root,
        2,
        {"epochs": 2, "lr": 1e-3, "warmup_epochs": 0.5, "augment": "basic", "deterministic": True},
        probe={"min_steps": 20},
    )
    doc = yaml.safe_load(cfg.read_text())  # a cached linear probe too: features sharded, then gathered
    doc["models"].append({**doc["models"][0], "label": "head", "finetune": "head", "model_kwargs": {"depth": 1}})
    cfg.write_text(yaml.safe_dump(doc))
    ddp, single, probe = tmp / "ddp", tmp / "single", tmp / "probe"
    probe.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROBE_DIR": str(probe), "PROBE_WATCH": str(ddp)}
    proc = subprocess.run(
        [*TORCHRUN, "compare", "--config", str(cfg), "--out", str(ddp), "--no-report"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(root / ".visionpoc-cache", ignore_errors=True)  # the single process computes its own features
    subprocess.run(
        [sys.executable, "-m", "visionpoc", "compare", "--config", str(cfg), "--out", str(single), "--no-report"],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )
    return ddp, single, proc.stderr, root, probe


def _model(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())["models"][0]


def test_ddp_compare_completes(runs: tuple[Path, Path, str, Path, Path]) -> None:
    ddp, _, stderr, _, _ = runs
    m = _model(ddp)
    assert m["status"] == "ok" and m["world_size"] == 2
    assert m["batch_size"] == 4 and m["batch_size_per_device"] == 2
    assert "[rank 0/2]" in stderr and "[rank 1/2]" in stderr  # logs say which process speaks
    assert len(load_predictions(ddp / "vit" / "test_predictions.npz")["files"]) == 9


def test_distributed_test_accuracy_equals_single_process_eval(
    runs: tuple[Path, Path, str, Path, Path],
) -> None:
    ddp, _, _, root, _ = runs
    trained = load_trained(ddp, "vit")
    test = make_splits(read_stanford_dogs(root), 0.34, None, 0).test
    cfg = trained.mcfg  # only for the loader's worker settings below
    from visionpoc.config import load_config

    loader = stream_loader(
        test, eval_transform(trained.data_config), 4, False, load_config(ddp / "config.yaml"), torch.device("cpu")
    )
    stats = evaluate(trained.model, loader, torch.device("cpu"), 3, len(test))
    assert cfg.label == "vit"
    assert stats.accuracy == _model(ddp)["test_accuracy"]
    saved = load_predictions(ddp / "vit" / "test_predictions.npz")
    assert list(saved["files"]) == test.files  # gathered back into the split's order
    assert np.allclose(saved["probs"], stats.probs, atol=1e-5)


def test_two_processes_match_one_process_with_the_same_global_batch(
    runs: tuple[Path, Path, str, Path, Path],
) -> None:
    ddp, single, _, _, _ = runs
    a, b = _model(ddp), _model(single)
    assert np.allclose([h["train_loss"] for h in a["history"]], [h["train_loss"] for h in b["history"]], rtol=1e-4)
    assert a["test_accuracy"] == b["test_accuracy"] and a["val_accuracy"] == b["val_accuracy"]
    pa = load_predictions(ddp / "vit" / "test_predictions.npz")["probs"]
    pb = load_predictions(single / "vit" / "test_predictions.npz")["probs"]
    assert np.allclose(pa, pb, atol=1e-4)


def test_rank_1_writes_nothing_in_the_run_folder(runs: tuple[Path, Path, str, Path, Path]) -> None:
    ddp, _, _, _, probe = runs
    rank0 = _probe(probe, 0)["writes"]
    assert str(ddp / "results.json") in rank0 and any(p.endswith("last.safetensors") for p in rank0)
    assert _probe(probe, 1)["writes"] == []


def test_ranks_draw_their_own_random_streams_from_identical_weights(
    runs: tuple[Path, Path, str, Path, Path],
) -> None:
    _, _, _, _, probe = runs
    a, b = _probe(probe, 0)["first_step"], _probe(probe, 1)["first_step"]
    assert a["weights"] == b["weights"]  # the same init (and DDP broadcasts rank 0's anyway)
    assert a["torch"] != b["torch"] and a["python"] != b["python"] and a["numpy"] != b["numpy"]


def test_tune_trials_run_on_both_processes_with_one_study(tmp_path: Path) -> None:
    import optuna

    cfg = _config(
        tmp_path / "c.yaml",
        make_mini_dogs(tmp_path / "dogs"),
        1,
        {"epochs": 2, "warmup_epochs": 0.0, "augment": "none"},
        tune={
            "trials": 2,
            "pruner": "none",
            "batch_size": [4],
            "augment": None,
            "warmup_epochs": None,
            "label_smoothing": None,
            "layer_decay": None,
            "drop_path": None,
            "drop_rate": None,
        },
    )
    out, probe = tmp_path / "tune", tmp_path / "probe"
    probe.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROBE_DIR": str(probe), "PROBE_WATCH": str(out), "PROBE_PRUNE": "1"}
    proc = subprocess.run(
        [*TORCHRUN, "tune", "--config", str(cfg), "--model", "vit", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="vit", storage=f"sqlite:///{out / 'tune.db'}")
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "PRUNED"]  # one study of 2 trials, not one per process
    assert study.trials[1].last_step == 1  # pruned after its first epoch, on every rank
    rank1 = "[rank 1/2] INFO visionpoc.train: [vit] epoch"
    assert proc.stderr.count(f"{rank1} 1/2") == 2  # each trial trained on both processes ...
    assert proc.stderr.count(f"{rank1} 2/2") == 1  # ... and rank 1 stopped trial 1 when rank 0 pruned it
    assert "[rank 1/2] INFO visionpoc.tuning.ddp: [vit] trial 1 pruned" in proc.stderr
    assert all((out / "trials" / "vit" / str(t) / "history.json").is_file() for t in (0, 1))
    assert _probe(probe, 1)["writes"] == []  # (SQLite writes in C, unseen by the hook: rank 1 has no Optuna)
    assert str(out / "tuned" / "vit.yaml") in _probe(probe, 0)["writes"]


def test_stop_flag_through_the_control_group(tmp_path: Path) -> None:
    """The per-step stop flag goes through a gloo group (on NCCL it would sync the GPU every step): a
    flag raised on rank 1 reaches rank 0, and no flag stays no flag."""
    script = tmp_path / "flag.py"
    script.write_text(
        "import json, os, sys\n"
        "from visionpoc import distributed\n"
        "d = distributed.init('cpu')\n"
        "assert distributed._control_group() is not None\n"
        "out = [distributed.broadcast_flag(d, d.rank == 1), distributed.broadcast_flag(d, False)]\n"
        "open(os.path.join(sys.argv[1], f'rank{d.rank}.json'), 'w').write(json.dumps(out))\n"
        "distributed.shutdown(d)\n"
    )
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(
        [*run, str(tmp_path)], capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [[True, False]] * 2


def test_repeats_under_torchrun(tmp_path: Path) -> None:
    """Each seed trains on both processes; rank 0 alone writes the seeds' folders, the list and the report."""
    cfg = _config(
        tmp_path / "c.yaml",
        make_mini_dogs(tmp_path / "dogs"),
        1,
        {"epochs": 1, "warmup_epochs": 0.0, "augment": "none", "repeats": 2},
    )
    out, probe = tmp_path / "run", tmp_path / "probe"
    probe.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROBE_DIR": str(probe), "PROBE_WATCH": str(out)}
    proc = subprocess.run(
        [*TORCHRUN, "compare", "--config", str(cfg), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for seed in (0, 1):
        m = _model(out / f"seed-{seed}")
        assert (m["status"], m["world_size"]) == ("ok", 2)
    assert json.loads((out / "repeats.json").read_text())["seeds"] == [0, 1]
    assert (out / "report.html").is_file()
    assert proc.stderr.count("[rank 1/2] INFO visionpoc.train: [vit] epoch 1/1") == 2  # both seeds, both ranks
    rank0 = _probe(probe, 0)["writes"]
    assert str(out / "repeats.json") in rank0 and str(out / "seed-1" / "results.json") in rank0
    assert _probe(probe, 1)["writes"] == []


def test_the_cached_linear_probe_under_torchrun_equals_one_process(runs: tuple[Path, Path, str, Path, Path]) -> None:
    """Each process computes its shard's features; gathered back in sample order, they give the same
    grid, the same chosen head and the same test predictions as one process."""
    run_ddp, run_single = runs[0], runs[1]
    ddp, single = (json.loads((r / "results.json").read_text())["models"][1] for r in (run_ddp, run_single))
    assert ddp["world_size"] == 2 and ddp["finetune"] == "head" and ddp["probe"]["cache"] == "miss"
    assert single["probe"]["cache"] == "miss"
    accuracies = [[g["val_accuracy"] for g in m["probe"]["grid"]] for m in (ddp, single)]
    assert accuracies[0] == pytest.approx(accuracies[1]) and ddp["probe"]["chosen"] == single["probe"]["chosen"]
    assert ddp["test_accuracy"] == single["test_accuracy"]
    a = load_predictions(run_ddp / "head" / "test_predictions.npz")
    b = load_predictions(run_single / "head" / "test_predictions.npz")
    assert list(a["files"]) == list(b["files"]) and np.allclose(a["probs"], b["probs"], atol=1e-5)


UNREADABLE_ON_RANK_1 = """
import os, sys
from visionpoc import cli, probe

real = probe.load_file
def load_file(path):
    if os.environ["RANK"] == "1":  # this process's copy of the cache is damaged (or not on its file system)
        raise OSError("injected: unreadable on rank 1")
    return real(path)
probe.load_file = load_file
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_feature_cache_one_rank_cannot_read_is_computed_again_by_all(tmp_path: Path) -> None:
    """Rank 0 reads the cached features, rank 1 cannot: both compute them again (with their collectives),
    instead of rank 1 computing alone and waiting for a rank 0 that never joins."""
    root = make_mini_dogs(tmp_path / "dogs")
    cfg = _config(tmp_path / "c.yaml", root, 1, {"epochs": 1}, probe={"min_steps": 4})
    doc = yaml.safe_load(cfg.read_text())
    doc["models"][0]["finetune"] = "head"
    cfg.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VISIONPOC_DIST_TIMEOUT_S": "30"}
    args = ["compare", "--config", str(cfg), "--no-report"]
    first = subprocess.run(
        [sys.executable, "-m", "visionpoc", *args, "--out", str(tmp_path / "first")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert _model(tmp_path / "first")["probe"]["cache"] == "miss"  # the cache is now written
    script = tmp_path / "unreadable.py"
    script.write_text(UNREADABLE_ON_RANK_1)
    proc = subprocess.run(
        [*TORCHRUN[:-1], str(script), *args, "--out", str(tmp_path / "ddp")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "injected: unreadable on rank 1" in proc.stderr
    m = _model(tmp_path / "ddp")
    assert (m["status"], m["world_size"], m["probe"]["cache"]) == ("ok", 2, "miss")
