"""A GIF without its metadata, losslessly: the blocks that draw the image are copied as
they are, the others are dropped.

Pillow cannot do this: re-encoding a GIF re-quantises its frames and costs a decode of
every frame. GIF has no EXIF, but it carries comments and application extensions, and
those hold what EXIF holds elsewhere (an XMP packet with the GPS position, the editing
software, the author) as well as anything else a client wants served back under an image
type. So only what renders is kept: the screen descriptor and colour tables, each frame
with its graphic control extension, and the loop count. A plain-text extension is dropped
too: GIF89a has it draw text over the image, but browsers and Pillow, as most viewers, skip
it, so its text is content most who look at the image never see, as a comment's is (a
graphic control before it stays: those readers apply it to the next frame). Of an extension
whose first block is all players read (a graphic control, a loop count), only that block
is kept: sub-blocks after it are skipped by every reader, so they could carry anything (an
XMP packet after a loop count was served back). The ICC profile extension is dropped: few
GIFs have one, few viewers read it, and it is an opaque blob that could carry anything
too. Whatever follows the trailer — a polyglot's payload — is dropped as well.

The GIF is served as it came, so every client that plays it decodes every frame: each
frame's size is checked against the pixel cap, not only the first one's (which Pillow
reads), and all of them together against FRAMES_PIXEL_CAPS times it.
"""

import struct

# Application extensions holding the loop count, by identifier.
LOOP_APPLICATIONS = frozenset({b"NETSCAPE2.0", b"ANIMEXTS1.0"})
_EXTENSION, _IMAGE, _TRAILER = 0x21, 0x2C, 0x3B
_GRAPHIC_CONTROL, _APPLICATION = 0xF9, 0xFF
# Ten times the default cap is 400 frames of 1000 by 1000 pixels, decoded at every loop.
FRAMES_PIXEL_CAPS = 10


class MalformedGif(ValueError):
    pass


class TooManyPixels(ValueError):
    pass


def without_metadata(data: bytes, max_pixels: int) -> bytes:
    """``data`` with only the blocks that render; MalformedGif if its structure is broken
    before the trailer, TooManyPixels if a frame or all of them are over the cap."""
    view = memoryview(data)
    if bytes(view[:6]) not in (b"GIF87a", b"GIF89a") or len(view) < 13:
        raise MalformedGif("Not a GIF.")
    position = 13 + _colour_table_bytes(view[10])  # header, screen descriptor, palette
    kept = [view[:position]]
    pixels = 0  # of the frames so far
    while True:
        if position >= len(view):
            raise MalformedGif("The GIF ends before its trailer.")
        introducer = view[position]
        if introducer == _TRAILER:
            kept.append(view[position : position + 1])
            return b"".join(kept)
        if introducer == _IMAGE:
            if position + 10 > len(view):
                raise MalformedGif("The GIF ends inside an image descriptor.")
            width, height = struct.unpack_from("<HH", view, position + 5)
            frame = width * height
            if frame > max_pixels:
                raise TooManyPixels(f"A frame of the GIF has more than {max_pixels} pixels.")
            pixels += frame
            if pixels > FRAMES_PIXEL_CAPS * max_pixels:
                raise TooManyPixels(
                    f"The GIF's frames have more than {FRAMES_PIXEL_CAPS * max_pixels} pixels."
                )
            # Descriptor, local palette, then the LZW code size byte before the data.
            start = position
            position = _end_of_sub_blocks(
                view, position + 11 + _colour_table_bytes(view[position + 9])
            )
            kept.append(view[start:position])
        elif introducer == _EXTENSION:
            start = position
            position = _end_of_sub_blocks(view, position + 2)
            kept.append(_rendering_part(view[start:position]))
        else:
            raise MalformedGif(f"Unknown GIF block {introducer:#04x}.")


def _rendering_part(extension: memoryview) -> bytes:
    """What players read of ``extension`` (introducer to terminator, whose sub-blocks are
    complete), as an extension of its own: nothing if they read none of it."""
    label, first_size = extension[1], extension[2]
    if label == _GRAPHIC_CONTROL and first_size == 4:
        return bytes(extension[:7]) + b"\x00"
    # An application extension opens with an 11-byte block, identifier and code; the loop
    # count is in a 3-byte sub-block: 1, then the count.
    if (
        label == _APPLICATION
        and first_size == 11
        and bytes(extension[3:14]) in LOOP_APPLICATIONS
        and bytes(extension[14:16]) == b"\x03\x01"
    ):
        return bytes(extension[:18]) + b"\x00"
    return b""


def _colour_table_bytes(flags: int) -> int:
    return 3 << ((flags & 0x07) + 1) if flags & 0x80 else 0


def _end_of_sub_blocks(view: memoryview, position: int) -> int:
    """Where the data sub-blocks starting at ``position`` end, past their terminator."""
    while position < len(view):
        size = view[position]
        position += 1 + size
        if size == 0:
            return position
    raise MalformedGif("The GIF ends inside a block.")
