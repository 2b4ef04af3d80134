"""The PoC: read (or download) the dataset, split it once, then fine-tune every model through the same
loop on the same splits, and write `results.json`, `results.csv`, `config.yaml` and one folder per
model. A model that fails is recorded with its error; the others still run and are reported.

`run` is the `compare` and `train` commands: it resolves the run's config and folder (new, resumed or
tuned), trains, and turns an interruption or a data error into a message that says how to continue.
"""

from __future__ import annotations

import datetime as dt
import logging
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from visionpoc import distributed
from visionpoc.config import Config, ModelConfig, TrackingConfig, load_config, save_config, to_dict
from visionpoc.data.sources import Dataset, read_dataset
from visionpoc.data.splits import Splits, make_splits
from visionpoc.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ImageError,
    TrainingInterrupted,
    VisionpocError,
    user_message,
)
from visionpoc.recovery import resume_config, resume_hint
from visionpoc.repeats import read_repeats, repeat_dir, save_repeats, spread
from visionpoc.results import DatasetInfo, ModelResult, RunResults, environment, load_results, save_results
from visionpoc.runfiles import CONFIG_FILE, RESULTS_FILE
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


def default_out(command: str) -> Path:
    """The output folder of a command run without --out: `runs/<command>-<time>`."""
    return Path("runs") / f"{command}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run(
    command: str,
    config_path: Path | None,
    overrides: list[str],
    out: Path | None,
    resume_dir: Path | None,
    tuned_dir: Path | None,
    labels: list[str] | None,
) -> RunOutcome:
    """`visionpoc compare` (`labels` None: every model) or `visionpoc train` (`labels`: [one model]).

    A new run uses `config_path` (required for `train`) with `overrides`, in `out` (default: `default_out`),
    with the tuned settings of `tuned_dir`; a resumed one (`resume_dir`) its own config and folder.
    """
    cfg, out_dir = _settings(command, config_path, overrides, out, resume_dir, tuned_dir)
    from visionpoc.report.tracking import require_mlflow  # the report side: imported only for a run

    require_mlflow(cfg.tracking.mlflow_uri)  # before hours of training, not after
    for label in labels or []:
        cfg.model(label)  # a misspelt --model: said before a run folder is started
    d = distributed.from_env()
    hint = resume_hint(command, out_dir, labels[0] if labels else None, d.world)
    try:
        runs = _train(cfg, out_dir, labels, resume_dir is not None, hint)
    finally:
        distributed.shutdown(d)  # a no-op for one process
    return RunOutcome(out_dir, runs, cfg.tracking, d.main)


def _settings(
    command: str, config: Path | None, overrides: list[str], out: Path | None, resume: Path | None, tuned: Path | None
) -> tuple[Config, Path]:
    """The run's config and folder: the interrupted run's own, or a new one (with the settings of `tuned`)."""
    if resume is not None:
        if config is not None or out is not None:
            raise ConfigError(f"--resume RUN_DIR takes the run's own {CONFIG_FILE} and folder: drop --config/--out")
        return resume_config(resume, overrides), resume  # refuses --set that would change the training
    if command == "train" and config is None:
        raise ConfigError("visionpoc train needs --config FILE (or --resume RUN_DIR)")
    cfg = load_config(config, overrides)
    out_dir = out or default_out(command)
    if tuned is not None:
        from visionpoc.tuning.outputs import apply_tuned  # Optuna: imported only when asked for

        refuse_existing_run(out_dir)  # before the tuning records are copied into it
        cfg = apply_tuned(cfg, tuned, out_dir)
    return cfg, out_dir


def _train(cfg: Config, out_dir: Path, labels: list[str] | None, resume: bool, hint: str) -> list[RunResults]:
    """`run_compare`, or `run_repeats` for `train.repeats` > 1; a stop or a data error says how to go on."""
    try:
        if cfg.train.repeats > 1:
            return run_repeats(cfg, out_dir, labels, resume=resume)
        return [run_compare(cfg, out_dir, labels, resume=resume)]
    except TrainingInterrupted as e:
        raise TrainingInterrupted(f"{e}. Resume with: {hint}") from None
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


def load_data(cfg: Config) -> tuple[Dataset, Splits]:
    """The dataset of `cfg.data`, downloading Stanford Dogs first when allowed and absent."""
    root = Path(cfg.data.root).expanduser()
    if cfg.data.source == "stanford_dogs" and cfg.data.download:
        from visionpoc.data.download import download_stanford_dogs, is_extracted
        from visionpoc.data.sources import find_dogs_lists

        if not is_extracted(root) and find_dogs_lists(root) is None:
            log.info("Stanford Dogs not found in %s: downloading it (data.download=false turns this off)", root)
            download_stanford_dogs(root, base_url=cfg.data.base_url)
    ds = read_dataset(cfg.data.source, root)
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


def refuse_existing_run(out_dir: Path) -> None:
    """A new run may not go into a folder that holds one (its config.yaml): results and checkpoints of the
    two runs would mix."""
    if (Path(out_dir) / CONFIG_FILE).exists():
        raise ConfigError(
            f"{out_dir} already holds a run (its config.yaml): continue it with --resume {out_dir}, "
            "or give another --out (or delete that folder)"
        )


def _run_folder(out_dir: Path, resume: bool) -> None:
    """Create `out_dir`, refused if it holds another run (unless this one resumes it)."""
    if not resume:
        refuse_existing_run(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out_dir}: cannot create the folder ({e}); choose another path") from e


def run_compare(cfg: Config, out_dir: Path, labels: list[str] | None = None, resume: bool = False) -> RunResults:
    """Train and score each model of `cfg` (or only `labels`); results are saved after every model.

    With `resume`, models already finished in `out_dir/results.json` are kept, and an interrupted model
    continues from its last checkpoint. Only the main process writes (under torchrun).
    """
    out_dir = Path(out_dir)
    d = distributed.init("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    done: dict[str, ModelResult] = {}
    if resume and (out_dir / RESULTS_FILE).is_file():
        done = {m.label: m for m in load_results(out_dir).models if m.status == "ok"}
    if d.main:
        _run_folder(out_dir, resume)
        ds, splits = load_data(cfg)  # one process downloads; the others wait for it
        save_config(cfg, out_dir / CONFIG_FILE)  # the run starts: a data error before it leaves none
    distributed.barrier(d)
    if not d.main:
        ds, splits = load_data(cfg)
    device = resolve_device(cfg.train.device, d)
    results = RunResults(
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
        environment=environment(str(device), cfg.train.seed),
        config=to_dict(cfg),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    chosen = [cfg.model(label) for label in labels] if labels else list(cfg.models)
    # a resume that trains some models keeps the others' finished results (in the config's order)
    chosen = [m for m in cfg.models if m in chosen or m.label in done]
    if d.main and ds.source == "stanford_dogs":
        warn_imagenet_overlap(chosen)
    for mcfg in chosen:
        if mcfg.label in done:
            log.info("=== %s: already finished in %s, kept", mcfg.label, out_dir)
            results.models.append(done[mcfg.label])
            continue
        log.info("=== %s (%s, finetune=%s)", mcfg.label, mcfg.timm, mcfg.finetune)
        try:
            result = fit(cfg, mcfg, splits, out_dir / mcfg.label, resume=resume)
        except (KeyboardInterrupt, DataError, CheckpointError, TrainingInterrupted):
            raise  # the user stopped us, or the data/checkpoint needs the user, for every model alike
        except Exception as e:  # one model failing (weights, OOM, a bug) must not lose the others
            message = str(e) if isinstance(e, VisionpocError) else f"{type(e).__name__}: {e}"
            log.error("model %s failed: %s", mcfg.label, message)
            log.debug("%s", traceback.format_exc())
            result = ModelResult(
                label=mcfg.label,
                timm=mcfg.timm,
                finetune=mcfg.finetune,
                pretrained=mcfg.pretrained,
                status="failed",
                error=message,
                preset=mcfg.preset,
                policy=mcfg.policy,
            )
        results.models.append(result)
        if d.main:
            save_results(results, out_dir)
    return results


def run_repeats(cfg: Config, out_dir: Path, labels: list[str] | None = None, resume: bool = False) -> list[RunResults]:
    """`run_compare` once per seed of `cfg.train.repeats` (seed, seed+1, ...), each a whole run in
    `out_dir/seed-<s>/` on the same splits (the first seed's); `out_dir` holds the config and the list.

    With `resume`, finished repeats are kept and an interrupted one continues from its checkpoints.
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
        load_data(cfg)  # a data error before the run starts leaves no config.yaml, as in run_compare
        save_config(cfg, out_dir / CONFIG_FILE)
        save_repeats(out_dir, seeds, labels)  # a resumed run may have changed train.repeats
    runs = []
    for k, seed in enumerate(seeds):
        one = replace(
            cfg, data=replace(cfg.data, split_seed=_split_seed(cfg)), train=replace(cfg.train, seed=seed, repeats=1)
        )
        sub = out_dir / repeat_dir(seed)
        log.info("=== repeat %d of %d: seed %d, in %s", k + 1, len(seeds), seed, sub)
        runs.append(run_compare(one, sub, labels, resume=resume and (sub / CONFIG_FILE).is_file()))
    return runs


def warn_imagenet_overlap(chosen: list[ModelConfig]) -> list[str]:
    """Log (and return) the pretrained models whose pretraining data contains ImageNet, from which
    Stanford Dogs was built: they may have seen its test images."""
    from visionpoc.presets.facts import may_have_seen_imagenet, tagged_name

    flagged = []
    for m in chosen:
        if not m.pretrained or m.pretrained_path:
            continue
        name = tagged_name(m.timm)  # an untagged name loads timm's default tag
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
    return "-" if v is None else format(v, spec)


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
