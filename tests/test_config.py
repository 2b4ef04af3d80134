from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from visionpoc.config import Config, load_config, save_config, to_dict
from visionpoc.errors import ConfigError

PACKAGED = Path(__file__).parents[1] / "src" / "visionpoc" / "configs" / "stanford_dogs.yaml"


def test_default_is_the_seed_poc() -> None:
    cfg = Config()
    assert cfg.data.source == "stanford_dogs" and cfg.data.val_fraction == 0.1
    base, cand = cfg.models
    assert (base.label, base.timm, base.finetune, base.fraction) == (
        "xception", "legacy_xception.tf_in1k", "top_fraction", 0.10)  # fmt: skip
    assert (cand.label, cand.timm, cand.finetune) == ("vit_b16", "vit_base_patch16_224.orig_in21k", "full")
    assert cfg.train.epochs == 10 and cfg.train.seed == 0 and cfg.train.device == "auto"


def test_packaged_yaml_matches_builtin_default() -> None:
    assert load_config(PACKAGED) == Config()


def test_yaml_and_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({
        "data": {"source": "folder", "root": "/x"},
        "models": [{"label": "a", "timm": "resnet18"}, {"label": "b", "timm": "vit_tiny_patch16_224"}],
        "train": {"epochs": 3},
    }))  # fmt: skip
    cfg = load_config(p, ["train.lr=3e-4", "models.1.lr=1e-5", "models.0.model_kwargs={depth: 2}",
                          "data.limit_per_class=5"])  # fmt: skip
    assert cfg.data.source == "folder" and cfg.data.root == "/x" and cfg.data.val_fraction == 0.1
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(3e-4) and cfg.train.batch_size == 64
    assert [m.label for m in cfg.models] == ["a", "b"]
    assert cfg.models[1].lr == pytest.approx(1e-5) and cfg.models[0].model_kwargs == {"depth": 2}
    assert cfg.data.limit_per_class == 5
    assert isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.epoch=3"], "'train.epoch'"),
        (["trian.epochs=3"], "'trian'"),
        (["train.epochs=three"], "train.epochs: expected an integer"),
        (["train.lr=fast"], "train.lr: expected a number"),
        (["train.compile=maybe"], "train.compile: expected true or false"),
        (["data.source=imagenet"], "data.source: 'imagenet' is not one of"),
        (["models.0.finetune=some"], "models.0.finetune"),
        (["models.5.lr=1"], "'models.5' is not an index"),
        (["models.0.colour=red"], "'models.0.colour'"),
        (["train.epochs"], "expected KEY=VALUE"),
        (["data.val_fraction=1.5"], "data.val_fraction"),
    ],
)
def test_bad_keys_and_types_are_named(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_bad_yaml_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("train: {epochs: [")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(p)
    p.write_text("models:\n  - {timm: resnet18}\n")
    with pytest.raises(ConfigError, match="missing required config key 'models.0.label'"):
        load_config(p)
    p.write_text("models:\n  - {label: a, timm: resnet18}\n  - {label: a, timm: resnet18}\n")
    with pytest.raises(ConfigError, match="unique"):
        load_config(p)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.epochs=2", "models.0.img_size=64"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert to_dict(again)["models"][0]["img_size"] == 64
