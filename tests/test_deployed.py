"""The production model as it is deployed: an `onnx:` entry scored (not trained), its checks, the report's
verdict against it, and `visionpoc evaluate`. The ONNX files are made here: a timm model exported with
torch, and an NHWC/BGR model built with the `onnx` helper API whose predictions are computable by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from visionpoc.cli import main
from visionpoc.compare import load_data
from visionpoc.config import ModelConfig, PreprocessConfig, load_config
from visionpoc.deployed import score, spec
from visionpoc.errors import ConfigError
from visionpoc.preflight import class_map_problems, model_problems
from visionpoc.results import load_predictions, load_results

NAMES = ["Chihuahua", "Shih-Tzu", "Afghan hound"]  # the mini dogs' classes (tests/dogs_fixture.py), in order
# BGR input: channel 0 is blue, 1 green, 2 red; the breeds are red, green and blue (dogs_fixture.COLOURS)
BGR_WEIGHTS = np.array([[4, 0, 0, 1], [0, 4, 0, 0], [0, 0, 4, 1]], dtype=np.float32)  # (3, 4): 4 outputs
BGR_CLASSES = ["Afghan_hound", "n02086240-Shih-Tzu", "chihuahua", "tabby cat"]  # names, folders, loose; one extra
NHWC = PreprocessConfig(
    size=32, crop="squash", mean=(0.4, 0.45, 0.5), std=(0.25, 0.2, 0.3), channels="BGR", layout="NHWC"
)


def nhwc_model(path: Path, weights: np.ndarray, size: int = 32) -> Path:
    """(N, size, size, 3) -> mean over H and W -> (N, 3) @ weights (3, K): scores a hand computation checks."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", size, size, 3])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", weights.shape[1]])
    init = [
        numpy_helper.from_array(weights.astype(np.float32), "W"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes"], ["pooled"], keepdims=0),  # (N, 3)
        helper.make_node("MatMul", ["pooled", "W"], ["scores"]),  # (N, K)
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "nhwc", [x], [y], init), opset_imports=[helper.make_opsetid("", 18)]
    )
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def yaml_entry(label: str, onnx_path: Path, classes: object, pp: PreprocessConfig) -> str:
    pre = {k: list(v) if isinstance(v, tuple) else v for k, v in pp.__dict__.items()}
    return "  - " + json.dumps({"label": label, "onnx": str(onnx_path), "classes": classes, "preprocess": pre}) + "\n"


def write_config(path: Path, dogs: Path, entries: str, extra: str = "") -> Path:
    path.write_text(
        f"data: {{source: stanford_dogs, root: '{dogs}', val_fraction: 0.2, num_workers: 0, download: false}}\n"
        f"models:\n{entries}"
        "train: {epochs: 2, batch_size: 8, lr: 0.003, warmup_epochs: 0.5}\n" + extra
    )
    return path


@pytest.fixture
def bgr_onnx(tmp_path: Path) -> Path:
    return nhwc_model(tmp_path / "prod.onnx", BGR_WEIGHTS)


# ------------------------------------------------------------------------------ (a) a timm model exported


def test_a_timm_model_exported_to_onnx_scores_as_in_pytorch(mini_dogs: Path, tmp_path: Path) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    path = tmp_path / "timm.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 40, 40),),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
        dynamo=False,
    )
    pp = PreprocessConfig(size=40, resize=44)
    mcfg = ModelConfig(label="prod", onnx=str(path), preprocess=pp, classes=tuple(NAMES))
    keys = spec.entry_keys(0)
    deployed = score.open_deployed(mcfg, keys)
    _, splits = load_data(load_config(write_config(tmp_path / "c.yaml", mini_dogs, yaml_entry("p", path, NAMES, pp))))
    scores, _ = score.model_scores(deployed, splits.test, 0, "test")  # (9, 3) logits from ONNX Runtime

    from visionpoc.data.images import load_rgb

    x = torch.stack([score.image_transform(pp)(load_rgb(splits.test.path(i))) for i in range(len(splits.test))])
    x = torch.from_numpy(score.model_input(x.numpy(), pp))  # the same images, through PyTorch
    with torch.no_grad():
        want = model(x).numpy()
    assert scores.shape == (len(splits.test), 3)
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)
    probs = score.to_probs(scores)  # logits: a softmax
    np.testing.assert_allclose(probs, torch.from_numpy(want).softmax(1).numpy(), atol=1e-5)
    match = spec.match_classes(list(NAMES), splits.class_names, NAMES, keys)
    stats = score.score_split(deployed, match, splits.test, 3, 0, "test")
    assert stats.accuracy == pytest.approx(float((want.argmax(1) == splits.test.labels).mean()))


# ------------------------------------------------------------------------------ (b) NHWC, BGR, by hand


def by_hand(paths: list[Path], pp: PreprocessConfig, weights: np.ndarray) -> np.ndarray:
    """The NHWC model's probabilities in numpy: squash-resize, channel means, BGR, mean/std, @ W, softmax."""
    rows = []
    for p in paths:
        img = Image.open(p).convert("RGB").resize((pp.size, pp.size), Image.Resampling.BILINEAR)
        rgb = np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0) / 255.0  # (3,)
        bgr = rgb[::-1]
        rows.append(((bgr - np.array(pp.mean)) / np.array(pp.std)) @ weights)
    z = np.array(rows)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)  # (N, K)


def test_an_nhwc_bgr_model_scores_as_computed_by_hand(mini_dogs: Path, tmp_path: Path, bgr_onnx: Path) -> None:
    cfg_path = write_config(tmp_path / "c.yaml", mini_dogs, yaml_entry("production", bgr_onnx, BGR_CLASSES, NHWC))
    cfg = load_config(cfg_path)
    ds, splits = load_data(cfg)
    result = score.score_deployed(
        cfg, cfg.models[0], splits, ds.class_folders, tmp_path / "production", spec.entry_keys(0)
    )
    saved = load_predictions(tmp_path / "production" / "test_predictions.npz")

    raw = by_hand([splits.test.path(i) for i in range(len(splits.test))], NHWC, BGR_WEIGHTS)  # (9, 4)
    # outputs: Afghan hound, Shih-Tzu, Chihuahua, tabby cat (dropped) -> the dataset's order, renormalised
    want = raw[:, [2, 1, 0]] / raw[:, :3].sum(1, keepdims=True)
    np.testing.assert_allclose(saved["probs"], want, atol=2e-3)  # PIL's and torchvision's resize agree closely
    assert (saved["preds"] == want.argmax(1)).all()
    assert result.test_accuracy == pytest.approx(float((want.argmax(1) == splits.test.labels).mean()))
    assert result.test_accuracy > 0.6  # the colours decide: the hand-made model is a good classifier
    assert (result.finetune, result.timm, result.classes_ignored) == ("deployed", str(bgr_onnx), ["tabby cat"])
    assert result.train_accuracy is None and result.val_accuracy is not None and result.params == 12 + 2


def test_probabilities_are_kept_when_the_model_outputs_them() -> None:
    p = np.array([[0.2, 0.8], [0.5, 0.5]])
    np.testing.assert_allclose(score.to_probs(p), p)
    logits = np.array([[2.0, -1.0], [0.1, 0.3]])
    np.testing.assert_allclose(score.to_probs(logits).sum(1), 1.0)
    assert score.to_probs(logits)[0, 0] > 0.9


# ------------------------------------------------------------------------------ (c) bad input


def problems_of(tmp_path: Path, dogs: Path, onnx_path: Path, classes: object, pp: PreprocessConfig) -> list[str]:
    cfg = load_config(write_config(tmp_path / "c.yaml", dogs, yaml_entry("prod", onnx_path, classes, pp)))
    return model_problems(cfg)


def test_a_missing_file_names_the_key(mini_dogs: Path, tmp_path: Path) -> None:
    (found,) = problems_of(tmp_path, mini_dogs, tmp_path / "nope.onnx", NAMES, NHWC)
    assert "models.0.onnx" in found and "nope.onnx not found" in found


def test_an_input_that_disagrees_with_preprocess_names_the_key(mini_dogs: Path, tmp_path: Path, bgr_onnx: Path) -> None:
    (size,) = problems_of(tmp_path, mini_dogs, bgr_onnx, BGR_CLASSES, PreprocessConfig(size=64, layout="NHWC"))
    assert "models.0.preprocess.size is 64" in size and "32x32" in size and "set `size: 32`" in size
    (layout,) = problems_of(tmp_path, mini_dogs, bgr_onnx, BGR_CLASSES, PreprocessConfig(size=32))
    assert "models.0.preprocess.layout is NCHW" in layout and "set `layout: NHWC`" in layout


def test_an_output_size_that_disagrees_with_classes_names_the_key(
    mini_dogs: Path, tmp_path: Path, bgr_onnx: Path
) -> None:
    (found,) = problems_of(tmp_path, mini_dogs, bgr_onnx, NAMES, NHWC)  # 3 names, 4 outputs
    assert "models.0.classes: 3 class names" in found and "4 scores per image" in found
    names = tmp_path / "names.txt"
    names.write_text("a\n\nb\nc\nd\n")
    (found,) = problems_of(tmp_path, mini_dogs, bgr_onnx, str(names), NHWC)
    assert "models.0.classes" in found and "empty line" in found


def test_class_files_are_read_as_lines_json_lists_and_index_maps(tmp_path: Path) -> None:
    keys = spec.entry_keys(3)
    (tmp_path / "a.txt").write_text("x\ny\n")
    (tmp_path / "b.json").write_text('["x", "y"]')
    (tmp_path / "c.json").write_text('{"1": "y", "0": "x"}')
    for f in ("a.txt", "b.json", "c.json"):
        assert spec.read_classes(str(tmp_path / f), keys) == ["x", "y"]
    (tmp_path / "d.json").write_text('{"0": "x", "2": "y"}')
    with pytest.raises(ConfigError, match=r"models\.3\.classes: .*every output index from 0"):
        spec.read_classes(str(tmp_path / "d.json"), keys)


def test_class_maps_that_do_not_overlap_are_refused_and_partial_ones_reported(mini_dogs: Path, tmp_path: Path) -> None:
    keys = spec.entry_keys(0)
    folders = [f"n0{i}-{n}" for i, n in enumerate(NAMES)]
    with pytest.raises(ConfigError, match=r"models\.0\.classes: none of the model's 2 class names"):
        spec.match_classes(["cat", "dog"], NAMES, folders, keys)
    m = spec.match_classes(["Shih-Tzu", "cat", "chihuahua"], NAMES, folders, keys)
    assert (m.index, m.unknown, m.ignored) == ((1, None, 0), ("Afghan hound",), ("cat",))
    cfg = load_config(
        write_config(tmp_path / "c.yaml", mini_dogs, yaml_entry("prod", tmp_path / "x.onnx", ["cat"], NHWC))
    )
    ds, _ = load_data(cfg)
    (found,) = class_map_problems(cfg, None, ds.class_names, ds.class_folders)
    assert found.startswith("models.0 (prod): models.0.classes: none of the model's 1 class names")


def test_preflight_checks_onnx_entries_without_torch(mini_dogs: Path, tmp_path: Path, bgr_onnx: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", mini_dogs, yaml_entry("prod", bgr_onnx, NAMES, NHWC))
    code = (
        "import sys; from visionpoc.config import load_config; from visionpoc.preflight import model_problems; "
        f"p = model_problems(load_config({str(cfg)!r})); assert 'torch' not in sys.modules, 'torch imported'; "
        "print(p)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "models.0.classes: 3 class names" in out.stdout


def test_a_deployed_model_is_not_tuned_nor_rebuilt(tmp_path: Path, bgr_onnx: Path) -> None:
    from visionpoc import models

    mcfg = ModelConfig(label="prod", onnx=str(bgr_onnx), preprocess=NHWC, classes=tuple(BGR_CLASSES))
    with pytest.raises(Exception, match="deployed file .* cannot be trained, tuned, exported"):
        models.create_model(mcfg, 3)
    pytest.importorskip("optuna")
    from visionpoc.tuning.search import run_tune

    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path, yaml_entry("prod", bgr_onnx, BGR_CLASSES, NHWC)))
    with pytest.raises(ConfigError, match="a deployed model is not tuned"):
        run_tune(cfg, "prod", out_dir=tmp_path / "tune")


# ------------------------------------------------------------------------------ the report's paired test


def test_the_paired_test_counts_only_the_classes_both_know(
    mini_dogs: Path, tmp_path: Path, bgr_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """production lacks Afghan hound; the candidate (another deployed file, so nothing trains) knows all."""
    blind = nhwc_model(tmp_path / "blind.onnx", BGR_WEIGHTS[:, 1:3])  # Shih-Tzu, Chihuahua only
    entries = yaml_entry("production", blind, ["Shih-Tzu", "Chihuahua"], NHWC) + yaml_entry(
        "candidate", bgr_onnx, BGR_CLASSES, NHWC
    )
    cfg = write_config(tmp_path / "c.yaml", mini_dogs, entries)
    out = tmp_path / "run"
    assert main(["compare", "--config", str(cfg), "--out", str(out)]) == 0
    prod = load_results(out).model("production")
    assert prod.classes_unknown == ["Afghan hound"] and prod.train_accuracy is None
    assert load_predictions(out / "production" / "test_predictions.npz")["probs"][:, 2].max() == 0  # never predicted
    md = (out / "report.md").read_text()
    assert (
        "counts only the classes both models know (production has no output for Afghan hound): 6 test images, 3 left out"
        in md
    )
    assert "candidate vs the production model as deployed (production):" in md and "on 6 test images" in md
    assert "Deployed model: production" in md and "it is scored once" in md


def test_the_verdict_against_the_production_model_states_the_signed_gain() -> None:
    from visionpoc.report.stats import Interval, McNemar, verdict

    win = verdict("prod", "vit", Interval(0.097, 0.061, 0.132), McNemar(900, 20, 136, 144, 1e-9), deployed=True)
    assert win == (
        "vit vs the production model as deployed (prod): +9.7 points on 1,200 test images (95% CI +6.1 to +13.2 "
        "points; McNemar p < 0.001): vit is more accurate, and the difference is unlikely to be chance."
    )
    loss = verdict("prod", "vit", Interval(-0.05, -0.08, -0.02), McNemar(900, 80, 20, 200, 0.001), deployed=True)
    assert ": -5.0 points on 1,200 test images" in loss and "the production model is more accurate than vit" in loss
    tie = verdict("prod", "vit", Interval(0.01, -0.02, 0.04), McNemar(900, 50, 62, 188, 0.3), deployed=True)
    assert tie.endswith("(95% CI -2.0 to +4.0 points; McNemar p = 0.3): this test set cannot tell them apart.")


# ------------------------------------------------------------------------------ (d) end to end


@pytest.mark.slow
def test_compare_a_production_onnx_file_against_a_timm_candidate(
    mini_dogs: Path, tmp_path: Path, bgr_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = yaml_entry("production", bgr_onnx, BGR_CLASSES, NHWC) + (
        "  - {label: cnn, timm: test_resnet, pretrained: false, img_size: 48}\n"
    )
    cfg = write_config(tmp_path / "c.yaml", mini_dogs, entries)
    out = tmp_path / "run"
    assert main(["compare", "--config", str(cfg), "--out", str(out)]) == 0
    r = load_results(out)
    prod, cnn = r.model("production"), r.model("cnn")
    assert (prod.finetune, prod.policy, prod.epochs_run, prod.onnx) == ("deployed", "deployed", 0, str(bgr_onnx))
    assert r.config["models"][0]["onnx"] == str(bgr_onnx)  # where the inference measurements find the file
    assert cnn.finetune == "full" and cnn.epochs_run == 2
    md = (out / "report.md").read_text()
    gain = 100 * ((cnn.test_accuracy or 0) - (prod.test_accuracy or 0))
    line = next(x for x in md.splitlines() if x.startswith("> **cnn vs the production model as deployed"))
    assert f"(production): {round(gain, 1) + 0.0:+.1f} points on 9 test images (95% CI " in line
    assert "McNemar p = " in line
    given = md.split("### What each model was given")[1].splitlines()[4]
    assert given.startswith("| **production** | deployed | unknown (deployed file, not trained here) |")


@pytest.mark.slow
def test_repeats_score_the_deployed_model_once(
    mini_dogs: Path, tmp_path: Path, bgr_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = yaml_entry("production", bgr_onnx, BGR_CLASSES, NHWC) + (
        "  - {label: cnn, timm: test_resnet, pretrained: false, img_size: 48}\n"
    )
    cfg = write_config(tmp_path / "c.yaml", mini_dogs, entries, "")
    out = tmp_path / "run"
    calls = []
    real = score.score_deployed

    def counted(*a: object, **k: object) -> object:
        calls.append(1)
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(score, "score_deployed", counted)
    assert main(["compare", "--config", str(cfg), "--out", str(out), "--set", "train.repeats=2"]) == 0
    assert len(calls) == 1
    first, second = (load_results(out / d) for d in ("seed-0", "seed-1"))
    assert first.model("production") == second.model("production")
    a, b = (load_predictions(out / d / "production" / "test_predictions.npz") for d in ("seed-0", "seed-1"))
    np.testing.assert_array_equal(a["probs"], b["probs"])
    md = (out / "report.md").read_text()  # the page across seeds says why it was scored once
    assert "Deployed model: production" in md and "it is scored once and the same scores stand in every seed" in md


# ------------------------------------------------------------------------------ (e) visionpoc evaluate


def test_evaluate_an_onnx_file_writes_results_that_report_renders(
    mini_dogs: Path, tmp_path: Path, bgr_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({str(i): n for i, n in enumerate(BGR_CLASSES)}))
    pre = "{size: 32, crop: squash, mean: [0.4, 0.45, 0.5], std: [0.25, 0.2, 0.3], channels: BGR, layout: NHWC}"
    out = tmp_path / "ev"
    args = ["evaluate", "--model", str(bgr_onnx), "--classes", str(classes), "--preprocess", pre]
    args += [
        "--data",
        str(mini_dogs),
        "--set",
        "data.val_fraction=0.2",
        "--set",
        "data.num_workers=0",
        "--out",
        str(out),
    ]
    assert main([*args, "--no-report"]) == 0
    r = load_results(out)
    (m,) = r.models
    assert (m.label, m.finetune, m.classes_ignored) == ("prod", "deployed", ["tabby cat"])
    want = by_hand(
        [Path(r.dataset.test_root or "") / f for f in load_predictions(out / "prod" / "test_predictions.npz")["files"]],
        NHWC,
        BGR_WEIGHTS,
    )
    assert m.test_accuracy == pytest.approx(float((want[:, [2, 1, 0]].argmax(1) == np.arange(3).repeat(3)).mean()))
    assert "prod (" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert f"| **prod** ({bgr_onnx}, deployed) |" in md and f"**{100 * (m.test_accuracy or 0):.1f}%**" in md
    bad = main(
        [
            "evaluate",
            "--model",
            str(bgr_onnx),
            "--classes",
            str(classes),
            "--preprocess",
            "{size: 48, layout: NHWC}",
            "--data",
            str(mini_dogs),
            "--out",
            str(tmp_path / "bad"),
        ]
    )
    assert bad == 2 and "--preprocess.size is 48" in capsys.readouterr().err


def test_evaluate_adds_a_model_to_a_run(
    run_dir: Path, tmp_path: Path, bgr_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(BGR_CLASSES) + "\n")
    pre = "{size: 32, crop: squash, mean: [0.4, 0.45, 0.5], std: [0.25, 0.2, 0.3], channels: BGR, layout: NHWC}"
    args = ["evaluate", "--model", str(bgr_onnx), "--classes", str(classes), "--preprocess", pre, "--out", str(run)]
    assert main([*args, "--label", "production", "--no-report"]) == 0
    r = load_results(run)
    assert [m.label for m in r.models] == ["cnn", "vit", "production"]
    files = load_predictions(run / "production" / "test_predictions.npz")["files"]
    assert list(files) == list(load_predictions(run / "cnn" / "test_predictions.npz")["files"])  # the run's test split
    from visionpoc.serving.loading import trained_labels

    assert trained_labels(run) == ["cnn", "vit"]  # predict, serve and export leave the deployed file out
    assert main([*args, "--label", "cnn"]) == 2
    assert "already has a model 'cnn' of its own" in capsys.readouterr().err
    results = json.loads((run / "results.json").read_text())
    results["models"][1]["status"] = "failed"  # a resume that trains a model again keeps the added one
    (run / "results.json").write_text(json.dumps(results))
    assert main(["compare", "--resume", str(run), "--no-report"]) == 0
    assert [m.label for m in load_results(run).models] == ["cnn", "vit", "production"]
    assert load_results(run).model("production").test_accuracy == r.model("production").test_accuracy
