"""The `manifest`, `hf` and `webdataset` sources, on data built here offline: tiny coloured images (each
class its own colour and stripes, `dogs_fixture.dog_image`) listed in a CSV/JSONL manifest, saved as a
`datasets` dataset (`save_to_disk`, parquet), or written as tar shards (`webdataset.TarWriter`).

Each source reads the right counts and class names, uses the splits it gives and carves the others
(stratified, seeded); each manifest problem is an error naming the file and the row; a tiny `compare`
trains on each source; and under torchrun (2 processes, gloo) a webdataset run scores every test image
exactly once."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dogs_fixture import dog_image
from visionpoc.config import DataConfig
from visionpoc.data.sources import read_dataset
from visionpoc.data.splits import make_splits
from visionpoc.errors import DataError

CLASSES = ["cat", "dog", "fox"]


def _png(k: int, n: int) -> bytes:
    buf = io.BytesIO()
    dog_image(k, n).save(buf, "PNG")
    return buf.getvalue()


def _images(root: Path, per_class: int) -> list[tuple[str, str]]:
    """`per_class` images of each class in root/img/<class>/; (path relative to root, label)."""
    rows = []
    for k, c in enumerate(CLASSES):
        (root / "img" / c).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            dog_image(k, n).save(root / "img" / c / f"{n}.png")
            rows.append((f"img/{c}/{n}.png", c))
    return rows


def _csv(path: Path, rows: list[tuple[str, ...]], header: str = "path,label") -> Path:
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ manifest


def test_manifest_without_splits_carves_test_stratified_and_seeded(tmp_path: Path) -> None:
    path = _csv(tmp_path / "labels.csv", _images(tmp_path, 10))
    opts = DataConfig(test_fraction=0.2)
    ds = read_dataset("manifest", path, options=opts, seed=3)
    assert ds.class_names == CLASSES and ds.val is None
    assert (len(ds.train), len(ds.test)) == (24, 6)
    assert np.bincount(ds.test.labels).tolist() == [2, 2, 2]  # stratified: 20% of each class
    assert ds.test.path(0).is_file() and ds.test.root == tmp_path  # paths relative to the manifest
    again = read_dataset("manifest", path, options=opts, seed=3)
    other = read_dataset("manifest", path, options=opts, seed=4)
    assert again.test.files == ds.test.files  # seeded
    assert other.test.files != ds.test.files
    assert not set(ds.test.files) & set(ds.train.files)


def test_manifest_splits_from_the_file_jsonl(tmp_path: Path) -> None:
    rows = _images(tmp_path, 6)
    split = ["train", "train", "train", "validation", "test", "test"]
    lines = [json.dumps({"path": p, "label": c, "split": split[i % 6]}) for i, (p, c) in enumerate(rows)]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ds = read_dataset("manifest", path)
    assert ds.val is not None
    assert (len(ds.train), len(ds.val), len(ds.test)) == (9, 3, 6)
    splits = make_splits(ds, 0.5, None, 0)  # the file's val rows are the validation split: nothing carved
    assert splits.val.files == ds.val.files and len(splits.train) == 9


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        ([("img/cat/0.png", "cat"), ("img/cat/9.png", "cat")], "path,label", "row 3"),  # a missing image
        ([("img/cat/0.png", "cat"), ("img/cat/1.png", "")], "path,label", "row 3: the label is empty"),
        ([("img/cat/0.png", "cat", "train"), ("img/cat/1.png", "cat", "holdout")], "path,label,split", "row 3"),
        (
            [("img/cat/0.png", "cat"), ("img/cat/1.png", "cat"), ("img/cat/0.png", "cat")],
            "path,label",
            "row 2 and row 4",
        ),
        (
            [("img/cat/0.png", "cat", ""), ("img/dog/0.png", "dog", ""), ("img/fox/0.png", "fox", "test")],
            "path,label,split",
            "appear only in test rows (e.g. ",
        ),
    ],
    ids=["missing-file", "empty-label", "unknown-split", "duplicate", "label-only-in-test"],
)
def test_manifest_errors_name_the_file_and_row(
    tmp_path: Path, rows: list[tuple[str, ...]], header: str, message: str
) -> None:
    _images(tmp_path, 2)
    path = _csv(tmp_path / "bad.csv", rows, header)
    with pytest.raises(DataError) as e:
        read_dataset("manifest", path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_manifest_unknown_split_error_says_which_values(tmp_path: Path) -> None:
    _images(tmp_path, 1)
    path = _csv(tmp_path / "m.csv", [("img/cat/0.png", "cat", "holdout")], "path,label,split")
    with pytest.raises(DataError, match=r"m\.csv, row 2: unknown split 'holdout'; use train, val"):
        read_dataset("manifest", path)


def test_data_check_cli_reports_manifest_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from visionpoc.cli import main

    path = _csv(tmp_path / "labels.csv", _images(tmp_path, 5))
    assert main(["data", "check", "--source", "manifest", "--root", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["train"], out["test"], out["classes"]) == (12, 3, 3)


# ------------------------------------------------------------------------------------------------ hf


def _hf_dataset(per_class: int, with_test: bool) -> object:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["zebra", *CLASSES[:2]])})

    def part(offset: int, n: int) -> object:
        rows = [(k, offset + i) for k in range(3) for i in range(n)]
        return datasets.Dataset.from_dict(
            {"img": [{"bytes": _png(k, i), "path": None} for k, i in rows], "y": [k for k, _ in rows]},
            features=features,
        )

    if not with_test:
        return part(0, per_class)
    return datasets.DatasetDict({"train": part(0, per_class), "test": part(100, 2)})


def test_hf_save_to_disk_with_classlabel_names_and_splits(tmp_path: Path) -> None:
    _hf_dataset(4, True).save_to_disk(tmp_path / "ds")  # type: ignore[attr-defined]
    opts = DataConfig(image_column="img", label_column="y")
    ds = read_dataset("hf", tmp_path / "ds", options=opts)
    assert ds.class_names == ["zebra", "cat", "dog"]  # the ClassLabel's names, in its order
    assert (len(ds.train), len(ds.test)) == (12, 6)
    assert np.bincount(ds.test.labels).tolist() == [2, 2, 2]
    from visionpoc.data.images import load_rgb

    img = load_rgb(ds.train.path(0))  # a file like any other source's
    assert img.size == (48, 36)
    first = ds.train.path(0).stat().st_mtime_ns
    again = read_dataset("hf", tmp_path / "ds", options=opts)  # the cache is reused, not rewritten
    assert again.train.files == ds.train.files and again.train.path(0).stat().st_mtime_ns == first


def test_hf_parquet_without_test_split_is_carved(tmp_path: Path) -> None:
    _hf_dataset(5, False).to_parquet(str(tmp_path / "train.parquet"))  # type: ignore[attr-defined]
    ds = read_dataset("hf", tmp_path / "train.parquet", options=DataConfig(image_column="img", label_column="y"))
    assert (len(ds.train), len(ds.test)) == (12, 3)
    assert np.bincount(ds.test.labels).tolist() == [1, 1, 1]


def test_hf_wrong_column_is_named(tmp_path: Path) -> None:
    _hf_dataset(2, True).save_to_disk(tmp_path / "ds")  # type: ignore[attr-defined]
    with pytest.raises(DataError, match=r"data.image_column: .* has no column 'image'; its columns are \['img', 'y'\]"):
        read_dataset("hf", tmp_path / "ds", options=DataConfig(label_column="y"))


def test_hf_without_the_extra_names_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(DataError, match=r"pip install 'visionpoc\[hf\]'"):
        read_dataset("hf", tmp_path)


# ---------------------------------------------------------------------------------------- webdataset


def _shards(folder: Path, per_class: int, splits: dict[str, int], names: bool = True) -> Path:
    """Shards `<split>-00000<i>.tar`, `splits[split]` of them, `per_class` images of each class per shard."""
    wds = pytest.importorskip("webdataset")
    folder.mkdir(parents=True, exist_ok=True)
    for split, n_shards in splits.items():
        for s in range(n_shards):
            with wds.TarWriter(str(folder / f"{split}-{s:06d}.tar")) as sink:
                for k in range(3):
                    for i in range(per_class):
                        n = 1000 * s + i + (500 if split == "test" else 0)
                        sink.write({"__key__": f"{k}_{n:05d}", "png": _png(k, n), "cls": str(k).encode()})
    if names:
        (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return folder


def test_webdataset_shards_by_split_and_class_names(tmp_path: Path) -> None:
    root = _shards(tmp_path / "shards", 2, {"train": 2, "test": 1})
    ds = read_dataset("webdataset", root, options=DataConfig(num_workers=2))
    assert ds.class_names == CLASSES
    assert ds.val is not None  # carved out of train when reading, extracted with test
    assert (len(ds.train) + len(ds.val), len(ds.test)) == (12, 6)
    assert np.bincount(np.concatenate([ds.train.labels, ds.val.labels])).tolist() == [4, 4, 4]
    assert all(s.path(i).is_file() for s in (ds.val, ds.test) for i in range(len(s)))
    assert ds.train.shards is not None and not any(ds.train.path(i).exists() for i in range(len(ds.train)))


def test_webdataset_brace_pattern_carves_test(tmp_path: Path) -> None:
    _shards(tmp_path / "s", 5, {"train": 2}, names=False)
    ds = read_dataset(
        "webdataset", str(tmp_path / "s" / "train-{000000..000001}.tar"), options=DataConfig(num_workers=0)
    )
    assert ds.class_names == ["0", "1", "2"]  # no classes.txt: the indices
    assert ds.val is not None and (len(ds.train) + len(ds.val), len(ds.test)) == (24, 6)
    assert np.bincount(ds.test.labels).tolist() == [2, 2, 2]


def test_webdataset_bad_cls_names_the_shard_and_key(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    tmp_path.mkdir(exist_ok=True)
    with wds.TarWriter(str(tmp_path / "train-0.tar")) as sink:
        sink.write({"__key__": "a", "png": _png(0, 0), "cls": b"cat"})
    with pytest.raises(DataError, match=r"shard train-0.tar, key a: .cls holds 'cat', not a class index"):
        read_dataset("webdataset", tmp_path, options=DataConfig(num_workers=0))


@pytest.mark.parametrize("workers", [0, 2])
def test_data_check_decodes_the_training_images_inside_their_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: int
) -> None:
    """`data check --decode` on shards: a training sample that does not decode is named (shard, key),
    though the training split is never extracted."""
    from visionpoc.cli import main

    wds = pytest.importorskip("webdataset")
    root = _shards(tmp_path / "shards", 2, {"train": 2, "test": 1})
    with wds.TarWriter(str(root / "train-000002.tar")) as sink:
        sink.write({"__key__": "0_broken", "png": b"not a png", "cls": b"0"})
        sink.write({"__key__": "1_fine", "png": _png(1, 7), "cls": b"1"})
    check = ["data", "check", "--source", "webdataset", "--root", str(root), "--decode", "--json"]
    assert main([*check, "--workers", str(workers)]) == 2
    out = json.loads(capsys.readouterr().out)
    assert len(out["undecodable"]) == 1 and "train-000002.tar:0_broken.png" in out["undecodable"][0]
    (root / "train-000002.tar").unlink()
    assert main(check) == 0 and json.loads(capsys.readouterr().out)["undecodable"] == []


# ------------------------------------------------------------------------------------ compare on each


def _compare_config(path: Path, data: dict) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"val_fraction": 0.25, "num_workers": 0, "download": False, **data},
                "models": [{"label": "cnn", "timm": "test_resnet", "pretrained": False, "img_size": 32}],
                "train": {"batch_size": 4, "device": "cpu", "epochs": 1},
            }
        )
    )
    return path


def _data_for(source: str, tmp: Path) -> dict:
    if source == "manifest":
        return {"source": "manifest", "root": str(_csv(tmp / "labels.csv", _images(tmp, 6)))}
    if source == "hf":
        _hf_dataset(4, True).save_to_disk(tmp / "ds")  # type: ignore[attr-defined]
        return {"source": "hf", "root": str(tmp / "ds"), "image_column": "img", "label_column": "y"}
    return {"source": "webdataset", "root": str(_shards(tmp / "shards", 4, {"train": 2, "test": 1}))}


@pytest.mark.slow
@pytest.mark.parametrize("source", ["manifest", "hf", "webdataset"])
def test_compare_trains_on_each_source(tmp_path: Path, source: str) -> None:
    from visionpoc.cli import main

    cfg = _compare_config(tmp_path / "c.yaml", _data_for(source, tmp_path))
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-report"]) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["dataset"]["source"] == source and res["models"][0]["status"] == "ok"
    assert res["dataset"]["test_size"] == {"manifest": 3, "hf": 6, "webdataset": 12}[source]
    if source == "webdataset":  # the 18 training images streamed from the shards: 4 batches of 4
        m = res["models"][0]
        assert m["data_pipeline"] == "stream" and (m["optimizer_steps"], m["images_seen"]) == (4, 16)
        assert np.isfinite(m["history"][0]["train_loss"])
        assert all(m[k] is not None for k in ("train_accuracy", "val_accuracy", "test_accuracy"))
        extracted = [p for p in (tmp_path / "shards" / ".visionpoc-cache").rglob("*.png")]
        assert len(extracted) == 6 + 12  # val (carved out of the train shards) and test only


@pytest.mark.slow
@pytest.mark.parametrize("source", ["manifest", "hf", "webdataset"])
def test_repeats_tune_report_and_predict_work_on_each_source(tmp_path: Path, source: str) -> None:
    """Every feature downstream of the data, on each source: two repeats, a one-trial study and
    `compare --tuned`, the report across seeds, and a prediction from the finished run."""
    from visionpoc.cli import main
    from visionpoc.serving.predict import Predictor

    cfg = _compare_config(tmp_path / "c.yaml", _data_for(source, tmp_path))
    run, tuned = tmp_path / "run", tmp_path / "tuned"
    assert main(["compare", "--config", str(cfg), "--out", str(run), "--set", "train.repeats=2"]) == 0
    assert len(json.loads((run / "repeats.json").read_text())["runs"]) == 2
    for sub in run.glob("seed-*"):
        assert json.loads((sub / "results.json").read_text())["models"][0]["status"] == "ok"
    assert "2 seeds" in (run / "report.html").read_text()  # the page across seeds
    tune = ["tune", "--config", str(cfg), "--model", "cnn", "--trials", "1", "--out", str(tuned)]
    assert main(tune) == 0 and (tuned / "tuned" / "cnn.yaml").is_file()
    best = yaml.safe_load((tuned / "tuned" / "cnn.yaml").read_text())["model"]
    again = [
        "compare",
        "--config",
        str(cfg),
        "--out",
        str(tmp_path / "tuned_run"),
        "--tuned",
        str(tuned),
        "--no-report",
    ]
    assert main(again) == 0
    m = json.loads((tmp_path / "tuned_run" / "results.json").read_text())["models"][0]
    assert m["status"] == "ok" and m["tuned_from"] and m["lr"] == pytest.approx(best["lr"])
    seed = next(run.glob("seed-*"))
    image = next(f for f in tmp_path.rglob("*.png") if "run" not in f.parts)
    row = Predictor(seed).predict_paths([image], top=1)[0]
    assert "error" not in row, row
    names = json.loads((seed / "results.json").read_text())["dataset"]["class_names"]
    assert row["models"][0]["top"][0]["label"] in names


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["stream", "prepared"])
def test_a_linear_probe_and_a_fine_tune_on_shards_on_either_pipeline(tmp_path: Path, pipeline: str) -> None:
    """Streamed or through the prepared store (built by reading the training shards once), a fine-tune
    takes the same 4 steps of 4 images, and the linear probe caches its features (keyed on the shards):
    a second run reads them from the cache."""
    from visionpoc.cli import main

    cfg = _compare_config(tmp_path / "c.yaml", {**_data_for("webdataset", tmp_path), "pipeline": pipeline})
    raw = yaml.safe_load(cfg.read_text())
    raw["models"].append({**raw["models"][0], "label": "probe", "finetune": "linear_probe"})
    raw["probe"] = {"min_steps": 1, "views": 1}
    cfg.write_text(yaml.safe_dump(raw))
    caches = []
    for out in ("run", "again"):
        assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / out), "--no-report"]) == 0
        caches.append(json.loads((tmp_path / out / "results.json").read_text())["models"][1]["probe"]["cache"])
    assert caches == ["miss", "hit"]
    cnn, probe = json.loads((tmp_path / "again" / "results.json").read_text())["models"]
    assert cnn["data_pipeline"] == probe["data_pipeline"] == pipeline
    assert (cnn["optimizer_steps"], cnn["images_seen"]) == (4, 16) and cnn["test_accuracy"] is not None
    assert probe["status"] == "ok" and probe["finetune"] == "head" and probe["probe"]["grid"]
    assert probe["test_accuracy"] is not None
    stores = list((tmp_path / "shards" / ".visionpoc-cache").glob("store-*.npy"))
    assert len(stores) == (pipeline == "prepared")
    if pipeline == "prepared":  # 18 training images from the shards, 6 val and 12 test from their files
        assert np.load(stores[0], mmap_mode="r").shape[0] == 36


@pytest.mark.slow
def test_webdataset_under_torchrun_scores_each_test_image_once(tmp_path: Path) -> None:
    """2 processes on gloo: the test split (7 images: an odd count, so the ranks' shares differ) is
    scored once per image, in the single-process order."""
    root = _shards(tmp_path / "shards", 4, {"train": 2})
    (root / "test-000000.tar").unlink(missing_ok=True)
    wds = pytest.importorskip("webdataset")
    with wds.TarWriter(str(root / "test-000000.tar")) as sink:
        for j in range(7):
            sink.write({"__key__": f"t{j}", "png": _png(j % 3, 900 + j), "cls": str(j % 3).encode()})
    cfg = _compare_config(tmp_path / "c.yaml", {"source": "webdataset", "root": str(root)})
    probe = Path(__file__).parent / "ddp_probe.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROBE_DIR": str(tmp_path), "PROBE_WATCH": str(tmp_path / "run")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(probe)]
    proc = subprocess.run(
        [*torchrun, "compare", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-report"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from visionpoc.results import load_predictions

    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["dataset"]["test_size"] == 7
    files = list(load_predictions(tmp_path / "run" / "cnn" / "test_predictions.npz")["files"])
    assert len(files) == 7 and len(set(files)) == 7
    assert files == sorted(files)  # gathered back into the split's order
    extracted = list((root / ".visionpoc-cache").rglob("*.png"))  # only val (carved out of train) and test
    assert len(extracted) == res["dataset"]["val_size"] + 7 < 7 + 24
