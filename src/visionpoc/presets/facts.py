"""Model presets: the original PoC's models and today's candidates as ready `ModelConfig`s, with their facts.

The presets live in the packaged `configs/presets.yaml`: a `ModelConfig` per preset, named fine-tuning
policies (`full`, `linear_probe` = finetune `head`, and any other) with recommended learning rates, and
metadata kept outside `ModelConfig` (family, release, pretraining data, licence fallback, notes).
A config names one as `models: [{preset: NAME, policy: P}]` (`preset_entries` resolves it at load time);
`preset(name, policy)` gives the same `ModelConfig` in Python; `list_presets(family)` gives one row per preset
with parameters, forward GFLOPs, input size, pretraining data and licence (timm's pretrained config
first, the preset's own field as fallback) for `visionpoc models` and docs/models.md; without `figures`
it builds no model and reads only presets.yaml (no torch, no timm), for the quick default table.
`pretrain_data` and `may_have_seen_imagenet` read a timm tag for the report's leakage caveat.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any, Literal

from visionpoc.config import ModelConfig
from visionpoc.errors import ConfigError
from visionpoc.presets.table import PRESETS_FILE as PRESETS_FILE  # re-exported
from visionpoc.presets.table import preset_table, resolve_entry
from visionpoc.typed import from_dict

log = logging.getLogger(__name__)

REQUIRED_POLICIES = ("full", "linear_probe")
LicenceKind = Literal["permissive", "non-commercial", "custom", "unknown"]

# Licences that allow commercial use with attribution only. Anything else needs a person to read it.
PERMISSIVE = frozenset({"apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc-by-4.0", "cc0-1.0", "unlicense"})

# timm tag tokens that name pretraining data (the vocabulary of `pretrain_data`), and aliases
_DATA_TOKENS = frozenset(
    "in1k in12k in21k in22k lvd142m lvd1689m sat493m webli laion2b laion400m openai datacomp1b datacompxl dfn2b "
    "dfn5b dfndr2b metaclip metaclip2 merged2b ig1b jft yfcc15m yfcc100m cc12m sa1b".split()
)
_TOKEN_ALIAS = {"inw21k": "in21k"}  # ImageNet-21k, winter 2021 release
# Architectures whose tag does not name the data (`vit_pe_*.fb`): prefix -> pretraining data.
_ARCH_DATA = {"vit_pe_": "metaclip"}
# Data known to contain ImageNet images: ImageNet itself, and the DINOv2/v3 LVD sets, which include
# ImageNet-1k/22k among their curated sources.
IMAGENET_DATA = frozenset({"in1k", "in12k", "in21k", "in22k", "lvd142m", "lvd1689m"})
# Data known to hold no ImageNet image (satellite imagery).
NON_IMAGENET_DATA = frozenset({"sat493m"})


@dataclass(frozen=True)
class Preset:
    name: str
    """Key in presets.yaml; also the default label."""
    model: ModelConfig
    """The base ModelConfig, before a policy is laid over it (label: the preset name)."""
    policies: dict[str, ModelConfig]
    """Policy name -> the ModelConfig it gives (the base with the policy's finetune, fraction, lr), as a
    config entry `{preset: NAME, policy: POLICY}` loads."""
    default_policy: str
    """The policy `preset(name)` and a `{preset: NAME}` config entry use when none is named."""
    family: str
    """Model family, for `--family` filtering."""
    released: str
    """First public weights, YYYY-MM."""
    pretrain_data: str | None
    """What the weights have seen, in the `pretrain_data()` vocabulary (e.g. `in22k+in1k`)."""
    license: str | None
    """Licence used when timm's pretrained config has none."""
    input_size: int
    """Pretrained input resolution (pixels)."""
    normalization: str
    """imagenet | inception | clip: the mean/std family of the tag's preprocessing."""
    notes: str = ""
    """Why this tag, and what to watch for."""


def _validate_policy(name: str, pname: str, fields: Any) -> ModelConfig:
    where = f"{PRESETS_FILE}: presets.{name}.policies.{pname}"
    if not isinstance(fields, dict) or ("lr" not in fields and fields.get("finetune") != "head"):
        raise ConfigError(f"{where}: expected a mapping of ModelConfig fields with a recommended `lr`")
    # the same resolution as a config entry `{preset: name, policy: pname}`
    return from_dict(ModelConfig, resolve_entry({"preset": name, "policy": pname}, where), where)


def _parse(name: str, raw: Any) -> Preset:
    where = f"{PRESETS_FILE}: presets.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    known = {f.name for f in dataclasses.fields(Preset)} - {"name"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}: Unknown preset key(s) {sorted(unknown)}; valid keys: {sorted(known)}")
    base = raw.get("model")
    if not isinstance(base, dict):
        raise ConfigError(f"{where}.model: expected a ModelConfig mapping (timm, model_kwargs, ...)")
    model = from_dict(ModelConfig, {**base, "label": name}, f"{where}.model")
    policies = raw.get("policies") or {}
    if not isinstance(policies, dict):
        raise ConfigError(f"{where}.policies: expected a mapping of policy name -> fields")
    missing = [p for p in REQUIRED_POLICIES if p not in policies]
    if missing:
        raise ConfigError(f"{where}.policies: missing {missing}; every preset needs {list(REQUIRED_POLICIES)}")
    default = raw.get("default_policy", "full")
    if default not in policies:
        raise ConfigError(f"{where}.default_policy: {default!r} is not one of {sorted(policies)}")
    resolved = {pname: _validate_policy(name, pname, fields) for pname, fields in policies.items()}
    if resolved["linear_probe"].finetune != "head":
        raise ConfigError(f"{where}.policies.linear_probe: must set `finetune: head`")
    for key in ("family", "input_size", "normalization", "released"):
        if raw.get(key) is None:
            raise ConfigError(f"{where}.{key}: required")
    return Preset(
        name=name,
        model=model,
        policies=resolved,
        default_policy=default,
        family=str(raw["family"]),
        released=str(raw["released"]),
        pretrain_data=raw.get("pretrain_data"),
        license=raw.get("license"),
        input_size=int(raw["input_size"]),
        normalization=str(raw["normalization"]),
        notes=str(raw.get("notes") or "").strip(),
    )


@functools.cache
def load_presets() -> dict[str, Preset]:
    """All presets of the packaged presets.yaml, in file order (validated once, then cached)."""
    return {name: _parse(name, entry) for name, entry in preset_table().items()}


def families() -> list[str]:
    """The preset families, in file order."""
    return list(dict.fromkeys(p.family for p in load_presets().values()))


def get_preset(name: str) -> Preset:
    """The preset called `name`; a ConfigError lists the names otherwise."""
    presets = load_presets()
    if name not in presets:
        raise ConfigError(f"no preset {name!r}; presets: {list(presets)} (see `visionpoc models`)")
    return presets[name]


def preset(name: str, policy: str | None = None, label: str | None = None) -> ModelConfig:
    """The ModelConfig of preset `name` under `policy` (default: the preset's recommended one).

    `policy` is `full`, `linear_probe` or another policy the preset defines (`production` for the original PoC's
    Xception). `label` renames the model, e.g. to compare two policies of one preset in a run. The same
    ModelConfig as the config entry `{preset: name, policy: policy, label: label}`.
    """
    p = get_preset(name)
    chosen = policy or p.default_policy
    if chosen not in p.policies:
        raise ConfigError(f"preset {name!r} has no policy {chosen!r}; policies: {sorted(p.policies)}")
    return dataclasses.replace(p.policies[chosen], label=label) if label else p.policies[chosen]


# ------------------------------------------------------------------------------------------ facts


def pretrain_data(name_or_tag: str | None) -> str | None:
    """Pretraining data named by a timm tag or full tagged name, '+'-joined in training order.

    `orig_in21k` -> `in21k`; `mim_in22k_ft_in22k_in1k` -> `in22k+in1k`; `v2_webli` -> `webli`;
    `vit_pe_core_base_patch16_224.fb` -> `metaclip`. None when the tag does not say (`fb`, `fcmae`).
    """
    if not name_or_tag:
        return None
    arch, _, tag = name_or_tag.rpartition(".") if "." in name_or_tag else ("", "", name_or_tag)
    tokens = tag.lower().replace("+", "_").split("_")
    tokens = [_TOKEN_ALIAS.get(t, t) for t in tokens]
    found = list(dict.fromkeys(t for t in tokens if t in _DATA_TOKENS))
    if not found:
        found = [data for prefix, data in _ARCH_DATA.items() if arch.startswith(prefix)]
    return "+".join(found) or None


def hf_pretrain_name(hf: str) -> str:
    """A Hugging Face model id (or folder) read as a timm-style tag for `pretrain_data`:
    `google/vit-base-patch16-224-in21k` -> `vit_base_patch16_224_in21k` (pretraining: `in21k`)."""
    return hf.rstrip("/").rpartition("/")[2].replace("-", "_").replace(".", "_")


def tagged_name(timm_name: str, tag: str | None = None) -> str:
    """`arch.tag`: with `tag` when given, else the name's own tag, else timm's default tag for `arch`."""
    arch, dot, own = timm_name.partition(".")
    if tag:
        return f"{arch}.{tag}"
    if dot:
        return timm_name
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    return f"{arch}.{cfg.tag}" if cfg is not None and cfg.tag else arch


def may_have_seen_imagenet(pretrain_tag: str | None) -> bool | None:
    """Whether pretraining may have seen ImageNet (and so Stanford Dogs' test images, built from ImageNet).

    `pretrain_tag` is a timm tag, a full tagged name (best: it resolves `vit_pe_*.fb`) or a
    `pretrain_data()` string. True: the data contains ImageNet (ImageNet itself, or LVD-142M/1689M).
    False: no pretraining (`None`, as results record for `pretrained: false`) or data known to hold no
    ImageNet image (SAT-493M). None: unknown, e.g. web crawls (WebLI, LAION, MetaCLIP) that document no
    de-duplication against ImageNet.
    """
    if pretrain_tag is None:
        return False
    data = pretrain_data(pretrain_tag)
    if data is None:
        return None
    parts = set(data.split("+"))
    if parts & IMAGENET_DATA:
        return True
    if parts <= NON_IMAGENET_DATA:
        return False
    return None


def licence_kind(licence: str | None) -> LicenceKind:
    """`permissive` (commercial use allowed), `non-commercial`, `custom` (read it), or `unknown`."""
    if not licence:
        return "unknown"
    key = licence.strip().lower()
    if key in PERMISSIVE:
        return "permissive"
    if "-nc" in key or "noncommercial" in key or "non-commercial" in key:
        return "non-commercial"
    return "custom"


def timm_licence(timm_name: str) -> tuple[str | None, str | None]:
    """(licence, hf_hub_id) from timm's pretrained config of the tagged name, where timm has them."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(timm_name)
    except (RuntimeError, ValueError):
        return None, None
    if cfg is None:
        return None, None
    return getattr(cfg, "license", None) or None, getattr(cfg, "hf_hub_id", None) or None


def model_figures(mcfg: ModelConfig) -> tuple[int, float, tuple[int, int, int]]:
    """(parameters without classifier, forward GFLOPs at batch 1, input size) without weights.

    The model is built on the `meta` device (no memory, no compute; attention is counted, which the CPU
    kernels are not), with the CPU as fallback.
    """
    import torch

    from visionpoc import models

    for device in (torch.device("meta"), torch.device("cpu")):
        try:
            with device:
                model = models.create_model(mcfg, num_classes=0, pretrained=False)
            model.requires_grad_(False)  # FlopCounterMode trips on attention-pool latents that need grad
            c, h, w = (int(v) for v in models.data_config(model, mcfg)["input_size"])
            params, _ = models.count_params(model)
            return params, models.forward_gflops(model, (c, h, w), device), (c, h, w)
        except Exception as e:  # a model the meta device cannot run: count on the CPU
            if device.type == "cpu":
                raise
            log.debug("%s: meta-device count failed (%s); counting on the CPU", mcfg.timm, e)
    raise AssertionError("unreachable")


def list_presets(family: str | None = None, figures: bool = True) -> list[dict[str, Any]]:
    """One JSON-ready row per preset (optionally of one family), in presets.yaml order.

    Keys: name, label, timm, family, released, input_size, params (backbone, no classifier), gflops
    (forward, batch 1, at input_size), pretrain_tag, pretrain_data, imagenet_overlap (True/False/None),
    license, license_source (`timm` or `preset`), license_kind, hf_hub_id, default_policy, policies
    (name -> {finetune, lr, fraction}), notes. Without `figures` no model is built and timm is not asked:
    params, gflops and hf_hub_id are None, input_size is the preset's, the licence the preset's.
    """
    presets = list(load_presets().values())
    if family is not None:
        known = families()
        presets = [p for p in presets if p.family.lower() == family.lower()]
        if not presets:
            raise ConfigError(f"no preset of family {family!r}; families: {known}")
    rows = []
    for p in presets:
        mcfg = preset(p.name)
        params: int | None = None
        gflops: float | None = None
        size, licence, hub = mcfg.img_size or p.input_size, None, None
        if figures:
            params, gflops, (_, _, size) = model_figures(mcfg)
            licence, hub = timm_licence(mcfg.timm)
        source = "timm" if licence else ("preset" if p.license else None)
        licence = licence or p.license
        tag = mcfg.timm.partition(".")[2] or None
        policies = {
            name: {"finetune": m.finetune, "lr": m.lr}
            | ({"fraction": m.fraction} if m.finetune == "top_fraction" else {})
            for name, m in p.policies.items()
        }
        rows.append(
            {
                "name": p.name,
                "label": mcfg.label,
                "timm": mcfg.timm,
                "family": p.family,
                "released": p.released,
                "input_size": int(size),
                "params": params,
                "gflops": None if gflops is None else round(gflops, 2),
                "pretrain_tag": tag,
                "pretrain_data": p.pretrain_data or pretrain_data(mcfg.timm),
                "imagenet_overlap": may_have_seen_imagenet(p.pretrain_data or mcfg.timm),
                "license": licence,
                "license_source": source,
                "license_kind": licence_kind(licence),
                "hf_hub_id": hub,
                "default_policy": p.default_policy,
                "policies": policies,
                "notes": p.notes,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------ table

_OVERLAP = {True: "yes", False: "no", None: "unknown"}
_LICENCE_MARK = {
    "permissive": "",
    "non-commercial": " [NON-COMMERCIAL]",
    "custom": " [CUSTOM: review]",
    "unknown": " [UNKNOWN]",
}


def _policies_cell(r: dict[str, Any]) -> str:
    """`production 0.001, full 0.0001, linear_probe grid`: every policy with its LR, the default first (a
    linear probe without one searches its grid)."""
    names = [r["default_policy"], *(p for p in r["policies"] if p != r["default_policy"])]
    lrs = {p: "grid" if r["policies"][p]["lr"] is None else f"{r['policies'][p]['lr']:g}" for p in names}
    return ", ".join(f"{p} {lrs[p]}" for p in names)


def _cells(r: dict[str, Any]) -> list[str]:
    licence = (r["license"] or "-") + _LICENCE_MARK[r["license_kind"]]
    if r["license_source"] == "preset":
        licence += " (preset)"
    return [
        r["name"],
        r["timm"],
        r["family"],
        str(r["input_size"]),
        f"{r['params'] / 1e6:.1f}",
        f"{r['gflops']:.1f}",
        r["pretrain_data"] or "?",
        _OVERLAP[r["imagenet_overlap"]],
        licence,
        _policies_cell(r),
    ]


HEADERS = [
    "preset",
    "timm",
    "family",
    "input",
    "params (M)",
    "GFLOPs",
    "pretrain data",
    "ImageNet overlap",
    "licence",
    "policies: lr (default first)",
]
USAGE = (
    "In a config, one line per model: `- {preset: NAME}` (its default policy) or "
    "`- {preset: NAME, policy: full|linear_probe}`;\nfields on the line (lr, img_size, ...) override "
    "the preset's."
)


NARROW = 100  # columns of the default `visionpoc models` table
_SHORT_MARK = {"permissive": "", "non-commercial": " [NC]", "custom": " [review]", "unknown": " [unknown]"}


def _narrow_table(rows: list[dict[str, Any]]) -> str:
    """The default table, within NARROW columns and without figures (no model built): the names a config
    uses, the input size, the ImageNet overlap and the licence."""
    headers = ["preset", "timm", "input", "ImageNet", "licence"]
    cells = [
        [r["name"], r["timm"], str(r["input_size"]), _OVERLAP[r["imagenet_overlap"]], _licence_short(r)] for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if i == 2 else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    notes = [
        "ImageNet: whether pretraining saw ImageNet, where Stanford Dogs' test images come from.",
        "Licences: [NC] non-commercial; [review] a licence of its own, to read before production use.",
        "--wide adds family, params, GFLOPs, pretraining data and each policy's lr (it builds every model).",
        "In a config, one line per model: `- {preset: NAME}` (its default policy) or",
        "`- {preset: NAME, policy: full|linear_probe}`; fields on the line (lr, img_size, ...) win.",
    ]
    out = [line(headers), "-" * len(line(headers)), *(line(row) for row in cells), *notes]
    return "\n".join(s.rstrip() for s in out)


def _licence_short(r: dict[str, Any]) -> str:
    return (r["license"] or "-") + _SHORT_MARK[r["license_kind"]]


def format_models_table(rows: list[dict[str, Any]], markdown: bool = False, wide: bool = True) -> str:
    """`list_presets` rows as an aligned text table (or a Markdown table), with licence warnings and, in
    text, how a config names a preset. `wide=False`: the default table of `visionpoc models`, within
    NARROW columns, which needs no figures (`list_presets(figures=False)`)."""
    if not wide and not markdown:
        return _narrow_table(rows)
    cells = [_cells(r) for r in rows]
    numeric = {3, 4, 5}
    if markdown:
        lines = [
            "| " + " | ".join(HEADERS) + " |",
            "|" + "|".join("---:" if i in numeric else "---" for i in range(len(HEADERS))) + "|",
        ]
        lines += [
            "| " + " | ".join(c if i not in (0, 1) else f"`{c}`" for i, c in enumerate(row)) + " |" for row in cells
        ]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(HEADERS)]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if i in numeric else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    out = [line(HEADERS), "-" * len(line(HEADERS))] + [line(row) for row in cells]
    out.append(
        "params: backbone without classifier; GFLOPs: forward, batch 1, at the input size (attention "
        "included); (preset): licence not in timm's config, taken from presets.yaml."
    )
    out.append(USAGE)
    return "\n".join(s.rstrip() for s in out)
