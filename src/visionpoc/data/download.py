"""Download and extract the official Stanford Dogs archives into ROOT, resumably and atomically.

- Archives (`images.tar`, `annotation.tar`, `lists.tar`) go to `ROOT/.downloads/NAME.part` and are
  renamed to `NAME` only once all Content-Length bytes arrived; a re-run resumes a `.part` with a
  `Range` request. With `from_dir` the user's own archives are used and nothing is downloaded.
- Every archive is read to the end before extraction. A truncated or corrupt archive is an error; a
  downloaded one is deleted so that the next run fetches it again, a `from_dir` one is left alone.
- Extraction goes into `ROOT/.extract-tmp-*`, is checked with `read_stanford_dogs`, then `Images`,
  `Annotation` and the .mat lists are moved into ROOT and the marker `ROOT/.visionpoc-extracted` is
  written last: a crash never leaves a tree that `is_extracted` reports as complete.
- Downloaded archives are kept in `ROOT/.downloads` afterwards (delete them to save space).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import requests
from tqdm import tqdm

from visionpoc.data.sources import find_dogs_lists, read_stanford_dogs
from visionpoc.errors import DataError
from visionpoc.runfiles import atomic_write_json

log = logging.getLogger(__name__)

OFFICIAL_URL = "http://vision.stanford.edu/aditya86/ImageNetDogs/"
ARCHIVES = ("images.tar", "annotation.tar", "lists.tar")
ENV_URL = "VISIONPOC_DOGS_URL"  # env var overriding the base URL (mirrors, tests)
MARKER = ".visionpoc-extracted"
DOWNLOADS = ".downloads"
TMP_PREFIX = ".extract-tmp-"
_FILTER_ERROR: Any = getattr(tarfile, "FilterError", ())  # Python < 3.11.4 has no filter (catches nothing)
LIST_FILES = ("file_list.mat", "train_list.mat", "test_list.mat")
TIMEOUT = (30, 120)  # seconds: connect, read
CHUNK = 1 << 16  # bytes; a transfer cut mid-chunk loses that chunk (urllib3 drops it), never more


def resolve_base_url(base_url: str | None) -> str:
    """The archives' base URL: `base_url` if given, else $VISIONPOC_DOGS_URL, else the official site."""
    return base_url or os.environ.get(ENV_URL) or OFFICIAL_URL


def is_extracted(root: Path) -> bool:
    """True when a previous run finished: marker written last, lists and Images present."""
    root = Path(root)
    return (root / MARKER).is_file() and (root / "Images").is_dir() and find_dogs_lists(root) is not None


def _resume_hint(part: Path) -> str:
    kept = (
        f"the partial file {part} is kept; re-run 'visionpoc data download' to resume"
        if part.is_file() and part.stat().st_size > 0
        else "re-run 'visionpoc data download' when the network is back"
    )
    return (
        f"{kept}, pass a mirror with --base-url (or ${ENV_URL}), or use archives you already have: "
        "'visionpoc data download --from DIR'"
    )


def _download(url: str, dest: Path, progress: bool) -> None:
    """Stream `url` into `dest.part` (resuming it when present), then rename it to `dest`."""
    part = dest.with_name(dest.name + ".part")
    for _attempt in range(2):  # a second attempt only restarts from zero after a useless .part
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Accept-Encoding": "identity"}  # byte counts and ranges refer to the file itself
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT) as r:
                if r.status_code == 416 and offset:  # nothing left past `offset`: complete or too long
                    m = re.search(r"/(\d+)\s*$", r.headers.get("Content-Range", ""))
                    if m and int(m.group(1)) == offset:
                        log.info("%s: already complete (%d bytes)", dest.name, offset)
                        os.replace(part, dest)
                        return
                    log.warning("%s: %s does not match the remote file; restarting", dest.name, part)
                    part.unlink()
                    continue
                if r.status_code >= 400:
                    raise DataError(
                        f"cannot download {url}: HTTP {r.status_code} {r.reason}; check the URL "
                        f"(--base-url or ${ENV_URL}) or put the archives in a folder and pass --from"
                    )
                total: int | None = None
                m = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", r.headers.get("Content-Range", "").strip())
                if r.status_code == 206 and m and int(m.group(1)) == offset:
                    total, mode = int(m.group(2)), "ab"
                    log.info("%s: resuming at byte %d", dest.name, offset)
                else:  # 200 (the server ignored Range) or an unusable 206: start again
                    if offset:
                        log.info("%s: the server does not resume; downloading from the start", dest.name)
                    offset, mode = 0, "wb"
                    if "Content-Length" in r.headers and "Content-Encoding" not in r.headers:
                        total = int(r.headers["Content-Length"])
                size = offset
                bar = tqdm(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    disable=not progress,
                )
                with bar, open(part, mode) as f:
                    for chunk in r.iter_content(chunk_size=CHUNK):
                        f.write(chunk)
                        size += len(chunk)
                        bar.update(len(chunk))
        except requests.RequestException as e:
            raise DataError(f"download of {url} failed ({e}); {_resume_hint(part)}") from e
        except OSError as e:  # after RequestException, which is an OSError too
            raise DataError(f"cannot write {part} ({e}); free disk space, then {_resume_hint(part)}") from e
        if total is not None and size != total:
            raise DataError(f"download of {url} stopped at {size} of {total} bytes; {_resume_hint(part)}")
        if total is None:
            log.warning("%s: the server sent no size; completeness is checked when reading it", url)
        os.replace(part, dest)
        log.info("%s: downloaded (%d bytes)", dest.name, size)
        return
    raise DataError(f"cannot download {url}: the server refuses the range requests; delete {part} and re-run")


class _BadArchive(Exception):
    """An archive that cannot be read to the end."""


def _check_archive(path: Path, progress: bool) -> int:
    """Read every member of `path` to the end; return the member count or raise DataError."""
    count = 0
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tqdm(tar, desc=f"checking {path.name}", unit=" files", disable=not progress):
                parts = PurePosixPath(m.name).parts
                if m.name.startswith(("/", "\\")) or ".." in parts or not (m.isfile() or m.isdir()):
                    raise DataError(
                        f"{path} holds an unsafe or unexpected member {m.name!r}: it is not an "
                        "official Stanford Dogs archive; replace it with the official one"
                    )
                if m.isfile():
                    f = tar.extractfile(m)
                    while f is not None and f.read(CHUNK):
                        pass
                count += 1
            end = tar.offset  # tarfile stops quietly at a cut between members: need the end marker
        with open(path, "rb") as fh:
            fh.seek(end)
            if fh.read(1024) != bytes(1024):
                raise tarfile.ReadError("no end-of-archive marker: the file is cut short")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise _BadArchive(str(e)) from e
    if count == 0:
        raise _BadArchive("it holds no files")
    return count


def _get_archives(root: Path, base_url: str | None, from_dir: Path | None, progress: bool) -> list[Path]:
    """Paths of the three archives, downloaded (or taken from `from_dir`) and checked complete."""
    if from_dir is not None:
        missing = [n for n in ARCHIVES if not (from_dir / n).is_file()]
        if missing:
            raise DataError(
                f"{', '.join(missing)} not found in {from_dir}: put the official archives "
                f"({', '.join(ARCHIVES)}) there, or run without --from to download them"
            )
        paths = [from_dir / n for n in ARCHIVES]
    else:
        url = resolve_base_url(base_url).rstrip("/") + "/"
        downloads = root / DOWNLOADS
        downloads.mkdir(parents=True, exist_ok=True)
        paths = [downloads / n for n in ARCHIVES]
        for p in paths:
            if p.is_file():
                log.info("%s: already downloaded", p)
            else:
                log.info("downloading %s%s to %s", url, p.name, p)
                _download(url + p.name, p, progress)
    for p in paths:
        try:
            _check_archive(p, progress)
        except _BadArchive as e:
            if from_dir is not None:
                raise DataError(
                    f"{p} is truncated or corrupt ({e}): replace it with a complete copy of the "
                    "official archive (or run without --from to download it)"
                ) from e
            p.unlink(missing_ok=True)
            raise DataError(
                f"{p} is truncated or corrupt ({e}); it has been deleted: re-run "
                "'visionpoc data download' to download it again"
            ) from e
    return paths


def _extract(root: Path, archives: list[Path], progress: bool) -> None:
    """Extract into a temp dir in ROOT, validate, move into ROOT, write the marker last."""
    for stale in root.glob(TMP_PREFIX + "*"):
        log.info("removing %s left by an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root))
    try:
        for a in archives:
            try:
                with tarfile.open(a, "r:") as tar:
                    members = tqdm(tar, desc=f"extracting {a.name}", unit=" files", disable=not progress)
                    if hasattr(tarfile, "data_filter"):
                        tar.extractall(tmp, members=members, filter="data")
                    else:  # Python < 3.11.4: _check_archive already refused unsafe members
                        tar.extractall(tmp, members=members)
            except _FILTER_ERROR as e:  # the extraction filter refused a member: links, devices, '..'
                raise DataError(
                    f"{a} holds an unsafe member ({e}): it is not an official Stanford Dogs archive; nothing "
                    f"was extracted into {root}: delete {a} and re-run to download it again, or replace it "
                    "with the official one"
                ) from e
            except (tarfile.TarError, OSError) as e:  # `tmp` is removed below: name what stays
                raise DataError(
                    f"cannot extract {a} into {root} ({e}); nothing was moved into {root}: check free disk "
                    f"space there (or delete {a} if it is damaged) and re-run"
                ) from e
        try:
            read_stanford_dogs(tmp)
        except DataError as e:
            raise DataError(
                f"the archives in {archives[0].parent} are not a valid Stanford Dogs tree ({e}); "
                f"nothing was moved into {root}: use the official {', '.join(ARCHIVES)}"
            ) from e
        lists = find_dogs_lists(tmp)
        if lists is None or not (tmp / "Annotation").is_dir():
            raise DataError(f"{', '.join(ARCHIVES)} do not hold an Annotation folder: use the official archives")
        (root / MARKER).unlink(missing_ok=True)
        moves = [(tmp / "Images", root / "Images"), (tmp / "Annotation", root / "Annotation")]
        moves += [(lists / n, root / n) for n in LIST_FILES if (lists / n).is_file()]
        for src, dst in moves:
            if dst.is_dir() or dst.is_symlink():  # left by an earlier interrupted run: replace it
                os.replace(dst, tmp / f".old-{dst.name}")
            os.replace(src, dst)
        atomic_write_json(root / MARKER, {"archives": [a.name for a in archives], "source": str(archives[0].parent)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_stanford_dogs(
    root: str | Path,
    base_url: str | None = None,
    from_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Fetch (or take from `from_dir`) the official archives and extract them into `root`; return it.

    A no-op when `root` already holds a tree extracted by an earlier run.
    """
    root = Path(root)
    if is_extracted(root):
        log.info("Stanford Dogs already present in %s; nothing to do", root)
        return root
    src = Path(from_dir) if from_dir is not None else None
    if src is not None and not src.is_dir():
        raise DataError(f"--from {src}: no such folder; pass the folder holding {', '.join(ARCHIVES)}")
    root.mkdir(parents=True, exist_ok=True)
    archives = _get_archives(root, base_url, src, progress)
    _extract(root, archives, progress)
    log.info("Stanford Dogs extracted into %s", root)
    return root
