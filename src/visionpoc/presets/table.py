"""`models:` entries that name a preset, resolved at config load time into plain ModelConfig fields.

`{preset: dinov3_b16, policy: full}` takes the preset's fields from the packaged `configs/presets.yaml`
(timm name, model_kwargs, img_size, ...), lays the policy's fields over them (finetune, fraction, lr),
then the entry's own fields over both (`model_kwargs` is merged key by key). The label defaults to the
preset name, and the entry keeps `preset` and `policy` for the record. Without `policy`, the preset's
default policy applies, or the one whose finetune matches an explicit `finetune:` (a finetune no policy
sets, such as `top_fraction` on a ViT, keeps the default policy's LR and is recorded as the policy).
`finetune: linear_probe`, the name users type, becomes `head` (frozen backbone, trained head) with
`policy: linear_probe` recorded, with or without a preset.

A foundation module: it reads presets.yaml as plain data (no timm), so that `config` can resolve
entries; `presets` validates that file and adds the facts (params, GFLOPs, licences).
"""

from __future__ import annotations

import copy
import functools
from importlib import resources
from typing import Any

import yaml

from visionpoc.errors import ConfigError
from visionpoc.typed import SetValue

PRESETS_FILE = "presets.yaml"
LINEAR_PROBE = "linear_probe"
FINETUNES = ("full", LINEAR_PROBE, "head", "top_fraction")  # what `finetune:` accepts (linear_probe = head)
# Policies an entry without a preset may name -> the finetune each sets
GENERIC_POLICIES = {"full": "full", LINEAR_PROBE: "head"}


@functools.cache
def _table() -> dict[str, Any]:
    text = resources.files("visionpoc").joinpath("configs", PRESETS_FILE).read_text()
    raw = yaml.safe_load(text) or {}
    entries = raw.get("presets") if isinstance(raw, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"{PRESETS_FILE}: expected a top-level `presets:` mapping of name -> preset")
    return entries


def preset_table() -> dict[str, Any]:
    """The raw `presets:` mapping of the packaged presets.yaml, in file order (a copy: callers may edit)."""
    return copy.deepcopy(_table())


def _text(value: Any) -> Any:
    """A scalar as typed: `--set` wraps non-string YAML scalars (`null`, `yes`) in SetValue."""
    if isinstance(value, SetValue):
        return None if value.value is None else value.text
    return value


def _pick_policy(name: str, finetune_of: dict[str, Any], default: str, finetune: Any, where: str) -> str | None:
    """The preset's default policy, or, for an explicit `finetune:`, the policy that sets that finetune
    (None if none does)."""
    matching = [p for p, f in finetune_of.items() if f == finetune]
    if finetune is None or default in matching:
        return default
    if len(matching) <= 1:
        return matching[0] if matching else None
    raise ConfigError(
        f"{where}.finetune: {finetune!r} matches several policies of preset {name!r}; name one with "
        f"`policy:` ({', '.join(f'{p} (finetune {f})' for p, f in finetune_of.items())})"
    )


def resolve_entry(entry: Any, where: str) -> Any:
    """One `models:` entry (a raw mapping) as plain ModelConfig fields; `where` (`models.2`) prefixes errors.

    Anything that is not a mapping is returned as is: `from_dict` names the key and the problem.
    """
    if not isinstance(entry, dict):
        return entry
    out = dict(entry)
    name, policy, finetune = (_text(out.get(k)) for k in ("preset", "policy", "finetune"))
    if finetune is not None and (not isinstance(finetune, str) or finetune not in FINETUNES):
        raise ConfigError(f"{where}.finetune: {finetune!r} is not one of {list(FINETUNES)} (linear_probe = head)")
    if finetune == LINEAR_PROBE:
        finetune = out["finetune"] = "head"
        policy = LINEAR_PROBE if policy is None else policy
    if name is None:
        if policy is None:
            return out
        if not isinstance(policy, str) or policy not in GENERIC_POLICIES:
            raise ConfigError(
                f"{where}.policy: {policy!r} needs a `preset:`; without one, a policy is one of "
                f"{list(GENERIC_POLICIES)} (or set `finetune:` full, linear_probe, head or top_fraction)"
            )
        wanted = GENERIC_POLICIES[policy]
        if finetune is not None and finetune != wanted:
            raise ConfigError(f"{where}.finetune: {finetune!r} contradicts `policy: {policy}` (finetune {wanted})")
        return {**out, "finetune": wanted, "policy": policy}

    table = _table()
    if not isinstance(name, str) or name not in table:
        raise ConfigError(f"{where}.preset: no preset {name!r}; presets: {list(table)} (see `visionpoc models`)")
    raw = table[name]
    base: dict[str, Any] = copy.deepcopy(raw.get("model") or {})
    policies: dict[str, Any] = raw.get("policies") or {}
    finetune_of = {p: (f or {}).get("finetune", base.get("finetune", "full")) for p, f in policies.items()}
    default = raw.get("default_policy", "full")
    if policy is None:
        policy = _pick_policy(name, finetune_of, default, finetune, where)
        if policy is None:  # a finetune no policy sets (top_fraction on a ViT): it names the policy
            fields = {k: v for k, v in (policies[default] or {}).items() if k != "finetune"}
            return _merge(base, {**fields, "finetune": finetune}, out, name, finetune)
    if not isinstance(policy, str) or policy not in policies:
        raise ConfigError(f"{where}.policy: preset {name!r} has no policy {policy!r}; policies: {list(policies)}")
    wanted = finetune_of[policy]
    if finetune is not None and finetune != wanted:
        raise ConfigError(
            f"{where}.finetune: {finetune!r} contradicts policy {policy!r} of preset {name!r} (finetune "
            f"{wanted}); drop `finetune:` or pick another policy: {list(policies)}"
        )
    return _merge(base, copy.deepcopy(policies[policy] or {}), out, name, policy)


def _merge(base: dict[str, Any], fields: dict[str, Any], out: dict[str, Any], name: str, policy: str) -> dict[str, Any]:
    """The preset's model fields, then the policy's, then the entry's own (`model_kwargs` key by key)."""
    resolved = {**base, "label": name, **fields, **out, "preset": name, "policy": policy}
    if "lr" not in out and resolved.get("lr") is not None:  # the policy's recommended rate, not the user's
        resolved["lr_source"] = "preset"
    if isinstance(out.get("model_kwargs"), dict):  # `{depth: 1}` keeps DINOv3's `global_pool: token`
        resolved["model_kwargs"] = {**(base.get("model_kwargs") or {}), **out["model_kwargs"]}
    return resolved
