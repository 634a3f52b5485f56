"""Checking, cleaning and thumbnailing uploaded images with Pillow (run in a worker thread).

Decompression bombs: the pixel count is read from the header and refused before anything
is decoded, above the cap or above what the memory budget allows for the format (WebP
costs over four times what JPEG does); Pillow's own bomb warning is promoted to an error as a
second line. A progressive JPEG decodes its whole image once per scan, and scans are cheap
to repeat (a 170 KB file of 500 scans kept the decoding thread busy for 18 s), so its
scans are counted first too.

Metadata: EXIF (GPS position, camera serial…) must not be served back, so JPEG, PNG and
WebP originals are re-encoded without it, upright (EXIF orientation applied, since the tag
that carried it is dropped). The cost is one more lossy generation for JPEG and lossy WebP
at quality 90 (a JPEG at its own chroma sampling; a lossless WebP stays lossless), and
only the first frame of an animated PNG/WebP is kept; the ICC profile is kept because
colours depend on it. Pillow decodes a
PNG of 16 bits per colour channel to 8 and cannot write it back deeper, so such a PNG is not
re-encoded: its other chunks are dropped, its pixels kept as they came, and an orientation
kept as its only EXIF tag rather than applied. GIF has no EXIF but holds the same in
comments and XMP: its metadata blocks are dropped losslessly (gif.py).
"""

import io
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import ExifTags, Image, ImageOps, PngImagePlugin

from app.files import gif
from app.observability.logging import get_logger

logger = get_logger(__name__)

THUMBNAIL_SIZE = (256, 256)
PIL_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/webp": "WEBP"}
LOSSY_QUALITY = 90
# A PNG of 16 bits per colour channel is not re-encoded (Pillow would write it at 8): it
# keeps these chunks as they came, those ``_encode`` passes on of any other PNG.
PNG_KEPT_CHUNKS = frozenset(
    {b"IHDR", b"PLTE", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"IDAT", b"IEND"}
)
# EXIF orientations that ImageOps.exif_transpose turns (1 is upright already).
UPRIGHTED = range(2, 9)
# A lossless WebP is re-encoded lossless at method 2, which compresses within 1% of libwebp's
# default (method 4) on a photo and a screenshot at a fifth of its CPU time: ~2 s for 9 MP of
# noise, as the lossy encoder at LOSSY_QUALITY takes. Its hash chains cost more memory than
# the lossy encoder, 44 bytes per pixel in all on noise (measured as BYTES_PER_PIXEL): an
# image for which that is over the budget gets method 0, which costs no more than lossy, for
# a file about twice as large. Quality is the lossless encoder's effort within its method.
LOSSLESS_WEBP_BYTES_PER_PIXEL = 44
LOSSLESS_WEBP_EFFORT = 50
# A progressive JPEG has about 10 (libjpeg's default script); at the pixel cap each one more
# costs ~50 ms of decoding.
MAX_JPEG_SCANS = 100
# Tables, APPn blocks and scans: a camera's JPEG has tens (an ICC profile split into 64 KB
# blocks a few more). Walking them costs a search each: millions of tiny ones in 10 MB took
# seconds of CPU, with the image slot held.
MAX_JPEG_SEGMENTS = 1000
# Peak bytes per pixel of checking, cleaning and thumbnailing one image, measured (Pillow 13)
# on the costliest content: noise, whose re-encoded PNG is as large as its pixels and whose
# lossy WebP encoder keeps a token per coefficient, turned by its EXIF orientation (a second
# copy). WebP's decoder holds its canvas twice and its encoder copies it again; of a GIF
# only the first frame is decoded, and nothing re-encoded.
BYTES_PER_PIXEL = {"image/jpeg": 8, "image/png": 12, "image/gif": 6, "image/webp": 35}
# A progressive JPEG holds every coefficient while decoding, whatever its content: 2 bytes
# each, for 4 components in CMYK, beside the 4 bytes of the decoded pixel.
PROGRESSIVE_JPEG_BYTES_PER_PIXEL = 13
_SOS, _EOI = 0xDA, 0xD9
# A marker's last 0xFF, before its code. Not before 0 (a stuffed 0xFF out of place), TEM or
# a restart marker: those have no length, and libjpeg skips them between segments as it
# skips stray bytes (with a warning), so the search skips them too, in C.
_MARKER = re.compile(rb"\xff(?![\x00\x01\xd0-\xd7\xff])")
# Within entropy-coded data a 0xFF is stuffed (0xFF00) or opens a restart marker: any other
# ends the scan.
_END_OF_SCAN = re.compile(rb"\xff(?![\x00\xd0-\xd7])")


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


def process(path: Path, content_type: str, max_pixels: int, max_memory: int) -> ProcessedImage:
    # catch_warnings is process-wide state in Python 3.11: another thread may briefly see
    # the filter too, which is harmless (it only makes a bomb warning louder). The header
    # check below is the guard that does not depend on it.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=[PIL_FORMATS[content_type]]) as image:
                width, height = image.size
                cost = (
                    PROGRESSIVE_JPEG_BYTES_PER_PIXEL
                    if content_type == "image/jpeg" and image.info.get("progressive")
                    else BYTES_PER_PIXEL[content_type]
                )
                limit = min(max_pixels, max_memory // cost)
                if width * height > limit:
                    raise ImageRejected("bomb", f"The image has more than {limit} pixels.")
                if content_type == "image/jpeg" and (costly := _jpeg_too_costly(path.read_bytes())):
                    raise ImageRejected("bomb", costly)
                # In place, and the thumbnail made from the same pixels once the cleaned
                # original is encoded: one decoded copy of the image at a time (a copy each
                # was 360 MB more at the pixel cap); BYTES_PER_PIXEL is measured so.
                orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
                ImageOps.exif_transpose(image, in_place=True)
                cleaned = _cleaned(image, path, content_type, limit, max_memory, orientation)
                thumbnail = _thumbnail(image)
                return ProcessedImage(_encode(thumbnail, thumbnail_type(content_type)), cleaned)
        except ImageRejected:
            raise
        except gif.TooManyPixels as exc:
            raise ImageRejected("bomb", str(exc)) from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected("bomb", "The image is too large to decode.") from exc
        except Exception as exc:
            # Not only UnidentifiedImageError, OSError, SyntaxError and ValueError: Pillow's
            # parsers let through whatever hostile bytes make them hit (struct.error from
            # a malformed EXIF block, found by fuzzing), and the client sent those bytes.
            # Logged, since our own mistakes end here too (valid 16-bit PNGs once did).
            logger.warning("image refused as undecodable", content_type=content_type, exc_info=True)
            raise ImageRejected("invalid", "The image cannot be decoded.") from exc


def _cleaned(
    image: Image.Image,
    path: Path,
    content_type: str,
    max_pixels: int,
    max_memory: int,
    orientation: int,
) -> bytes:
    """The original at ``path``, decoded (and turned upright from ``orientation``) as
    ``image``, without its metadata."""
    if content_type == "image/gif":
        return gif.without_metadata(path.read_bytes(), max_pixels)
    if content_type == "image/png" and _is_deep_colour_png(path):
        return _png_without_metadata(path.read_bytes(), orientation)
    if content_type == "image/webp" and _is_lossless_webp(path):
        fits = image.width * image.height * LOSSLESS_WEBP_BYTES_PER_PIXEL <= max_memory
        return _encode(image, content_type, lossless_method=2 if fits else 0)
    return _encode(image, content_type)


def _is_lossless_webp(path: Path) -> bool:
    """Whether the WebP at ``path`` (its first frame, the one kept) is lossless: a VP8L
    bitstream rather than a VP8 one. Pillow decodes both alike and does not say which it
    read, so the RIFF chunks are walked, by their headers only; an animation's first frame
    (ANMF) holds its bitstream as a sub-chunk after a 16-byte header."""
    with path.open("rb") as file:
        file.seek(12)  # past "RIFF", the size and "WEBP"
        while len(header := file.read(8)) == 8:
            fourcc, size = header[:4], int.from_bytes(header[4:], "little")
            if fourcc in (b"VP8L", b"VP8 "):
                return fourcc == b"VP8L"
            file.seek(16 if fourcc == b"ANMF" else size + (size & 1), io.SEEK_CUR)
    return False


def _is_deep_colour_png(path: Path) -> bool:
    """Whether the PNG at ``path`` has 16 bits per channel in colour or with alpha, which
    Pillow decodes to 8 bits (it has no deeper mode but 16-bit greyscale)."""
    with path.open("rb") as file:
        header = file.read(26)  # signature, then IHDR's length, type, size, depth and type
    return header[12:16] == b"IHDR" and header[24] == 16 and header[25] in (2, 4, 6)


def _png_without_metadata(data: bytes, orientation: int) -> bytes:
    """The PNG ``data`` with only the chunks ``_encode`` would write (pixels, palette,
    transparency, colour), each copied as it came, so its pixels are those uploaded, at
    their depth; up to IEND, so whatever follows is dropped. The pixels are not turned
    upright, so an ``orientation`` other than upright is kept in an EXIF block of its own,
    before the pixels as the eXIf chunk must be; viewers turn the image by it."""
    view = memoryview(data)
    kept: list[bytes | memoryview] = [view[:8]]  # the signature
    position = 8
    untagged = orientation in UPRIGHTED
    while position + 12 <= len(view):
        length = int.from_bytes(view[position : position + 4], "big")
        kind = bytes(view[position + 4 : position + 8])
        end = position + 12 + length  # length, type, data, CRC
        if end > len(view):
            raise ValueError("The PNG ends inside a chunk.")
        if kind == b"IDAT" and untagged:
            exif = Image.Exif()
            exif[ExifTags.Base.Orientation] = orientation
            kept.append(_png_chunk(b"eXIf", exif.tobytes()[6:]))  # without "Exif\0\0"
            untagged = False
        if kind in PNG_KEPT_CHUNKS:
            kept.append(view[position:end])
        if kind == b"IEND":
            return b"".join(kept)
        position = end
    raise ValueError("The PNG ends before its IEND chunk.")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return len(data).to_bytes(4, "big") + kind + data + crc.to_bytes(4, "big")


def _thumbnail(image: Image.Image) -> Image.Image:
    """``image`` made a thumbnail, in place but for 16-bit greyscale, which Pillow reduces
    only in its 32-bit mode (and writes as PNG only in the 16-bit one)."""
    if not image.mode.startswith("I;16"):
        image.thumbnail(THUMBNAIL_SIZE)
        return image
    wide = image.convert("I")
    wide.thumbnail(THUMBNAIL_SIZE)
    return wide.convert("I;16")


def _jpeg_too_costly(data: bytes) -> str | None:
    """Why decoding ``data`` would cost too much, if it would: more than MAX_JPEG_SCANS
    scans (SOS segments) or MAX_JPEG_SEGMENTS segments. Between segments, whatever is not
    a marker is skipped, as libjpeg does: counting must not stop where decoding goes on."""
    scans = segments = 0
    position = 2  # past SOI
    while marker := _MARKER.search(data, position):
        code_at = marker.end()
        if code_at == len(data) or data[code_at] == _EOI:
            break
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            return f"The JPEG has more than {MAX_JPEG_SEGMENTS} segments."
        # The segment's length counts its own 2 bytes, not the marker's.
        position = code_at + 1 + int.from_bytes(data[code_at + 1 : code_at + 3], "big")
        if data[code_at] == _SOS:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                return f"The JPEG has more than {MAX_JPEG_SCANS} scans."
            end = _END_OF_SCAN.search(data, position)
            position = end.start() if end else len(data)
    return None


def _encode(image: Image.Image, content_type: str, *, lossless_method: int | None = None) -> bytes:
    """Only pixels, ICC profile and PNG transparency and colour chunks are passed on: no
    EXIF, XMP or text. The ICC profile describes the pixels' colour space, so CMYK stays
    CMYK. With a ``lossless_method`` a WebP is written lossless at that method (libwebp's
    effort, 0-6), every pixel as it was decoded, the colour of transparent ones included
    (libwebp would otherwise change it, as invisible)."""
    options: dict[str, object] = {}
    if icc := image.info.get("icc_profile"):
        options["icc_profile"] = icc
    if content_type == "image/jpeg":
        if image.mode not in ("RGB", "L", "CMYK"):
            image = image.convert("RGB")
        options["quality"] = LOSSY_QUALITY
        if image.format == "JPEG":  # the decoded JPEG itself, not a conversion of it
            # Its chroma sampled as the original's was: libjpeg's default halves it both
            # ways, which blurred the colours of fine detail a 4:4:4 original kept sharp.
            options["subsampling"] = "keep"
    elif content_type == "image/webp" and lossless_method is not None:
        options.update(
            lossless=True, exact=True, method=lossless_method, quality=LOSSLESS_WEBP_EFFORT
        )
    elif content_type == "image/webp":
        options["quality"] = LOSSY_QUALITY
    elif content_type == "image/png":
        if image.mode == "CMYK":
            image = image.convert("RGB")
        if (transparency := image.info.get("transparency")) is not None:
            options["transparency"] = transparency
        options["pnginfo"] = _png_colour_chunks(image.info)
    buffer = io.BytesIO()
    # Without the source's metadata, which some encoders write back unless told not to
    # (JPEG its comments): what is passed on is only what ``options`` holds.
    metadata, image.info = image.info, {}
    try:
        image.save(buffer, PIL_FORMATS[content_type], **options)
    finally:
        image.info = metadata
    return buffer.getvalue()


def _png_colour_chunks(info: dict[str, object]) -> PngImagePlugin.PngInfo:
    """The gAMA, cHRM and sRGB chunks Pillow read, which say how a PNG's values map to
    colours when it has no ICC profile (Pillow keeps them, unwritten, as floats)."""
    chunks = PngImagePlugin.PngInfo()
    if isinstance(gamma := info.get("gamma"), float):
        chunks.add(b"gAMA", struct.pack(">I", round(gamma * 100_000)))
    chromaticity = info.get("chromaticity")
    if isinstance(chromaticity, tuple) and len(chromaticity) == 8:  # as many as were sent
        chunks.add(b"cHRM", struct.pack(">8I", *(round(v * 100_000) for v in chromaticity)))
    if isinstance(srgb := info.get("srgb"), int):
        chunks.add(b"sRGB", bytes([srgb]))
    return chunks
