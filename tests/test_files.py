"""Files: streamed uploads with a size cap, type checks, image cleaning and thumbnails,
private downloads (Range included) and deletion; after every rejection nothing is left."""

import contextlib
import errno
import gzip
import hashlib
import io
import itertools
import os
import random
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from httpx2 import Response
from PIL import ExifTags, Image, ImageCms, ImageSequence, JpegImagePlugin, PngImagePlugin
from starlette.types import Message

from app.backends import storage as storage_module
from app.files import gif, images
from app.files.downloads import MAX_RANGES, byte_ranges
from app.files.router import blob_response
from app.files.rules import GENERIC_TYPE as GENERIC
from app.files.rules import TextProbe, content_disposition, sanitize_filename
from app.main import create_app
from tests.api import Account, Api, assert_problem
from tests.conftest import make_settings
from tests.prom import parse, value

PDF = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
TEXT = "Grüße, world\nline two\n".encode()
BOUNDARY = "test-boundary-7MA4YWxk"


def image_bytes(
    fmt: str, size: tuple[int, int] = (64, 48), exif: Image.Exif | None = None
) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, (200, 30, 30))
    image.save(buffer, fmt, **({"exif": exif} if exif is not None else {}))
    return buffer.getvalue()


def gps_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored sideways: displayed rotated 90° clockwise
    exif[ExifTags.Base.Make] = "SpyCam"
    exif[ExifTags.IFD.GPSInfo] = {
        ExifTags.GPS.GPSLatitudeRef: "N",
        ExifTags.GPS.GPSLatitude: (52.0, 31.0, 12.0),
    }
    return exif


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The type and data of each chunk of the PNG ``data``."""
    chunks, position = [], len(PNG_SIGNATURE)
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        chunks.append(
            (data[position + 4 : position + 8], data[position + 8 : position + 8 + length])
        )
        position += 12 + length
    return chunks


def huge_png(width: int, height: int) -> bytes:
    """A real 1-bit PNG of this size; all-zero rows compress to almost nothing."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def upload(
    api: Api,
    owner: Account,
    name: str,
    data: bytes,
    content_type: str = "application/octet-stream",
    **form: str,
) -> Response:
    return api.client.post(
        "/api/v1/files",
        files={"file": (name, data, content_type)},
        data=form,
        headers=owner.headers,
    )


def raw_upload(api: Api, owner: Account, disposition: bytes, data: bytes) -> Response:
    """A hand-built body, for file names no well-behaved client would send."""
    body = (
        f"--{BOUNDARY}\r\nContent-Disposition: ".encode()
        + disposition
        + b"\r\nContent-Type: text/plain\r\n\r\n"
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    headers = owner.headers | {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    return api.client.post("/api/v1/files", content=body, headers=headers)


def uploaded(response: Response) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    return response.json()


def leftovers(api: Api) -> list[Path]:
    return sorted(api.settings.upload_dir.iterdir())


def assert_rejected_without_trace(
    api: Api, owner: Account, response: Response, status: int
) -> None:
    assert_problem(response, status)
    assert leftovers(api) == []
    assert api.client.get("/api/v1/files", headers=owner.headers).json()["total"] == 0


@pytest.fixture
def api_with(database_url: str, tmp_path: Path) -> Iterator[Callable[..., Api]]:
    """An API whose settings differ from the defaults (small caps, strict limits)."""
    with contextlib.ExitStack() as stack:

        def build(**overrides: object) -> Api:
            settings = make_settings(database_url, tmp_path / "custom", **overrides)
            client = stack.enter_context(TestClient(create_app(settings)))
            return Api(client, settings)

        yield build


@pytest.mark.parametrize(
    ("name", "data", "content_type", "detected"),
    [
        ("report.pdf", PDF, "application/pdf", "application/pdf"),
        ("notes.txt", TEXT, "text/plain; charset=utf-8", "text/plain"),
        ("empty.txt", b"", "application/octet-stream", "text/plain"),
    ],
)
def test_documents_round_trip_byte_for_byte(
    api: Api, name: str, data: bytes, content_type: str, detected: str
) -> None:
    alice = api.account("alice")
    meta = uploaded(upload(api, alice, name, data, content_type, description="Quarterly"))
    assert set(meta) == {
        "id",
        "owner_id",
        "original_name",
        "content_type",
        "size",
        "sha256",
        "has_thumbnail",
        "description",
        "created_at",
    }
    assert (meta["owner_id"], meta["original_name"], meta["content_type"]) == (
        alice.id,
        name,
        detected,
    )
    assert (meta["size"], meta["has_thumbnail"], meta["description"]) == (
        len(data),
        False,
        "Quarterly",
    )
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert api.client.get(f"/api/v1/files/{meta['id']}", headers=alice.headers).json() == meta

    content = api.client.get(f"/api/v1/files/{meta['id']}/content", headers=alice.headers)
    assert content.status_code == 200
    assert content.content == data
    assert content.headers["content-type"].split(";")[0] == detected
    assert content.headers["x-content-type-options"] == "nosniff"
    assert (
        content.headers["content-disposition"]
        == f"attachment; filename=\"{name}\"; filename*=UTF-8''{name}"
    )
    assert_problem(
        api.client.get(f"/api/v1/files/{meta['id']}/thumbnail", headers=alice.headers), 404
    )


@pytest.mark.parametrize(
    ("fmt", "name", "thumb_type"),
    [
        ("PNG", "pic.png", "image/png"),
        ("JPEG", "pic.jpg", "image/jpeg"),
        ("GIF", "pic.gif", "image/png"),
        ("WEBP", "pic.webp", "image/png"),
    ],
)
def test_images_get_a_thumbnail(api: Api, fmt: str, name: str, thumb_type: str) -> None:
    alice = api.account("alice")
    meta = uploaded(upload(api, alice, name, image_bytes(fmt, (600, 300)), f"image/{fmt.lower()}"))
    assert meta["has_thumbnail"] is True
    content = api.client.get(f"/api/v1/files/{meta['id']}/content", headers=alice.headers)
    assert content.headers["content-type"] == f"image/{fmt.lower()}"
    assert len(content.content) == meta["size"]
    assert Image.open(io.BytesIO(content.content)).size == (600, 300)

    thumb = api.client.get(f"/api/v1/files/{meta['id']}/thumbnail", headers=alice.headers)
    assert thumb.status_code == 200
    assert thumb.headers["content-type"] == thumb_type
    assert thumb.headers["x-content-type-options"] == "nosniff"
    assert Image.open(io.BytesIO(thumb.content)).size == (256, 128)


def test_exif_and_gps_never_come_back(api: Api) -> None:
    alice = api.account("alice")
    photo = image_bytes("JPEG", (300, 200), exif=gps_exif())
    assert Image.open(io.BytesIO(photo)).getexif().get_ifd(ExifTags.IFD.GPSInfo)  # sanity
    meta = uploaded(upload(api, alice, "holiday.jpeg", photo, "image/jpeg"))

    for path, size in (("content", (200, 300)), ("thumbnail", (171, 256))):
        served = api.client.get(f"/api/v1/files/{meta['id']}/{path}", headers=alice.headers)
        image = Image.open(io.BytesIO(served.content))
        assert image.size == size  # the orientation was applied before the tag was dropped
        assert not image.getexif()
        assert "exif" not in image.info
        assert b"SpyCam" not in served.content


def malformed_exif() -> bytes:
    """Big-endian EXIF whose first entry (0x0107, a SHORT) is stored as ASCII, then an
    orientation: rotating the image rewrites the block, and Pillow's packing fails."""
    entries = struct.pack(">HHI4s", 0x0107, 2, 2, b"X\0\0\0") + struct.pack(
        ">HHIHH", 0x0112, 3, 1, 6, 0
    )
    return b"Exif\0\0MM\0*" + struct.pack(">I", 8) + struct.pack(">H", 2) + entries + bytes(4)


def test_an_image_with_malformed_exif_is_422_alone_in_a_batch_too(api: Api) -> None:
    alice = api.account("alice")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(buffer, "JPEG", exif=malformed_exif())
    photo = buffer.getvalue()
    response = upload(api, alice, "odd.jpg", photo, "image/jpeg")
    assert_rejected_without_trace(api, alice, response, 422)
    response = batch(api, alice, [("odd.jpg", photo, "image/jpeg"), ("ok.txt", TEXT, "text/plain")])
    assert response.status_code == 207
    assert [r["status"] for r in response.json()["results"]] == [422, 201]


def test_a_16_bit_greyscale_png_keeps_its_depth_in_the_original_and_the_thumbnail(
    api: Api,
) -> None:
    alice = api.account("alice")
    deep = Image.new("I;16", (1024, 1024), 40_000)  # large enough to be reduced
    buffer = io.BytesIO()
    deep.save(buffer, "PNG")
    meta = uploaded(upload(api, alice, "scan.png", buffer.getvalue(), "image/png"))
    for what, size in (("content", (1024, 1024)), ("thumbnail", (256, 256))):
        served = api.client.get(f"/api/v1/files/{meta['id']}/{what}", headers=alice.headers)
        with Image.open(io.BytesIO(served.content)) as image:
            assert (image.mode, image.size) == ("I;16", size)
            assert image.getextrema() == (40_000, 40_000)


@pytest.mark.parametrize(("colour_type", "channels"), [(2, 3), (6, 4)], ids=["RGB", "RGBA"])
def test_a_16_bit_colour_png_keeps_its_pixels_at_their_depth(
    api: Api, colour_type: int, channels: int
) -> None:
    """Pillow has no 16-bit colour mode (and cannot write one): such a PNG is served with
    its pixel data as it came, only its metadata dropped."""
    alice = api.account("alice")
    width, height = 300, 200
    noise = random.Random(colour_type)
    # Unfiltered rows of 16-bit samples: what a decoder of the served file must get back.
    rows = b"".join(b"\x00" + noise.randbytes(width * channels * 2) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    sent = (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", header)
        + png_chunk(b"eXIf", gps_exif().tobytes()[6:])  # a PNG's EXIF has no "Exif\0\0"
        + png_chunk(b"tEXt", b"Comment\x00taken at home")
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
        + b"<script>trailing</script>"
    )
    meta = uploaded(upload(api, alice, "scan.png", sent, "image/png"))

    served = api.client.get(f"/api/v1/files/{meta['id']}/content", headers=alice.headers)
    for secret in (b"SpyCam", b"taken at home", b"<script>"):
        assert secret not in served.content
    chunks = png_chunks(served.content)
    assert chunks[0] == (b"IHDR", header)  # 16 bits per sample still
    assert zlib.decompress(b"".join(data for kind, data in chunks if kind == b"IDAT")) == rows
    with Image.open(io.BytesIO(served.content)) as image:
        # Still displayed turned as uploaded, by its orientation, the only tag left.
        assert dict(image.getexif()) == {ExifTags.Base.Orientation: 6}
    thumb = api.client.get(f"/api/v1/files/{meta['id']}/thumbnail", headers=alice.headers)
    assert Image.open(io.BytesIO(thumb.content)).size == (171, 256)


def test_a_png_keeps_the_chunks_that_say_what_its_colours_are(api: Api) -> None:
    alice = api.account("alice")
    colour = PngImagePlugin.PngInfo()
    colour.add(b"gAMA", struct.pack(">I", 45455))
    colour.add(b"cHRM", struct.pack(">8I", 31270, 32900, 64000, 33000, 30000, 60000, 15000, 6000))
    colour.add(b"sRGB", b"\x00")
    buffer = io.BytesIO()
    Image.new("RGB", (600, 300), "red").save(buffer, "PNG", pnginfo=colour)
    keys = ("gamma", "chromaticity", "srgb")
    with Image.open(buffer) as original:
        sent = {key: original.info[key] for key in keys}
    meta = uploaded(upload(api, alice, "red.png", buffer.getvalue(), "image/png"))
    for what in ("content", "thumbnail"):
        served = api.client.get(f"/api/v1/files/{meta['id']}/{what}", headers=alice.headers)
        with Image.open(io.BytesIO(served.content)) as image:
            assert {key: image.info.get(key) for key in keys} == sent


def test_jpeg_comments_never_come_back(api: Api) -> None:
    alice = api.account("alice")
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), "red").save(buffer, "JPEG", comment=b"GPS 52.52N 13.40E")
    meta = uploaded(upload(api, alice, "noted.jpg", buffer.getvalue(), "image/jpeg"))
    for path in ("content", "thumbnail"):
        served = api.client.get(f"/api/v1/files/{meta['id']}/{path}", headers=alice.headers)
        assert "comment" not in Image.open(io.BytesIO(served.content)).info
        assert b"52.52N" not in served.content


def test_a_jpeg_keeps_its_chroma_resolution(api: Api) -> None:
    """Columns of red and blue a pixel wide, sampled 4:4:4: halving the chroma, as a
    default re-encoding does, turns them purple."""
    alice = api.account("alice")
    stripes = Image.new("RGB", (64, 48), "red")
    for x in range(1, 64, 2):
        stripes.paste("blue", (x, 0, x + 1, 48))
    buffer = io.BytesIO()
    stripes.save(buffer, "JPEG", quality=95, subsampling=0)
    meta = uploaded(upload(api, alice, "stripes.jpg", buffer.getvalue(), "image/jpeg"))
    served = api.client.get(f"/api/v1/files/{meta['id']}/content", headers=alice.headers)
    with Image.open(io.BytesIO(served.content)) as image:
        assert JpegImagePlugin.get_sampling(image) == 0  # 4:4:4
        red, _, blue = image.convert("RGB").getpixel((10, 24))
        assert (red > 200, blue < 60) == (True, True)  # red, not purple


def test_a_cmyk_jpeg_keeps_the_colour_space_its_profile_describes(api: Api) -> None:
    alice = api.account("alice")
    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    profile[16:20] = b"CMYK"  # the header's data colour space, as a print profile has it
    buffer = io.BytesIO()
    Image.new("CMYK", (300, 200), (0, 255, 255, 0)).save(buffer, "JPEG", icc_profile=bytes(profile))
    meta = uploaded(upload(api, alice, "print.jpg", buffer.getvalue(), "image/jpeg"))
    for path in ("content", "thumbnail"):
        served = api.client.get(f"/api/v1/files/{meta['id']}/{path}", headers=alice.headers)
        image = Image.open(io.BytesIO(served.content))
        assert image.mode == "CMYK"
        assert image.info["icc_profile"][16:20] == b"CMYK"


def webp_bitstream(data: bytes) -> bytes:
    """The kind of a WebP's image data: b"VP8L" (lossless) or b"VP8 " (lossy)."""
    return next(kind for kind in (b"VP8L", b"VP8 ") if kind in data[12:])


@pytest.mark.parametrize(
    "overrides",
    # The second budget lets the image in, but not its lossless encoder's best method.
    [{}, {"max_image_memory_bytes": images.BYTES_PER_PIXEL["image/webp"] * 64 * 48}],
    ids=["default", "budget-for-the-cheapest-method"],
)
def test_a_lossless_webp_stays_lossless_and_a_lossy_one_lossy(
    api_with: Callable[..., Api], overrides: dict[str, int]
) -> None:
    size = (64, 48)
    api = api_with(**overrides)
    alice = api.account("alice")
    # Noise, which any lossy encoding changes, some of it fully transparent yet coloured.
    pixels = Image.frombytes("RGBA", size, random.Random(7).randbytes(size[0] * size[1] * 4))
    pixels.putalpha(pixels.getchannel("A").point(lambda alpha: 0 if alpha < 64 else alpha))
    lossless = io.BytesIO()
    pixels.save(lossless, "WEBP", lossless=True, exact=True, exif=gps_exif())
    meta = uploaded(upload(api, alice, "drawing.webp", lossless.getvalue(), "image/webp"))
    served = api.client.get(f"/api/v1/files/{meta['id']}/content", headers=alice.headers)
    assert webp_bitstream(served.content) == b"VP8L"
    with Image.open(io.BytesIO(served.content)) as image:
        assert "exif" not in image.info
        assert image.convert("RGBA").tobytes() == pixels.rotate(-90, expand=True).tobytes()

    lossy = io.BytesIO()
    pixels.convert("RGB").save(lossy, "WEBP", quality=80)
    meta = uploaded(upload(api, alice, "photo.webp", lossy.getvalue(), "image/webp"))
    served = api.client.get(f"/api/v1/files/{meta['id']}/content", headers=alice.headers)
    assert webp_bitstream(served.content) == b"VP8 "


def gif_with_metadata(payload: bytes) -> bytes:
    """A looping 3-frame GIF carrying a comment and an XMP packet with a GPS position,
    ``payload`` appended after its trailer."""
    frames = [Image.new("RGB", (40, 30), colour) for colour in ("red", "green", "blue")]
    buffer = io.BytesIO()
    frames[0].save(
        buffer,
        "GIF",
        save_all=True,
        append_images=frames[1:],
        duration=100,
        loop=0,
        comment=b"taken at home",
    )
    extension = b"\x21\xff\x0bXMP DataXMP" + sub_blocks(XMP_GPS * 5) + b"\x00"
    return with_extension(buffer.getvalue(), extension) + payload


XMP_GPS = b"<x:xmpmeta><exif:GPSLatitude>52,31.2N</exif:GPSLatitude></x:xmpmeta>"


def sub_blocks(data: bytes) -> bytes:
    """``data`` as GIF data sub-blocks, without their terminator."""
    return b"".join(
        bytes([len(data[i : i + 255])]) + data[i : i + 255] for i in range(0, len(data), 255)
    )


def with_extension(data: bytes, extension: bytes) -> bytes:
    """The GIF ``data`` with ``extension`` before its first frame."""
    flags = data[10]  # the global colour table's presence and size, after which it goes
    start = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    return data[:start] + extension + data[start:]


def frames_of(data: bytes) -> list[bytes]:
    with Image.open(io.BytesIO(data)) as image:
        return [frame.convert("RGB").tobytes() for frame in ImageSequence.Iterator(image)]


def test_gif_metadata_and_trailing_bytes_never_come_back(api: Api) -> None:
    alice = api.account("alice")
    payload = b"<html><script>alert(document.cookie)</script></html>"
    original = gif_with_metadata(payload)
    with Image.open(io.BytesIO(original)) as image:  # sanity: what there is to remove
        assert image.info["comment"] == b"taken at home"
    assert len(frames_of(original)) == 3  # the XMP block is well formed: Pillow reads past it
    meta = uploaded(upload(api, alice, "loop.gif", original, "image/gif"))

    served = api.client.get(f"/api/v1/files/{meta['id']}/content", headers=alice.headers)
    for secret in (b"taken at home", b"GPSLatitude", b"XMP DataXMP", b"<script"):
        assert secret not in served.content
    # Lossless and still animated: the same frames, the loop kept; the record describes
    # what is served.
    assert frames_of(served.content) == frames_of(original)
    with Image.open(io.BytesIO(served.content)) as image:
        assert image.info["loop"] == 0
        assert "comment" not in image.info
        assert "xmp" not in image.info
    assert meta["size"] == len(served.content)
    assert meta["sha256"] == hashlib.sha256(served.content).hexdigest()


def test_gif_metadata_hidden_in_the_blocks_kept_never_comes_back(api: Api) -> None:
    """Readers skip the sub-blocks after a graphic control's or a loop count's block, so
    those can carry an XMP packet; so can an ICC profile extension."""
    alice = api.account("alice")
    original = gif_with_metadata(b"")
    hidden = original.replace(
        b"NETSCAPE2.0\x03\x01\x00\x00", b"NETSCAPE2.0\x03\x01\x00\x00" + sub_blocks(XMP_GPS), 1
    )
    control = hidden.index(b"\x21\xf9\x04") + 7  # past its 4-byte block
    hidden = hidden[:control] + sub_blocks(XMP_GPS) + hidden[control:]
    hidden = with_extension(hidden, b"\x21\xff\x0bICCRGBG1012" + sub_blocks(XMP_GPS) + b"\x00")
    # Sanity: hidden in all three.
    assert hidden.count(XMP_GPS) == original.count(XMP_GPS) + 3
    assert frames_of(hidden) == frames_of(original)  # and Pillow reads past them

    meta = uploaded(upload(api, alice, "loop.gif", hidden, "image/gif"))
    served = api.client.get(f"/api/v1/files/{meta['id']}/content", headers=alice.headers)
    assert b"GPSLatitude" not in served.content
    assert frames_of(served.content) == frames_of(original)
    with Image.open(io.BytesIO(served.content)) as image:
        assert image.info["loop"] == 0
        assert image.info["duration"] == 100


def test_gif_plain_text_blocks_never_come_back(api: Api) -> None:
    """Text GIF89a viewers of old drew over the image, which browsers and Pillow skip:
    hidden from whoever looks at the image, as a comment is."""
    alice = api.account("alice")
    original = gif_with_metadata(b"")
    # Grid position and size, cell size, foreground and background colour indexes.
    grid = struct.pack("<4H4B", 0, 0, 40, 30, 8, 8, 1, 0)
    plain_text = b"\x21\x01\x0c" + grid + sub_blocks(b"meet me at 52.52N 13.40E") + b"\x00"
    texted = with_extension(original, plain_text)
    assert frames_of(texted) == frames_of(original)  # sanity: Pillow reads past it

    meta = uploaded(upload(api, alice, "texted.gif", texted, "image/gif"))
    served = api.client.get(f"/api/v1/files/{meta['id']}/content", headers=alice.headers)
    assert b"52.52N" not in served.content
    assert frames_of(served.content) == frames_of(original)
    with Image.open(io.BytesIO(served.content)) as image:
        assert (image.info["loop"], image.info["duration"]) == (0, 100)


def test_a_gif_cut_anywhere_before_its_trailer_is_malformed() -> None:
    whole = gif_with_metadata(b"")
    for end in range(len(whole)):
        with pytest.raises(gif.MalformedGif):
            gif.without_metadata(whole[:end], max_pixels=1_000_000)
    assert frames_of(gif.without_metadata(whole, max_pixels=1_000_000)) == frames_of(whole)


def test_a_gif_broken_after_its_first_frame_is_422_and_leaves_nothing(api: Api) -> None:
    alice = api.account("alice")
    broken = gif_with_metadata(b"")[:-1] + b"\x99 not a block"
    response = upload(api, alice, "broken.gif", broken, "image/gif")
    assert_rejected_without_trace(api, alice, response, 422)


def gif_of_frames(count: int) -> bytes:
    """A GIF of ``count`` frames of 10x10, each drawn whole: their colours alternate."""
    frames = [Image.new("RGB", (10, 10), ("red", "blue")[i % 2]) for i in range(count)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert len(frames_of(buffer.getvalue())) == count
    return buffer.getvalue()


def test_a_gif_frame_over_the_pixel_cap_is_422_and_leaves_nothing(
    api_with: Callable[..., Api],
) -> None:
    api = api_with(max_image_pixels=100)
    alice = api.account("alice")
    data = gif_of_frames(2)
    # Its second frame claims 60000x60000 under a 10x10 screen: every client that plays it
    # would decode that, while Pillow reads only the first frame.
    second = data.rindex(b"\x2c\x00\x00\x00\x00\x0a\x00\x0a\x00")  # at 0,0; 10x10
    bomb = data[: second + 5] + struct.pack("<HH", 60_000, 60_000) + data[second + 9 :]
    response = upload(api, alice, "bomb.gif", bomb, "image/gif")
    assert_rejected_without_trace(api, alice, response, 422)


def test_gif_frames_together_over_their_cap_are_422_and_leave_nothing(
    api_with: Callable[..., Api],
) -> None:
    api = api_with(max_image_pixels=100)
    alice = api.account("alice")
    too_long = gif_of_frames(gif.FRAMES_PIXEL_CAPS + 1)
    response = upload(api, alice, "long.gif", too_long, "image/gif")
    assert_rejected_without_trace(api, alice, response, 422)
    uploaded(upload(api, alice, "ok.gif", gif_of_frames(gif.FRAMES_PIXEL_CAPS), "image/gif"))


@pytest.mark.parametrize(
    ("name", "data", "content_type"),
    [
        ("x.png", TEXT, "application/octet-stream"),  # text named as an image
        ("x.png", image_bytes("PNG"), "text/plain"),  # an image declared as text
        ("x.jpg", image_bytes("PNG"), "application/octet-stream"),  # wrong extension
        ("x.txt", image_bytes("PNG"), "application/octet-stream"),
        ("x", TEXT, "text/plain"),  # no extension to agree with
        ("x.txt", b"abc\x00def", "text/plain"),  # NUL: not text
        ("x.txt", b"\xff\xfe\xfa", "text/plain"),  # not UTF-8
        ("x.zip", b"PK\x03\x04" + bytes(100), "application/zip"),  # detected, not allowed
        ("x.png", image_bytes("PNG"), "image/pjpeg"),  # another type's alias
    ],
)
def test_type_mismatches_are_415_and_leave_nothing(
    api: Api, name: str, data: bytes, content_type: str
) -> None:
    alice = api.account("alice")
    response = upload(api, alice, name, data, content_type)
    assert_rejected_without_trace(api, alice, response, 415)


@pytest.mark.parametrize(
    ("name", "data", "content_type"),
    [
        ("server.log", TEXT, "text/x-log"),  # Firefox and Chrome on Linux
        ("photo.jpg", image_bytes("JPEG"), "image/pjpeg"),
        ("photo.jpeg", image_bytes("JPEG"), "image/jpg"),
        ("pic.png", image_bytes("PNG"), "image/x-png"),
    ],
)
def test_types_declared_under_other_names_agree(
    api: Api, name: str, data: bytes, content_type: str
) -> None:
    alice = api.account("alice")
    assert uploaded(upload(api, alice, name, data, content_type))["size"] > 0


def test_a_declared_type_refused_is_not_echoed(api: Api) -> None:
    alice = api.account("alice")
    hostile = "text/html<script>alert(1)</script>"
    body = assert_problem(upload(api, alice, "notes.txt", TEXT, hostile), 415)
    assert "<script>" not in body["detail"]
    assert body["detail"] == "The part's declared type does not match its text/plain content."


def test_a_decompression_bomb_is_422_and_leaves_nothing(api: Api) -> None:
    alice = api.account("alice")
    bomb = huge_png(20_000, 20_000)
    assert len(bomb) < 200_000
    response = upload(api, alice, "bomb.png", bomb, "image/png")
    assert_rejected_without_trace(api, alice, response, 422)


def test_the_pixel_cap_is_checked_before_decoding(api_with: Callable[..., Api]) -> None:
    api = api_with(max_image_pixels=100)
    alice = api.account("alice")
    response = upload(api, alice, "big.png", image_bytes("PNG", (11, 10)), "image/png")
    assert_rejected_without_trace(api, alice, response, 422)
    uploaded(upload(api, alice, "ok.png", image_bytes("PNG", (10, 10)), "image/png"))


def test_a_webp_under_the_pixel_cap_but_over_the_memory_budget_is_422(api: Api) -> None:
    """1.6 KB that took ~1 GB to decode and re-encode, above what two workers are given."""
    alice = api.account("alice")
    buffer = io.BytesIO()
    Image.new("RGBA", (6300, 6300), (1, 2, 3, 4)).save(buffer, "WEBP", lossless=True)
    assert api.settings.max_image_pixels > 6300 * 6300  # under the pixel cap
    response = upload(api, alice, "big.webp", buffer.getvalue(), "image/webp")
    assert_rejected_without_trace(api, alice, response, 422)


def test_the_memory_budget_caps_each_format_by_its_cost(api_with: Callable[..., Api]) -> None:
    api = api_with(max_image_memory_bytes=images.BYTES_PER_PIXEL["image/webp"] * 100 * 100)
    alice = api.account("alice")
    response = upload(api, alice, "big.webp", image_bytes("WEBP", (100, 101)), "image/webp")
    assert_rejected_without_trace(api, alice, response, 422)
    uploaded(upload(api, alice, "ok.webp", image_bytes("WEBP", (100, 100)), "image/webp"))
    # Three times those pixels fit as a JPEG, twice as a PNG, not as a progressive JPEG,
    # whose decoder holds every coefficient.
    uploaded(upload(api, alice, "big.jpg", image_bytes("JPEG", (300, 101)), "image/jpeg"))
    uploaded(upload(api, alice, "big.png", image_bytes("PNG", (200, 101)), "image/png"))
    buffer = io.BytesIO()
    Image.new("RGB", (300, 101)).save(buffer, "JPEG", progressive=True)
    response = upload(api, alice, "big.jpg", buffer.getvalue(), "image/jpeg")
    assert_problem(response, 422)


def test_a_broken_image_is_422_and_leaves_nothing(api: Api) -> None:
    alice = api.account("alice")
    truncated = image_bytes("JPEG", (400, 400))[:600]
    response = upload(api, alice, "broken.jpg", truncated, "image/jpeg")
    assert_rejected_without_trace(api, alice, response, 422)


def jpeg_with_scans(scans: int) -> bytes:
    """A progressive JPEG of noise (stuffed 0xFF bytes, restart markers) whose last scan is
    repeated until it has ``scans``: each repeat decodes the whole image again. A stray byte
    before its first scan is skipped by libjpeg (with a warning) and must be by the count."""
    noise = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, "JPEG", progressive=True, restart_marker_blocks=1)
    data = buffer.getvalue()
    # Sanity: what the count must skip, a stuffed 0xFF and a restart marker.
    assert b"\xff\x00" in data
    assert b"\xff\xd0" in data
    # Entropy-coded data never holds 0xFFDA: the last one opens the last scan.
    last_scan = data[data.rfind(b"\xff\xda") : -2]
    repeated = data[:-2] + last_scan * (scans - data.count(b"\xff\xda")) + data[-2:]
    first_scan = repeated.index(b"\xff\xda")
    repeated = repeated[:first_scan] + b"\x00" + repeated[first_scan:]
    Image.open(io.BytesIO(repeated)).load()  # sanity: still a JPEG Pillow decodes
    return repeated


def test_a_jpeg_of_too_many_scans_is_422_and_leaves_nothing(api: Api) -> None:
    alice = api.account("alice")
    too_many = jpeg_with_scans(images.MAX_JPEG_SCANS + 1)
    response = upload(api, alice, "scans.jpg", too_many, "image/jpeg")
    assert_rejected_without_trace(api, alice, response, 422)
    # Empty comments by the thousand: each a search to walk past, none decoded.
    plain = image_bytes("JPEG", (16, 16))
    comments = b"\xff\xfe\x00\x02" * images.MAX_JPEG_SEGMENTS
    response = upload(api, alice, "notes.jpg", plain[:2] + comments + plain[2:], "image/jpeg")
    assert_rejected_without_trace(api, alice, response, 422)
    uploaded(upload(api, alice, "scans.jpg", jpeg_with_scans(images.MAX_JPEG_SCANS), "image/jpeg"))
    uploaded(upload(api, alice, "notes.jpg", plain[:2] + comments[:400] + plain[2:], "image/jpeg"))


def test_one_byte_over_the_cap_is_413_and_leaves_nothing(api_with: Callable[..., Api]) -> None:
    api = api_with(max_upload_bytes=1000)
    alice = api.account("alice")
    response = upload(api, alice, "big.txt", b"a" * 1001, "text/plain")
    assert_rejected_without_trace(api, alice, response, 413)
    assert response.headers["connection"] == "close"  # the rest of the body stays unread
    assert uploaded(upload(api, alice, "fits.txt", b"a" * 1000, "text/plain"))["size"] == 1000


def test_a_large_upload_is_hashed_whole_and_the_cap_holds_past_the_first_writes(
    api_with: Callable[..., Api],
) -> None:
    """Past 1 MiB, chunks are written and hashed in a worker thread while more arrive."""
    api = api_with(max_upload_bytes=3 * 2**20)
    alice = api.account("alice")
    data = bytes(range(32, 127)) * (3 * 2**20 // 95)
    meta = uploaded(upload(api, alice, "big.txt", data, "text/plain"))
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["size"] == len(data)
    api.client.delete(f"/api/v1/files/{meta['id']}", headers=alice.headers)
    response = upload(api, alice, "over.txt", b"a" * (3 * 2**20 + 1), "text/plain")
    assert_rejected_without_trace(api, alice, response, 413)


def test_the_cap_holds_without_a_content_length(api_with: Callable[..., Api]) -> None:
    api = api_with(max_upload_bytes=1000)
    alice = api.account("alice")
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\n'
    ).encode()

    def chunked() -> Iterator[bytes]:
        yield head
        for _ in range(100):
            yield b"a" * 100
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    headers = alice.headers | {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    response = api.client.post("/api/v1/files", content=chunked(), headers=headers)
    assert_rejected_without_trace(api, alice, response, 413)


@pytest.mark.parametrize(
    ("disposition", "stored"),
    [
        (b'form-data; name="file"; filename="../../etc/passwd.txt"', "passwd.txt"),
        (b'form-data; name="file"; filename="..\\\\..\\\\boot.txt"', "boot.txt"),
        (b'form-data; name="file"; filename="evil\x00name.txt"', "evilname.txt"),
        (b'form-data; name="file"; filename="tab\there\x1b.txt"', "tabhere.txt"),
    ],
)
def test_file_names_are_sanitised(api: Api, disposition: bytes, stored: str) -> None:
    alice = api.account("alice")
    meta = uploaded(raw_upload(api, alice, disposition, TEXT))
    assert meta["original_name"] == stored
    # Stored under a generated key: the client's name never reaches the file system.
    assert [len(path.name) for path in leftovers(api)] == [32]


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a\r\nb.txt", "ab.txt"),
        ("/abs/path/x.txt", "x.txt"),
        ("C:\\Users\\me\\x.txt", "x.txt"),
        ("..", "file"),
        ("\x00\r\n", "file"),
        ("", "file"),
        (None, "file"),
        ("é" * 200 + ".txt", "é" * 125 + ".txt"),
        ("invoice\u202egnp.txt", "invoicegnp.txt"),  # would display as "invoicetxt.png"
        ("\u2067a\u2069\u200fb.txt", "ab.txt"),
        ("\u200b\u2028\ufeff.txt", ".txt"),  # what it displays as
        ("a\u2029b\u00ad.txt", "ab.txt"),
    ],
)
def test_sanitize_filename(raw: str | None, clean: str) -> None:
    assert sanitize_filename(raw) == clean
    assert len(sanitize_filename(raw).encode()) <= 255


@pytest.mark.parametrize(
    ("chunks", "is_text"),
    [
        ([b"plain ", b"ascii"], True),
        (["caf\u00e9".encode()[:4], "caf\u00e9".encode()[4:]], True),  # é split in two
        # A started character cannot skip an ASCII chunk to end in the next one.
        ([b"abc\xc3", b"def", b"\xa9"], False),
        ([b"abc", b"\xff"], False),
        ([b"abc\xc3"], False),  # the upload ends inside a character
        ([b"nul\x00byte"], False),
    ],
)
def test_text_probe_checks_utf8_across_chunks(chunks: list[bytes], is_text: bool) -> None:
    probe = TextProbe()
    for chunk in chunks:
        probe.feed(chunk)
    assert probe.is_text() is is_text


def test_content_disposition_has_an_ascii_fallback_and_the_utf8_name() -> None:
    assert content_disposition('résumé "1".txt') == (
        "attachment; filename=\"r_sum_ _1_.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%221%22.txt"
    )
    # Some clients percent-decode the fallback: no "%" in it.
    assert content_disposition("100%41.txt").startswith('attachment; filename="100_41.txt";')


def test_text_that_opens_like_a_binary_format_is_text_and_an_animated_png_a_png(
    api: Api,
) -> None:
    alice = api.account("alice")
    openings = (b"ID3 tags are MP3 metadata", b"BMW parts", b"MThd", b"fLaC notes")
    # Short, and longer than the head the type is first guessed from (SNIFF_BYTES).
    for opening, repeats in itertools.product(openings, (1, 1000)):
        text = opening + b"\n" + TEXT * repeats
        meta = uploaded(upload(api, alice, "notes.txt", text, "text/plain"))
        assert meta["content_type"] == "text/plain", (opening, len(text))
    frames = [Image.new("RGB", (32, 24), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:], duration=100)
    meta = uploaded(upload(api, alice, "anim.png", buffer.getvalue(), "image/png"))
    assert (meta["content_type"], meta["has_thumbnail"]) == ("image/png", True)
    # A binary file of a refused type is still refused, whatever its name.
    mp3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 4
    assert_problem(upload(api, alice, "notes.txt", mp3, "text/plain"), 415)


def test_form_problems_are_4xx_and_leave_nothing(api: Api) -> None:
    alice = api.account("alice")
    no_file = api.client.post("/api/v1/files", data={"description": "x"}, headers=alice.headers)
    assert_rejected_without_trace(api, alice, no_file, 415)  # urlencoded, not multipart
    long = upload(api, alice, "a.txt", TEXT, "text/plain", description="d" * 501)
    assert_rejected_without_trace(api, alice, long, 422)
    two = api.client.post(
        "/api/v1/files",
        files=[("file", ("a.txt", TEXT, "text/plain")), ("file", ("b.txt", TEXT, "text/plain"))],
        headers=alice.headers,
    )
    assert_rejected_without_trace(api, alice, two, 400)
    truncated = api.client.post(
        "/api/v1/files",
        content=f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.txt"'
        "\r\n\r\nno closing boundary",
        headers=alice.headers | {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    assert_rejected_without_trace(api, alice, truncated, 400)
    two_dispositions = raw_upload(
        api,
        alice,
        b'form-data; name="description"\r\n'
        b'Content-Disposition: form-data; name="file"; filename="a.txt"',
        TEXT,
    )
    assert_rejected_without_trace(api, alice, two_dispositions, 400)
    nul = upload(api, alice, "a.txt", TEXT, "text/plain", description="a\x00b")
    assert_rejected_without_trace(api, alice, nul, 422)  # PostgreSQL text cannot hold it
    for length in (71, 257):  # RFC 2046 allows 70; the parser itself refuses over 256
        boundary = "b" * length
        long_boundary = api.client.post(
            "/api/v1/files",
            content=f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="a.txt"\r\n\r\ntext\r\n--{boundary}--\r\n',
            headers=alice.headers | {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert_rejected_without_trace(api, alice, long_boundary, 400)
    assert_problem(api.client.post("/api/v1/files", files={"file": ("a.txt", TEXT)}), 401)
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n'
        f"\r\ntext\r\n--{BOUNDARY}--\r\n"
    ).encode()
    compressed = api.client.post(
        "/api/v1/files",
        content=gzip.compress(body),
        headers=alice.headers
        | {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Content-Encoding": "gzip"},
    )
    assert_rejected_without_trace(api, alice, compressed, 415)
    assert compressed.headers["accept-encoding"] == "identity"


Receive = Callable[[], Awaitable[dict[str, Any]]]


def asgi_post(
    api: Api, owner: Account, route: str, receive: Receive, content_length: int | None = None
) -> list[dict[str, Any]]:
    """POST a multipart body straight to the app, with ``receive`` handing out the ASGI
    messages (a client that vanishes, a body that must not be read); what the app sent."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [
        (b"host", b"testserver"),
        (b"authorization", owner.headers["Authorization"].encode()),
        (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
    ]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": route,
        "raw_path": route.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    assert api.client.portal is not None
    api.client.portal.call(api.client.app, scope, receive, send)  # returns: nothing raised
    return sent


@pytest.mark.parametrize("route", ["/api/v1/files", "/api/v1/files/batch"])
def test_an_upload_its_client_abandons_is_a_499_and_leaves_nothing(api: Api, route: str) -> None:
    """Not a 500: the client left, the server did nothing wrong (and nothing is sent)."""
    alice = api.account("alice")
    before = parse(api.client.get("/metrics").text)
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.txt"'
        "\r\nContent-Type: text/plain\r\n\r\n"
    ).encode() + TEXT * 10_000
    messages = [{"type": "http.request", "body": head, "more_body": True}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent = asgi_post(api, alice, route, receive)
    assert sent[0]["status"] == 499
    assert leftovers(api) == []
    assert api.client.get("/api/v1/files", headers=alice.headers).json()["total"] == 0
    after = parse(api.client.get("/metrics").text)
    for name, labels in (
        ("http_requests_total", {"method": "POST", "route": route, "status": "499"}),
        ("uploads_total", {"outcome": "aborted"}),
    ):
        assert value(after, name, **labels) - value(before, name, **labels) == 1
    assert value(after, "http_requests_total", method="POST", route=route, status="500") == 0


@pytest.mark.parametrize("route", ["/api/v1/files", "/api/v1/files/batch"])
def test_a_body_declared_over_the_cap_is_refused_unread(
    api_with: Callable[..., Api], route: str
) -> None:
    """Before a byte is read, so a client sending Expect: 100-continue is never told to go
    on; and the connection closes, rather than reading the body to its end."""
    api = api_with(max_upload_bytes=1000, max_batch_files=2)
    alice = api.account("alice")

    async def receive() -> dict[str, Any]:
        pytest.fail("the body was read")

    sent = asgi_post(api, alice, route, receive, content_length=10 * 2**30)
    assert sent[0]["status"] == 413
    assert (b"connection", b"close") in sent[0]["headers"]
    assert leftovers(api) == []


def test_range_requests_are_answered_with_206(api: Api) -> None:
    alice = api.account("alice")
    meta = uploaded(upload(api, alice, "report.pdf", PDF, "application/pdf"))
    partial = api.client.get(
        f"/api/v1/files/{meta['id']}/content", headers=alice.headers | {"Range": "bytes=0-9"}
    )
    assert partial.status_code == 206
    assert partial.content == PDF[:10]
    assert partial.headers["content-range"] == f"bytes 0-9/{len(PDF)}"


def bytes_read_by_this_process() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_a_head_of_a_download_reads_no_file(api: Api) -> None:
    """The routes take a HEAD as a GET; the file was then read whole for the server to
    drop, holding the connection meanwhile (a second for 200 MB)."""
    alice = api.account("alice")
    text = b"eight mebibytes of a text file\n" * (8 * 2**20 // 31)
    meta = uploaded(upload(api, alice, "big.txt", text, "text/plain"))
    path = f"/api/v1/files/{meta['id']}/content"
    for headers in ({}, {"Range": "bytes=0-"}, {"Range": "bytes=0-10, 2000000-"}):
        before = bytes_read_by_this_process()
        head = api.client.head(path, headers=alice.headers | headers)
        read = bytes_read_by_this_process() - before
        assert head.status_code in (200, 206), headers
        assert head.content == b""
        assert read < 2**20, f"a HEAD ({headers}) read {read} bytes"
    whole = api.client.head(path, headers=alice.headers)
    assert whole.headers["content-length"] == str(len(text))


# An HTTP date whose year no integer of the platform holds: email.utils raised
# OverflowError, not the ValueError of other invalid dates.
OVERFLOWING_DATE = "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"


def test_conditional_downloads_follow_rfc_9110(api: Api) -> None:
    """A client whose copy is current gets a 304 without the file; a failed If-Match or
    If-Unmodified-Since is a 412 problem; anything else gets the file."""
    alice = api.account("alice")
    meta = uploaded(upload(api, alice, "report.pdf", PDF, "application/pdf"))
    path = f"/api/v1/files/{meta['id']}/content"
    first = api.client.get(path, headers=alice.headers)
    etag, last_modified = first.headers["etag"], first.headers["last-modified"]
    long_ago = "Sun, 06 Nov 1994 08:49:37 GMT"

    def status(method: str = "GET", **conditions: str) -> Response:
        headers = {name.replace("_", "-"): value for name, value in conditions.items()}
        return api.client.request(method, path, headers=alice.headers | headers)

    for current in (
        {"If_None_Match": etag},
        {"If_None_Match": f'"other", W/{etag}'},
        {"If_None_Match": "*"},
        {"If_Modified_Since": last_modified},
    ):
        not_modified = status(**current)
        assert (not_modified.status_code, not_modified.content) == (304, b""), current
        assert not_modified.headers["etag"] == etag
        assert status("HEAD", **current).status_code == 304, current
    for stale in (
        {"If_None_Match": '"other"'},
        {"If_Modified_Since": long_ago},
        {"If_Modified_Since": "not a date"},  # ignored
        # Ignored too, as dates past what Python can hold, not a 500.
        {"If_Modified_Since": OVERFLOWING_DATE},
        {"If_Unmodified_Since": OVERFLOWING_DATE},
        {"If_Match": etag},
        {"If_Match": "*"},
        {"If_Unmodified_Since": last_modified},
    ):
        sent = status(**stale)
        assert (sent.status_code, sent.content) == (200, PDF), stale
    for failed in (
        {"If_Match": '"other"'},
        {"If_Match": f"W/{etag}"},
        {"If_Unmodified_Since": long_ago},
    ):
        assert_problem(status(**failed), 412)
    # If-None-Match wins over If-Modified-Since (RFC 9110 section 13.2.2).
    assert status(If_None_Match='"other"', If_Modified_Since=last_modified).status_code == 200


def test_a_bad_range_is_a_problem_and_an_unknown_range_unit_is_ignored(api: Api) -> None:
    alice = api.account("alice")
    meta = uploaded(upload(api, alice, "report.pdf", PDF, "application/pdf"))
    size = len(PDF)

    def download(range_header: str) -> Response:
        return api.client.get(
            f"/api/v1/files/{meta['id']}/content", headers=alice.headers | {"Range": range_header}
        )

    for malformed in ("bytes=abc", "bytes=5-2", "bytes", "bytes=", "bytes=--1", "bytes=1-2-3"):
        body = assert_problem(download(malformed), 400)
        assert body["detail"] == "The Range header is not a valid bytes range.", malformed
    for unsatisfiable in (f"bytes={size}-", "bytes=-0", f"bytes={size}-{size + 9}, {size * 2}-"):
        response = download(unsatisfiable)
        assert_problem(response, 416)
        assert response.headers["content-range"] == f"bytes */{size}"
    # RFC 9110 section 14.2: a range unit the server does not know is ignored, not refused.
    whole = download("items=0-9")
    assert (whole.status_code, whole.content) == (200, PDF)
    # Satisfiable when any of its ranges is: the others are left out.
    mixed = download(f"bytes=0-1, {size}-{size + 10}")
    assert (mixed.status_code, mixed.content) == (206, PDF[:2])
    assert mixed.headers["content-range"] == f"bytes 0-1/{size}"
    several = download("bytes=-3, 0-1, 1-2")  # in order, overlapping ones merged
    assert several.status_code == 206
    assert several.headers["content-type"].startswith("multipart/byteranges; boundary=")
    parts = several.content.split(b"Content-Range: ")[1:]
    assert [part.split(b"\r\n", 1)[0] for part in parts] == [
        f"bytes 0-2/{size}".encode(),
        f"bytes {size - 3}-{size - 1}/{size}".encode(),
    ]
    assert b"\r\n\r\n" + PDF[:3] + b"\r\n" in parts[0]


@pytest.mark.parametrize(
    ("header", "ranges"),
    [
        ("bytes=0-9", [(0, 10)]),
        ("bytes=90-", [(90, 100)]),
        ("bytes=90-1000", [(90, 100)]),  # clipped to the file
        ("bytes=-10", [(90, 100)]),
        ("bytes=-1000", [(0, 100)]),  # a suffix longer than the file is all of it
        ("BYTES = 0-0 , , 5-5", [(0, 1), (5, 6)]),  # case, spaces, empty list elements
        ("bytes=10-19,0-9,30-39", [(0, 20), (30, 40)]),  # sorted; touching ones merged
        ("bytes=0-1,100-200", [(0, 2)]),  # the unsatisfiable one is left out
        ("bytes=" + ",".join(["0-0"] * (MAX_RANGES + 1)), []),  # too many: the whole file
        ("pages=1-2", []),
    ],
)
def test_byte_ranges_follow_rfc_9110(header: str, ranges: list[tuple[int, int]]) -> None:
    assert byte_ranges(header, 100) == ranges


def test_someone_elses_file_is_404_on_every_route_and_stays(api: Api) -> None:
    alice, mallory = api.account("alice"), api.account("mallory")
    meta = uploaded(upload(api, alice, "pic.png", image_bytes("PNG"), "image/png"))
    file_id = meta["id"]
    for method, path in (
        ("GET", f"/api/v1/files/{file_id}"),
        ("GET", f"/api/v1/files/{file_id}/content"),
        ("GET", f"/api/v1/files/{file_id}/thumbnail"),
        ("DELETE", f"/api/v1/files/{file_id}"),
        ("GET", "/api/v1/files/999999"),
    ):
        body = assert_problem(api.client.request(method, path, headers=mallory.headers), 404)
        assert body["detail"] == "File not found."
    assert api.client.get("/api/v1/files", headers=mallory.headers).json()["total"] == 0
    assert api.client.get(f"/api/v1/files/{file_id}", headers=alice.headers).json() == meta
    assert len(leftovers(api)) == 2  # the image and its thumbnail


def test_listing_is_paginated_and_private(api: Api) -> None:
    alice, bob = api.account("alice"), api.account("bob")
    ids = [uploaded(upload(api, alice, f"{n}.txt", TEXT, "text/plain"))["id"] for n in range(3)]
    uploaded(upload(api, bob, "bob.txt", TEXT, "text/plain"))
    page = api.client.get("/api/v1/files?skip=1&limit=1", headers=alice.headers).json()
    assert (page["total"], page["skip"], page["limit"]) == (3, 1, 1)
    assert [item["id"] for item in page["items"]] == ids[1:2]


def test_listing_searches_names_and_descriptions(api: Api) -> None:
    alice, bob = api.account("alice"), api.account("bob")
    report = uploaded(upload(api, alice, "Q3-report.txt", TEXT, "text/plain"))
    notes = uploaded(
        upload(api, alice, "notes.txt", TEXT, "text/plain", description="Report draft")
    )
    uploaded(upload(api, alice, "other.txt", TEXT, "text/plain"))
    uploaded(upload(api, bob, "report.txt", TEXT, "text/plain"))  # not alice's
    found = api.client.get("/api/v1/files?q=REPORT", headers=alice.headers).json()
    assert found["total"] == 2
    assert [item["id"] for item in found["items"]] == [report["id"], notes["id"]]
    nothing = api.client.get("/api/v1/files?q=100%25", headers=alice.headers).json()
    assert (nothing["total"], nothing["items"]) == (0, [])  # "%" is no wildcard


def test_a_download_whose_file_is_deleted_as_it_starts_is_sent_whole(tmp_path: Path) -> None:
    """A DELETE racing a download: the file is unlinked once the route has answered, before
    the response starts. It was opened by then, so every byte still goes out (Starlette's
    FileResponse opened the path after sending the status line: a 200 without a body)."""
    storage = storage_module.LocalStorage(tmp_path)
    path = storage.local_path("key")
    assert path is not None
    data = os.urandom(300_000)  # several of FileResponse's chunks
    path.write_bytes(data)
    sent: list[Message] = []

    async def download() -> None:
        response = await blob_response(storage, "key", "application/octet-stream", "x.bin")
        path.unlink()
        scope = {"type": "http", "method": "GET", "headers": [], "asgi": {"spec_version": "2.4"}}

        async def receive() -> Message:
            raise AssertionError("not read")

        async def send(message: Message) -> None:
            sent.append(message)

        await response(scope, receive, send)

    anyio.run(download)
    assert sent[0]["status"] == 200
    assert b"".join(message.get("body", b"") for message in sent[1:]) == data


def test_a_file_whose_blob_is_gone_is_404_not_500(api: Api) -> None:
    """What a download sees when a DELETE removes the file after this request read its
    row; and what an operator's lost volume looks like."""
    alice = api.account("alice")
    meta = uploaded(upload(api, alice, "pic.png", image_bytes("PNG"), "image/png"))
    for blob in leftovers(api):
        blob.unlink()
    for path in ("content", "thumbnail"):
        response = api.client.get(f"/api/v1/files/{meta['id']}/{path}", headers=alice.headers)
        assert assert_problem(response, 404)["detail"] == "File not found."


def test_delete_removes_row_blob_and_thumbnail(api: Api) -> None:
    alice = api.account("alice")
    meta = uploaded(upload(api, alice, "pic.png", image_bytes("PNG"), "image/png"))
    assert len(leftovers(api)) == 2
    assert (
        api.client.delete(f"/api/v1/files/{meta['id']}", headers=alice.headers).status_code == 204
    )
    assert leftovers(api) == []
    assert_problem(api.client.get(f"/api/v1/files/{meta['id']}", headers=alice.headers), 404)


def test_deleting_a_user_removes_their_stored_files(api: Api) -> None:
    alice = api.account("alice")
    uploaded(upload(api, alice, "pic.png", image_bytes("PNG"), "image/png"))
    uploaded(upload(api, alice, "notes.txt", TEXT, "text/plain"))
    assert len(leftovers(api)) == 3
    root = api.root()
    assert api.client.delete(f"/api/v1/users/{alice.id}", headers=root.headers).status_code == 204
    assert leftovers(api) == []


def test_an_admin_can_read_and_delete_any_file(api: Api) -> None:
    alice = api.account("alice")
    meta = uploaded(upload(api, alice, "notes.txt", TEXT, "text/plain"))
    root = api.root()
    content = api.client.get(f"/api/v1/files/{meta['id']}/content", headers=root.headers)
    assert content.content == TEXT
    assert api.client.delete(f"/api/v1/files/{meta['id']}", headers=root.headers).status_code == 204
    assert leftovers(api) == []


def test_uploads_are_rate_limited_per_user(api_with: Callable[..., Api]) -> None:
    api = api_with(rate_limit_uploads="2/minute")
    alice, bob = api.account("alice"), api.account("bob")
    for _ in range(2):
        uploaded(upload(api, alice, "a.txt", TEXT, "text/plain"))
    limited = upload(api, alice, "a.txt", TEXT, "text/plain")
    assert_problem(limited, 429)
    assert "retry-after" in limited.headers
    uploaded(upload(api, bob, "b.txt", TEXT, "text/plain"))


def batch(api: Api, owner: Account, files: list[tuple[str, bytes, str]]) -> Response:
    return api.client.post(
        "/api/v1/files/batch",
        files=[("file", spec) for spec in files],
        data={"description": "batch"},
        headers=owner.headers,
    )


def test_a_batch_answers_207_with_one_result_per_file(api: Api) -> None:
    alice = api.account("alice")
    response = batch(
        api,
        alice,
        [
            ("pic.png", image_bytes("PNG"), "image/png"),
            ("fake.png", TEXT, "image/png"),
            ("report.pdf", PDF, "application/pdf"),
            ("bomb.png", huge_png(20_000, 20_000), "image/png"),
        ],
    )
    assert response.status_code == 207, response.text
    results = response.json()["results"]
    assert [(r["filename"], r["status"]) for r in results] == [
        ("pic.png", 201),
        ("fake.png", 415),
        ("report.pdf", 201),
        ("bomb.png", 422),
    ]
    assert results[0]["file"]["has_thumbnail"] is True
    assert results[2]["file"]["description"] == "batch"
    assert results[1]["file"] is None
    assert results[1]["detail"]
    listed = api.client.get("/api/v1/files", headers=alice.headers).json()
    assert [f["id"] for f in listed["items"]] == [
        results[0]["file"]["id"],
        results[2]["file"]["id"],
    ]
    assert len(leftovers(api)) == 3  # the image, its thumbnail and the PDF


def test_a_batch_holds_ten_files_and_eleven_are_400(api: Api) -> None:
    alice = api.account("alice")
    eleven = [(f"{n}.txt", TEXT, "text/plain") for n in range(11)]
    assert_rejected_without_trace(api, alice, batch(api, alice, eleven), 400)
    ten = batch(api, alice, eleven[:10])
    assert [r["status"] for r in ten.json()["results"]] == [201] * 10
    assert len(leftovers(api)) == 10


def test_a_file_over_the_cap_fails_alone_in_a_batch(api_with: Callable[..., Api]) -> None:
    api = api_with(max_upload_bytes=1000)
    alice = api.account("alice")
    response = batch(
        api, alice, [("big.txt", b"a" * 1001, "text/plain"), ("ok.txt", b"a" * 10, "text/plain")]
    )
    assert [r["status"] for r in response.json()["results"]] == [413, 201]
    assert len(leftovers(api)) == 1


def test_polyglots_are_refused_or_defused(api: Api) -> None:
    alice = api.account("alice")
    # Text that opens like a PDF is a PDF to the sniffer: it disagrees with ".txt".
    pdf_looking = upload(api, alice, "notes.txt", PDF, "text/plain")
    assert_rejected_without_trace(api, alice, pdf_looking, 415)
    # A real PNG with a script appended after its end: accepted as the image it is, and the
    # payload does not survive the re-encoding, so it is never served back.
    payload = b"<html><script>alert(document.cookie)</script></html>"
    meta = uploaded(upload(api, alice, "pic.png", image_bytes("PNG") + payload, "image/png"))
    served = api.client.get(f"/api/v1/files/{meta['id']}/content", headers=alice.headers)
    assert served.headers["content-type"] == "image/png"
    assert b"<script" not in served.content


def test_upload_outcomes_are_counted(api: Api) -> None:
    alice = api.account("alice")

    def outcomes() -> dict[str, float]:
        samples = parse(api.client.get("/metrics").text)
        return {
            outcome: value(samples, "uploads_total", outcome=outcome)
            for outcome in ("ok", "bad_type", "bomb", "invalid")
        }

    before = outcomes()
    uploaded(upload(api, alice, "notes.txt", TEXT, "text/plain"))
    upload(api, alice, "fake.png", TEXT, "image/png")
    upload(api, alice, "bomb.png", huge_png(20_000, 20_000), "image/png")
    # No file's type was checked: the request's own is wrong.
    not_a_form = api.client.post("/api/v1/files", json={"file": "x"}, headers=alice.headers)
    assert_problem(not_a_form, 415)
    after = outcomes()
    assert {key: after[key] - before[key] for key in after} == {
        "ok": 1,
        "bad_type": 1,
        "bomb": 1,
        "invalid": 1,
    }


def posted_form(api: Api, owner: Account, route: str, *parts: bytes) -> Response:
    """A hand-built form of these parts (each its Content-Disposition value onwards)."""
    body = b"".join(f"--{BOUNDARY}\r\nContent-Disposition: ".encode() + p + b"\r\n" for p in parts)
    return api.client.post(
        route,
        content=body + f"--{BOUNDARY}--\r\n".encode(),
        headers=owner.headers | {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )


def test_a_file_input_left_empty_is_no_file(api: Api) -> None:
    """Browsers send a file input nobody filled as a part with an empty file name and no
    content: no file to check the type of (it was a 415, for a name without extension).
    It still counts as a file input: a form cannot have the server parse parts without end."""
    alice = api.account("alice")
    left_empty = b'form-data; name="file"; filename=""\r\nContent-Type: ' + GENERIC.encode()
    left_empty += b"\r\n\r\n"
    a_file = b'form-data; name="file"; filename="a.txt"\r\nContent-Type: text/plain\r\n\r\n'
    a_file += TEXT
    empty = posted_form(api, alice, "/api/v1/files", left_empty)
    assert assert_problem(empty, 422)["detail"] == "The form has no 'file' part."
    named_nothing = raw_upload(api, alice, b'form-data; name="file"; filename=""', b"data")
    assert_problem(named_nothing, 400)
    batch = posted_form(api, alice, "/api/v1/files/batch", a_file, left_empty)
    assert batch.status_code == 207
    assert [r["status"] for r in batch.json()["results"]] == [201]
    assert_problem(posted_form(api, alice, "/api/v1/files", left_empty, a_file), 400)
    too_many = posted_form(api, alice, "/api/v1/files/batch", *[left_empty] * 10, a_file)
    assert_problem(too_many, 400)
    assert len(leftovers(api)) == 1  # the batch's file; the refused forms left nothing


def test_writeback_is_asked_for_each_written_range_and_a_refusal_costs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk's writeback starts per MiB written; a file system that refuses the advice
    (ext4 here never does, hence the fault injected) must not fail the upload."""
    ranges: list[tuple[int, int]] = []

    def refusing(fd: int, offset: int, length: int, advice: int) -> None:
        ranges.append((offset, length))
        raise OSError(errno.EINVAL, "advice refused")

    monkeypatch.setattr(storage_module, "_start_writeback", refusing)
    storage = storage_module.LocalStorage(tmp_path / "blobs")
    data = os.urandom(storage_module.WRITE_BUFFER_BYTES * 5 // 2)

    async def stage_and_commit() -> None:
        async with storage.stage() as blob:
            for start in range(0, len(data), 64 * 1024):
                await blob.write(data[start : start + 64 * 1024])
            await blob.commit("key")

    anyio.run(stage_and_commit)
    assert (tmp_path / "blobs" / "key").read_bytes() == data
    # Consecutive ranges covering every byte once: two full buffers, then the rest.
    assert [offset for offset, _ in ranges] == [0, *itertools.accumulate(n for _, n in ranges)][:-1]
    assert sum(length for _, length in ranges) == len(data)
    assert len(ranges) == 3


def test_the_sweep_takes_only_stages_no_live_process_holds(tmp_path: Path) -> None:
    """A live upload may leave its stage unwritten for longer than the sweep's age: a
    client sending slowly, whose bytes gather below the write buffer, or a batch whose
    first file waits, complete, for the others to arrive. The sweep must not take them;
    it takes the stage of a process that died."""
    storage = storage_module.LocalStorage(tmp_path / "blobs")
    two_hours_ago = time.time() - 7200
    dead = tmp_path / "blobs" / ".upload-of-a-dead-worker.tmp"

    async def batch() -> int:
        async with storage.stage() as first, storage.stage() as second:
            await first.write(b"first file, complete\n")
            await second.write(b"second file, ")
            dead.write_bytes(b"cut short")
            for stage in (tmp_path / "blobs").glob(".upload-*"):
                os.utime(stage, (two_hours_ago, two_hours_ago))  # nothing written since
            removed = await storage.remove_stale_stages(older_than_seconds=3600)
            await second.write(b"arriving slowly\n")
            await first.commit("one")
            await second.commit("two")
            return removed

    assert anyio.run(batch) == 1
    assert not dead.exists()
    assert (tmp_path / "blobs" / "one").read_bytes() == b"first file, complete\n"
    assert (tmp_path / "blobs" / "two").read_bytes() == b"second file, arriving slowly\n"


def test_a_commit_that_fails_after_the_rename_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(path: Path) -> None:
        raise OSError("fsync failed")

    monkeypatch.setattr(storage_module, "_fsync_directory", failing_fsync)
    storage = storage_module.LocalStorage(tmp_path / "blobs")

    async def stage_and_commit() -> None:
        async with storage.stage() as blob:
            await blob.write(b"bytes")
            await blob.commit("key")

    with pytest.raises(OSError, match="fsync failed"):
        anyio.run(stage_and_commit)
    assert list((tmp_path / "blobs").iterdir()) == []


def test_a_commit_dates_the_blob_from_the_commit_not_its_last_write(tmp_path: Path) -> None:
    """A batch commits its first file only once the last has arrived, which may be long
    after the first's last byte: dated from that byte, a committed blob whose row is not
    written yet looked old enough to prune."""
    storage = storage_module.LocalStorage(tmp_path / "blobs")
    two_hours_ago = time.time() - 7200

    async def slow_batch() -> list[storage_module.BlobInfo]:
        async with storage.stage() as first:
            await first.write(b"first file, complete\n")
            await first.local_file()  # written out, as when it was inspected
            for stage in (tmp_path / "blobs").glob(".upload-*"):
                os.utime(stage, (two_hours_ago, two_hours_ago))  # the rest took two hours
            await first.commit("one")
        return [blob async for batch in storage.blobs(3600) for blob in batch]

    assert anyio.run(slow_batch) == []
    assert (tmp_path / "blobs" / "one").stat().st_mtime > time.time() - 60


def test_prune_blobs_removes_only_old_blobs_no_row_refers_to(api: Api) -> None:
    """What a process killed between a blob and its row leaves (a file's bytes, a lone
    thumbnail) goes; the blobs of files, a blob committed a moment ago (its row may be
    on its way) and a live upload's stage stay."""
    alice = api.account("alice")
    picture = uploaded(upload(api, alice, "pic.png", image_bytes("PNG"), "image/png"))
    notes = uploaded(upload(api, alice, "notes.txt", TEXT, "text/plain"))
    root = api.settings.upload_dir
    kept = leftovers(api)  # the picture, its thumbnail and the notes
    orphans = {"0" * 32: b"bytes of a file whose row was never written", f"{'1' * 32}-thumb": b"t"}
    for key, data in orphans.items():
        (root / key).write_bytes(data)
    stage = root / ".upload-in-flight.tmp"
    stage.write_bytes(b"arriving")
    two_hours_ago = time.time() - 7200
    for path in root.iterdir():
        os.utime(path, (two_hours_ago, two_hours_ago))
    just_committed = root / ("2" * 32)
    just_committed.write_bytes(b"its row is being written")
    env = {
        "APP_ENV": "test",
        "APP_DATABASE_URL": api.settings.database_url,
        "APP_DATA_DIR": str(api.settings.data_dir),
    }

    listed = prune_blobs(env, "--dry-run")
    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stdout.splitlines()[:-1]) == sorted(
        f"would remove {key} ({len(data)} bytes)" for key, data in orphans.items()
    )
    assert listed.stdout.splitlines()[-1] == (
        f"would remove 2 blob(s) no file refers to, {sum(map(len, orphans.values()))} bytes"
    )
    assert all((root / key).exists() for key in orphans)

    pruned = prune_blobs(env)
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.splitlines()[-1].startswith("removed 2 blob(s)")
    assert leftovers(api) == sorted([*kept, stage, just_committed])
    for meta in (picture, notes):
        content = api.client.get(f"/api/v1/files/{meta['id']}/content", headers=alice.headers)
        assert content.status_code == 200
    thumbnail = api.client.get(f"/api/v1/files/{picture['id']}/thumbnail", headers=alice.headers)
    assert thumbnail.status_code == 200


def test_prune_blobs_on_an_unmigrated_database_says_to_migrate(tmp_path: Path) -> None:
    env = {
        "APP_ENV": "test",
        "APP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/new.db",
        "APP_DATA_DIR": str(tmp_path / "data"),
    }
    refused = prune_blobs(env)
    assert refused.returncode == 1
    assert "run `python -m app migrate` first" in refused.stderr
    assert "Traceback" not in refused.stderr


def prune_blobs(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "prune-blobs", *args],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
