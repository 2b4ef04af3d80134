"""The PoC: read (or download) the dataset, split it once, then fine-tune every model through the same
loop on the same splits, and write `results.json`, `results.csv`, `config.yaml` and one folder per
model. A deployed model (`onnx:`) is scored as it is, not trained, and once across repeats. A model that
fails is recorded with its error; the others still run and are reported.

`run` is the `compare` and `train` commands, given the config and folder `preflight.settings` resolved
(new, resumed or tuned): it checks everything first (`check`: every model, then the data, before the first
model trains or anything is written), trains, measures each model's price at inference (`price`), and
turns an interruption or a data error into a message that says how to continue. `dry_run` is `--dry-run`:
the same checks, then the plan.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import shutil
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from visionpoc import distributed, preflight
from visionpoc.config import Config, ModelConfig, TrackingConfig, save_config, to_dict
from visionpoc.data.sources import Dataset, read_dataset
from visionpoc.data.splits import Splits, make_splits
from visionpoc.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ImageError,
    RankLost,
    TrainingInterrupted,
    VisionpocError,
    user_message,
)
from visionpoc.preflight import refuse_existing_run
from visionpoc.recovery import clean_orphan_temps, resume_hint
from visionpoc.repeats import read_repeats, repeat_dir, save_repeats, spread
from visionpoc.results import DatasetInfo, ModelResult, RunResults, environment, load_results, save_results
from visionpoc.runfiles import CONFIG_FILE, PREDICTIONS_FILE, RESULTS_FILE, is_disk_full
from visionpoc.train import fit, resolve_device

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """What a `compare` or `train` command leaves: its folder, its results and where to log them."""

    out_dir: Path
    runs: list[RunResults]  # the run, or one per seed (`train.repeats`)
    tracking: TrackingConfig
    main: bool  # whether this process speaks for the run (under torchrun: rank 0 only)

    @property
    def ok(self) -> bool:
        """Whether every model of every run trained."""
        return all(m.status == "ok" for r in self.runs for m in r.models)


def run(command: str, cfg: Config, out_dir: Path, resume: bool, labels: list[str] | None) -> RunOutcome:
    """`visionpoc compare` (`labels` None: every model) or `visionpoc train` (`labels`: [one model]) of
    `cfg` into `out_dir` (`preflight.settings`); `resume` continues the run that folder holds."""
    d = distributed.from_env()
    hint = resume_hint(command, out_dir, labels[0] if labels else None, d.world)
    try:
        data = check(cfg, labels)  # before hours of training, not after
    except DataError as e:  # a resumed run's data moved or damaged: how to go on once it is fixed
        raise DataError(_data_error_message(e, out_dir, hint)) from None
    try:
        runs = _train(cfg, out_dir, labels, resume, hint, data)
    finally:
        distributed.shutdown(d)  # a no-op for one process
    if d.main:
        price(cfg, out_dir, runs, hint)
    return RunOutcome(out_dir, runs, cfg.tracking, d.main)


def price(cfg: Config, out_dir: Path, runs: list[RunResults], hint: str = "") -> None:
    """Each model's price at inference (`inference.cost.price_runs`) unless `inference.enabled` is false, once
    every model is trained: under torchrun the process group is gone by then, so no rank waits on a
    collective while it is measured. `runs`: the run in `out_dir`, or its repeats (one per seed)."""
    if not cfg.inference.enabled:
        return
    from visionpoc.inference.cost import price_runs

    seeds = [cfg.train.seed + k for k in range(len(runs))]
    dirs = [out_dir] if cfg.train.repeats == 1 else [out_dir / repeat_dir(s) for s in seeds]
    try:
        price_runs(cfg, list(zip(dirs, runs, strict=True)))
    except KeyboardInterrupt:
        raise TrainingInterrupted(
            f"stopped while measuring the price at inference; the trained models are saved. Resume to measure it: {hint}"
        ) from None


def check(cfg: Config, labels: list[str] | None) -> tuple[Dataset, Splits] | None:
    """Everything the run needs, before anything trains or is written, every problem at once: MLflow's
    client (when tracking is on), each model's timm name and weights file (`preflight.model_problems`),
    the data read and split. Returns the data, or None while Stanford Dogs is still to be downloaded
    (the run downloads it before the first model)."""
    from visionpoc.report.tracking import require_mlflow  # the report side: imported only for a run

    require_mlflow(cfg.tracking.mlflow_uri)
    problems = preflight.model_problems(cfg, labels)
    data = None
    if not download_due(cfg):
        try:
            data = load_data(cfg)
        except DataError as e:
            if not problems:
                raise
            problems.append(f"data: {user_message(e)}")
        if data is not None:  # deployed models' class maps against the dataset's classes
            problems += preflight.class_map_problems(cfg, labels, data[0].class_names, data[0].class_folders)
    preflight.refuse(problems)
    return data


def dry_run(command: str, cfg: Config, out_dir: Path, resume: bool, labels: list[str] | None) -> preflight.Plan:
    """`--dry-run`: the checks of `run`, then its plan; nothing trains and nothing is written."""
    data = check(cfg, labels)
    p = preflight.plan(command, cfg, out_dir, labels, None if data is None else data[1], resume)
    return dataclasses.replace(p, input=input_plan(cfg, data[1]) if data is not None else "")


def input_plan(cfg: Config, splits: Splits) -> str:
    """How the images reach the models (`data.pipeline` as the run resolves it on its device) and, for the
    prepared store, what it holds and its size on disk (built once beside the data, then reused)."""
    from visionpoc.data.loaders import resolve_pipeline
    from visionpoc.data.prepared import CACHE_DIRNAME, store_bytes

    device = resolve_device(cfg.train.device)
    streamed = splits.train.shards is not None
    if resolve_pipeline(cfg, device, streamed) == "stream":
        where = "the training split streamed from its tar shards, " if streamed else ""
        return f"stream on {device}: {where}each image decoded and augmented every epoch (data.pipeline)"
    n, side = len(splits.train) + len(splits.val) + len(splits.test), cfg.data.prepared_size
    size = store_bytes(n, side)
    size_text = f"{size / 2**30:,.2f} GiB" if size >= 2**30 else f"{size / 2**20:,.1f} MiB"
    return (
        f"prepared store on {device}: {n} images decoded once at {side} px, {size_text} on disk in "
        f"{CACHE_DIRNAME}/ beside the data (else ~/.cache/visionpoc; reused by every model and later run), "
        "augmented on the device"
    )


def _train(
    cfg: Config,
    out_dir: Path,
    labels: list[str] | None,
    resume: bool,
    hint: str,
    data: tuple[Dataset, Splits] | None,
) -> list[RunResults]:
    """`run_compare`, or `run_repeats` for `train.repeats` > 1; a stop or a data error says how to go on."""
    try:
        if cfg.train.repeats > 1:
            return run_repeats(cfg, out_dir, labels, resume=resume, data=data)
        return [run_compare(cfg, out_dir, labels, resume=resume, data=data)]
    except TrainingInterrupted as e:
        raise TrainingInterrupted(f"{e}. Resume with: {hint}") from None
    except OSError as e:  # a full disk: the next models would fail the same way
        if not is_disk_full(e):
            raise
        raise VisionpocError(
            f"{e}. The models finished before it are kept in {RESULTS_FILE} under {out_dir}, and the "
            f"interrupted one continues from its last checkpoint: free the space, then {hint}"
        ) from None
    except KeyboardInterrupt:  # outside the loop's step boundaries (SIGTERM too: `cli.main`)
        if not (out_dir / CONFIG_FILE).is_file():
            raise
        raise TrainingInterrupted(f"the last checkpoint stands. Resume with: {hint}") from None
    except DataError as e:  # e.g. a corrupt image met mid-run (the run has its config.yaml): it is kept
        raise DataError(_data_error_message(e, out_dir, hint)) from None


def _data_error_message(e: DataError, out_dir: Path, hint: str) -> str:
    """`e`'s message (also when a DataLoader worker wrapped it in its traceback text), with how to find
    every such file, and how to continue the run once they are fixed."""
    msg = user_message(e)
    if isinstance(e, ImageError):
        msg += " (`visionpoc data check --decode` lists every such file of the dataset at once)"
    if (out_dir / CONFIG_FILE).is_file():
        msg += f". Once it is fixed, continue the run with: {hint}"
    return msg


def _split_seed(cfg: Config) -> int:
    return cfg.train.seed if cfg.data.split_seed is None else cfg.data.split_seed


def download_due(cfg: Config) -> bool:
    """Whether `load_data` would download Stanford Dogs first: allowed, and `data.root` holds neither it
    nor another dataset (a class-folder tree read with the wrong `data.source` is said, not overwritten)."""
    if cfg.data.source != "stanford_dogs" or not cfg.data.download:
        return False
    from visionpoc.data.download import is_extracted
    from visionpoc.data.sources import class_folder_layout, find_dogs_lists

    root = Path(cfg.data.root).expanduser()
    return not is_extracted(root) and find_dogs_lists(root) is None and class_folder_layout(root) is None


def load_data(cfg: Config) -> tuple[Dataset, Splits]:
    """The dataset of `cfg.data`, downloading Stanford Dogs first when allowed and absent."""
    root = Path(cfg.data.root).expanduser()
    if download_due(cfg):
        from visionpoc.data.download import download_stanford_dogs

        log.info("Stanford Dogs not found in %s: downloading it (data.download=false turns this off)", root)
        download_stanford_dogs(root, base_url=cfg.data.base_url)
    ds = read_dataset(cfg.data.source, root, cfg.data.class_names, cfg.data, _split_seed(cfg))
    splits = make_splits(ds, cfg.data.val_fraction, cfg.data.limit_per_class, _split_seed(cfg))
    empty = [name for name, split in (("train", splits.train), ("test", splits.test)) if len(split) == 0]
    if empty:
        why = f" after data.limit_per_class={cfg.data.limit_per_class}" if cfg.data.limit_per_class else ""
        raise DataError(f"{root}: the {' and '.join(empty)} split is empty{why}")
    log.info(
        "data: %d train / %d val / %d test images, %d classes",
        len(splits.train),
        len(splits.val),
        len(splits.test),
        splits.num_classes,
    )
    return ds, splits


def _run_folder(out_dir: Path, resume: bool) -> None:
    """Create `out_dir`, refused if it holds another run (unless this one resumes it)."""
    if not resume:
        refuse_existing_run(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out_dir}: cannot create the folder ({e}); choose another path") from e


def run_compare(
    cfg: Config,
    out_dir: Path,
    labels: list[str] | None = None,
    resume: bool = False,
    data: tuple[Dataset, Splits] | None = None,
    scored: Path | None = None,
) -> RunResults:
    """Train and score each model of `cfg` (or only `labels`; an `onnx:` one is only scored); results are
    saved after every model.

    With `resume`, models already finished in `out_dir/results.json` are kept, and an interrupted model
    continues from its last checkpoint. `data`: the dataset and splits `check` read (else read here).
    `scored`: a run folder on the same splits (the first repeat) whose deployed models' scores are reused.
    Only the main process writes (under torchrun).
    """
    out_dir = Path(out_dir)
    d = distributed.init("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    done: dict[str, ModelResult] = {}
    if resume and (out_dir / RESULTS_FILE).is_file():
        done = {m.label: m for m in load_results(out_dir).models if m.status == "ok"}
    if d.main:
        _run_folder(out_dir, resume)
        if resume:
            clean_orphan_temps(out_dir)
        ds, splits = data or load_data(cfg)  # one process downloads; the others wait for it
        save_config(cfg, out_dir / CONFIG_FILE)  # the run starts: a data error before it leaves none
    distributed.wait_for_main(d)  # a download may take longer than the collective timeout
    if not d.main:
        ds, splits = data or load_data(cfg)
    device = resolve_device(cfg.train.device, d)
    results = new_results(cfg, ds, splits, str(device))
    chosen = [cfg.model(label) for label in labels] if labels else list(cfg.models)
    # a resume that trains some models keeps the others' finished results (in the config's order)
    chosen = [m for m in cfg.models if m in chosen or m.label in done]
    if d.main and ds.source == "stanford_dogs":
        warn_imagenet_overlap(chosen)
    added = [m for m in done.values() if m.label not in {c.label for c in cfg.models}]  # by `evaluate --out`
    for m in added:
        log.info("=== %s: added to %s by `visionpoc evaluate`, kept", m.label, out_dir)
    for mcfg in chosen:
        if mcfg.label in done:
            log.info("=== %s: already finished in %s, kept", mcfg.label, out_dir)
            results.models.append(done[mcfg.label])
            continue
        log.info("=== %s (%s, finetune=%s)", mcfg.label, mcfg.name, "deployed" if mcfg.onnx else mcfg.finetune)
        if mcfg.kind == "onnx" and not d.main:  # a deployed model is scored by one process
            continue
        try:
            result = _fit_or_score(cfg, mcfg, splits, ds, out_dir, resume, scored)
        except (KeyboardInterrupt, DataError, CheckpointError, TrainingInterrupted):
            raise  # the user stopped us, or the data/checkpoint needs the user, for every model alike
        except Exception as e:  # one model failing (weights, OOM, a bug) must not lose the others
            if is_disk_full(e):
                raise  # every later model would fail the same way: stop, keeping what is done
            lost = distributed.peer_failure(d, e)  # another rank died: not this model's failure
            if lost is not None:
                raise RankLost(f"[{mcfg.label}] {lost}; this model's last checkpoint stands") from None
            message = str(e) if isinstance(e, VisionpocError) else f"{type(e).__name__}: {e}"
            log.error("model %s failed: %s", mcfg.label, message)
            log.debug("%s", traceback.format_exc())
            result = _failed(mcfg, message)
        results.models.append(result)
        if d.main:
            save_results(dataclasses.replace(results, models=results.models + added), out_dir)
    results.models += added
    return results


def new_results(cfg: Config, ds: Dataset, splits: Splits, device: str) -> RunResults:
    """The results of a run of `cfg` on `ds` split as `splits`, on `device`, before any model."""
    return RunResults(
        dataset=DatasetInfo(
            source=ds.source,
            root=str(ds.root.resolve()),
            test_root=str(splits.test.root.resolve()),
            train_size=len(splits.train),
            val_size=len(splits.val),
            test_size=len(splits.test),
            num_classes=splits.num_classes,
            class_names=splits.class_names,
        ),
        models=[],
        environment=environment(device, cfg.train.seed),
        config=to_dict(cfg),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def run_repeats(
    cfg: Config,
    out_dir: Path,
    labels: list[str] | None = None,
    resume: bool = False,
    data: tuple[Dataset, Splits] | None = None,
) -> list[RunResults]:
    """`run_compare` once per seed of `cfg.train.repeats` (seed, seed+1, ...), each a whole run in
    `out_dir/seed-<s>/` on the same splits (the first seed's); `out_dir` holds the config and the list.

    With `resume`, finished repeats are kept and an interrupted one continues from its checkpoints.
    `data`: the dataset and splits `check` read (else read here).
    """
    out_dir = Path(out_dir)
    seeds = [cfg.train.seed + k for k in range(cfg.train.repeats)]
    before = read_repeats(out_dir) if resume else None
    if before is not None and before.labels != labels:  # e.g. `compare --resume` of a `train --model vit` run
        label = before.labels[0] if before.labels else None
        was = f"visionpoc train --model {label}" if label else "visionpoc compare"
        now = resume_hint("train" if label else "compare", out_dir, label, distributed.from_env().world)
        raise ConfigError(
            f"{out_dir} was started by `{was}`: resume it with `{now}` (another command would "
            "train other models into its seeds)"
        )
    if distributed.from_env().main:
        _run_folder(out_dir, resume)
        if resume:
            clean_orphan_temps(out_dir)  # the seeds' folders too
        data = data or load_data(cfg)  # a data error before the run starts leaves no config.yaml
        save_config(cfg, out_dir / CONFIG_FILE)
        save_repeats(out_dir, seeds, labels)  # a resumed run may have changed train.repeats
    runs = []
    for k, seed in enumerate(seeds):
        one = replace(
            cfg, data=replace(cfg.data, split_seed=_split_seed(cfg)), train=replace(cfg.train, seed=seed, repeats=1)
        )
        sub = out_dir / repeat_dir(seed)
        log.info("=== repeat %d of %d: seed %d, in %s", k + 1, len(seeds), seed, sub)
        again = resume and (sub / CONFIG_FILE).is_file()
        first = out_dir / repeat_dir(seeds[0]) if k else None  # a deployed model: scored once, same splits
        runs.append(run_compare(one, sub, labels, resume=again, data=data, scored=first))
    return runs


def _fit_or_score(
    cfg: Config, mcfg: ModelConfig, splits: Splits, ds: Dataset, out_dir: Path, resume: bool, scored: Path | None
) -> ModelResult:
    """`fit` model `mcfg` into `out_dir/<label>`; a deployed model (`onnx:`) is scored as it is instead."""
    if mcfg.kind == "onnx":
        return _deployed(cfg, mcfg, splits, ds.class_folders, out_dir, scored)
    return fit(cfg, mcfg, splits, out_dir / mcfg.label, resume=resume)


def _failed(mcfg: ModelConfig, message: str) -> ModelResult:
    """The result of model `mcfg` that failed with `message`."""
    deployed = mcfg.kind == "onnx"
    return ModelResult(
        label=mcfg.label,
        timm=mcfg.name,
        finetune="deployed" if deployed else mcfg.finetune,
        pretrained=mcfg.pretrained and not deployed,
        status="failed",
        error=message,
        preset=mcfg.preset,
        policy="deployed" if deployed else mcfg.policy,
        onnx=mcfg.onnx,
    )


def _deployed(
    cfg: Config, mcfg: ModelConfig, splits: Splits, class_folders: list[str], out_dir: Path, scored: Path | None
) -> ModelResult:
    """Score the deployed model `mcfg`, or reuse its scores from the run in `scored`: it is not trained, so
    another seed on the same splits would give the same figures."""
    from visionpoc.deployed.score import score_deployed
    from visionpoc.deployed.spec import entry_keys

    here = out_dir / mcfg.label / PREDICTIONS_FILE
    if scored is not None and (scored / mcfg.label / PREDICTIONS_FILE).is_file() and (scored / RESULTS_FILE).is_file():
        done = [m for m in load_results(scored).models if m.label == mcfg.label and m.status == "ok"]
        if done:
            log.info("[%s] deployed: scored once, in %s; the same scores stand for this seed", mcfg.label, scored)
            here.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(scored / mcfg.label / PREDICTIONS_FILE, here)
            return done[0]
    keys = entry_keys(next(i for i, m in enumerate(cfg.models) if m.label == mcfg.label))
    return score_deployed(cfg, mcfg, splits, class_folders, out_dir / mcfg.label, keys)


def warn_imagenet_overlap(chosen: list[ModelConfig]) -> list[str]:
    """Log (and return) the pretrained models whose pretraining data contains ImageNet, from which
    Stanford Dogs was built: they may have seen its test images."""
    from visionpoc.presets.facts import hf_pretrain_name, may_have_seen_imagenet, tagged_name

    flagged = []
    for m in chosen:
        if m.onnx or not m.pretrained or m.pretrained_path:
            continue
        name = hf_pretrain_name(m.hf) if m.hf else tagged_name(m.timm)  # untagged: timm's default tag
        if may_have_seen_imagenet(name):
            flagged.append(m.label)
            log.warning(
                "%s (%s): Stanford Dogs is built from ImageNet images and this model's pretraining "
                "includes ImageNet, so it may have seen test images; its test accuracy can be optimistic "
                "(the report's caveats say more)",
                m.label,
                name,
            )
    return flagged


def _fmt(v: float | None, spec: str) -> str:
    return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)


def format_table(results: RunResults) -> str:
    """The original PoC's table (model, train time, train acc, test acc) plus top-5 and macro-F1."""
    head = f"{'model':<16} {'train time (s)':>14} {'train acc':>9} {'val acc':>8} {'test acc':>8} {'top-5':>7} {'macro-F1':>8}"
    lines = [head, "-" * len(head)]
    for m in results.models:
        if m.status != "ok":
            lines.append(f"{m.label:<16} FAILED: {m.error}")
            continue
        lines.append(
            f"{m.label:<16} {_fmt(m.train_time_s, '14.1f')} {_fmt(m.train_accuracy, '9.4f')} "
            f"{_fmt(m.val_accuracy, '8.4f')} {_fmt(m.test_accuracy, '8.4f')} "
            f"{_fmt(m.test_top5_accuracy, '7.4f')} {_fmt(m.test_macro_f1, '8.4f')}"
        )
    return "\n".join(lines)


def format_runs(runs: list[RunResults]) -> str:
    """The table of a run, or of its repeats across seeds."""
    return format_table(runs[0]) if len(runs) == 1 else format_repeats_table(runs)


def format_repeats_table(runs: list[RunResults]) -> str:
    """Each model's mean +- standard deviation across the repeats (the models that finished in each)."""
    n = len(runs)
    head = f"{'model':<16} {'runs':>4} {'train time (s)':>16} {'val acc':>15} {'test acc':>15}"
    lines = [f"across {n} seeds (mean +- std):", head, "-" * len(head)]

    def cell(values: list[float | None], width: int, spec: str) -> str:
        s = spread(values)
        text = "-" if s is None else format(s.mean, spec) + ("" if s.std is None else " +- " + format(s.std, spec))
        return f"{text:>{width}}"

    for label in dict.fromkeys(m.label for r in runs for m in r.models):
        ok = [m for r in runs for m in r.models if m.label == label and m.status == "ok"]
        lines.append(
            f"{label:<16} {len(ok):>4} {cell([m.train_time_s for m in ok], 16, '.1f')} "
            f"{cell([m.val_accuracy for m in ok], 15, '.4f')} {cell([m.test_accuracy for m in ok], 15, '.4f')}"
        )
    return "\n".join(lines)
