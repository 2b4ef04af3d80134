"""A deployed model's entry, checked without torch: the file, its input and output against `preprocess`
and `classes`, and its class map against the dataset's classes.

The ONNX graph is read with `onnx` (its header and shapes; external weights are not loaded). Every
message names the key the user sets (`models.2.preprocess`, or `evaluate`'s `--preprocess`) and the fix.
A class name matches a dataset class by its display name or its folder (exactly, else ignoring case and
`_` vs space); dataset classes the map lacks and map classes the dataset lacks are a warning and a
caveat (`ClassMatch.unknown`, `.ignored`), an error only when nothing overlaps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from visionpoc.config import ModelConfig, PreprocessConfig
from visionpoc.errors import ConfigError

DEPLOYED = "deployed"  # a deployed model's `finetune` and `policy` in its result: scored as it is, not trained
FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64"}  # onnx.TensorProto element types we can feed

Dim = int | str | None  # a fixed size, a symbolic one ('N', 'batch'), or unknown


@dataclass(frozen=True)
class Keys:
    """What the user calls each setting: config keys (`models.2.onnx`) or `visionpoc evaluate`'s flags."""

    onnx: str
    preprocess: str
    classes: str


def entry_keys(i: int) -> Keys:
    """The keys of the config's `models` entry `i`."""
    return Keys(f"models.{i}.onnx", f"models.{i}.preprocess", f"models.{i}.classes")


@dataclass(frozen=True)
class Port:
    """A graph input or output: its name, shape and element type."""

    name: str
    dims: tuple[Dim, ...]
    elem_type: int

    @property
    def shape(self) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"


@dataclass(frozen=True)
class OnnxIO:
    """What the file declares: its image input, its first output, and its parameter count."""

    input: Port
    output: Port
    params: int


@dataclass(frozen=True)
class ClassMatch:
    """The model's outputs mapped to the dataset's classes."""

    index: tuple[int | None, ...]  # per output: the dataset class index, or None (not a class of the dataset)
    unknown: tuple[str, ...]  # dataset classes (display names) that no output names: the model cannot answer them
    ignored: tuple[str, ...]  # output names that are not dataset classes: their outputs are dropped


def _port(p: object) -> Port:
    t = p.type.tensor_type  # type: ignore[attr-defined]
    dims: list[Dim] = []
    for d in t.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return Port(p.name, tuple(dims), t.elem_type)  # type: ignore[attr-defined]


def read_io(path: Path, keys: Keys) -> OnnxIO:
    """The input, first output and parameter count of the ONNX file at `path` (weights not loaded)."""
    import numpy as np
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, OSError: not an ONNX file
        raise ConfigError(
            f"{keys.onnx}: {path} is not a readable ONNX file ({type(e).__name__}: {e}); point it to the "
            "exported model (.onnx)"
        ) from e
    g = model.graph
    weights = {t.name for t in g.initializer}
    inputs = [p for p in g.input if p.name not in weights]
    if len(inputs) != 1 or not g.output:
        raise ConfigError(
            f"{keys.onnx}: {path} has {len(inputs)} inputs and {len(g.output)} outputs; a deployed classifier "
            "takes one image batch and gives class scores first"
        )
    params = sum(int(np.prod(t.dims)) for t in g.initializer)
    return OnnxIO(_port(inputs[0]), _port(g.output[0]), params)


def input_problem(port: Port, pp: PreprocessConfig, keys: Keys) -> str | None:
    """What makes the model's input disagree with `preprocess` (layout, channels, size), or None."""
    d = port.dims
    if len(d) != 4:
        return (
            f"{keys.onnx}: the model's input {port.name!r} has shape {port.shape}, not a batch of images "
            "(4 dimensions, NCHW or NHWC)"
        )
    if port.elem_type not in FLOAT_TYPES:
        return f"{keys.onnx}: the model's input {port.name!r} is not a float tensor (ONNX type {port.elem_type})"
    c, hw, other = (1, (2, 3), "NHWC") if pp.layout == "NCHW" else (3, (1, 2), "NCHW")
    if isinstance(d[c], int) and d[c] != 3:
        flipped = 3 if pp.layout == "NCHW" else 1
        if d[flipped] == 3:
            return (
                f"{keys.preprocess}.layout is {pp.layout}, but the model's input {port.name!r} is {port.shape}, "
                f"channels {'last' if other == 'NHWC' else 'first'}: set `layout: {other}`"
            )
        return f"{keys.onnx}: the model's input {port.name!r} is {port.shape}: {d[c]} channels, not 3 (RGB or BGR)"
    sizes = [d[a] for a in hw]
    if any(isinstance(s, int) and s != pp.size for s in sizes):
        side = next(s for s in sizes if isinstance(s, int))
        fix = f"set `size: {side}`" if sizes[0] == sizes[1] else "a non-square input is not supported"
        return (
            f"{keys.preprocess}.size is {pp.size}, but the model's input {port.name!r} is {port.shape} "
            f"({pp.layout}): it takes {sizes[0]}x{sizes[1]} images; {fix}"
        )
    return None


def output_problem(port: Port, n_names: int, keys: Keys) -> str | None:
    """What makes the model's output disagree with the number of class names, or None."""
    k = port.dims[-1] if port.dims else None
    if isinstance(k, int) and k != n_names:
        return (
            f"{keys.classes}: {n_names} class names, but the model's output {port.name!r} is {port.shape}: "
            f"{k} scores per image; list one dataset class name per output, in the output's order"
        )
    return None


def _names_file(path: Path, keys: Keys) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".json" and text.lstrip()[:1] not in ("[", "{"):
        lines = text.rstrip("\n").splitlines()
        if any(not x.strip() for x in lines):
            raise ConfigError(f"{keys.classes}: {path} has an empty line: one class name per line, one per output")
        return [x.strip() for x in lines]
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{keys.classes}: {path} is not valid JSON ({e})") from e
    if isinstance(data, list):
        return [str(x) for x in data]
    if isinstance(data, dict):
        try:
            by_index = {int(k): str(v) for k, v in data.items()}
        except ValueError:
            by_index = {}
        if sorted(by_index) == list(range(len(data))):
            return [by_index[i] for i in range(len(data))]
    raise ConfigError(
        f'{keys.classes}: {path} must hold a JSON list of names or an object {{"0": "name", "1": ...}} '
        "keyed by every output index from 0"
    )


def read_classes(classes: tuple[str, ...] | str | None, keys: Keys) -> list[str]:
    """The class name of each output index: the inline list, or the file (one name per line, a JSON list,
    or JSON `{"index": "name"}`)."""
    if classes is None:
        raise ConfigError(
            f"{keys.classes}: missing; a deployed model needs the dataset class name of each output index, as a "
            'list or a file (one name per line, a JSON list, or JSON {"0": "name"})'
        )
    if isinstance(classes, str):
        path = Path(classes).expanduser()
        if not path.is_file():
            raise ConfigError(f"{keys.classes}: {path} not found; point it to the file of class names, or list them")
        names = _names_file(path, keys)
    else:
        names = [str(c) for c in classes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if not names or twice:
        why = f"{twice} listed more than once" if twice else "no class name"
        raise ConfigError(f"{keys.classes}: {why}; name each output index once")
    return names


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def match_classes(names: list[str], class_names: list[str], class_folders: list[str], keys: Keys) -> ClassMatch:
    """Map each output name to a dataset class (by display name or folder, then loosely); nothing in common
    is an error, two outputs on one class too."""
    exact: dict[str, int] = {}
    loose: dict[str, int] = {}
    for i, (shown, folder) in enumerate(zip(class_names, class_folders, strict=True)):
        for n in (shown, folder):
            exact.setdefault(n, i)
            loose.setdefault(_norm(n), i)
    index = [exact.get(n, loose.get(_norm(n))) for n in names]
    hits = [i for i in index if i is not None]
    if not hits:
        raise ConfigError(
            f"{keys.classes}: none of the model's {len(names)} class names is a class of the dataset "
            f"(e.g. {names[:3]} vs the dataset's {class_names[:3]}): name each output by the dataset class it "
            "stands for (its name or its folder)"
        )
    dup = sorted({class_names[i] for i in hits if hits.count(i) > 1})
    if dup:
        raise ConfigError(f"{keys.classes}: several outputs name the dataset class(es) {dup}; name each class once")
    unknown = tuple(class_names[i] for i in range(len(class_names)) if i not in set(hits))
    ignored = tuple(n for n, i in zip(names, index, strict=True) if i is None)
    return ClassMatch(tuple(index), unknown, ignored)


def problems(mcfg: ModelConfig, keys: Keys) -> list[str]:
    """Everything wrong with the deployed entry `mcfg` that can be seen without the data, each message
    naming its key and the fix (no torch imported)."""
    path = Path(mcfg.onnx or "").expanduser()
    if not path.is_file():
        return [f"{keys.onnx}: {path} not found; point it to the deployed model's .onnx file"]
    out = []
    if mcfg.preprocess is None:
        out.append(
            f"{keys.preprocess}: missing; say how the model wants its input (size, resize, crop, mean, std, "
            "channels, layout): docs/models.md has an example"
        )
    names: list[str] | None = None
    try:
        names = read_classes(mcfg.classes, keys)
    except ConfigError as e:
        out.append(str(e))
    try:
        io = read_io(path, keys)
    except ConfigError as e:
        return [*out, str(e)]
    if mcfg.preprocess is not None and (p := input_problem(io.input, mcfg.preprocess, keys)):
        out.append(p)
    if names is not None and (p := output_problem(io.output, len(names), keys)):
        out.append(p)
    return out


def data_problem(mcfg: ModelConfig, keys: Keys, class_names: list[str], class_folders: list[str]) -> str | None:
    """The class map against the dataset's classes: a message when nothing overlaps, else None."""
    try:
        names = read_classes(mcfg.classes, keys)
    except ConfigError:
        return None  # said by `problems`
    try:
        match_classes(names, class_names, class_folders, keys)
    except ConfigError as e:
        return str(e)
    return None
