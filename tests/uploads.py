"""Uploads as a client streams them to a real server: bodies produced a MiB at a time,
and an upload left half-sent."""

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from deploy.stack.process import wait_for

MIB = 1024 * 1024
BOUNDARY = "memory-bound-boundary"
HEAD = (
    f"--{BOUNDARY}\r\n"
    'Content-Disposition: form-data; name="file"; filename="big.txt"\r\n'
    "Content-Type: text/plain\r\n\r\n"
).encode()


def file_chunks(size: int) -> Iterator[bytes]:
    """``size`` bytes of text (a whole number of MiB), 1 MiB at a time."""
    line = b"streamed, never buffered\n"
    chunk = (line * (MIB // len(line) + 1))[:MIB]
    for _ in range(size // MIB):
        yield chunk


def multipart_body(size: int) -> Iterator[bytes]:
    """A text file part of ``size`` bytes, produced 1 MiB at a time (never held whole)."""
    yield HEAD
    yield from file_chunks(size)
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


@contextlib.contextmanager
def half_sent_upload(base: str, token: str, uploads: Path) -> Iterator[socket.socket]:
    """An upload of 32 MiB of which 5 MiB are sent, open until the block ends; entered
    once the server has staged some of it."""
    address = urlsplit(base)
    with socket.create_connection((address.hostname, address.port)) as connection:
        connection.sendall(
            (
                "POST /api/v1/files HTTP/1.1\r\n"
                f"Host: {address.netloc}\r\n"
                f"Authorization: Bearer {token}\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                f"Content-Length: {32 * MIB}\r\n\r\n"
            ).encode()
            + HEAD
        )
        for chunk in file_chunks(5 * MIB):
            connection.sendall(chunk)
        wait_for(lambda: any(uploads.glob(".upload-*")), timeout=30, what="the upload to be staged")
        yield connection
