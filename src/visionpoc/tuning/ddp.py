"""`visionpoc tune` under torchrun: every trial trains data-parallel on all the processes.

Only rank 0 talks to Optuna (it samples, reports, prunes and writes the storage and the outputs). The
protocol, in the order every rank meets it:

1. rank 0's objective samples a trial and broadcasts its settings (`share_trial`); the other ranks wait
   for them in `follow` and run the same `fit` under DDP;
2. after each epoch's validation, rank 0 decides whether to prune and broadcasts the flag
   (`share_prune`); every rank stops the trial together;
3. when rank 0's study is done (or stopped), `finish` broadcasts a sentinel with the finished trials,
   and `follow` returns an in-memory copy of the study, so every process ends with the same answer.

A trial that fails on rank 0 alone (not on the others) leaves them waiting in a collective: torchrun
ends the group when rank 0's process exits, or the backend's timeout does (README).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch
import torch.distributed as dist

from visionpoc import distributed
from visionpoc.config import Config, ModelConfig, with_model_changes
from visionpoc.data.splits import Splits
from visionpoc.errors import TrainingInterrupted
from visionpoc.runfiles import TRIALS_DIR
from visionpoc.train import fit

log = logging.getLogger(__name__)


def _dist() -> distributed.Dist:
    d = distributed.from_env()
    return d if d.enabled and dist.is_initialized() else distributed.SINGLE


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def follower(cfg: Config) -> bool:
    """Join the process group (under torchrun); True on the ranks that follow rank 0's trials."""
    d = distributed.init("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    return not d.main


def share_trial(number: int, changes: dict[str, Any]) -> None:
    """Rank 0: send one trial's settings to the other ranks (a no-op for one process)."""
    if _dist().enabled:
        _broadcast({"number": number, "changes": changes})


def share_prune(should_prune: bool) -> bool:
    """Rank 0's pruning decision, on every rank."""
    return distributed.broadcast_flag(_dist(), should_prune)


def finish(study: optuna.Study | None) -> None:
    """Rank 0: end the other ranks' `follow` loop, handing them the study's finished trials."""
    if not _dist().enabled:
        return
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()] if study else []
    _broadcast({"done": True, "name": study.study_name if study else "", "trials": trials})


def _follow_epoch(epoch: int, val_accuracy: float | None) -> None:
    if val_accuracy is not None and share_prune(False):
        raise optuna.TrialPruned(f"epoch {epoch}: pruned by rank 0")


def follow(cfg: Config, mcfg: ModelConfig, out_dir: Path, make_splits: Callable[[Config], Splits]) -> optuna.Study:
    """Ranks > 0: run each trial rank 0 sends, until its sentinel. Writes nothing."""
    splits: Splits | None = None
    while True:
        msg = _broadcast(None)
        if msg.get("done"):
            study = optuna.create_study(direction="maximize", study_name=msg["name"] or mcfg.label)
            study.add_trials(msg["trials"])
            return study
        if splits is None:  # after rank 0's first trial: it has read (or downloaded) the data by then
            splits = make_splits(cfg)
        number = msg["number"]
        try:
            tcfg = with_model_changes(cfg, mcfg.label, msg["changes"], f"trial {number}")
            folder = out_dir / TRIALS_DIR / mcfg.label / str(number)  # rank 0's; fit writes only on rank 0
            fit(tcfg, tcfg.model(mcfg.label), splits, folder, score_test=False, on_epoch=_follow_epoch)
        except optuna.TrialPruned:
            log.info("[%s] trial %d pruned", mcfg.label, number)
        except TrainingInterrupted:
            log.warning("[%s] trial %d interrupted: waiting for rank 0 to end the study", mcfg.label, number)
        except Exception as e:  # rank 0 records the failure; keep following
            log.warning("[%s] trial %d failed here: %s: %s", mcfg.label, number, type(e).__name__, e)
