"""Command line: parse arguments, set up logging, call the library, print its answer. No logic here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from visionpoc.errors import TrainingInterrupted, VisionpocError, user_message

log = logging.getLogger("visionpoc")


def _add_config_args(p: argparse.ArgumentParser, config_required: bool = False, resume: bool = True) -> None:
    p.add_argument("--config", type=Path, required=config_required, help="YAML config (default: built-in PoC)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 --set models.1.lr=5e-5",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<command>-<time>)")
    if resume:  # not for tune: running the same tune command again continues its study
        p.add_argument(
            "--resume",
            type=Path,
            default=None,
            metavar="RUN_DIR",
            help="continue an interrupted run from its checkpoints (its config.yaml is used)",
        )


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An argparse type: a number of `kind` above zero, or a usage error (exit code 2)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above zero, got {text}")
        return value

    return parse


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free port) to 65535."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    from visionpoc import __version__

    parser = argparse.ArgumentParser(
        prog="visionpoc",
        description="Is the newer vision model worth it? Fine-tune it and your production baseline on the "
        "same data, with the same loop and budget, and compare training time, accuracy and whether the "
        "difference is real. `visionpoc compare` runs the default PoC (Stanford Dogs, Xception vs ViT-B/16).",
    )
    parser.add_argument("--version", action="version", version=f"visionpoc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_data_parser, _compare_parser, _tune_parser, _train_parser, _evaluate_parser, _report_parser):
        add(sub)
    for add in (_predict_parser, _serve_parser, _export_parser, _bench_parser, _models_parser, _demo_parser):
        add(sub)
    return parser


def _data_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    data = sub.add_parser("data", help="download or check a dataset").add_subparsers(dest="data_command", required=True)
    dl = data.add_parser("download", help="fetch and extract Stanford Dogs (resumable, atomic)")
    dl.add_argument("--root", type=Path, default=Path("data/stanford_dogs"))
    dl.add_argument("--base-url", default=None, help="mirror URL (also $VISIONPOC_DOGS_URL)")
    dl.add_argument("--from", dest="from_dir", type=Path, default=None, help="folder holding the three tars")
    ck = data.add_parser("check", help="validate a dataset tree and print what was found")
    ck.add_argument("--root", type=Path, default=Path("data/stanford_dogs"))
    ck.add_argument(
        "--source", choices=["stanford_dogs", "folder", "manifest", "hf", "webdataset"], default="stanford_dogs"
    )
    ck.add_argument("--image-column", default="image", help="hf: the column of the images")
    ck.add_argument("--label-column", default="label", help="hf: the column of the labels")
    ck.add_argument("--class-names", type=Path, default=None, help="a data.class_names file (CSV or JSON) to check")
    ck.add_argument("--json", action="store_true", help="print one JSON object")
    ck.add_argument(
        "--decode", action="store_true", help="also decode every image (in parallel) and list every file that fails"
    )
    ck.add_argument("--workers", type=int, default=None, help="processes for --decode (default: min(8, CPUs))")


def _compare_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmp_ = sub.add_parser("compare", help="the PoC: train and compare every model of the config")
    _add_config_args(cmp_)
    cmp_.add_argument("--no-report", action="store_true", help="skip writing report.html / report.md")
    _add_dry_run(cmp_)
    cmp_.add_argument(
        "--tuned",
        type=Path,
        default=None,
        metavar="DIR",
        help="use each model's best params from a `visionpoc tune` output folder",
    )


def _tune_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tn = sub.add_parser("tune", help="Optuna search of one model's hyper-parameters on validation accuracy")
    _add_config_args(tn, resume=False)  # to continue a study, run the same command again
    tn.add_argument("--model", required=True, help="label of the model in the config")
    tn.add_argument(
        "--trials",
        type=int,
        default=None,
        metavar="N",
        help="the study's target of finished (complete or pruned) trials, shared by every worker "
        "on the storage; a rerun tops it up to N (default: tune.trials)",
    )
    tn.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///OUT/tune.db)")
    tn.add_argument("--study", default=None, help="study name (default: the model label)")
    tn.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")


def _train_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tr = sub.add_parser("train", help="train one model of the config alone, through the same loop")
    _add_config_args(tr)
    tr.add_argument("--model", required=True, help="label of the model in the config")
    _add_dry_run(tr)


def _add_dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check every model, weights file and the data, print the plan (models, lr, steps, data) and "
        "exit: nothing trains, nothing is written",
    )


def _evaluate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ev = sub.add_parser("evaluate", help="score a deployed ONNX file or a run's model on a dataset split")
    ev.add_argument(
        "--model", type=Path, required=True, help="a .onnx file, a `visionpoc export` folder or a run folder"
    )
    ev.add_argument("--label", default=None, help="the model's name in the results (default: the file's or model's)")
    ev.add_argument("--model-label", default=None, help="a run folder: which of its models (default: its only one)")
    ev.add_argument(
        "--preprocess", default=None, help="ONNX file: a YAML file or mapping, e.g. '{size: 299, layout: NHWC}'"
    )
    ev.add_argument("--classes", default=None, help="ONNX file: class name per output (a text or JSON file)")
    ev.add_argument("--split", choices=["test", "val", "train"], default="test", help="test also scores val (default)")
    ev.add_argument("--data", type=Path, default=None, help="dataset root (sets data.root)")
    ev.add_argument("--source", default=None, help="dataset source (sets data.source), e.g. folder")
    _add_config_args(ev, resume=False)
    ev.add_argument("--no-report", action="store_true", help="skip writing report.html / report.md")
    ev.add_argument(
        "--no-price", action="store_true", help="skip measuring its price at inference (as inference.enabled: false)"
    )


def _evaluate(args: argparse.Namespace) -> int:
    from visionpoc.config import load_config
    from visionpoc.preflight import default_out

    sets = [f"data.root={args.data}"] * (args.data is not None) + [f"data.source={args.source}"] * bool(args.source)
    cfg = load_config(args.config, [*args.overrides, *sets])
    from visionpoc.deployed.rescore import run_evaluate

    out = args.out or default_out("evaluate")
    done = run_evaluate(
        args.model, cfg, out, args.label, args.split, args.preprocess, args.classes, args.model_label, not args.no_price
    )
    m = done.result
    scores = ", ".join(
        f"{name} accuracy {v:.4f}" for name in ("train", "val", "test") if (v := getattr(m, f"{name}_accuracy"))
    )
    print(f"{m.label} ({m.timm}): {scores or 'nothing scored'}" + (f"; added to {out}" if done.added else ""))
    if m.inference is not None:
        from visionpoc.inference.cost import summary

        print(f"price at inference: {summary(m.inference)}")
    if not args.no_report and m.test_accuracy is not None:
        _write_report(out)
    print(f"results: {out / 'results.json'}")
    return 0


def _report_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rp = sub.add_parser("report", help="write report.html and report.md for a finished run")
    rp.add_argument("run_dir", type=Path)
    rp.add_argument(
        "--mlflow-uri",
        default=None,
        metavar="URI",
        help="also log the run to this MLflow tracking URI (e.g. sqlite:///mlflow.db)",
    )
    rp.add_argument("--mlflow-experiment", default="visionpoc", metavar="NAME", help="MLflow experiment name")


def _predict_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pr = sub.add_parser("predict", help="each model's top-k for your images, side by side")
    pr.add_argument("run_dir", type=Path)
    pr.add_argument("images", type=Path, nargs="+", metavar="IMAGE_OR_DIR")
    pr.add_argument("--top", type=_positive(int), default=5, help="classes per model (default 5)")
    pr.add_argument("--json", action="store_true", help="machine-readable output")


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sv = sub.add_parser("serve", help="web API and demo page for the models of a run")
    sv.add_argument("run_dir", type=Path)
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    sv.add_argument("--port", type=_port, default=8000)
    sv.add_argument(
        "--max-upload-mb", type=_positive(float), default=10, help="larger uploads are refused with 413 (default 10)"
    )
    sv.add_argument("--title", default=None, help="the demo page's title (default: from the run's dataset)")
    sv.add_argument(
        "--max-queue", type=_positive(int), default=16, help="uploads that may wait for a slot; more get 503 (16)"
    )
    sv.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also accept this Host name (repeatable; on loopback only localhost, 127.0.0.1 and [::1] by default)",
    )


def _export_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ex = sub.add_parser("export", help="write a deployable model (ONNX or safetensors) with its preprocessing")
    ex.add_argument("run_dir", type=Path)
    ex.add_argument("--format", dest="fmt", choices=["onnx", "safetensors"], required=True)
    ex.add_argument("--model", default=None, help="only this label (default: every model)")
    ex.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/export")


def _bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bn = sub.add_parser("bench", help="our training step and input path vs the peers, in one process")
    bn.add_argument("--smoke", action="store_true", help="tiny sizes: runs on the CPU in seconds")
    bn.add_argument("--device", default="auto")
    bn.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    bn.add_argument(
        "--sections", default=None, help="comma-separated subset of peer,hf,input,ours,probe,plain (default: all)"
    )


def _models_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ml = sub.add_parser("models", help="list the model presets: params, GFLOPs, pretraining data, licence")
    ml.add_argument("--family", default=None, help="only this family (e.g. dinov3, siglip2, vit)")
    ml.add_argument("--json", action="store_true", help="print JSON rows (every column)")
    ml.add_argument(
        "--wide", action="store_true", help="every column: family, params, GFLOPs, pretraining data, each policy's lr"
    )


def _demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dm = sub.add_parser(
        "demo", help="a whole comparison in about a minute on a CPU, offline: a CNN vs a ViT on handwritten digits"
    )
    dm.add_argument("--out", type=Path, default=None, help="folder for the digits and the run (default: runs/demo)")
    dm.add_argument("--serve", action="store_true", help="then start the demo page on 127.0.0.1 (Ctrl-C stops it)")
    dm.add_argument("--port", type=_port, default=8000, help="the demo page's port with --serve (0: any free port)")


def _data_download(args: argparse.Namespace) -> int:
    from visionpoc.data.download import download_stanford_dogs

    root = download_stanford_dogs(args.root, base_url=args.base_url, from_dir=args.from_dir)
    print(f"Stanford Dogs ready in {root}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from visionpoc.config import DataConfig
    from visionpoc.data.sources import read_dataset
    from visionpoc.data.splits import make_splits

    options = DataConfig(image_column=args.image_column, label_column=args.label_column)
    ds = read_dataset(args.source, args.root, args.class_names, options)
    make_splits(ds, DataConfig().val_fraction, None, 0)  # e.g. a class with one training image: said now
    summary: dict[str, Any] = {
        "source": ds.source,
        "root": str(ds.root),
        "train": len(ds.train),
        **({"val": len(ds.val)} if ds.val is not None else {}),  # the source's own validation split
        "test": len(ds.test),
        "classes": ds.num_classes,
        "class_names": ds.class_names,
    }
    if args.decode:
        from visionpoc.data.images import undecodable
        from visionpoc.data.loaders import default_workers

        workers = default_workers(DataConfig(num_workers=args.workers))
        parts = [s for s in (ds.train, ds.val, ds.test) if s is not None]
        paths = [s.path(i) for s in parts if s.shards is None for i in range(len(s))]
        summary["undecodable"] = undecodable(paths, workers)
        for streamed in (s for s in parts if s.shards is not None):  # webdataset's training split: in its shards
            from visionpoc.data.shard_stream import undecodable_samples

            summary["undecodable"] += undecodable_samples(streamed, workers)
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{ds.source} dataset in {ds.root}: {len(ds.train)} train / "
            + (f"{len(ds.val)} val / " if ds.val is not None else "")
            + f"{len(ds.test)} test images, "
            f"{ds.num_classes} classes ({', '.join(ds.class_names[:5])}{', ...' if ds.num_classes > 5 else ''})"
        )
        if args.decode:
            bad = summary["undecodable"]
            print(f"decoded every image: {len(bad)} failed" + "".join(f"\n  {e}" for e in bad))
    return 2 if summary.get("undecodable") else 0


def _run(args: argparse.Namespace, labels: list[str] | None, tuned: Path | None) -> int:
    from visionpoc.preflight import elastic_resume, format_plan, settings  # no torch, no timm: errors at once

    # a worker that torchrun (re)started for a run its --out already holds continues it
    elastic = None if args.resume or args.dry_run else elastic_resume(args.config, args.overrides, args.out, tuned)
    config, out_arg, resume_dir = (None, None, elastic) if elastic else (args.config, args.out, args.resume)
    resume = resume_dir is not None
    cfg, out = settings(args.command, config, args.overrides, out_arg, resume_dir, tuned, labels, args.dry_run)
    from visionpoc.compare import dry_run, format_runs, run
    from visionpoc.repeats import run_folders
    from visionpoc.runfiles import RESULTS_FILE

    if args.dry_run:
        print(format_plan(dry_run(args.command, cfg, out, resume, labels)))
        return 0
    done = run(args.command, cfg, out, resume, labels)
    if not done.main:  # under torchrun only rank 0 speaks for the run
        return 0
    print(format_runs(done.runs))
    if args.command == "compare" and not args.no_report:
        try:
            _write_report(done.out_dir)
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                "interrupted while writing the report; the results are saved: write it with: "
                f"visionpoc report {done.out_dir}"
            ) from None
    print("results: " + ", ".join(str(f / RESULTS_FILE) for f in run_folders(done.out_dir)))
    ok = done.ok
    if done.tracking.mlflow_uri is not None:
        ok = _log_mlflow(done.out_dir, done.tracking.mlflow_uri, done.tracking.experiment) and ok
    return 0 if ok else 1


def _log_mlflow(run_dir: Path, uri: str, experiment: str) -> bool:
    """Log a finished run (a run with repeats: one MLflow run per seed) to MLflow; a tracking failure is
    reported, and the run's files stay as they are."""
    from visionpoc.repeats import run_folders
    from visionpoc.report.tracking import log_run

    for folder in run_folders(run_dir):
        log.info("logging %s to MLflow at %s", folder, uri)
        try:
            run_id = log_run(folder, uri, experiment)
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                f"interrupted while logging to MLflow; the run is saved in {run_dir}; log it "
                f"with: visionpoc report {run_dir} --mlflow-uri {uri}"
            ) from None
        except Exception as e:  # the server is down, the store is read-only, ...: the run itself is saved
            print(
                f"error: MLflow logging to {uri} failed ({type(e).__name__}: {e}); the run is saved in "
                f"{run_dir}; log it later with: visionpoc report {run_dir} --mlflow-uri {uri}",
                file=sys.stderr,
            )
            return False
        print(f"mlflow: run {run_id} ({folder}) in experiment {experiment!r} at {uri}")
    return True


def _predict(args: argparse.Namespace) -> int:
    from visionpoc.serving.predict import Predictor, format_predictions

    rows = Predictor(args.run_dir).predict_paths(args.images, top=args.top)
    print(json.dumps(rows, indent=2) if args.json else format_predictions(rows))
    return 1 if any("error" in r for r in rows) else 0


def _export(args: argparse.Namespace) -> int:
    from visionpoc.serving.export import export, read_onnx_check

    for path in export(args.run_dir, args.fmt, label=args.model, out=args.out):
        print(f"wrote {path}")
        if path.suffix == ".onnx":
            print(read_onnx_check(path))
    return 0


def _tune(args: argparse.Namespace) -> int:
    from visionpoc import distributed
    from visionpoc.config import load_config
    from visionpoc.preflight import default_out
    from visionpoc.report.tuning import tie_advice
    from visionpoc.runfiles import TUNED_DIR, tuned_file
    from visionpoc.tuning.outputs import TS, best_trial, tied_value
    from visionpoc.tuning.search import run_tune

    cfg = load_config(args.config, args.overrides)
    out = args.out or default_out("tune")
    d = distributed.from_env()
    try:
        study = run_tune(
            cfg,
            args.model,
            trials=args.trials,
            storage=args.storage,
            study=args.study,
            timeout=args.timeout,
            out_dir=out,
        )
    finally:
        distributed.shutdown(d)  # a no-op for one process
    if not d.main:  # under torchrun only rank 0 speaks for the study
        return 0
    best = best_trial(study)  # the trial the tuned YAML records
    tie = tied_value(study)
    if tie is not None:  # nothing to choose between the trials: naming one the winner would be noise
        n = len(study.get_trials(deepcopy=False, states=(TS.COMPLETE,)))
        print(
            f"all {n} completed trials of study {study.study_name!r} scored {tie:.3f} validation accuracy: the search "
            f"found nothing to choose between them; no tuned settings written (the defaults stand); {tie_advice(tie)}",
            file=sys.stderr,
        )
        return 1
    if best is None:
        print(
            f"{len(study.trials)} trials in study {study.study_name!r}, none completed: no tuned settings "
            "written; run the same command again to add trials",
            file=sys.stderr,
        )
        return 1
    print(
        f"{len(study.trials)} trials in study {study.study_name!r}; best validation accuracy "
        f"{best.value:.4f} (trial {best.number}) with {best.params}"
    )
    print(f"best params: {out / TUNED_DIR / tuned_file(args.model)}; use them with: visionpoc compare --tuned {out}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from visionpoc.presets import facts as presets

    rows = presets.list_presets(args.family, figures=args.wide or args.json)  # figures: each model built
    print(json.dumps(rows, indent=2) if args.json else presets.format_models_table(rows, wide=args.wide))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from visionpoc.compare import format_table
    from visionpoc.demo.run import PAGE_TITLE, free_port, next_steps, run_demo

    with _sigterm_interrupts():
        demo = run_demo(args.out)
    print(format_table(demo.results))
    print("\n".join(["bottom line:", *(f"  {line}" for line in demo.bottom_line)]))
    print(next_steps(demo))
    if not args.serve:
        return 0 if demo.ok else 1
    from visionpoc.serving.app import serve

    port = free_port(args.port)
    print(f"demo page: http://127.0.0.1:{port}/ (Ctrl-C stops it)", flush=True)
    serve(demo.run_dir, host="127.0.0.1", port=port, title=PAGE_TITLE)
    return 0 if demo.ok else 1


def _write_report(run_dir: Path) -> None:
    from visionpoc.report import write_report

    log.info("writing the report (figures, statistics) in %s", run_dir)  # a phase of its own: not silent
    html = write_report(run_dir)
    print(f"report: {html}")


def _warning_line(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """A library's warning (Optuna's, timm's, torch's) as one log line in the log's format."""
    text = " ".join(str(message).split())
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, text, Path(filename).name, lineno)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends the command like Ctrl-C (KeyboardInterrupt: a message and exit code 130) wherever it
    lands outside the training loop (a model being built or scored, data loading, the report), instead of
    the silent exit 143 of Python's default; inside the loop `recovery.stop_on_signals` makes it a
    clean stop at the next step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), os.environ.get("RANK", "0")
    speaker = f" [rank {rank}/{world}]" if world > 1 else ""  # under torchrun, say which process speaks
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s{speaker} %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    warnings.showwarning = _warning_line  # not Python's two-line format, between the log's lines
    try:
        if args.command == "serve":  # uvicorn handles its signals itself
            from visionpoc.serving.app import serve

            serve(
                args.run_dir,
                host=args.host,
                port=args.port,
                max_upload_mb=args.max_upload_mb,
                title=args.title,
                max_queue=args.max_queue,
                allowed_hosts=args.allowed_host,
            )
            return 0
        if args.command == "demo":  # the run as below; then, with --serve, uvicorn handles its signals
            return _demo(args)
        with _sigterm_interrupts():  # SIGTERM anywhere: the message and exit code of Ctrl-C, not a silent 143
            return _command(args)
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except VisionpocError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _command(args: argparse.Namespace) -> int:
    if args.command == "data":
        return _data_download(args) if args.data_command == "download" else _data_check(args)
    if args.command == "compare":
        return _run(args, None, args.tuned)
    if args.command == "train":
        return _run(args, [args.model], None)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "report":
        from visionpoc.report.tracking import require_mlflow

        require_mlflow(args.mlflow_uri)
        _write_report(args.run_dir)
        if args.mlflow_uri is not None:
            return 0 if _log_mlflow(args.run_dir, args.mlflow_uri, args.mlflow_experiment) else 1
        return 0
    if args.command == "tune":
        return _tune(args)
    if args.command == "models":
        return _models(args)
    if args.command == "predict":
        return _predict(args)
    if args.command == "export":
        return _export(args)
    if args.command == "bench":
        from visionpoc.bench.run import format_bench, run_bench

        sections = args.sections.split(",") if args.sections else None
        print(format_bench(run_bench(smoke=args.smoke, device=args.device, out=args.out, sections=sections)))
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
