"""Before anything trains: the run's config and folder, the checks of every model, and the plan.

- `settings`: a `compare`/`train` command's config (new, resumed or tuned) and run folder. It imports
  neither torch nor timm (only a resumed or tuned run loads them), so a config error is said at once.
  `elastic_resume`: workers that torchrun restarts resume their `--out` folder by themselves.
- `model_problems`: what is wrong with each model, every one at once: a timm name that timm does not
  know (with timm's closest names), a `pretrained_path` that is absent or not a readable weights file
  (its header is read, never the weights), an `onnx:` entry's file, shapes and class names
  (`deployed.spec`; its class map against the data: `class_map_problems`), an `hf:` entry's folder
  (config.json) or hub id (in the cache, or the hub reachable). `refuse` turns them into one error.
- `plan` / `format_plan`: what `--dry-run` prints: per model the timm name, policy, LR and where it came
  from, batch, epochs and optimizer steps; the data counts; a time estimate only from throughput this
  run has measured itself (a resumed run's epochs).

`compare.check` runs these checks and reads the data before the first model trains.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import logging
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from visionpoc.config import Config, ModelConfig, for_model, load_config, to_dict
from visionpoc.errors import ConfigError
from visionpoc.runfiles import CONFIG_FILE, HISTORY_FILE, RESULTS_FILE

if TYPE_CHECKING:
    from visionpoc.data.splits import Splits

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------ settings


def default_out(command: str) -> Path:
    """The output folder of a command run without --out: `runs/<command>-<time>`."""
    return Path("runs") / f"{command}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def refuse_existing_run(out_dir: Path) -> None:
    """A new run may not go into a folder that holds one (its config.yaml): results and checkpoints of the
    two runs would mix."""
    if (Path(out_dir) / CONFIG_FILE).exists():
        raise ConfigError(
            f"{out_dir} already holds a run (its config.yaml): continue it with --resume {out_dir}, "
            "or give another --out (or delete that folder)"
        )


def elastic_resume(config: Path | None, overrides: list[str], out: Path | None, tuned: Path | None) -> Path | None:
    """The run folder a command that torchrun (re)started continues, as `--resume OUT` would; else None.

    torchrun with `--max-restarts N` (`TORCHELASTIC_MAX_RESTARTS` > 0) restarts every worker with the
    command it started, after a worker died or a host joined or left; only the failed worker's agent counts
    a restart (`TORCHELASTIC_RESTART_COUNT`), so every worker decides from the folder instead: `--out`
    holds a run whose saved config is the one this command asks for. A folder with other settings is
    left to `refuse_existing_run`."""
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if out is None or not restarts.isdigit() or int(restarts) == 0 or not (Path(out) / CONFIG_FILE).is_file():
        return None
    asked = load_config(config, overrides)
    if tuned is not None:
        from visionpoc.tuning.outputs import apply_tuned  # Optuna: imported only when asked for

        asked = apply_tuned(asked, tuned, None)
    if to_dict(asked) != to_dict(load_config(Path(out) / CONFIG_FILE)):
        return None
    log.warning(
        "torchrun started this worker (restart %s of up to %s) for a run that %s already holds: resuming it "
        "from its last checkpoint, as --resume %s would",
        os.environ.get("TORCHELASTIC_RESTART_COUNT", "?"),
        restarts,
        out,
        out,
    )
    return Path(out)


def settings(
    command: str,
    config: Path | None,
    overrides: list[str],
    out: Path | None,
    resume: Path | None,
    tuned: Path | None,
    labels: list[str] | None,
    dry_run: bool = False,
) -> tuple[Config, Path]:
    """The run's config and folder: the interrupted run's own (`resume`), or a new one (with the settings
    of `tuned`, whose records are copied into the folder unless `dry_run`). A misspelt `--model` label
    and a folder that holds another run are refused here, before anything is written."""
    if resume is not None:
        if config is not None or out is not None:
            raise ConfigError(f"--resume RUN_DIR takes the run's own {CONFIG_FILE} and folder: drop --config/--out")
        from visionpoc.recovery import resume_config  # torch: a resumed run's state

        cfg, out_dir = resume_config(resume, overrides), resume  # refuses --set that would change the training
    else:
        if command == "train" and config is None:
            raise ConfigError("visionpoc train needs --config FILE (or --resume RUN_DIR)")
        cfg, out_dir = load_config(config, overrides), out or default_out(command)
        refuse_existing_run(out_dir)
    for label in labels or []:
        cfg.model(label)  # a misspelt --model
    if tuned is not None and resume is None:
        from visionpoc.tuning.outputs import apply_tuned  # Optuna: imported only when asked for

        cfg = apply_tuned(cfg, tuned, None if dry_run else out_dir)
    return cfg, out_dir


# -------------------------------------------------------------------------------------- checks


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def timm_name_problem(name: str) -> str | None:
    """What is wrong with the timm model name `name` (with timm's closest names), or None if timm knows it.

    `hf-hub:` names pass (the Hub's config names the model when it is fetched); a `local-dir:` folder must
    exist. A tagged name (`arch.tag`) needs both the architecture and the pretrained tag."""
    import timm
    from timm.models import get_pretrained_cfg, parse_model_name, split_model_name_tag

    try:
        source, model_id = parse_model_name(name)
    except (ValueError, AssertionError) as e:  # a path-like name, an unknown `source:` prefix
        return f"{name!r} is not a timm model name ({e})"
    if source == "hf-hub":
        return None
    if source == "local-dir":
        return None if Path(model_id).expanduser().is_dir() else f"{name!r}: the folder {model_id} does not exist"
    arch, tag = split_model_name_tag(model_id)
    if not timm.is_model(arch):
        known = timm.list_pretrained() if tag else timm.list_models()
        return f"timm has no model {name!r}{_did_you_mean(model_id, known)}"
    if tag:
        try:
            get_pretrained_cfg(model_id)
        except RuntimeError:  # timm: "Invalid pretrained tag"
            tags = timm.list_pretrained(f"{arch}.*")
            hint = (_did_you_mean(model_id, tags) or f"; its tagged names: {tags}") if tags else "; it has no tags"
            return f"timm's {arch!r} has no pretrained tag {tag!r}{hint}"
    return None


def weights_problem(path: Path) -> str | None:
    """What keeps `path` from being a weights file timm can load, or None. Cheap: a .safetensors file's
    header is read (and checked against the file's size); any other file must start as `torch.save`
    writes (a zip archive, or a pickle)."""
    path = path.expanduser()
    if not path.exists():
        return f"pretrained_path {path} not found"
    if not path.is_file():
        return f"pretrained_path {path} is a folder, not a weights file"
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"pretrained_path {path} cannot be read ({e.strerror})"
    if not head:
        return f"pretrained_path {path} is empty"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="np") as st:
                st.keys()
        except Exception as e:  # safetensors raises its own SafetensorError for a bad or truncated file
            return f"pretrained_path {path} is not a readable safetensors file ({e})"
    elif head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip, or a (legacy) pickle
        return f"pretrained_path {path} is neither a safetensors file nor a torch.save checkpoint"
    return None


def model_problems(cfg: Config, labels: list[str] | None = None) -> list[str]:
    """Every problem of the models of `cfg` (only `labels`, when given) that would stop one at its turn,
    each naming the entry, the value and the fix."""
    problems = []
    for i, m in enumerate(cfg.models):
        if labels and m.label not in labels:
            continue
        where = f"models.{i} ({m.label})"
        if m.kind == "onnx":  # a deployed file: exists, shapes against `preprocess` and `classes` (no torch)
            from visionpoc.deployed.spec import entry_keys
            from visionpoc.deployed.spec import problems as deployed_problems

            problems += [f"{where}: {p}" for p in deployed_problems(m, entry_keys(i))]
            continue
        if m.kind == "hf":  # a folder with config.json, or a cached (or reachable) hub id; no transformers import
            from visionpoc.hfmodels import source_problem

            hf = source_problem(str(m.hf), _hub_online)
            if hf:
                problems.append(f"{where}: {hf} (or --set models.{i}.hf=FOLDER_OR_ID)")
            continue
        name = timm_name_problem(m.timm)
        if name:
            problems.append(f"{where}: {name} (fix its `timm:` in the config, or --set models.{i}.timm=NAME)")
        weights = weights_problem(Path(m.pretrained_path)) if m.pretrained and m.pretrained_path else None
        if weights:
            problems.append(
                f"{where}: {weights} (point it to a .safetensors or .pth state dict of {m.timm}, or drop "
                f"`pretrained_path` to take timm's weights: --set models.{i}.pretrained_path=null)"
            )
    return problems


def _hub_online() -> bool:
    from visionpoc.models import hub_reachable  # torch: only asked for a hub id missing from the cache

    return hub_reachable()


def class_map_problems(
    cfg: Config, labels: list[str] | None, class_names: list[str], class_folders: list[str]
) -> list[str]:
    """The class map of each deployed model (`onnx:`) against the dataset's classes: nothing in common is a
    problem (a partial overlap is a warning when it is scored)."""
    from visionpoc.deployed.spec import data_problem, entry_keys

    out = []
    for i, m in enumerate(cfg.models):
        if m.kind == "onnx" and (not labels or m.label in labels):
            p = data_problem(m, entry_keys(i), class_names, class_folders)
            if p:
                out.append(f"models.{i} ({m.label}): {p}")
    return out


def refuse(problems: list[str]) -> None:
    """One ConfigError that lists every problem (nothing has trained yet), or nothing."""
    if len(problems) == 1:
        raise ConfigError(f"{problems[0]} (checked before training: nothing was trained)")
    if problems:
        listed = "".join(f"\n  - {p}" for p in problems)
        raise ConfigError(f"{len(problems)} problems, found before training (nothing was trained):{listed}")


# ---------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ModelPlan:
    """How one model would train."""

    label: str
    timm: str
    finetune: str
    policy: str | None
    lr: str  # the peak LR, or the probe's grid
    lr_source: str  # optim.resolve_lr's: config, preset, tuned, policy_default
    batch_size: int
    epochs: int
    steps_per_epoch: int | None  # None: the data is not read yet (it is downloaded first)
    estimate_s: float | None  # training time, from throughput this run measured; None: no estimate
    probe: bool = False  # the cached linear probe: a grid of heads on features computed once, no early stop
    status: str = ""  # on resume: "finished (kept)", "continues after epoch N"

    @property
    def steps(self) -> int | None:
        return None if self.steps_per_epoch is None else self.epochs * self.steps_per_epoch


@dataclass(frozen=True)
class Plan:
    """What `compare --dry-run` / `train --dry-run` prints."""

    command: str
    out_dir: Path
    resume: bool
    data: str  # the data, counted, or why it cannot be yet
    models: list[ModelPlan]
    repeats: int
    early_stop: int | None
    input: str = ""  # the input path and, for the prepared store, its size on disk (`compare.input_plan`)


def loop_steps(n_train: int, batch_size: int) -> int:
    """Optimizer steps per epoch of the shared loop: the last partial batch is dropped, unless the split
    holds a single batch (`data.loaders`)."""
    return n_train // batch_size if n_train > batch_size else 1


def _probe_schedule(cfg: Config, n_train: int | None) -> tuple[int, int | None]:
    """(epochs, steps per epoch) of the cached linear probe (`probe.fit_probe`)."""
    if n_train is None:
        return cfg.probe.epochs or cfg.train.epochs, None
    per_epoch = math.ceil(n_train * (1 + cfg.probe.views) / cfg.train.batch_size)
    return cfg.probe.epochs or max(cfg.train.epochs, math.ceil(cfg.probe.min_steps / per_epoch)), per_epoch


def _measured(out_dir: Path, label: str) -> tuple[int, float | None]:
    """(epochs done, median training img/s) in this run's history of `label`; (0, None) without one."""
    path = out_dir / label / HISTORY_FILE
    if not path.is_file():
        return 0, None
    history = json.loads(path.read_text())
    rates = [e["train_img_s"] for e in history if e.get("train_img_s")]
    return len(history), (statistics.median(rates) if rates else None)


def _finished(out_dir: Path) -> set[str]:
    path = out_dir / RESULTS_FILE
    if not path.is_file():
        return set()
    return {m["label"] for m in json.loads(path.read_text()).get("models", []) if m.get("status") == "ok"}


def model_plan(cfg: Config, mcfg: ModelConfig, n_train: int | None, out_dir: Path, done: set[str]) -> ModelPlan:
    """How `mcfg` would train on `n_train` images: its own view of the config (`for_model`), its LR
    (`optim.resolve_lr`), and its steps as the loop (or the cached probe) counts them."""
    from visionpoc.optim import resolve_lr

    if mcfg.kind == "onnx":  # scored as it is: no LR, no epochs
        status = "finished (kept)" if mcfg.label in done else ""
        return ModelPlan(mcfg.label, mcfg.name, "deployed", "deployed", "-", "deployed", 0, 0, 0, None, status=status)
    view = for_model(cfg, mcfg)
    bs = view.train.batch_size
    lr, source = resolve_lr(view.train.lr, mcfg, bs)
    lr_text, probe = f"{lr:.3g}", mcfg.finetune == "head" and cfg.probe.cache
    if probe:
        epochs, per_epoch = _probe_schedule(view, n_train)
        if source == "policy_default":  # the probe searches its grid instead
            lr_text, source = f"a grid of {len(cfg.probe.lrs)} x {len(cfg.probe.weight_decays)}", "probe"
    else:
        epochs, per_epoch = view.train.epochs, None if n_train is None else loop_steps(n_train, bs)
    status, estimate = "", None
    if mcfg.label in done:
        status = "finished (kept)"
    else:
        ran, img_s = _measured(out_dir, mcfg.label)
        status = f"continues after epoch {ran}" if ran else ""
        if img_s and per_epoch is not None:
            estimate = max(0, epochs - ran) * per_epoch * bs / img_s
    return ModelPlan(
        label=mcfg.label,
        timm=mcfg.name,
        finetune=mcfg.finetune,
        policy=mcfg.policy,
        lr=lr_text,
        lr_source=source,
        batch_size=bs,
        epochs=epochs,
        steps_per_epoch=per_epoch,
        estimate_s=estimate,
        probe=probe,
        status=status,
    )


def plan(
    command: str, cfg: Config, out_dir: Path, labels: list[str] | None, splits: Splits | None, resume: bool
) -> Plan:
    """The plan of a run of `cfg` on `splits` (None: Stanford Dogs is to be downloaded first)."""
    if splits is None:
        data = f"Stanford Dogs is not in {cfg.data.root} yet: the run downloads it first, so counts are unknown"
    else:
        data = (
            f"{cfg.data.source} in {cfg.data.root}: {len(splits.train)} train / {len(splits.val)} val / "
            f"{len(splits.test)} test images, {splits.num_classes} classes"
        )
    done = _finished(out_dir) if resume else set()
    chosen = [m for m in cfg.models if not labels or m.label in labels]
    n_train = None if splits is None else len(splits.train)
    models = [model_plan(cfg, m, n_train, out_dir, done) for m in chosen]
    return Plan(command, out_dir, resume, data, models, cfg.train.repeats, cfg.train.early_stop_patience)


_LR_SOURCE = {
    "config": "from the config",
    "preset": "the preset's policy",
    "tuned": "tuned",
    "policy_default": "the policy's default for this batch",
    "probe": "probe.lrs x probe.weight_decays: a head each, the best on validation is kept",
}


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _duration(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def format_plan(p: Plan) -> str:
    """The plan as text: the data, then one block per model."""
    where = f"resuming {p.out_dir}" if p.resume else f"the run would write {p.out_dir}"
    lines = [f"dry run of visionpoc {p.command}: nothing trains, nothing is written ({where})"]
    lines.append(f"data: {p.data}")
    if p.input:
        lines.append(f"input: {p.input}")
    seeds = f", {p.repeats} times (train.repeats: one seed each)" if p.repeats > 1 else ""
    lines.append(f"{len(p.models)} model(s), one after the other through the same loop{seeds}:")
    for m in p.models:
        policy = f"policy {m.policy} (finetune {m.finetune})" if m.policy else f"finetune {m.finetune}"
        if m.finetune == "deployed":
            lines.append(f"  {m.label}: {m.timm}, deployed: scored as it is on val and test, not trained")
            continue
        lines.append(f"  {m.label}: {m.timm}, {policy}" + (f"; {m.status}" if m.status else ""))
        steps = (
            "? steps" if m.steps_per_epoch is None else f"{_n(m.steps_per_epoch, 'step')} = {m.steps} optimizer steps"
        )
        upto = "up to " if p.early_stop and not m.probe else ""
        lines.append(f"    lr {m.lr} ({_LR_SOURCE.get(m.lr_source, m.lr_source)}), batch {m.batch_size}")
        lines.append(f"    {upto}{_n(m.epochs, 'epoch')} x {steps}")
        if m.estimate_s is not None:
            lines.append(f"    time: about {_duration(m.estimate_s)} of training at this run's measured img/s")
        elif "finished" not in m.status:
            lines.append("    time: no estimate")
    if any(m.estimate_s is None and "finished" not in m.status and m.finetune != "deployed" for m in p.models):
        lines.append("no estimate: a time comes only from the img/s this run has measured (the dry run of a resumed")
        lines.append("run uses its recorded epochs); each epoch's log line gives its img/s.")
    return "\n".join(lines)
