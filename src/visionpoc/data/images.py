"""Decode one image file to RGB, or fail with an error that names the file and says what to do.

Grayscale (8/16-bit, float), CMYK, palette and alpha images are converted to RGB and turned upright
by their EXIF orientation; the format is read from the file's content, not its extension. Truncated
files and decompression bombs are errors, never silently padded or decoded into memory.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from visionpoc.errors import DataError, ImageError

MAX_PIXELS = 178_956_970  # PIL's own default bomb threshold (~0.18 gigapixel), made explicit


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any PIL mode, upright: the EXIF orientation a camera wrote is applied (as a photo
    viewer does), transparency is composited onto white (photos of dogs on white), 16-bit grayscale
    keeps its top 8 bits and a float image is read as 0..1 (scaled to 255) or else 0..255."""
    with contextlib.suppress(Exception):  # a malformed EXIF block: the pixels are still good
        ImageOps.exif_transpose(img, in_place=True)
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):  # I;16, I;16B (big-endian, ImageJ's TIFFs), I;16L, I (32-bit)
        img = Image.fromarray((np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8).astype(np.uint8))
    elif img.mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float32))
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
        img = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | Path, max_pixels: int = MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Open and fully decode `path` as an RGB image. `min_side`: a JPEG may be decoded at 1/2, 1/4 or
    1/8 scale (libjpeg's DCT scaling, PIL's `draft`) as long as both sides stay at least `min_side`:
    several times faster for photos much larger than the size they are resized to."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
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
            f"image {path} declares too many pixels ({e}): it is not a photo this tool can use; "
            "remove it from the dataset"
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(
            f"cannot decode image {path} ({type(e).__name__}: {e}): the file is corrupt or not an image; "
            "replace or delete it"
        ) from e


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
