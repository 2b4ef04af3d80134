"""Decode one image file (or its bytes) to RGB, or fail with an error that names it and says what to do.

Grayscale (8/16-bit, float), CMYK, palette and alpha images are converted to RGB and turned upright
by their EXIF orientation; the format is read from the file's content, not its extension. Truncated
files and decompression bombs are errors, never silently padded or decoded into memory. The conversion
makes no full-size intermediate wider than 8 bits per channel: `peak_bytes_per_pixel` bounds what
decoding and converting one image hold at once, per PIL mode, for callers that budget memory.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from visionpoc.errors import DataError, ImageError

MAX_PIXELS = 178_956_970  # PIL's own default bomb threshold (~0.18 gigapixel), made explicit


# Bytes per pixel of a decoded image in PIL's memory: one byte for 1/L/P, two for 16-bit grey, else
# four (PIL keeps RGB as RGBX; I and F are 32-bit).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# Bytes per pixel that `to_rgb` allocates on top of the decoded image, by mode: the RGB result (4) and
# what it passes through (an 8-bit L for 16/32-bit and float, RGBA and an alpha mask for transparency).
_CONVERT_BYTES = {"RGB": 0, "P": 4 + 4 + 1, "RGBA": 4 + 1, "LA": 4 + 4 + 1, "PA": 4 + 4 + 1}
_CONVERT_BYTES.update(dict.fromkeys(("I", "F", "I;16", "I;16B", "I;16L", "I;16N"), 1 + 4))
STRIP_ROWS = 256  # 16/32-bit and float images are converted this many rows at a time


def peak_bytes_per_pixel(mode: str) -> int:
    """The most bytes per pixel that decoding an image of PIL `mode` and `to_rgb` hold at once: the
    decoded image plus the larger of its EXIF-upright copy and the conversion to RGB."""
    stored = _STORED_BYTES.get(mode, 4)
    return stored + max(stored, _CONVERT_BYTES.get(mode, 4))


def _to_8bit(img: Image.Image) -> Image.Image:
    """An L image of a 16/32-bit or float image, `STRIP_ROWS` rows at a time so that no full-size
    wider intermediate is made: integers keep their top 8 of 16 bits (clipped to 0..65535), float is
    read as 0..1 (scaled to 255) when its maximum is at most 1, else as 0..255; NaN is 0."""
    w, h = img.size
    strips = [(y, min(h, y + STRIP_ROWS)) for y in range(0, h, STRIP_ROWS)]
    scale = 1.0
    if img.mode == "F":
        top = max((np.nan_to_num(np.asarray(img.crop((0, a, w, b)))).max() for a, b in strips), default=0.0)
        scale = 255.0 if top <= 1.0 else 1.0
    out = np.empty((h, w), dtype=np.uint8)
    for a, b in strips:
        band = np.asarray(img.crop((0, a, w, b)))  # (rows, W), uint16, int32 or float32
        if img.mode == "F":
            out[a:b] = np.clip(np.nan_to_num(band) * scale, 0, 255).round().astype(np.uint8)
        else:
            out[a:b] = (np.clip(band, 0, 65535) >> 8).astype(np.uint8)
    return Image.fromarray(out)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any PIL mode, upright: the EXIF orientation a camera wrote is applied (as a photo
    viewer does), transparency is composited onto white (photos of dogs on white), 16-bit grayscale
    keeps its top 8 bits and a float image is read as 0..1 (scaled to 255) or else 0..255. The memory
    it takes on top of `img` is bounded by `peak_bytes_per_pixel`."""
    with contextlib.suppress(Exception):  # a malformed EXIF block: the pixels are still good
        ImageOps.exif_transpose(img, in_place=True)
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":  # I;16, I;16B (ImageJ's TIFFs), I;16L, I (32-bit), F
        img = _to_8bit(img)
    if img.mode in ("P", "LA", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def load_rgb(path: str | Path, max_pixels: int = MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Open and fully decode `path` as an RGB image. `min_side`: a JPEG may be decoded at 1/2, 1/4 or
    1/8 scale (libjpeg's DCT scaling, PIL's `draft`) as long as both sides stay at least `min_side`:
    several times faster for photos much larger than the size they are resized to."""
    path = Path(path)
    return _decode(path, str(path), max_pixels, min_side)


def decode_rgb(data: bytes, name: str, max_pixels: int = MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """`load_rgb` of an image's bytes (e.g. a sample streamed from a tar shard); errors name it `name`."""
    return _decode(io.BytesIO(data), name, max_pixels, min_side)


def _decode(src: Path | io.BytesIO, path: str, max_pixels: int, min_side: int | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(
                        f"image {path} declares {w}x{h} pixels, over the {max_pixels:,} limit: "
                        "it is not a photo this tool can use; remove it from the dataset"
                    )
                if min_side is not None:
                    img.draft(None, (min_side, min_side))  # JPEG only; a no-op for other formats
                img.load()
                return to_rgb(img)
    except DataError:
        raise
    except FileNotFoundError as e:
        raise ImageError(
            f"image {path} is listed but absent: re-extract the dataset or run 'visionpoc data check'"
        ) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # raised by the header read
        raise ImageError(
            f"image {path} declares {declared_pixels(e)} pixels, over the {max_pixels:,} limit: "
            "it is not a photo this tool can use; remove it from the dataset"
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(
            f"cannot decode image {path} ({type(e).__name__}: {e}): the file is corrupt or not an image; "
            "replace or delete it"
        ) from e


def declared_pixels(e: Exception) -> str:
    """The pixel count in PIL's DecompressionBombError text ("Image size (N pixels) exceeds ..."),
    formatted with separators, or "too many" if the text changed."""
    m = re.search(r"\((\d+) pixels\)", str(e))
    return f"{int(m.group(1)):,}" if m else "too many"


def _decode_error(path: Path) -> str | None:
    try:
        load_rgb(path)
    except DataError as e:
        return str(e)
    return None


def undecodable(paths: Sequence[Path], workers: int = 1) -> list[str]:
    """The error of every file of `paths` that does not decode (all of them, not the first), decoding
    in `workers` processes with a progress bar."""
    bar = tqdm(total=len(paths), desc=f"decoding {len(paths)} images", unit="img", disable=None)
    errors: list[str] = []
    with ProcessPoolExecutor(max(1, workers)) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.map(_decode_error, paths, chunksize=64) if pool else map(_decode_error, paths)
        for err in results:
            bar.update(1)
            if err is not None:
                errors.append(err)
    bar.close()
    return errors
