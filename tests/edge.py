"""Stand-ins around a real nginx rendered from the shipped templates: an api that says which
address answered and what nginx sent it, and a DNS server whose answers a test changes, as
Docker's does when compose recreates or scales a service."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.server.connections.append(self.client_address)  # type: ignore[attr-defined]

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        delay = float(self.headers.get("X-Test-Delay") or 0)
        if delay:
            time.sleep(delay)
        body = json.dumps(
            {
                "server": self.server.server_address[0],
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
        ).encode()
        body += b" " * int(self.headers.get("X-Test-Padding") or 0)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def echo_api(host: str, port: int) -> Iterator[ThreadingHTTPServer]:
    """An HTTP server on host:port answering every GET/POST with JSON about the request;
    a request with `X-Test-Delay: N` is answered N seconds late, one with
    `X-Test-Padding: N` gets N spaces after the JSON (a large download)."""
    server = ThreadingHTTPServer((host, port), _EchoHandler)
    server.daemon_threads = True
    server.connections = []  # type: ignore[attr-defined]  # the peer of each one accepted
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def hang_up_api(host: str, port: int) -> Iterator[None]:
    """A server on host:port that reads each request and closes the connection unanswered."""
    listener = socket.create_server((host, port))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(5)
                with contextlib.suppress(OSError):
                    connection.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        listener.close()


class FakeDns:
    """A UDP DNS server on 127.0.0.1 answering A queries from `records` (name -> addresses),
    with a 1 s TTL; any other name is NXDOMAIN. Change `records` to move a name."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self._sock.recvfrom(512)
            except TimeoutError:
                continue
            self._sock.sendto(self._answer(query), peer)

    def _answer(self, query: bytes) -> bytes:
        (query_id,) = struct.unpack("!H", query[:2])
        labels, at = [], 12
        while query[at]:
            labels.append(query[at + 1 : at + 1 + query[at]].decode())
            at += 1 + query[at]
        question = query[12 : at + 5]  # the name, its end, QTYPE and QCLASS
        (qtype,) = struct.unpack("!H", query[at + 1 : at + 3])
        name = ".".join(labels).lower()
        addresses = self.records.get(name)
        if addresses is None:
            return struct.pack("!HHHHHH", query_id, 0x8183, 1, 0, 0, 0) + question
        answers = [] if qtype != 1 else addresses
        records = b"".join(
            struct.pack("!HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(a) for a in answers
        )
        header = struct.pack("!HHHHHH", query_id, 0x8180, 1, len(answers), 0, 0)
        return header + question + records
