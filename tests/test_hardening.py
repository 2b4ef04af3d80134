"""Hostile or unlucky inputs to the config loader, the data readers and a run folder: alias bombs, values
out of range, a full disk, temp files left by a killed run, class folders that link back into the
dataset, and an unsafe archive."""

from __future__ import annotations

import errno
import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from dogs_fixture import TINY_VIT, dog_image, make_mini_dogs
from visionpoc import checkpoint
from visionpoc.cli import main
from visionpoc.config import load_config
from visionpoc.data.download import TMP_PREFIX, _extract
from visionpoc.data.sources import read_folder
from visionpoc.errors import ConfigError, DataError
from visionpoc.recovery import clean_orphan_temps
from visionpoc.runfiles import atomic_write

# The classic billion laughs (9^9 = 387 million strings once expanded), nested where any mapping is allowed
LAUGHS = """
      a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
      b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
      c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
      d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
      e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
      f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
      g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
      h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
      i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""
BOMB = "models:\n  - label: m\n    timm: resnet18\n    model_kwargs:" + LAUGHS

# A child that loads the config under a 2 GB address-space cap: an expansion dies or times out, not the host
_BOUNDED_LOAD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))
from visionpoc.config import load_config
from visionpoc.errors import ConfigError
try:
    load_config(sys.argv[1] if sys.argv[1] != "-" else None, sys.argv[2:])
except ConfigError as e:
    print(e)
    sys.exit(2)
"""


def _load_bounded(path: str, overrides: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", _BOUNDED_LOAD, path, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_an_alias_bomb_in_model_kwargs_is_refused_before_it_expands(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 1000
    done = _load_bounded(str(path), [])
    assert done.returncode == 2, done.stderr[-2000:]
    assert str(path) in done.stdout and "aliases" in done.stdout and "100,000" in done.stdout


def test_an_alias_bomb_or_a_self_reference_in_a_set_value_is_refused() -> None:
    laughs = ", ".join(line.strip() for line in LAUGHS.strip().splitlines())
    done = _load_bounded("-", [f"models.0.model_kwargs={{{laughs}}}"])
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--set models.0.model_kwargs: refused" in done.stdout and "aliases" in done.stdout
    with pytest.raises(ConfigError, match="refers to the value that contains it"):
        load_config(None, ["models.0.model_kwargs=&a {x: [1, *a]}"])


def test_an_alias_bomb_in_a_tuned_file_is_refused(tmp_path: Path) -> None:
    tuned = tmp_path / "tune" / "tuned"
    tuned.mkdir(parents=True)
    (tuned / "m.yaml").write_text("timm: resnet18\nmodel:\n  model_kwargs:" + LAUGHS)
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))\n"
        "from visionpoc.config import load_config\n"
        "from visionpoc.errors import ConfigError\n"
        "from visionpoc.tuning.outputs import apply_tuned\n"
        "try:\n"
        "    apply_tuned(load_config(None, ['models=[{label: m, timm: resnet18}]']), sys.argv[1])\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
        "    sys.exit(2)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "tune")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "m.yaml" in done.stdout and "aliases" in done.stdout


def test_a_config_using_a_few_aliases_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    kwargs = "{drop_path_rate: 0.1, depth: 2}"
    path.write_text(
        f"models:\n  - {{label: a, timm: resnet18, model_kwargs: &kw {kwargs}}}\n"
        "  - {label: b, timm: resnet34, model_kwargs: *kw}\n"
    )
    cfg = load_config(path)
    assert cfg.models[1].model_kwargs == {"drop_path_rate": 0.1, "depth": 2}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.seed=100000000000000000000000", "train.seed"),
        ("train.seed=4294967296", "train.seed"),
        ("data.split_seed=100000000000000000000000", "data.split_seed"),
        ("train.warmup_epochs=1e23", "train.warmup_epochs"),
        ("train.warmup_epochs=.inf", "train.warmup_epochs"),
        ("train.warmup_epochs=.nan", "train.warmup_epochs"),
        ("models.0.warmup_epochs=.inf", "models.0.warmup_epochs"),
        ("train.weight_decay=.inf", "train.weight_decay"),
        ("train.repeats=100000000", "train.repeats"),
        ("train.epochs=100000000000000000000000", "train.epochs"),
        ("train.batch_size=100000000000000000000000", "train.batch_size"),
        ("models.0.img_size=1000000", "models.0.img_size"),
        ("data.prepared_size=1000000", "data.prepared_size"),
        ("tune.warmup_epochs=[0, .inf]", "tune.warmup_epochs"),
    ],
)
def test_numbers_out_of_range_are_refused_at_load_time(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(f"{key}:") and " must be " in str(e.value)


def test_the_largest_seed_is_accepted_but_not_past_it_with_repeats() -> None:
    assert load_config(None, ["train.seed=4294967295"]).train.seed == 2**32 - 1
    with pytest.raises(ConfigError, match="train.seed: 4294967294 with train.repeats 3"):
        load_config(None, ["train.seed=4294967294", "train.repeats=3"])


# ------------------------------------------------------------------------------------------- run folder


@pytest.mark.slow
def test_a_full_disk_stops_the_run_keeps_what_is_done_and_resume_finishes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = make_mini_dogs(tmp_path / "dogs")
    models = [TINY_VIT, {**TINY_VIT, "label": "vit3"}, {**TINY_VIT, "label": "vit4"}]
    cfg = tmp_path / "c.yaml"
    train = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "device": "cpu"}
    data = {"source": "stanford_dogs", "root": str(root), "val_fraction": 0.2, "num_workers": 0, "download": False}
    cfg.write_text(yaml.safe_dump({"data": data, "models": models, "train": train}))
    run = tmp_path / "run"
    real = checkpoint.atomic_write
    writes = {"n": 0}

    def fills_the_disk(path, write):  # type: ignore[no-untyped-def]
        if Path(path).parent.name != "vit3":
            return real(path, write)
        writes["n"] += 1
        if writes["n"] < 3:  # vit3's first epoch is saved; its second fails half-way
            return real(path, write)

        def half_then_enospc(tmp: Path) -> None:
            tmp.write_bytes(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")

        return real(path, half_then_enospc)

    monkeypatch.setattr(checkpoint, "atomic_write", fills_the_disk)
    assert main(["compare", "--config", str(cfg), "--out", str(run), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "[Errno 28]" not in err
    assert f"no space left on the disk to write {run / 'vit3'}" in err and "MB free" in err
    assert f"visionpoc compare --resume {run}" in err
    results = json.loads((run / "results.json").read_text())["models"]
    assert [(m["label"], m["status"]) for m in results] == [("vit", "ok")]  # vit4 never started, vit3 unclaimed
    assert not (run / "vit4").exists() and not list(run.rglob("*.tmp"))

    monkeypatch.setattr(checkpoint, "atomic_write", real)
    (run / "vit3" / ".best.safetensors.k2j4h5x_.tmp").write_bytes(b"left by kill -9")
    with caplog.at_level(logging.INFO):
        assert main(["compare", "--resume", str(run), "--no-report"]) == 0
    assert "removed 1 temp file(s) under" in caplog.text
    results = json.loads((run / "results.json").read_text())["models"]
    assert [(m["label"], m["status"]) for m in results] == [("vit", "ok"), ("vit3", "ok"), ("vit4", "ok")]
    assert results[1]["resumed_from_epoch"] == 2 and not list(run.rglob("*.tmp"))


def test_a_full_disk_names_the_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    def enospc(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 2_000_000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as e:
        atomic_write(tmp_path / "best.safetensors", enospc)
    assert e.value.errno == errno.ENOSPC
    assert str(e.value).startswith(f"no space left on the disk to write {tmp_path / 'best.safetensors'}")
    assert "more than the 2.0 MB written" in str(e.value) and list(tmp_path.iterdir()) == []


def test_resume_cleans_only_the_atomic_writes_temp_files_inside_the_run(tmp_path: Path) -> None:
    run, outside = tmp_path / "run", tmp_path / "outside"
    (run / "vit").mkdir(parents=True)
    outside.mkdir()
    orphans = [run / ".results.json.a1b2c3d4.tmp", run / "vit" / ".best.safetensors.zz_9x8y7.tmp"]
    kept = [
        run / "vit" / "best.safetensors",
        run / "notes.tmp",  # not ours: no leading dot and random part
        run / ".best.safetensors.tmp",
        run / "vit" / ".last_state.pt.short.tmp",
        outside / ".best.safetensors.a1b2c3d4.tmp",  # outside the run folder, reached by a link
    ]
    for p in orphans + kept:
        p.write_text("x")
    (run / "elsewhere").symlink_to(outside, target_is_directory=True)
    assert clean_orphan_temps(run) == 2
    assert not any(p.exists() for p in orphans) and all(p.exists() for p in kept)


# ------------------------------------------------------------------------------------------------ data


def _folder_dataset(root: Path) -> Path:
    for split, n in (("train", 3), ("test", 1)):
        for k, cls in enumerate(("ant", "cat")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                dog_image(k, i, (20, 16)).save(d / f"{i}.png")
    return root


@pytest.mark.parametrize("target", ["train", "test/cat", ".", "train/ant"])
def test_a_class_folder_linking_into_the_dataset_is_refused(tmp_path: Path, target: str) -> None:
    root = _folder_dataset(tmp_path / "ds")
    link = root / "train" / "zebra"
    link.symlink_to(root / target, target_is_directory=True)
    with pytest.raises(DataError, match="symbolic link") as e:
        read_folder(root)
    assert str(link) in str(e.value) and str((root / target).resolve()) in str(e.value)


def test_a_class_folder_linking_to_images_elsewhere_is_read(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path / "ds")
    elsewhere = tmp_path / "zebras"
    elsewhere.mkdir()
    dog_image(2, 0, (20, 16)).save(elsewhere / "0.png")
    (root / "train" / "zebra").symlink_to(elsewhere, target_is_directory=True)
    ds = read_folder(root)
    assert ds.class_names == ["ant", "cat", "zebra"] and len(ds.train) == 7


def test_an_unsafe_archive_names_the_archive_and_what_to_do(tmp_path: Path) -> None:
    root, archive = tmp_path / "dogs", tmp_path / "downloads" / "images.tar"
    root.mkdir()
    archive.parent.mkdir()
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("Images/../../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DataError) as e:
        _extract(root, [archive], progress=False)
    msg = str(e.value)
    assert str(archive) in msg and "unsafe member" in msg and f"delete {archive}" in msg
    assert TMP_PREFIX not in msg and "disk space" not in msg  # no folder that is gone, no wrong cause
    assert list(root.iterdir()) == [] and not (tmp_path / "escaped.txt").exists()
