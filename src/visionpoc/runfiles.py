"""The names of the files in a run folder, and in a `visionpoc tune` folder: one spelling for the code that
writes them (compare, train, the report, tune) and the code that reads them (resume, the report, tracking,
serving). A model's checkpoints are named by `visionpoc.checkpoint` (BEST, LAST, STATE), and a repeat's
`seed-<s>/` folder by `visionpoc.repeats.repeat_dir`. Imports nothing of ours.
"""

from __future__ import annotations

# RUN_DIR/ of `compare` or `train` (a run with repeats: RUN_DIR/ and each RUN_DIR/seed-<s>/)
CONFIG_FILE = "config.yaml"  # the resolved config; its presence marks a started run
RESULTS_FILE = "results.json"
RESULTS_CSV = "results.csv"  # one row per model, for a spreadsheet
REPEATS_FILE = "repeats.json"  # a run with repeats (`train.repeats`): the seeds, one whole run each
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
REPORT_FILES_DIR = "report_files"  # the report's figures as PNG files, for report.md
RUN_TUNING_DIR = "tuning"  # `compare --tuned`: the tuning records and figures the report shows
EXPORT_DIR = "export"  # `visionpoc export`'s default output folder

# RUN_DIR/<label>/: one model (its checkpoints: `visionpoc.checkpoint`)
PREDICTIONS_FILE = "test_predictions.npz"
HISTORY_FILE = "history.json"  # the learning curves, epoch by epoch
DATA_CONFIG_FILE = "data_config.json"  # the preprocessing the model was trained and scored with

# OUT/ of `visionpoc tune`
TUNED_DIR = "tuned"  # tuned/<label>.yaml: the best trial's settings
TUNE_SUMMARY_FILE = "tune_summary.json"  # also in RUN_DIR/tuning/
TUNE_PLOTS_DIR = "plots"  # plots/<label>_<kind>.png (`tuning_plot`); copied flat into RUN_DIR/tuning/
TUNE_PLOTS = ("history", "importance")  # the kinds of figure each study gets
TUNE_DB_FILE = "tune.db"  # the default Optuna storage (SQLite)
TRIALS_DIR = "trials"  # trials/<label>/<number>/: each trial's training folder


def tuned_file(label: str) -> str:
    """The name of model `label`'s file in `tuned/`."""
    return f"{label}.yaml"


def tuning_plot(label: str, kind: str) -> str:
    """The name of model `label`'s figure of `kind` (one of `TUNE_PLOTS`)."""
    return f"{label}_{kind}.png"
