"""Checking, cleaning and thumbnailing uploaded images with Pillow (run in a worker thread).

Decompression bombs: the pixel count is read from the header and refused before anything
is decoded; Pillow's own bomb warning is promoted to an error as a second line.

Metadata: EXIF (GPS position, camera serial…) must not be served back, so JPEG, PNG and
WebP originals are re-encoded without it, upright (EXIF orientation applied, since the tag
that carried it is dropped). The cost is one more lossy generation for JPEG/WebP at
quality 90, and only the first frame of an animated PNG/WebP is kept; the ICC profile is
kept because colours depend on it. GIF has no EXIF but holds the same in comments and
XMP: its metadata blocks are dropped losslessly (gif.py).
"""

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from app.files import gif

THUMBNAIL_SIZE = (256, 256)
PIL_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/webp": "WEBP"}
REENCODED = frozenset({"image/png", "image/jpeg", "image/webp"})
LOSSY_QUALITY = 90


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ProcessedImage:
    thumbnail: bytes
    cleaned: bytes  # the original without metadata


def thumbnail_type(content_type: str) -> str:
    """Photos get JPEG thumbnails; everything else PNG, which keeps transparency."""
    return "image/jpeg" if content_type == "image/jpeg" else "image/png"


def process(path: Path, content_type: str, max_pixels: int) -> ProcessedImage:
    # catch_warnings is process-wide state in Python 3.11: another thread may briefly see
    # the filter too, which is harmless (it only makes a bomb warning louder). The header
    # check below is the guard that does not depend on it.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=[PIL_FORMATS[content_type]]) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageRejected("bomb", f"The image has more than {max_pixels} pixels.")
                # In place, and the thumbnail made from the same pixels once the cleaned
                # original is encoded: one decoded copy of the image at a time, which at
                # the pixel cap is 120-160 MB (a copy each was 360 MB at the peak).
                ImageOps.exif_transpose(image, in_place=True)
                cleaned = (
                    _encode(image, content_type)
                    if content_type in REENCODED
                    else gif.without_metadata(path.read_bytes())
                )
                image.thumbnail(THUMBNAIL_SIZE)
                return ProcessedImage(_encode(image, thumbnail_type(content_type)), cleaned)
        except ImageRejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected("bomb", "The image is too large to decode.") from exc
        except Exception as exc:
            # Not only UnidentifiedImageError, OSError, SyntaxError and ValueError: Pillow's
            # parsers let through whatever hostile bytes make them hit (struct.error from
            # a malformed EXIF block, found by fuzzing), and the client sent those bytes.
            raise ImageRejected("invalid", "The image cannot be decoded.") from exc


def _encode(image: Image.Image, content_type: str) -> bytes:
    """Only pixels, ICC profile and PNG transparency are passed on: no EXIF, XMP or text.
    The ICC profile describes the pixels' colour space, so CMYK stays CMYK."""
    options: dict[str, object] = {}
    if icc := image.info.get("icc_profile"):
        options["icc_profile"] = icc
    if content_type == "image/jpeg":
        if image.mode not in ("RGB", "L", "CMYK"):
            image = image.convert("RGB")
        options["quality"] = LOSSY_QUALITY
    elif content_type == "image/webp":
        options["quality"] = LOSSY_QUALITY
    elif content_type == "image/png":
        if image.mode == "CMYK":
            image = image.convert("RGB")
        if (transparency := image.info.get("transparency")) is not None:
            options["transparency"] = transparency
    buffer = io.BytesIO()
    # Without the source's metadata, which some encoders write back unless told not to
    # (JPEG its comments): what is passed on is only what ``options`` holds.
    metadata, image.info = image.info, {}
    try:
        image.save(buffer, PIL_FORMATS[content_type], **options)
    finally:
        image.info = metadata
    return buffer.getvalue()
