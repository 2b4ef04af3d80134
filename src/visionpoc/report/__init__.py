"""The report: read a finished run's files and write `report.html` (self-contained) and `report.md`.

`write_report(run_dir)` is the entry point; it never retrains. Modules: `inputs` (predictions and test
images), `stats` (McNemar, bootstrap intervals, verdicts), `plots` (matplotlib figures), `labels` (point labels placed without overlap), `pictures`
(disagreement gallery, saliency maps), `caveats`, `tuning`, `budget` (each model's training budget, its
linear-probe grid and the loop's diagnoses), `build` (the `Report` value), `across_seeds`
(the report of a run with repeats: the `SeedsReport` value) and `render` (Jinja2).
"""

from visionpoc.report.render import write_report

__all__ = ["write_report"]
