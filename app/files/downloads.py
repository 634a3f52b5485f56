"""The response that serves a stored file, Range requests included.

The file is opened before the response starts and sent from that handle: Starlette's
FileResponse opens its path only once the status line is out, so a file deleted in
between (a DELETE racing the download) became a 200 that sent nothing. An open file stays
readable after its unlink, so the download completes.

Starlette's FileResponse serves ranges (206, ``multipart/byteranges`` for several) but
parses the Range header in ways RFC 9110 §14 does not: it refuses a range unit it does not
know (the RFC says ignore it), refuses a whole header when one of its ranges starts past
the end (the RFC: satisfiable when any range is), and answers refusals in text/plain
unlike every other error of the service. So the parsing is done here, by ``byte_ranges``,
and FileResponse only sends what it returns.

FileResponse sends validators (ETag, Last-Modified) but ignores the conditional headers
that use them; ``app.conditional.precondition`` answers them: a client whose copy is
current gets a 304 without the file, a failed If-Match a 412.
"""

import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import BinaryIO

import anyio
from starlette.datastructures import Headers
from starlette.responses import FileResponse, Response
from starlette.types import Message, Receive, Scope, Send

from app.conditional import precondition
from app.errors import AppError, PreconditionFailed, UnsatisfiableRange
from app.middleware import client_left, client_method

# As Starlette: a header with more ranges than this is ignored (the whole file is sent),
# rather than answered with as many parts.
MAX_RANGES = 100
# first-last, first- or -suffix; 30 digits are more than any file needs.
_SPEC = re.compile(r"([0-9]{1,30})-([0-9]{0,30})|-([0-9]{1,30})")


class MalformedRange(AppError):
    """400: a bytes Range header that is not one."""


def byte_ranges(header: str, size: int) -> list[tuple[int, int]]:
    """The ranges a Range header asks of a ``size``-byte file, as [start, end) pairs, in
    order and merged where they overlap or touch; [] for the whole file (another range
    unit, or too many ranges). MalformedRange (400) for a bytes header that is not valid,
    UnsatisfiableRange (416) when none of its ranges overlaps the file."""
    unit, equals, range_set = header.partition("=")
    if unit.strip().lower() != "bytes":
        return []
    specs = [spec.strip() for spec in range_set.split(",") if spec.strip()]
    if not equals or not specs:
        raise MalformedRange("The Range header is not a valid bytes range.")
    if len(specs) > MAX_RANGES:
        return []
    ranges = []
    for spec in specs:
        found = _SPEC.fullmatch(spec)
        if found is None:
            raise MalformedRange("The Range header is not a valid bytes range.")
        first, last, suffix = found.groups()
        if suffix is not None:
            if int(suffix) > 0 and size > 0:
                ranges.append((max(size - int(suffix), 0), size))
        elif last and int(last) < int(first):
            raise MalformedRange("The Range header is not a valid bytes range.")
        elif int(first) < size:
            ranges.append((int(first), min(int(last) + 1, size) if last else size))
    if not ranges:
        raise UnsatisfiableRange(
            "No range of the Range header overlaps the file.",
            headers={"Content-Range": f"bytes */{size}"},
        )
    ranges.sort()
    merged = [ranges[0]]
    for start, end in ranges[1:]:
        if start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class Download(FileResponse):
    """FileResponse sending ``file``, opened by the caller (see the module), with the
    service's Range parsing. Its errors are raised before the response starts, so the
    app's error handler answers them as problem+json. It closes ``file`` when done."""

    def __init__(self, file: BinaryIO, *, media_type: str, headers: dict[str, str]) -> None:
        super().__init__(
            file.name, media_type=media_type, headers=headers, stat_result=os.fstat(file.fileno())
        )
        self.file = file

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if client_method(scope) == "HEAD":  # routed as a GET: the headers, not the file
            scope = {**scope, "method": "HEAD"}
        # Never sent by path (the server's pathsend extension): the path may be gone.
        extensions = scope.get("extensions") or {}
        if "http.response.pathsend" in extensions:
            extensions = {k: v for k, v in extensions.items() if k != "http.response.pathsend"}
            scope = {**scope, "extensions": extensions}
        try:
            decision = precondition(
                Headers(scope=scope),
                scope.get("method", "GET"),
                self.headers["etag"],
                self.headers["last-modified"],
            )
            if decision == 412:
                raise PreconditionFailed("The file does not meet the request's preconditions.")
            if decision == 304:
                validators = {name: self.headers[name] for name in ("etag", "last-modified")}
                await Response(status_code=304, headers=validators)(scope, receive, send)
                return
            await self._send_file(scope, receive, send)
        finally:
            self.file.close()  # a HEAD, a 304, or a failure before the body never read it

    async def _send_file(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FileResponse's sending, which stops as soon as the server reports the client
        gone (``http.disconnect``); then HttpMiddleware is told, so the cut-off download is
        counted as a 499 rather than the 200 it started as."""
        gone = done = False

        async def watched_receive() -> Message:
            nonlocal gone
            message = await receive()
            gone = message["type"] == "http.disconnect"
            return message

        async def watched_send(message: Message) -> None:
            nonlocal done
            await send(message)
            # The server reports a disconnect after a complete response too.
            done = message["type"] == "http.response.body" and not message.get("more_body")

        await super().__call__(scope, watched_receive, watched_send)
        if gone and not done:
            await client_left(send)

    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[anyio.AsyncFile[bytes]]:
        # Where FileResponse would open the path: the handle opened beforehand instead.
        yield anyio.AsyncFile(self.file)

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        return byte_ranges(http_range, file_size)
