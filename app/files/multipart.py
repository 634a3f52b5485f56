"""A multipart/form-data body read as it arrives.

``UploadFile`` / ``request.form()`` spool the whole body before the route runs, so a size
cap could only be applied afterwards. Here python-multipart's push parser is fed one
network chunk at a time and the caller sees each part's bytes as they come: it can stop
reading (and answer 413) the moment a limit is passed.
"""

from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.requests import Request

from app.errors import AppError, PayloadTooLarge, UnsupportedMediaType


class NotMultipart(UnsupportedMediaType):
    """415 for the request's own type: no file's type was checked."""


class MalformedBody(AppError):
    """400: the body is not the multipart/form-data it claims to be."""


@dataclass(frozen=True)
class PartStart:
    name: str
    filename: str | None
    content_type: str | None


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | bytes | PartEnd


@dataclass(frozen=True)
class FormBody:
    """A request's multipart body as it arrives, and what its headers say of it."""

    content_type: str
    # Content-Length, when sane: a body declared larger than the cap is refused before a
    # byte is read (and before the client is told to go on, for Expect: 100-continue).
    # Never trusted otherwise; the bytes are counted as they come.
    declared_bytes: int | None
    chunks: AsyncIterator[bytes]

    @classmethod
    def of(cls, request: Request) -> "FormBody":
        length = request.headers.get("content-length", "")
        return cls(
            request.headers.get("content-type", ""),
            int(length) if length.isascii() and length.isdigit() else None,
            request.stream(),
        )


def boundary_of(content_type: str) -> bytes:
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise NotMultipart("Send the file as multipart/form-data.")
    boundary = options.get(b"boundary")
    if not boundary:
        raise MalformedBody("The multipart body has no boundary.")
    if len(boundary) > MAX_BOUNDARY_BYTES:
        # The parser itself refuses those over 256 bytes, with an error of another kind.
        raise MalformedBody(f"The multipart boundary is longer than {MAX_BOUNDARY_BYTES} bytes.")
    return boundary


MAX_BOUNDARY_BYTES = 70  # RFC 2046 section 5.1.1


class _Collector:
    """Turns the parser's callbacks into events; the parser is synchronous, the events are
    handed out after each ``write``."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.finished = False
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._headers.clear,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": lambda data, start, end: self.events.append(bytes(data[start:end])),
            "on_part_end": lambda: self.events.append(PartEnd()),
            "on_end": self._end,
        }

    def _header_end(self) -> None:
        name = bytes(self._field).lower()
        if name in self._headers:
            # Which one counts is anyone's guess: a proxy or filter that reads the first
            # would judge another part than the one stored.
            raise MalformedBody("A part repeats one of its headers.")
        self._headers[name] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        kind, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if kind != b"form-data" or b"name" not in options:
            raise MalformedBody("A part has no form-data Content-Disposition with a name.")
        filename = options.get(b"filename")
        content_type = self._headers.get(b"content-type")
        self.events.append(
            PartStart(
                name=options[b"name"].decode("utf-8", "replace"),
                filename=None if filename is None else filename.decode("utf-8", "replace"),
                content_type=None if content_type is None else content_type.decode("latin-1"),
            )
        )

    def _end(self) -> None:
        self.finished = True


async def events(body: FormBody, max_body_bytes: int) -> AsyncIterator[Event]:
    """The body's parts as events. ``max_body_bytes`` bounds everything read, preamble and
    unknown parts included."""
    boundary = boundary_of(body.content_type)
    if body.declared_bytes is not None and body.declared_bytes > max_body_bytes:
        raise _too_large()
    collector = _Collector()
    parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
    received = 0
    async for chunk in body.chunks:
        received += len(chunk)
        if received > max_body_bytes:
            raise _too_large()
        try:
            parser.write(chunk)
        except MultipartParseError as exc:
            raise MalformedBody("The multipart body is malformed.") from exc
        for event in collector.events:
            yield event
        collector.events.clear()
        if collector.finished:
            return
    raise MalformedBody("The multipart body ended early.")


def _too_large() -> PayloadTooLarge:
    return PayloadTooLarge("The request body is too large.")
