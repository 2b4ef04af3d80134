"""Where an `hf:` model entry points: a local folder written by `save_pretrained`, or a hub id read from
the Hugging Face cache (or the hub when it answers); the exact revision loaded; what preflight says of
it; the error when its files are not there. Imports neither torch nor transformers."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from visionpoc.errors import WeightsError

HF_EXTRA = "pip install 'visionpoc[hf]'"
ARCH_DIR = "hf"  # in a run's model folder: config.json and preprocessor_config.json of the trained model
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass(frozen=True)
class HfSource:
    ref: str
    """What `from_pretrained` gets: an absolute folder, or a hub id."""
    local: bool
    """A folder: read as it is, never from the hub."""


def _path_like(hf: str) -> bool:
    return hf.startswith(("/", ".", "~")) or hf.count("/") > 1 or "\\" in hf


def hf_source(hf: str) -> HfSource:
    """The folder `hf` names when it exists (relative to the working folder), else the hub id."""
    path = Path(hf).expanduser()
    if path.is_dir():
        return HfSource(str(path.resolve()), True)
    if _path_like(hf) or not REPO_ID.fullmatch(hf) or ".." in hf:
        raise WeightsError(
            f"hf: {hf!r} is not a folder (it does not exist) and not a Hugging Face hub id (`owner/name`): point "
            "it to a folder written by `save_pretrained` (config.json, model.safetensors) or name a hub model"
        )
    return HfSource(hf, False)


def cached_file(repo_id: str, name: str = "config.json") -> Path | None:
    """The file of the hub model's snapshot in the local cache (`.../snapshots/<commit>/<name>`), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, name)
    return Path(found) if isinstance(found, str) else None


def revision(src: HfSource) -> str | None:
    """The exact weights loaded: the commit hash of the cached hub snapshot, or the absolute folder."""
    if src.local:
        return src.ref
    found = cached_file(src.ref)
    return found.parent.name if found is not None else None


def source_problem(hf: str, hub_online: Callable[[], bool]) -> str | None:
    """What would stop the `hf:` entry from loading, or None: transformers missing, a folder without
    config.json, or a hub id that is not cached while the hub cannot be reached (`hub_online`)."""
    if importlib.util.find_spec("transformers") is None:
        return f"hf: {hf!r} needs the `transformers` package: {HF_EXTRA}"
    try:
        src = hf_source(hf)
    except WeightsError as e:
        return str(e)
    if src.local:
        if not (Path(src.ref) / "config.json").is_file():
            return f"hf: the folder {src.ref} has no config.json: give a folder written by `save_pretrained`"
        return None
    if cached_file(src.ref) is None and not hub_online():
        from huggingface_hub.constants import HF_HUB_CACHE

        return (
            f"hf: {hf!r} is not in the Hugging Face hub cache ({HF_HUB_CACHE}) and the hub cannot be reached "
            f"(fix: run `hf download {hf}` with internet access, or point `hf:` to a local folder)"
        )
    return None


def hf_weights_error(label: str, src: HfSource, e: Exception) -> WeightsError:
    """The error for a model whose files cannot be read: the same advice as for timm weights."""
    from huggingface_hub.constants import HF_HUB_CACHE

    where = f"the folder {src.ref}" if src.local else f"{src.ref} in the HF hub cache {HF_HUB_CACHE}, then online"
    return WeightsError(
        f"model {label!r}: could not fetch the pretrained weights of the Hugging Face model {src.ref!r} (looked "
        f"for {where}): {type(e).__name__}: {str(e).strip().rstrip('.')}. Fix: run once with internet access to fill the cache "
        f"(`hf download {src.ref}`), or point `hf:` to a folder written by `save_pretrained`"
    )
