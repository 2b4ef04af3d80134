"""Typed trees of frozen dataclasses from plain dicts (parsed YAML): unknown keys, missing keys and
wrong types are rejected with a ConfigError naming the dotted key (`models.0.lr`); `a.b=value`
overrides are applied to the plain dict first. YAML is read with `BoundedLoader`: a safe loader that
refuses, before building anything, a document whose aliases expand beyond `MAX_YAML_VALUES` values (an
alias bomb) or refer to themselves. Generic: it knows nothing of visionpoc's settings."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import yaml

from visionpoc.errors import ConfigError

MAX_YAML_VALUES = 100_000
"""The most values (scalars, lists, mappings) a YAML document may hold once its aliases are expanded; a
config holds a few hundred, and an alias bomb billions."""


class YamlTooLargeError(yaml.YAMLError):
    """A YAML document that expands beyond `MAX_YAML_VALUES` values, or an alias that contains itself."""


class BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that measures the composed node graph (aliases counted at every use, each node
    measured once) and raises YamlTooLargeError before constructing anything too large or cyclic."""

    def construct_document(self, node: yaml.Node) -> Any:
        _expanded_size(node, {}, set())
        return super().construct_document(node)  # type: ignore[no-untyped-call]


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """The number of values `node` stands for with every alias expanded; memoised by node, so a bomb is
    measured in time linear in its text."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise YamlTooLargeError(f"an alias refers to the value that contains it (line {node.start_mark.line + 1})")
    open_nodes.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(c, sizes, open_nodes) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes, open_nodes) + _expanded_size(v, sizes, open_nodes) for k, v in node.value)
    open_nodes.discard(key)
    if size > MAX_YAML_VALUES:
        raise YamlTooLargeError(
            f"the YAML expands to more than {MAX_YAML_VALUES:,} values through its aliases (`*name`) "
            f"(line {node.start_mark.line + 1}): an alias bomb, or far too large for a config; write the values out"
        )
    sizes[key] = size
    return size


@dataclasses.dataclass(frozen=True)
class SetValue:
    """A `--set KEY=VALUE` value that YAML reads as a non-string scalar (`2024`, `yes`, `null`): a string
    field takes the text as typed, any other field the YAML reading."""

    text: str
    value: Any


def _plain(v: Any) -> Any:
    if isinstance(v, SetValue):
        return v.value
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def _wants_text(tp: Any, parsed: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return str in args and not (parsed is None and type(None) in args)
    return False


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to `tp` where that is lossless, else raise ConfigError naming `key`."""
    if isinstance(value, SetValue):
        value = value.text if _wants_text(tp, value.value) else value.value
    origin = typing.get_origin(tp)
    if tp is Any:
        return _plain(value)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: unexpected value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _plain(dict(value))
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return tuple(_check_type(v, item_tp, f"{key}.{i}") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this module, not user input


def from_dict(cls: Any, data: Any, prefix: str = "") -> Any:
    """An instance of dataclass `cls` from `data`; `prefix` is the dotted key of `data` in messages."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"Unknown config key {where!r}; valid keys here: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        where = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            kwargs[f.name] = _check_type(data[f.name], hints[f.name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {where!r}")
    return cls(**kwargs)


def flat_keys(tree: Any, lists: bool = True, prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1}}` -> `{"train.lr": 1}`; list items by index (`models.0.lr`), or, with
    `lists=False`, each list as one value."""
    if isinstance(tree, dict) and tree:
        items: Any = tree.items()
    elif lists and isinstance(tree, (list, tuple)) and tree:
        items = enumerate(tree)
    else:  # a leaf, or an empty dict/list
        return {prefix[:-1]: tree}
    return {k: v for key, sub in items for k, v in flat_keys(sub, lists, f"{prefix}{key}.").items()}


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict/list form of a config (tuples become lists), ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b=value` (or `models.0.lr=1e-3`) to the raw dict; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
    key, text = assignment.split("=", 1)
    try:
        value = yaml.load(text, Loader=BoundedLoader) if text.strip() else ""
    except YamlTooLargeError as e:
        raise ConfigError(f"--set {key}: refused, {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({e})") from e
    if value is None or isinstance(value, (bool, int, float)):
        value = SetValue(text.strip(), value)  # `data.root=2024` stays the text "2024"
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {where!r} is not an index of a list of {len(node)} entries")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if part not in node:
                    raise ConfigError(f"--set {key}: Unknown config key {where!r}")
                node = node[part]
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])!r} is a value, not a section")
