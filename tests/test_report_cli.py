"""The report through the CLI: `visionpoc report RUN_DIR` on a finished run, and `compare` writing it at
the end (without --no-report). Tiny models, one epoch: the wiring is under test, not the numbers."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from test_compare import write_config
from test_report import _decode_all, _summary_rows
from visionpoc.cli import main


def test_cli_report_writes_html_and_markdown(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)  # the shared run stays as it is for the other tests
    for name in ("report.html", "report.md", "report_files"):
        assert not (run / name).exists()
    assert main(["report", str(run)]) == 0
    assert f"report: {run / 'report.html'}" in capsys.readouterr().out
    html, md = (run / "report.html").read_text(), (run / "report.md").read_text()
    assert list(_summary_rows(html)) == ["cnn", "vit"]
    assert len(_decode_all(html)) >= 4  # curves, time, scatter, saliency (+ gallery if they disagree)
    notes = re.findall(r'<p class="note">((?:cnn|vit): [^<]*)</p>', html)
    assert [n.split(",")[0] for n in notes] == ["cnn: Grad-CAM", "vit: attention rollout"]
    assert md.startswith("# Model comparison: cnn, vit") and "## 7. Environment" in md
    assert sorted(p.name for p in (run / "report_files").glob("*.png"))  # the Markdown's figures


@pytest.mark.slow
def test_cli_compare_ends_with_the_report(mini_dogs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = [
        {"label": "tiny_cnn", "timm": "test_resnet", "pretrained": False, "img_size": 32},
        {
            "label": "tiny_vit",
            "timm": "vit_tiny_patch16_224",
            "pretrained": False,
            "img_size": 32,
            "model_kwargs": {"depth": 1},
        },
    ]
    cfg = write_config(tmp_path / "c.yaml", mini_dogs, models=models, epochs=1)
    out = tmp_path / "run"
    assert main(["compare", "--config", str(cfg), "--out", str(out)]) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    html = (out / "report.html").read_text()
    assert list(_summary_rows(html)) == ["tiny_cnn", "tiny_vit"]
    assert "tiny_vit vs tiny_cnn" in html and (out / "report.md").is_file()
