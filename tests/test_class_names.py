"""Class display names: breeds from WordNet-id folders, the `data.class_names` map (CSV or JSON) and its
errors, and the names reaching every reader: results.json, report.html, `predict`, the demo page and
the exported label list."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from dogs_fixture import dog_image
from visionpoc.cli import main
from visionpoc.config import load_config
from visionpoc.data.names import default_names, read_class_map
from visionpoc.data.sources import read_dataset
from visionpoc.errors import ConfigError

FISH = ["n01440764", "n01443537", "n01484850"]  # ImageNet-style folders: WordNet ids, no names
NAMES = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}


def folder_dataset(root: Path, classes: list[str], train: int = 6, test: int = 2) -> Path:
    """`root/train/<class>/*.png` and `root/test/<class>/*.png`, each class its own colour and stripes."""
    for split, n in (("train", train), ("test", test)):
        for k, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                dog_image(k, i + (0 if split == "train" else 100), (20, 16)).save(d / f"{cls[:9]}_{i}.png")
    return root


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ default names


def test_wordnet_folders_show_the_name_after_the_id(tmp_path: Path) -> None:
    """Stanford Dogs' Images/ read as a `folder` dataset: `n02085620-Chihuahua` shows `Chihuahua`."""
    folders = ["n02085620-Chihuahua", "n02086240-Shih-Tzu", "n02088094-Afghan_hound"]
    ds = read_dataset("folder", folder_dataset(tmp_path / "d", folders))
    assert ds.class_names == ["Chihuahua", "Shih-Tzu", "Afghan hound"]
    assert ds.class_folders == folders  # the images are still found by folder


def test_other_folders_keep_their_names() -> None:
    assert default_names(FISH) == FISH  # ids without names: only a map can name them
    assert default_names(["n02085620-Chihuahua", "cats"]) == ["n02085620-Chihuahua", "cats"]  # not all WordNet
    # ImageNet has two `crane` synsets: the two keep their folders rather than look the same
    assert default_names(["n02012849-crane", "n03126707-crane", "n02085620-Chihuahua"]) == [
        "n02012849-crane",
        "n03126707-crane",
        "Chihuahua",
    ]


def test_stanford_dogs_shows_breeds_and_takes_a_map(mini_dogs: Path, tmp_path: Path) -> None:
    assert read_dataset("stanford_dogs", mini_dogs).class_names == ["Chihuahua", "Shih-Tzu", "Afghan hound"]
    names = write(tmp_path / "dogs.json", '{"n02085620-Chihuahua": "Chihuahua (toy)"}')
    ds = read_dataset("stanford_dogs", mini_dogs, names)
    assert ds.class_names == ["Chihuahua (toy)", "Shih-Tzu", "Afghan hound"]  # the others keep their breed
    assert ds.train.files[0] == "n02085620-Chihuahua/n02085620_1.jpg"


# ------------------------------------------------------------------------------------------- the map


def test_csv_map_with_or_without_header(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "d", FISH)
    with_header = write(tmp_path / "a.csv", 'folder,name\nn01440764,tench\nn01484850,"great white, shark"\n\n')
    ds = read_dataset("folder", root, with_header)
    assert ds.class_names == ["tench", "n01443537", "great white, shark"]  # an unmapped class keeps its folder
    bare = write(tmp_path / "b.csv", "\ufeffn01443537 , goldfish\r\n")  # a spreadsheet's BOM, CRLF, spaces
    assert read_dataset("folder", root, bare).class_names == ["n01440764", "goldfish", "n01484850"]


def test_json_map(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "d", FISH)
    path = write(tmp_path / "names.json", json.dumps(NAMES))
    assert read_dataset("folder", root, path).class_names == ["tench", "goldfish", "great white shark"]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("rows.csv", "n01440764,tench,fish\n", ["line 1 has 3 column(s)", "folder,name"]),
        ("rows.csv", "n01440764\n", ["line 1 has 1 column(s)"]),
        ("empty.csv", "n01440764,\n", ["line 1: an empty name"]),
        ("twice.csv", "n01440764,tench\nn01440764,carp\n", ["line 2: 'n01440764' is mapped twice"]),
        ("twice.json", '{"n01440764": "tench", "n01440764": "carp"}', ["'n01440764' is mapped twice"]),
        ("list.json", '["tench", "goldfish"]', ["holds a list", '{"folder": "name", ...}']),
        ("number.json", '{"n01440764": 7}', ["maps 'n01440764' to 7", "must be a string"]),
        ("broken.json", '{"n01440764": "tench",}', ["is not valid JSON"]),
    ],
)
def test_a_bad_map_names_the_file_the_row_and_the_fix(
    tmp_path: Path, name: str, text: str, expected: list[str]
) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(ConfigError) as e:
        read_class_map(path)
    message = str(e.value)
    assert message.startswith(f"data.class_names: {path} ")
    for part in expected:
        assert part in message


def test_a_map_that_does_not_fit_the_classes(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "d", FISH)
    with pytest.raises(ConfigError, match="not found: give a CSV"):
        read_dataset("folder", root, tmp_path / "absent.csv")
    with pytest.raises(ConfigError, match="is a folder"):
        read_dataset("folder", root, tmp_path)
    typo = write(tmp_path / "typo.csv", "n01440764,tench\nn0144376,goldfish\n")
    with pytest.raises(ConfigError) as e:
        read_dataset("folder", root, typo)
    assert f"{typo} maps 'n0144376', which name(s) no class folder" in str(e.value)
    assert "'n01440764', 'n01443537', 'n01484850'" in str(e.value) and "fix or remove those rows" in str(e.value)
    same = write(tmp_path / "same.csv", "n01440764,fish\nn01484850,fish\n")
    with pytest.raises(ConfigError, match=r"gives the name 'fish' to 2 classes \('n01440764', 'n01484850'\)"):
        read_dataset("folder", root, same)
    clash = write(tmp_path / "clash.csv", "n01440764,n01443537\n")  # the name of another, unmapped class
    with pytest.raises(ConfigError, match="gives the name 'n01443537' to 2 classes"):
        read_dataset("folder", root, clash)


def test_data_check_checks_the_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = folder_dataset(tmp_path / "d", FISH)
    good = write(tmp_path / "names.json", json.dumps(NAMES))
    check = ["data", "check", "--source", "folder", "--root", str(root), "--json", "--class-names"]
    assert main([*check, str(good)]) == 0
    assert json.loads(capsys.readouterr().out)["class_names"] == ["tench", "goldfish", "great white shark"]
    assert main([*check, str(write(tmp_path / "typo.csv", "n0144076,tench\n"))]) == 2
    assert "maps 'n0144076', which name(s) no class folder" in capsys.readouterr().err


def test_config_key(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "data: {source: folder, root: my_data, class_names: names.csv}\n")
    assert load_config(cfg).data.class_names == "names.csv"
    assert load_config().data.class_names is None  # the default names
    with pytest.raises(ConfigError, match="data.class_names: .* must be a CSV or JSON file"):
        load_config(overrides=["data.class_names= "])


# ----------------------------------------------------------------------------- every reader sees them


@pytest.mark.slow
def test_names_reach_results_report_predict_page_and_export(
    tmp_path: Path, one_thread: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder dataset of WordNet ids and a CSV map: a finished `compare` shows the names everywhere."""
    root = folder_dataset(tmp_path / "fish", FISH)
    names = write(tmp_path / "names.csv", "folder,name\n" + "".join(f"{k},{v}\n" for k, v in NAMES.items()))
    tiny = {"timm": "test_resnet", "pretrained": False, "img_size": 32}
    cfg = {
        "data": {"source": "folder", "root": str(root), "class_names": str(names), "val_fraction": 0.34},
        "models": [{"label": "a", **tiny}, {"label": "b", **tiny, "lr": 3e-3}],
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 0},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert (
        main(["compare", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--set", "data.num_workers=0"]) == 0
    )
    wanted = list(NAMES.values())

    dataset = json.loads((out / "results.json").read_text())["dataset"]
    assert dataset["class_names"] == wanted

    html = (out / "report.html").read_text()
    confused = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td><td class=\"n\">", html)  # true, predicted
    assert confused and {name for pair in confused for name in pair} <= set(wanted)
    assert not any(f"<td>{wnid}</td>" in html for wnid in FISH)  # no table cell shows an id

    capsys.readouterr()
    assert main(["predict", str(out), str(root / "test" / FISH[2]), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {t["label"] for row in rows for m in row["models"] for t in m["top"]} == set(wanted)

    from fastapi.testclient import TestClient

    from visionpoc.serving.app import create_app

    client = TestClient(create_app(out))
    page = client.get("/").text
    assert "<h1>Which class is it?</h1>" in page and "Models: a, b · 3 classes of fish</div>" in page
    assert client.get("/health").json()["title"] == "Which class is it?"
    photo = sorted((root / "test" / FISH[0]).iterdir())[0]
    answer = client.post("/predict", files={"file": (photo.name, photo.read_bytes())}).json()
    assert {t["label"] for m in answer["models"] for t in m["top"]} == set(wanted)

    assert main(["export", str(out), "--format", "safetensors", "--model", "a"]) == 0
    assert json.loads((out / "export" / "a" / "classes.json").read_text()) == wanted
