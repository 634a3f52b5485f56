"""Structured logs carry the request context and trace ids, and never secrets."""

import asyncio
import contextlib
import io
import json
import logging
import re
import sqlite3
import struct
import time
from pathlib import Path

import httpx2
import pytest
from fastapi import WebSocketDisconnect
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from app.db import create_engine
from app.main import create_app
from app.observability.logging import (
    LogFormat,
    configure_logging,
    get_logger,
    hold_line,
    render_line,
)
from tests.api import PASSWORD, Api
from tests.app_server import app_server, server_env, signed_up, sqlite_server
from tests.conftest import make_settings
from tests.logs import attach, records


def test_access_lines_carry_request_context_and_trace_ids(
    database_url: str, tmp_path: Path, log_lines: io.StringIO
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = make_settings(database_url, tmp_path, log_format="json")
    with TestClient(create_app(settings, tracer_provider=provider)) as client:
        attach(log_lines)
        api = Api(client, settings)
        alice = api.account("alice")
        incoming_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        response = client.get(
            "/api/v1/users/me",
            headers=alice.headers
            | {"traceparent": f"00-{incoming_trace}-00f067aa0ba902b7-01", "X-Request-ID": "req-1"},
        )
    assert response.status_code == 200
    access = [r for r in records(log_lines) if r.get("logger") == "app.access"]
    line = next(r for r in access if r["path"] == "/api/v1/users/me")
    assert line["request_id"] == response.headers["x-request-id"] == "req-1"
    assert line["trace_id"] == incoming_trace
    assert line["user_id"] == alice.id
    assert (line["method"], line["route"], line["status"]) == ("GET", "/api/v1/users/me", 200)
    assert line["duration_ms"] > 0
    assert line["client_ip"] == "testclient"
    spans = [
        s for s in exporter.get_finished_spans() if s.context.trace_id == int(incoming_trace, 16)
    ]
    names = {span.name for span in spans}
    assert "GET /api/v1/users/me" in names
    # The database query of that request is a child span in the same trace.
    assert any(span.attributes.get("db.system") for span in spans), names
    server = next(span for span in spans if span.name == "GET /api/v1/users/me")
    assert format(server.context.trace_id, "032x") == line["trace_id"]


def test_tokens_sent_in_a_query_string_are_not_exported_in_spans(
    database_url: str, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = make_settings(database_url, tmp_path)
    with TestClient(create_app(settings, tracer_provider=provider)) as client:
        alice = Api(client, settings).account("alice")
        access, refresh = alice.tokens["access_token"], alice.tokens["refresh_token"]
        # Refused (a token in a URL ends up in logs), but the client sent it all the same.
        assert client.get(f"/api/v1/items?q=x&access_token={access}").status_code == 200
        assert client.get(f"/api/v1/items?refresh_token={refresh}&q=y").status_code == 200
        with (
            pytest.raises(WebSocketDisconnect),
            client.websocket_connect(f"/api/v1/ws/chat/lobby?token={access}") as socket,
        ):
            socket.receive_text()
    spans = exporter.get_finished_spans()
    exported = repr([(span.name, dict(span.attributes)) for span in spans])
    assert access not in exported
    assert refresh not in exported
    urls = [span.attributes["http.url"] for span in spans if "http.url" in span.attributes]
    assert any(url.endswith("/api/v1/items?q=x&access_token=[REDACTED]") for url in urls), urls
    assert any(url.endswith("/api/v1/items?refresh_token=[REDACTED]&q=y") for url in urls), urls
    assert any(url.endswith("/api/v1/ws/chat/lobby?token=[REDACTED]") for url in urls), urls


def test_secrets_never_reach_the_logs(
    database_url: str, tmp_path: Path, log_lines: io.StringIO
) -> None:
    settings = make_settings(database_url, tmp_path, log_format="json", log_level="DEBUG")
    with TestClient(create_app(settings)) as client:
        attach(log_lines, "DEBUG")
        api = Api(client, settings)
        alice = api.account("alice")
        client.post("/api/v1/auth/refresh", json={"refresh_token": alice.tokens["refresh_token"]})
        client.post("/api/v1/auth/refresh", json={"refresh_token": alice.tokens["refresh_token"]})
        client.get("/api/v1/users/me", headers=alice.headers)
        client.get("/api/v1/items", headers={"Authorization": "Bearer sneaky-token-value"})
        logging.getLogger("app.test").info(
            "leaky call %s", alice.tokens["access_token"], extra={"password": PASSWORD}
        )
    text = log_lines.getvalue()
    assert records(log_lines), "nothing was captured"
    assert PASSWORD not in text
    assert "$argon2" not in text  # nor its hash, which a driver's statement log would show
    for secret in (alice.tokens["access_token"], alice.tokens["refresh_token"]):
        assert secret not in text
        assert secret.split(".")[2] not in text  # not even the signature
    assert "sneaky-token-value" not in text
    assert "[REDACTED]" in text
    # The reuse warning is there, attributed, but without the token.
    assert any(r["event"].startswith("refresh token reuse") for r in records(log_lines))


def test_a_server_at_debug_logs_no_socket_query_cookie_or_message(tmp_path: Path) -> None:
    """At DEBUG the websockets library logs each handshake line, header and frame through
    the server's logger; a real server is needed to see it (TestClient has no server)."""
    log = tmp_path / "server.log"
    with sqlite_server(tmp_path, log, APP_LOG_LEVEL="DEBUG", APP_LOG_FORMAT="json") as base:
        token = signed_up(base, "socketeer")
        url = base.replace("http", "ws", 1) + "/api/v1/ws/chat/lobby"
        headers = {"Authorization": f"Bearer {token}", "Cookie": "session=cookie-secret-789"}
        # A token in the query string is refused, but the request line was read first.
        with pytest.raises(InvalidStatus):
            connect(f"{url}?token=query-secret-123", additional_headers=headers, proxy=None)
        with connect(url, additional_headers=headers, proxy=None) as ws:
            ws.send(json.dumps({"type": "message", "content": "private chat text 4242"}))
            while json.loads(ws.recv(timeout=10))["type"] != "message":
                pass
    text = log.read_text()
    assert '"level":"debug"' in text  # the server did log at DEBUG
    assert '"route":"/api/v1/ws/chat/{room}","path":"/api/v1/ws/chat/lobby","status":101' in text
    for secret in ("query-secret-123", "cookie-secret-789", "private chat text 4242"):
        assert secret not in text
    assert token.split(".")[2] not in text


def test_a_websocket_refused_with_429_logs_no_server_error(tmp_path: Path) -> None:
    """A handshake answered with an HTTP response (here the rate limit's 429) is complete;
    uvicorn logs it as an app that "returned without completing handshake" all the same.
    An ERROR per refused reconnect would page whoever alerts on errors."""
    log = tmp_path / "server.log"
    settings = {"APP_LOG_FORMAT": "json", "APP_RATE_LIMIT_DEFAULT": "2/minute"}
    with sqlite_server(tmp_path, log, **settings) as base:
        token = signed_up(base, "often")
        url = base.replace("http", "ws", 1) + "/api/v1/ws/chat/lobby"
        headers = {"Authorization": f"Bearer {token}"}
        answers = []
        for _ in range(4):
            try:
                with connect(url, additional_headers=headers, proxy=None):
                    answers.append(101)
            except InvalidStatus as exc:
                answers.append(exc.response.status_code)
        assert set(answers) == {101, 429}
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line for line in lines if line["level"] == "error"] == []
    logged = [line["status"] for line in lines if line.get("route") == "/api/v1/ws/chat/{room}"]
    assert logged.count(429) == answers.count(429)


def test_an_unhandled_error_is_logged_once_with_its_request_id(tmp_path: Path) -> None:
    """The server logs an app's unhandled error after the request's context is gone; the
    app logs it first, with the id the client got, and the server's copy is dropped."""
    env = server_env(tmp_path, APP_LOG_FORMAT="json")
    log = tmp_path / "server.log"
    with app_server(tmp_path, env, log) as (base, _):
        with contextlib.closing(sqlite3.connect(tmp_path / "app.db")) as database:
            database.execute("DROP TABLE users")  # a schema problem: a 500, not a 503
        response = httpx2.post(
            f"{base}/api/v1/auth/token", data={"username": "someone", "password": PASSWORD}
        )
        assert response.status_code == 500
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    errors = [line for line in lines if "exception" in line]
    assert len(errors) == 1, errors
    assert errors[0]["event"] == "unhandled error"
    assert errors[0]["request_id"] == response.headers["x-request-id"]
    assert "no such table" in errors[0]["exception"]
    access = [line for line in lines if line["event"] == "request"]
    assert [(line["status"], line["request_id"]) for line in access] == [
        (500, response.headers["x-request-id"])
    ]


def jpeg_with_an_overlong_exif_tag() -> bytes:
    """A valid JPEG whose EXIF declares a tag longer than its block: Pillow warns (through
    ``warnings``) and goes on."""
    image = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(image, "JPEG")
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x010E, 2, 64, 30)
    exif = b"Exif\x00\x00" + tiff + struct.pack("<I", 0) + b"short"
    app1 = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    return image.getvalue()[:2] + app1 + image.getvalue()[2:]


def test_python_warnings_come_out_as_log_lines_of_their_request(tmp_path: Path) -> None:
    """Not as plain text on stderr, which a log pipeline cannot parse and which carries
    no level, time or request id."""
    log = tmp_path / "server.log"
    with sqlite_server(tmp_path, log, APP_LOG_FORMAT="json") as base:
        token = signed_up(base, "alice")
        response = httpx2.post(
            f"{base}/api/v1/files",
            files={"file": ("photo.jpg", jpeg_with_an_overlong_exif_tag(), "image/jpeg")},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == 201, response.text
    lines = [json.loads(line) for line in log.read_text().splitlines()]  # every line is JSON
    warned = [line for line in lines if line.get("logger") == "py.warnings"]
    assert warned, lines
    assert {line["level"] for line in warned} == {"warning"}
    assert {line["request_id"] for line in warned} == {response.headers["x-request-id"]}


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_access_line_renders_like_the_processor_chain(
    log_lines: io.StringIO, log_format: LogFormat
) -> None:
    """The access line skips structlog; it must come out as the chain makes it."""
    configure_logging("INFO", log_format, stream=log_lines)
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    fields = {
        "event": "request",
        "method": "GET",
        "route": "/api/v1/items/{item_id}",
        "path": f"/api/v1/items/{token}",
        "status": 404,
        "duration_ms": 1.25,
        "client_ip": "10.0.0.7",
        "user_id": 7,
        "request_id": "req-42",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "span_id": "00f067aa0ba902b7",
    }
    get_logger("app.access").info(**fields)
    line = render_line(
        "app.access", "info", dict(fields), untrusted=fields["path"], timestamp=time.time()
    )
    hold_line(lambda: line)
    assert token not in log_lines.getvalue()
    timestamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z")
    if log_format == "console":
        chain_line, fast_line = log_lines.getvalue().splitlines()
        assert timestamp.sub("T", chain_line) == timestamp.sub("T", fast_line)
        assert "request_id=req-42" in fast_line
        assert "[REDACTED]" in fast_line
        return
    chain, fast = records(log_lines)
    assert timestamp.fullmatch(chain.pop("timestamp"))
    assert timestamp.fullmatch(fast.pop("timestamp"))
    assert fast == chain


def test_a_failed_statement_does_not_print_its_parameters(database_url: str) -> None:
    """Its error reaches the logs with the traceback of the 500 it causes."""

    async def fail() -> str:
        engine = create_engine(database_url)
        try:
            async with engine.connect() as connection:
                await connection.execute(
                    text("SELECT * FROM no_such_table WHERE name = :name"), {"name": PASSWORD}
                )
        except DBAPIError as error:
            return str(error)
        finally:
            await engine.dispose()
        raise AssertionError("the statement did not fail")

    message = asyncio.run(fail())
    assert "no_such_table" in message
    assert PASSWORD not in message
