from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from visionpoc.config import Config, ModelConfig, load_config, save_config, to_dict
from visionpoc.errors import ConfigError

PACKAGED = Path(__file__).parents[1] / "src" / "visionpoc" / "configs" / "stanford_dogs.yaml"


def test_default_is_the_seed_poc() -> None:
    cfg = Config()
    assert cfg.data.source == "stanford_dogs" and cfg.data.val_fraction == 0.1
    base, cand = cfg.models
    assert (base.label, base.timm, base.finetune, base.fraction) == (
        "xception",
        "legacy_xception.tf_in1k",
        "top_fraction",
        0.10,
    )
    assert (cand.label, cand.timm, cand.finetune) == ("vit_b16", "vit_base_patch16_224.orig_in21k", "full")
    assert cfg.train.epochs == 10 and cfg.train.seed == 0 and cfg.train.device == "auto"


def test_packaged_yaml_matches_builtin_default() -> None:
    assert load_config(PACKAGED) == Config()


def test_yaml_and_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "data": {"source": "folder", "root": "/x"},
                "models": [{"label": "a", "timm": "resnet18"}, {"label": "b", "timm": "vit_tiny_patch16_224"}],
                "train": {"epochs": 3},
            }
        )
    )
    cfg = load_config(
        p, ["train.lr=3e-4", "models.1.lr=1e-5", "models.0.model_kwargs={depth: 2}", "data.limit_per_class=5"]
    )
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
        (["train.lr=-0.001"], "train.lr: -0.001 must be at least 0"),
        (["train.lr=.nan"], "train.lr: nan must be at least 0"),
        (["models.1.lr=-1e-4"], "models.1.lr: -0.0001 must be at least 0"),
        (["train.min_lr=-1"], "train.min_lr: -1.0 must be at least 0"),
        (["train.grad_clip=-1"], "train.grad_clip: -1.0 must be above 0"),  # would turn descent into ascent
        (["train.eval_batch_size=0"], "train.eval_batch_size: 0 must be at least 1"),
        (["train.early_stop_patience=0"], "train.early_stop_patience"),
        (["train.seed=-5"], "train.seed: -5 must be at least 0"),
        (["train.device=gpu"], "train.device: 'gpu' must be auto, cpu, cuda or cuda:N"),
        (["data.num_workers=-1"], "data.num_workers"),
        (["data.prepared_size=0"], "data.prepared_size"),
        (["models.0.img_size=0"], "models.0.img_size"),
        (["models.0.label=.."], "models.0.label: '..' names the model's folder"),
        (["models.1.label=a/b"], "models.1.label: 'a/b'"),
        (["models.0.label="], "models.0.label: ''"),
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
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    p.write_bytes(b"\x00\xff\xfe")
    with pytest.raises(ConfigError, match="bad.yaml is not UTF-8"):
        load_config(p)
    p.write_text("train: {epochs: 1, epochs: 3}\n")  # YAML alone would keep 3 without a word
    with pytest.raises(ConfigError, match="'epochs' is given twice"):
        load_config(p)
    for text, needle in [
        ("data:\n", "`data:` must be a mapping"),
        ("train: 5\n", "`train:` must be a mapping"),
        ("models: {label: a}\n", "`models:` must be a list"),
    ]:
        p.write_text(text)
        with pytest.raises(ConfigError, match=needle) as e:
            load_config(p, ["train.batch_size=4"])  # the file is blamed, not the --set
        assert "bad.yaml" in str(e.value)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.epochs=2", "models.0.img_size=64"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert to_dict(again)["models"][0]["img_size"] == 64


def test_set_keeps_the_text_of_string_fields() -> None:
    """`--set` values are YAML, but a string field takes what was typed: a folder named 2024 or yes."""
    cfg = load_config(
        None,
        [
            "data.root=2024",
            "models.0.label=1",
            "models.1.label=yes",
            "train.epochs=3",
            "data.limit_per_class=null",
            "train.amp=no",
            "models.1.model_kwargs.depth=2",
        ],
    )
    assert cfg.data.root == "2024" and [m.label for m in cfg.models] == ["1", "yes"]
    assert cfg.train.epochs == 3 and cfg.data.limit_per_class is None and cfg.train.amp is False
    assert cfg.models[1].model_kwargs == {"depth": 2}  # free-form mappings keep the YAML reading
    assert load_config(None, ["tracking.mlflow_uri=null"]).tracking.mlflow_uri is None
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config(None, ["train.epochs=three"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, ["data.root=[unclosed"])


# ------------------------------------------------------------------------------ `preset:` model entries


def _models(
    tmp_path: Path, models: list[dict[str, Any]], overrides: list[str] | None = None
) -> tuple[ModelConfig, ...]:
    p = tmp_path / "presets.yaml"
    p.write_text(yaml.safe_dump({"models": models}))
    return load_config(p, overrides or []).models


def test_preset_entries_resolve_to_the_preset_fields(tmp_path: Path) -> None:
    base, vit = _models(tmp_path, [{"preset": "xception"}, {"preset": "vit_b16", "policy": "linear_probe"}])
    assert (base.label, base.timm, base.finetune, base.fraction, base.lr) == (
        "xception",
        "legacy_xception.tf_in1k",
        "top_fraction",
        0.1,
        1e-3,
    )
    assert (base.preset, base.policy) == ("xception", "production")  # the preset's default policy
    assert (vit.label, vit.timm, vit.finetune, vit.lr) == ("vit_b16", "vit_base_patch16_224.orig_in21k", "head", None)
    assert (vit.preset, vit.policy) == ("vit_b16", "linear_probe")


def test_explicit_fields_override_the_preset(tmp_path: Path) -> None:
    entry = {
        "preset": "dinov3_b16",
        "policy": "full",
        "label": "dino",
        "pretrained": False,
        "img_size": 32,
        "model_kwargs": {"depth": 1},
        "lr": 0.01,
    }
    (m,) = _models(tmp_path, [entry], ["models.0.weight_decay=0.1"])
    assert (m.label, m.timm, m.pretrained, m.img_size, m.lr, m.weight_decay, m.finetune) == (
        "dino",
        "vit_base_patch16_dinov3.lvd1689m",
        False,
        32,
        0.01,
        0.1,
        "full",
    )
    assert m.model_kwargs == {"global_pool": "token", "depth": 1}  # merged with the preset's
    (m,) = _models(tmp_path, [{"preset": "xception"}], ["models.0.policy=full", "models.0.lr=3e-4"])
    assert (m.finetune, m.policy, m.lr) == ("full", "full", 3e-4)
    (m,) = _models(tmp_path, [{"preset": "vit_b16", "finetune": "top_fraction", "fraction": 0.25}])
    # no policy of vit_b16 sets top_fraction: the finetune names the policy, the default policy gives the LR
    assert (m.finetune, m.fraction, m.policy, m.lr) == ("top_fraction", 0.25, "top_fraction", 1e-4)
    (m,) = _models(tmp_path, [{"preset": "xception"}], ["models.0={preset: eva02_b14}"])  # swap a model
    assert (m.label, m.timm) == ("eva02_b14", "eva02_base_patch14_224.mim_in22k")


def test_linear_probe_is_the_head_policy(tmp_path: Path) -> None:
    plain, named, inferred = _models(
        tmp_path,
        [
            {"label": "r", "timm": "resnet18", "finetune": "linear_probe"},
            {"label": "t", "timm": "resnet18", "policy": "linear_probe"},
            {"preset": "xception", "finetune": "linear_probe"},
        ],
    )
    assert (plain.finetune, plain.policy) == (named.finetune, named.policy) == ("head", "linear_probe")
    assert (inferred.finetune, inferred.policy, inferred.lr) == ("head", "linear_probe", None)  # the probe's grid


def test_preset_config_round_trips(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("models:\n  - {preset: xception}\n  - {preset: dinov3_b16, policy: full, img_size: 224}\n")
    cfg = load_config(p)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    ("models", "needle"),
    [
        ([{"preset": "xception"}, {"preset": "nope"}], "models.1.preset: no preset 'nope'; presets: ['xception'"),
        (
            [{"preset": "vit_b16", "policy": "half"}],
            "models.0.policy: preset 'vit_b16' has no policy 'half'; policies: ['full', 'linear_probe']",
        ),
        ([{"preset": "xception", "policy": "full", "finetune": "head"}], "models.0.finetune: 'head' contradicts"),
        ([{"label": "a", "timm": "resnet18", "policy": "production"}], "models.0.policy: 'production' needs a"),
        ([{"label": "a", "timm": "resnet18", "finetune": "probe"}], "'linear_probe', 'head', 'top_fraction'"),
        ([{"preset": "xception", "colour": "red"}], "'models.0.colour'"),
    ],
)
def test_bad_preset_entries_are_named(tmp_path: Path, models: list[dict[str, Any]], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        _models(tmp_path, models)
    assert needle in str(e.value)
