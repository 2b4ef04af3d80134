"""Untrusted uploads, in memory only: read a request body with a size cap, take one file out of a
multipart/form-data body, and decode it as an image with caps checked before any decoding: pixels and
aspect ratio (on the header), the memory decoding and converting the image's mode takes, and the number
of scans of a JPEG (each scan of a progressive JPEG is a pass over every pixel).

Nothing here touches the disk (no spooled temporary files, no path from the request is ever opened),
and every refusal is an `UploadError` carrying the HTTP status and a message for the client.
"""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator

from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from visionpoc.data.images import declared_pixels, peak_bytes_per_pixel, to_rgb
from visionpoc.errors import VisionpocError
from visionpoc.serving.predict import ImageShapeError, check_aspect_ratio

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers allowed on top of the file size limit
DEFAULT_MAX_PIXELS = 64_000_000  # a 64-megapixel photo
# the most memory decoding one upload and converting it to RGB may take (`peak_bytes_per_pixel` x pixels):
# a 64 MP RGB photo needs 8 bytes a pixel (PIL's RGBX, and its EXIF-upright copy), 16-bit grey 7
DEFAULT_MAX_DECODED_BYTES = 512 * 2**20
# a progressive JPEG has about 10 scans (libjpeg's default script, mozjpeg's a few more); a crafted one
# can repeat them by the thousand, each a full pass over the image
MAX_JPEG_SCANS = 100
# formats a photo arrives in; PIL's others (EPS runs Ghostscript, ...) are never tried on uploads
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")


class UploadError(VisionpocError):
    """A refused upload: `status` is the HTTP status code to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def human_size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n:,} bytes"


async def read_limited(
    chunks: AsyncIterator[bytes], limit: int, content_length: str | None, overhead: int = 0
) -> bytes:
    """The body from `chunks`, refusing (413) a declared or actual size over `limit + overhead` bytes
    (`overhead`: multipart framing allowed on top of the file): the declared Content-Length is checked
    first, then at most `limit + overhead + 1` bytes are kept."""
    cap = limit + overhead
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise UploadError(400, f"invalid Content-Length header {content_length!r}") from None
        if declared > cap:
            raise UploadError(
                413, f"upload too large: {human_size(declared)} declared, the limit is {human_size(limit)}"
            )
    body = bytearray()
    async for chunk in chunks:
        body += chunk[: cap + 1 - len(body)]
        if len(body) > cap:
            raise UploadError(413, f"upload too large: over the limit of {human_size(limit)}")
    return bytes(body)


def multipart_file(body: bytes, content_type: str | None, field: str = "file") -> bytes:
    """The content of the form field `field` of a multipart/form-data `body`, parsed in memory."""
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(
            400,
            f"send the image as multipart/form-data with a field {field!r} "
            f"(e.g. curl -F {field}=@dog.jpg), not {content_type or 'no Content-Type'}",
        )
    parts: list[tuple[dict[bytes, bytes], bytearray]] = []
    name: list[bytes] = []
    value: list[bytes] = []

    def on_part_begin() -> None:
        parts.append(({}, bytearray()))

    def on_header_end() -> None:
        parts[-1][0][b"".join(name).strip().lower()] = b"".join(value).strip()
        name.clear()
        value.clear()

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_part_data": lambda data, start, end: parts[-1][1].extend(data[start:end]),
        "on_header_field": lambda data, start, end: name.append(data[start:end]),
        "on_header_value": lambda data, start, end: value.append(data[start:end]),
        "on_header_end": on_header_end,
    }
    try:
        parser = MultipartParser(params[b"boundary"], callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError) as e:
        raise UploadError(400, f"malformed multipart/form-data body: {e}") from e
    for headers, data in parts:
        _, disp = parse_options_header(headers.get(b"content-disposition"))
        if disp.get(b"name") == field.encode():
            return bytes(data)
    raise UploadError(400, f"no form field {field!r} in the upload: send the image as {field}=@dog.jpg")


_AFTER_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # the next marker: not a stuffed 0xFF00, a restart, a fill


def jpeg_scans(data: bytes, stop: int = MAX_JPEG_SCANS) -> int:
    """The number of scans (SOS segments) in JPEG `data`, counted by walking its markers (an EXIF
    thumbnail's, inside its APP1 segment, are skipped), up to `stop + 1`: linear in the bytes and
    decoding nothing. A corrupt structure ends the count; the decoder then says what is wrong."""
    pos, scans = 2, 0
    while pos + 4 <= len(data) and data[pos] == 0xFF and scans <= stop:
        marker = data[pos + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD8 or marker == 0x01:  # fill byte, standalone markers
            pos += 1 if marker == 0xFF else 2
            continue
        if marker == 0xD9:  # end of image
            break
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: its header, then entropy-coded data up to the next marker
            scans += 1
            found = _AFTER_SCAN.search(data, pos)
            if found is None:
                break
            pos = found.start()
    return scans


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_DECODED_BYTES
) -> Image.Image:
    """Decode upload `data` to RGB, refusing before the pixels are decoded:
    - a header declaring more than `max_pixels` pixels (413; PIL's own refusal above
      2 x Image.MAX_IMAGE_PIXELS, raised while reading the header, is a 413 too);
    - an image whose mode makes decoding and converting it take more than `max_bytes` (413; 16/32-bit
      and float images, transparency and palettes cost more per pixel than RGB);
    - a side more than `MAX_ASPECT_RATIO` times the other (400: the eval transform would blow a
      100000x1 strip up to gigapixels);
    - a JPEG of more than `MAX_JPEG_SCANS` scans (400).
    Not an image is a 400.

    No `warnings.catch_warnings()` (it swaps the process-wide filters, which is not thread-safe): the
    explicit pixel check decides, and PIL's DecompressionBombWarning, emitted only above its own limit,
    is left to the default filters."""
    if not data:
        raise UploadError(400, "the uploaded file is empty")
    if data[:2] == b"\xff\xd8" and jpeg_scans(data) > MAX_JPEG_SCANS:
        raise UploadError(
            400,
            f"the JPEG has more than {MAX_JPEG_SCANS} scans, the limit (a progressive photo has about 10; "
            "this many only slow the decoder down): re-save it as a baseline JPEG or a PNG",
        )
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:  # reads the header only
            w, h = img.size
            if w * h > max_pixels:
                raise UploadError(413, _bomb(f"{w}x{h} = {w * h:,}", max_pixels))
            if (need := w * h * peak_bytes_per_pixel(img.mode)) > max_bytes:
                raise UploadError(
                    413,
                    f"image too large for its kind: {w}x{h} pixels in PIL mode {img.mode} take "
                    f"{human_size(need)} to decode and convert to RGB, over the limit of {human_size(max_bytes)} "
                    "(16/32-bit, float and transparent images cost more per pixel): downscale it, or save "
                    "it as an 8-bit RGB JPEG or PNG",
                )
            check_aspect_ratio(w, h, "the uploaded image")
            img.load()
            return to_rgb(img)
    except UploadError:
        raise
    except ImageShapeError as e:
        raise UploadError(400, str(e)) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # PIL's own header check
        raise UploadError(413, _bomb(declared_pixels(e), max_pixels)) from e
    except UnidentifiedImageError as e:
        raise UploadError(
            400, f"the upload is not an image (or not one of {', '.join(FORMATS)}): send a dog photo"
        ) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UploadError(
            400, f"the image cannot be decoded ({type(e).__name__}: {e}): it is truncated or corrupt"
        ) from e


def _bomb(declared: str, max_pixels: int) -> str:
    return (
        f"image too large: it declares {declared} pixels, over the limit of {max_pixels:,} pixels "
        f"(a decompression bomb, or a photo to downscale to at most {max_pixels / 1e6:g} megapixels before "
        "uploading)"
    )
