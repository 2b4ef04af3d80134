"""The PoC: read (or download) the dataset, split it once, then fine-tune every model through the same
loop on the same splits, and write `results.json`, `results.csv`, `config.yaml` and one folder per
model. A model that fails is recorded with its error; the others still run and are reported.
"""

from __future__ import annotations

import datetime as dt
import logging
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from visionpoc import distributed
from visionpoc.config import Config, ModelConfig, save_config, to_dict
from visionpoc.data.sources import Dataset, read_dataset
from visionpoc.data.splits import Splits, make_splits
from visionpoc.errors import CheckpointError, ConfigError, DataError, TrainingInterrupted, VisionpocError
from visionpoc.recovery import resume_hint
from visionpoc.repeats import read_repeats, repeat_dir, save_repeats, spread
from visionpoc.results import (
    RESULTS_FILE,
    DatasetInfo,
    ModelResult,
    RunResults,
    environment,
    load_results,
    save_results,
)
from visionpoc.train import fit, resolve_device

log = logging.getLogger(__name__)


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
    if (Path(out_dir) / "config.yaml").exists():
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
        save_config(cfg, out_dir / "config.yaml")  # the run starts: a data error before it leaves none
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
        save_config(cfg, out_dir / "config.yaml")
        save_repeats(out_dir, seeds, labels)  # a resumed run may have changed train.repeats
    runs = []
    for k, seed in enumerate(seeds):
        one = replace(
            cfg, data=replace(cfg.data, split_seed=_split_seed(cfg)), train=replace(cfg.train, seed=seed, repeats=1)
        )
        sub = out_dir / repeat_dir(seed)
        log.info("=== repeat %d of %d: seed %d, in %s", k + 1, len(seeds), seed, sub)
        runs.append(run_compare(one, sub, labels, resume=resume and (sub / "config.yaml").is_file()))
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
    """The seed's table (model, train time, train acc, test acc) plus top-5 and macro-F1."""
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
