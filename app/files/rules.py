"""What an upload may be: the allowed types, how a type is detected from the bytes, how it
must agree with the name and the declared type, and what an original name may contain."""

import codecs
from pathlib import PurePosixPath
from urllib.parse import quote

import filetype

from app.errors import UnsupportedMediaType
from app.text import without_invisible

# The first bytes are enough for every signature filetype knows.
SNIFF_BYTES = 8192
GENERIC_TYPE = "application/octet-stream"
MAX_NAME_BYTES = 255
FALLBACK_NAME = "file"

EXTENSIONS: dict[str, frozenset[str]] = {
    "image/png": frozenset({".png"}),
    "image/jpeg": frozenset({".jpg", ".jpeg"}),
    "image/gif": frozenset({".gif"}),
    "image/webp": frozenset({".webp"}),
    "application/pdf": frozenset({".pdf"}),
    "text/plain": frozenset({".txt", ".text", ".log"}),
}

# Other names clients declare these types under: legacy ones (old Internet Explorer), and
# what browsers on Linux take from shared-mime-info for a ".log" file.
DECLARED_ALIASES: dict[str, frozenset[str]] = {
    "image/jpeg": frozenset({"image/pjpeg", "image/jpg"}),
    "image/png": frozenset({"image/x-png"}),
    "text/plain": frozenset({"text/x-log"}),
}


class TextProbe:
    """Whether the whole upload is UTF-8 without NUL bytes, decided as the chunks pass
    (a multi-byte character may straddle two chunks, hence the incremental decoder)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._valid = True

    def feed(self, chunk: bytes) -> None:
        if not self._valid:
            return
        # ASCII is UTF-8 as it is: decoding it (into a str the size of the chunk) is
        # needed only when a multi-byte character is pending from the previous chunk.
        if not chunk.isascii() or self._decoder.getstate()[0]:
            try:
                self._decoder.decode(chunk)
            except UnicodeDecodeError:
                self._valid = False
        if b"\0" in chunk:
            self._valid = False

    def is_text(self) -> bool:
        try:
            self._decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
        return self._valid


# An animated PNG is a PNG (its first frame is what a PNG decoder sees, and is kept).
_SAME_TYPE = {"image/apng": "image/png"}


def detect(head: bytes, is_text: bool) -> str | None:
    """The type the bytes say they are. Text (``is_text``: the whole upload is UTF-8
    without NUL) when no allowed type's signature matched: text may open with the few
    letters that some binary formats start with ("ID3", "BMW", "MThd", "fLaC"…), while a
    file of such a format is not text."""
    kind = filetype.guess(head)
    mime = None if kind is None else _SAME_TYPE.get(kind.mime, str(kind.mime))
    if mime not in EXTENSIONS and is_text:
        return "text/plain"
    return mime


def check_type(detected: str | None, filename: str, declared: str | None) -> str:
    """The detected type, if it is allowed and the name and the part's type agree with it."""
    if detected not in EXTENSIONS:
        raise UnsupportedMediaType("This type of file is not accepted.")
    if PurePosixPath(filename).suffix.lower() not in EXTENSIONS[detected]:
        raise UnsupportedMediaType(
            f"The file name's extension does not match its {detected} content."
        )
    declared_type = (declared or GENERIC_TYPE).split(";", 1)[0].strip().lower()
    if declared_type not in (detected, GENERIC_TYPE, *DECLARED_ALIASES.get(detected, ())):
        # Not echoed: it is the client's input (the content's type is the server's finding).
        raise UnsupportedMediaType(
            f"The part's declared type does not match its {detected} content."
        )
    return detected


def sanitize_filename(raw: str | None) -> str:
    """A display name only (storage uses generated keys), yet it ends up in headers and
    on users' disks: the last path component, no control, invisible or line-breaking
    characters, at most 255 bytes."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = without_invisible(name).strip()
    if name in ("", ".", ".."):
        return FALLBACK_NAME
    if len(name.encode()) > MAX_NAME_BYTES:
        path = PurePosixPath(name)
        suffix = path.suffix if len(path.suffix.encode()) < 16 else ""
        budget = MAX_NAME_BYTES - len(suffix.encode())
        stem = name[: len(name) - len(suffix)].encode()[:budget].decode("utf-8", "ignore")
        name = stem + suffix
    return name


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII fallback for old clients and the exact UTF-8 name.
    The fallback has no "%" either: some clients percent-decode it (RFC 6266 appendix D)."""
    fallback = "".join(
        ch if ch.isascii() and ch.isprintable() and ch not in '"\\%' else "_" for ch in filename
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
