"""Decode one image file to RGB, or fail with an error that names the file and says what to do.

Grayscale, CMYK, palette and alpha images are converted to RGB; the format is read from the file's
content, not its extension. Truncated files and decompression bombs are errors, never silently
padded or decoded into memory.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from visionpoc.errors import DataError

MAX_PIXELS = 178_956_970  # PIL's own default bomb threshold (~0.18 gigapixel), made explicit


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any PIL mode; transparency is composited onto white (photos of dogs on white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")  # 16-bit grayscale to 8-bit
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
                    raise DataError(
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
        raise DataError(
            f"image {path} is listed but absent: re-extract the dataset or run 'visionpoc data check'"
        ) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # raised by the header read
        raise DataError(
            f"image {path} declares too many pixels ({e}): it is not a photo this tool can use; "
            "remove it from the dataset"
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(
            f"cannot decode image {path} ({type(e).__name__}: {e}): the file is corrupt or not an image; "
            "replace or delete it (or re-download the dataset)"
        ) from e
