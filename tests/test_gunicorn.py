"""The service under real gunicorn with two workers: metrics aggregated across workers
stay exact (also when a worker is SIGKILLed and replaced), system series are neither
multiplied nor keyed by pid, and the logs are single-format JSON without secrets."""

import base64
import contextlib
import http.client
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import psutil
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from app import migrate
from app.realtime.schemas import SERVER_MAX_FRAME_BYTES
from deploy.stack.process import free_port, wait_for
from tests.api import PASSWORD
from tests.app_server import answers, await_answer, signed_up
from tests.prom import Samples, parse, series, value
from tests.uploads import BOUNDARY, MIB, half_sent_upload, multipart_body

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "gunicorn.conf.py"
GUNICORN = [sys.executable, "-m", "gunicorn", "-c", str(CONFIG)]
N = 25
# (method, path, route label, status) — a mix of matched, templated and unmatched routes.
TRAFFIC = [
    ("GET", "/api/v1/items", "/api/v1/items", "200"),
    ("GET", "/api/v1/items/{n}", "/api/v1/items/{item_id}", "404"),
    ("POST", "/api/v1/items", "/api/v1/items", "401"),
    ("GET", "/health/live", "/health/live", "200"),
    ("GET", "/no/such/page-{n}", "UNMATCHED", "404"),
]


@dataclass
class Gunicorn:
    process: subprocess.Popen[bytes]
    base_url: str
    log: Path

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children()

    def scrape(self) -> Samples:
        response = httpx2.get(f"{self.base_url}/metrics")
        assert response.status_code == 200, response.text
        return parse(response.text)

    def log_records(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]


def gunicorn_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APP_", "OTEL_"))}
    return env | {
        "APP_ENV": "test",
        "APP_DATA_DIR": str(tmp_path / "data"),
        "APP_LOG_FORMAT": "json",
        "WEB_CONCURRENCY": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
        **extra,
    }


def launched(tmp_path: Path, **extra: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """gunicorn started with the shipped config on a migrated SQLite database under
    ``tmp_path`` and a free port, plus ``extra`` settings: the process, its base URL and
    its log."""
    database = tmp_path / "app.db"
    migrate.upgrade(f"sqlite+aiosqlite:///{database}")
    port = free_port()
    env = gunicorn_env(
        tmp_path,
        APP_DATABASE_URL=f"sqlite+aiosqlite:///{database}",
        GUNICORN_BIND=f"127.0.0.1:{port}",
        **extra,
    )
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            GUNICORN, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    return process, f"http://127.0.0.1:{port}", log


@contextlib.contextmanager
def killed_if_alive(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """Whatever the test asserts, the gunicorn it started does not outlive it."""
    try:
        yield
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[Gunicorn]:
    # Left over from "a previous run": must be wiped, or it would inflate the totals.
    (tmp_path / "prometheus").mkdir()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from prometheus_client import Counter; Counter("
            "'http_requests_total', '', ['method', 'route', 'status'])"
            ".labels('GET', '/ghost', '200').inc(1000)",
        ],
        env=gunicorn_env(tmp_path),
        check=True,
    )
    assert list((tmp_path / "prometheus").iterdir())
    process, base, log = launched(
        tmp_path,
        APP_METRICS_ALLOWED_NETWORKS="127.0.0.0/8",
        APP_SYSTEM_METRICS_INTERVAL_SECONDS="0.5",
    )
    server = Gunicorn(process, base, log)
    try:
        wait_for(
            lambda: _ready(server) and len(server.workers()) == 2,
            timeout=60,
            what="gunicorn with 2 workers",
            process=process,
            log_path=log,
        )
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def _ready(server: Gunicorn) -> bool:
    # /health/ready, not /health/live: the probes must not add to the counted traffic.
    return answers(f"{server.base_url}/health/ready")


def send_traffic(server: Gunicorn, start: int) -> None:
    def one(job: tuple[str, str, int]) -> None:
        method, path, n = job
        # A new connection per request: the kernel spreads them over both workers.
        response = httpx2.request(method, server.base_url + path.format(n=n), timeout=30)
        assert response.status_code < 500

    # Ids from 1: item id 0 would be a 422, not the 404 counted here.
    jobs = [(m, p, n) for m, p, _, _ in TRAFFIC for n in range(start + 1, start + N + 1)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, jobs))


def assert_exact_totals(samples: Samples, expected: int) -> None:
    for method, _, route, status in TRAFFIC:
        labels = {"method": method, "route": route, "status": status}
        assert value(samples, "http_requests_total", **labels) == expected, labels
    for route in {(m, r) for m, _, r, _ in TRAFFIC}:
        count = value(
            samples, "http_request_duration_seconds_count", method=route[0], route=route[1]
        )
        statuses = sum(1 for m, _, r, _ in TRAFFIC if (m, r) == route)
        assert count == expected * statuses, route
        # The service's own 5xx series are exported at 0 before any error, as rate() needs.
        for status in ("500", "503"):
            labels = {"method": route[0], "route": route[1], "status": status}
            assert ("http_requests_total", frozenset(labels.items())) in samples, labels
            assert value(samples, "http_requests_total", **labels) == 0, labels
    for labels in series(samples, "http_requests_in_progress"):
        if labels["route"] != "/metrics":
            assert value(samples, "http_requests_in_progress", **labels) == 0, labels
    assert not any(labels["route"] == "/ghost" for labels in series(samples, "http_requests_total"))


def worker_slots(server: Gunicorn) -> set[str]:
    """The slots of the live workers' series on /metrics (a dead one's go)."""
    return {labels["worker"] for labels in series(server.scrape(), "app_worker_open_fds")}


def await_slots(server: Gunicorn, slots: set[str]) -> None:
    """Until the live workers' series are exactly ``slots``."""
    wait_for(
        lambda: worker_slots(server) == slots,
        timeout=60,
        what=f"the worker series to be slots {sorted(slots)}",
        process=server.process,
    )


def await_new_workers(server: Gunicorn, old: set[int], count: int) -> None:
    """Until ``count`` workers, none of them one of ``old``, run and the service answers."""
    wait_for(
        lambda: (
            len(server.workers()) == count
            and not old & {worker.pid for worker in server.workers()}
            and _ready(server)
        ),
        timeout=60,
        what=f"gunicorn to run {count} new workers",
        process=server.process,
        log_path=server.log,
    )


def test_metrics_are_exact_across_workers_and_survive_a_killed_worker(
    gunicorn: Gunicorn,
) -> None:
    send_traffic(gunicorn, 0)
    assert_exact_totals(gunicorn.scrape(), N)

    victim = gunicorn.workers()[0].pid
    os.kill(victim, signal.SIGKILL)
    await_new_workers(gunicorn, {victim}, 2)
    send_traffic(gunicorn, N)
    samples = gunicorn.scrape()
    assert_exact_totals(samples, 2 * N)

    # The replacement took the dead worker's slot: still exactly workers 0 and 1.
    await_slots(gunicorn, {"0", "1"})


def test_a_reload_keeps_the_worker_slots_and_the_host_sampled(gunicorn: Gunicorn) -> None:
    """On HUP gunicorn starts the new workers before it stops the old ones: the new ones
    must take the old slots (bounded series, the same names on dashboards), and one of
    them the host's sampling, or every host series would freeze at its last value."""
    old = {worker.pid for worker in gunicorn.workers()}
    gunicorn.process.send_signal(signal.SIGHUP)
    await_new_workers(gunicorn, old, 2)
    await_slots(gunicorn, {"0", "1"})
    # The scrapes alone are traffic on the loopback, which the host counter includes.
    received = value(gunicorn.scrape(), "app_host_network_bytes_total", direction="receive")
    wait_for(
        lambda: (
            value(gunicorn.scrape(), "app_host_network_bytes_total", direction="receive") > received
        ),
        timeout=10,
        what="a new worker to sample the host",
        process=gunicorn.process,
    )


def test_scaling_then_a_reload_leaves_one_worker_per_slot(gunicorn: Gunicorn) -> None:
    """TTIN adds a worker on slot 2, TTOU stops the oldest (slot 0's), and a reload must then
    put the new workers on slots 0 and 1. Had it counted the slots of the old workers it
    stops, both would take slot 0: /metrics would show one of them, and their CPU seconds
    added up in one series."""
    gunicorn.process.send_signal(signal.SIGTTIN)
    await_slots(gunicorn, {"0", "1", "2"})
    gunicorn.process.send_signal(signal.SIGTTOU)
    wait_for(
        lambda: len(gunicorn.workers()) == 2 and len(worker_slots(gunicorn)) == 2,
        timeout=60,
        what="gunicorn to stop a worker, leaving two slots",
        process=gunicorn.process,
        log_path=gunicorn.log,
    )
    old = {worker.pid for worker in gunicorn.workers()}
    gunicorn.process.send_signal(signal.SIGHUP)
    await_new_workers(gunicorn, old, 2)
    await_slots(gunicorn, {"0", "1"})


@pytest.mark.parametrize(
    ("stop", "timeouts"),
    [
        # Killed 6 s after it stops; uvicorn cancels after 1 s.
        (signal.SIGTERM, "6"),
        # gunicorn's quick shutdown: cancelled at once, long before the 55 s window ends.
        (signal.SIGINT, "60"),
        (signal.SIGQUIT, "60"),
    ],
    ids=["SIGTERM", "SIGINT", "SIGQUIT"],
)
def test_a_stopping_worker_cancels_a_long_upload_and_cleans_up(
    tmp_path: Path, stop: signal.Signals, timeouts: str
) -> None:
    """A deploy's SIGTERM (or a max_requests recycle) stops a worker while an upload that
    may run for minutes is still arriving. The master kills a stopping worker after its
    timeouts; the worker must cancel the upload first, so that the staged file goes and
    the upload is counted, instead of both being left to the hourly sweep; and its client
    is told to retry (a 503 problem), not that the server failed (uvicorn's plain 500,
    logged as an error). A SIGINT or SIGQUIT (Ctrl-C) is a quick shutdown: the worker must
    stop at once, not be killed after the timeouts without its lifespan shutdown."""
    process, base, log = launched(
        tmp_path,
        WEB_CONCURRENCY="1",
        GUNICORN_TIMEOUT=timeouts,
        GUNICORN_GRACEFUL_TIMEOUT=timeouts,
        APP_MAX_UPLOAD_BYTES=str(64 * MIB),
    )
    with killed_if_alive(process):
        await_answer(f"{base}/health/ready", process, log, "gunicorn")
        token = signed_up(base, "long")
        uploads = tmp_path / "data" / "uploads"
        notifications = base.replace("http://", "ws://") + "/api/v1/ws/notifications"
        authorization = {"Authorization": f"Bearer {token}"}
        with (
            connect(notifications, additional_headers=authorization, proxy=None) as socket_,
            half_sent_upload(base, token, uploads) as connection,
        ):
            process.send_signal(stop)
            response = http.client.HTTPResponse(connection)
            response.begin()
            assert response.status == 503
            assert response.getheader("content-type") == "application/problem+json"
            assert response.getheader("retry-after") is not None
            assert response.getheader("connection") == "close"
            with pytest.raises(ConnectionClosed) as closed:
                socket_.recv(timeout=30)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1012  # a restart: the client may reconnect
            assert process.wait(timeout=30) == 0
    text = log.read_text()
    assert "SIGKILL" not in text
    assert "Exception in ASGI application" not in text
    assert "Application shutdown complete." in text
    assert list(uploads.glob(".upload-*")) == []
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path / "prometheus"))
    assert registry.get_sample_value("uploads_total", {"outcome": "aborted"}) == 1


def test_a_download_cut_short_by_a_stopping_worker_is_recorded_as_a_503(tmp_path: Path) -> None:
    """A deploy's SIGTERM stops a worker while a slow client is still downloading a file;
    when the graceful window runs out, the download is cancelled mid-body. Its client got
    a cut-off body: the access line and the metrics counted it a 200, and the log carried
    a traceback at ERROR as if the service had failed."""
    process, base, log = launched(
        tmp_path,
        WEB_CONCURRENCY="1",
        GUNICORN_TIMEOUT="6",
        GUNICORN_GRACEFUL_TIMEOUT="6",  # cancelled a second after the SIGTERM
        APP_MAX_UPLOAD_BYTES=str(32 * MIB),
    )
    with killed_if_alive(process):
        await_answer(f"{base}/health/ready", process, log, "gunicorn")
        token = signed_up(base, "reader")
        headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        }
        uploaded = httpx2.post(
            f"{base}/api/v1/files", content=multipart_body(16 * MIB), headers=headers, timeout=60
        )
        assert uploaded.status_code == 201, uploaded.text
        with slow_download(base, token, uploaded.json()["id"]) as (connection, length):
            process.send_signal(signal.SIGTERM)
            received = read_slowly(connection)
        assert received < length
        assert process.wait(timeout=30) == 0
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    route = "/api/v1/files/{file_id}/content"
    access = [r for r in records if r["logger"] == "app.access" and r["route"] == route]
    assert [r["status"] for r in access] == [503]
    assert [r for r in records if r["level"] == "error" and "exception" in r] == []
    cut = [r for r in records if r["event"] == "response cut short by shutdown"]
    assert [(r["level"], r["request_id"]) for r in cut] == [("warning", access[0]["request_id"])]
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path / "prometheus"))
    counted = {"method": "GET", "route": route}
    assert registry.get_sample_value("http_requests_total", counted | {"status": "503"}) == 1
    assert not registry.get_sample_value("http_requests_total", counted | {"status": "200"})


@contextlib.contextmanager
def slow_download(base: str, token: str, file_id: str) -> Iterator[tuple[socket.socket, int]]:
    """A download of the file ``file_id`` whose client reads little at a time: the open
    connection once the response's headers are in, and the Content-Length they declare."""
    address = urlsplit(base)
    with socket.socket() as connection:
        # A small window, so that most of the file waits on the server's side.
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        connection.connect((address.hostname, address.port))
        connection.sendall(
            (
                f"GET /api/v1/files/{file_id}/content HTTP/1.1\r\n"
                f"Host: {address.netloc}\r\n"
                f"Authorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        response = http.client.HTTPResponse(connection)
        response.begin()
        assert response.status == 200
        yield connection, int(response.getheader("content-length", "0"))


def read_slowly(connection: socket.socket) -> int:
    """Read until the server closes the connection, 64 KiB every 20 ms (a 16 MiB file
    takes 5 s): the bytes of the body that arrived."""
    received = 0
    while chunk := connection.recv(64 * 1024):
        received += len(chunk)
        time.sleep(0.02)
    return received


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGQUIT], ids=["SIGINT", "SIGQUIT"])
def test_a_quick_shutdown_does_not_wait_for_a_client_that_reads_nothing(
    tmp_path: Path, stop: signal.Signals
) -> None:
    """A closed connection lingers until its client has read what is left to send it, and
    the server waits for every connection before the application's shutdown. A client
    that reads nothing (here a websocket pinging without reading the pongs) must not hold a
    quick shutdown (Ctrl-C) for the whole graceful window, 55 s here: its connection is
    dropped once what still ran is cancelled."""
    process, base, log = launched(
        tmp_path, WEB_CONCURRENCY="1", GUNICORN_TIMEOUT="60", GUNICORN_GRACEFUL_TIMEOUT="60"
    )
    with killed_if_alive(process):
        await_answer(f"{base}/health/ready", process, log, "gunicorn")
        token = signed_up(base, "stalled")
        with raw_notifications_socket(base, token) as connection:
            ping_without_reading(connection)
            process.send_signal(stop)
            assert process.wait(timeout=30) == 0
    text = log.read_text()
    assert "Application shutdown complete." in text
    assert "timeout graceful shutdown exceeded" not in text


def test_system_series_are_not_multiplied_by_workers(gunicorn: Gunicorn) -> None:
    wait_for(
        lambda: len(series(gunicorn.scrape(), "app_worker_resident_memory_bytes")) == 2,
        timeout=10,
        what="both workers to sample",
        process=gunicorn.process,
    )
    samples = gunicorn.scrape()
    for name in ("app_worker_resident_memory_bytes", "app_worker_open_fds", "app_worker_threads"):
        assert sorted(labels["worker"] for labels in series(samples, name)) == ["0", "1"]
        assert all(value(samples, name, **labels) > 0 for labels in series(samples, name))
    # Host series once, not once per worker.
    assert sorted(labels["state"] for labels in series(samples, "app_host_memory_bytes")) == [
        "available",
        "total",
        "used",
    ]
    assert value(samples, "app_host_memory_bytes", state="total") > 0
    assert len(series(samples, "app_host_load_average")) == 3
    assert len(series(samples, "app_host_disk_bytes")) == 3
    keyed_by_pid = [name for name, labels in samples if any(key == "pid" for key, _ in labels)]
    assert keyed_by_pid == []


def test_workers_cap_websocket_frames(gunicorn: Gunicorn) -> None:
    """The workers get the server options `python -m app serve` sets (gunicorn.conf.py)."""
    chat = gunicorn.base_url.replace("http://", "ws://") + "/api/v1/ws/chat/lobby"
    with connect(chat, proxy=None) as anonymous:
        anonymous.send("x" * SERVER_MAX_FRAME_BYTES * 4)
        with pytest.raises(ConnectionClosed) as closed:
            anonymous.recv(timeout=10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009
    # ... and send no Server header, which would name the software to every client.
    assert "server" not in httpx2.get(f"{gunicorn.base_url}/health/live").headers


def test_a_client_pinging_without_reading_the_pongs_cannot_grow_a_worker(
    gunicorn: Gunicorn,
) -> None:
    """Every ping is answered with a pong of its size. A client that sends pings and never
    reads must find its sends blocked once the pongs fill the buffers, not have the worker
    hold every pong (memory, not time, is what is bounded here)."""
    token = signed_up(gunicorn.base_url, "pinger")
    with raw_notifications_socket(gunicorn.base_url, token) as connection:
        before = sum(worker.memory_info().rss for worker in gunicorn.workers())
        ping_without_reading(connection)
        grown = sum(worker.memory_info().rss for worker in gunicorn.workers()) - before
    assert grown < 32 * MIB, f"the workers grew by {grown / MIB:.0f} MiB"


@contextlib.contextmanager
def raw_notifications_socket(base_url: str, token: str) -> Iterator[socket.socket]:
    """A notifications websocket opened by hand, with a small receive buffer so that what
    the server sends it backs up early; open until the block ends."""
    address = urlsplit(base_url)
    connection = socket.socket()
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    connection.connect((address.hostname, address.port))
    with connection:
        key = base64.b64encode(os.urandom(16)).decode()
        connection.sendall(
            (
                "GET /api/v1/ws/notifications HTTP/1.1\r\n"
                f"Host: {address.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Authorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        assert connection.recv(12) == b"HTTP/1.1 101"
        yield connection


def ping_without_reading(connection: socket.socket) -> None:
    """Send pings, reading none of the pongs, until the server stops reading them (no
    progress for 5 s) or 128 MiB have gone."""
    # Masked pings of the largest control payload, 125 bytes: 1 MiB at a time.
    pings = (bytes([0x89, 0x80 | 125]) + b"\0\0\0\0" + b"p" * 125) * 8000
    connection.settimeout(5)
    with contextlib.suppress(TimeoutError):  # the server stopped reading: as it should
        for _ in range(128):
            connection.sendall(pings)


def test_logs_are_json_with_request_ids_and_no_secrets(gunicorn: Gunicorn) -> None:
    base = gunicorn.base_url
    body = {"email": "alice@example.com", "username": "alice", "password": PASSWORD}
    assert httpx2.post(f"{base}/api/v1/auth/register", json=body).status_code == 201
    tokens = httpx2.post(
        f"{base}/api/v1/auth/token", data={"username": "alice", "password": PASSWORD}
    ).json()
    me = httpx2.get(
        f"{base}/api/v1/users/me",
        headers={"Authorization": f"Bearer {tokens['access_token']}", "X-Request-ID": "probe-42"},
    )
    assert me.status_code == 200
    httpx2.post(f"{base}/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    httpx2.post(f"{base}/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    # Sockets: the server's own handshake lines would print these query strings.
    chat = base.replace("http://", "ws://") + "/api/v1/ws/chat/lobby"
    bearer = {"Authorization": f"Bearer {tokens['access_token']}", "X-Request-ID": "socket-7"}
    with connect(f"{chat}?password=hunter2hunter2", additional_headers=bearer, proxy=None) as ws:
        assert ws.response.headers["X-Request-ID"] == "socket-7"
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{chat}?token=opaque-secret-123", proxy=None)
    assert refused.value.response.status_code == 403

    # Through a trusted proxy (loopback) the client is the forwarded address: not allowed.
    spoofed = httpx2.get(f"{base}/metrics", headers={"X-Forwarded-For": "10.1.2.3"})
    assert spoofed.status_code == 403
    # Each worker writes its access lines within APP_LOG_FLUSH_SECONDS, not at once.
    wait_for(
        lambda: all(
            mark in gunicorn.log.read_text()
            for mark in (
                "probe-42",
                '"path":"/api/v1/auth/register"',
                '"status":101',
                '"status":403',
            )
        ),
        timeout=10,
        what="the access lines of both workers",
    )

    records = gunicorn.log_records()  # every line parses as JSON
    access = [r for r in records if r.get("logger") == "app.access"]
    line = next(r for r in access if r["request_id"] == "probe-42")
    assert (line["route"], line["status"], line["user_id"]) == ("/api/v1/users/me", 200, 1)
    assert line["client_ip"] == "127.0.0.1"
    assert len([r for r in access if r["path"] == "/api/v1/auth/register"]) == 1
    assert not any(r.get("logger") in ("uvicorn.access", "gunicorn.access") for r in records)
    assert any(r.get("logger") == "gunicorn.error" for r in records)
    sockets = [r for r in access if r["route"] == "/api/v1/ws/chat/{room}"]
    assert sorted((r["status"], r["user_id"]) for r in sockets) == [(101, 1), (403, None)]
    assert next(r for r in sockets if r["status"] == 101)["request_id"] == "socket-7"

    text = gunicorn.log.read_text()
    for secret in (PASSWORD, "hunter2hunter2", "opaque-secret-123"):
        assert secret not in text
    for token in (tokens["access_token"], tokens["refresh_token"]):
        assert token.split(".")[2] not in text


def test_check_config_and_refusal_of_unsafe_production(tmp_path: Path) -> None:
    checked = subprocess.run(
        [*GUNICORN, "--check-config"], env=gunicorn_env(tmp_path), capture_output=True, check=False
    )
    assert checked.returncode == 0, checked.stderr
    refused = subprocess.run(
        [*GUNICORN, "--check-config"],
        env=gunicorn_env(tmp_path, APP_ENV="production"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode != 0
    assert "APP_SECRET_KEY is required" in refused.stderr


def test_a_metrics_directory_holding_other_files_is_refused_not_emptied(
    tmp_path: Path,
) -> None:
    """gunicorn empties PROMETHEUS_MULTIPROC_DIR as it starts: pointed by mistake at the
    data volume, it deleted the database and every upload."""
    data = tmp_path / "volume"
    (data / "uploads").mkdir(parents=True)
    (data / "uploads" / "report.pdf").write_bytes(b"%PDF-1.7 a user's file")
    (data / "app.db").write_bytes(b"SQLite format 3")
    (data / "counter_4242.db").write_bytes(b"left over by a previous run")
    process, _, log = launched(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(data))
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    output = log.read_text()
    assert process.returncode == 1, output
    assert "PROMETHEUS_MULTIPROC_DIR holds files that are not metrics (app.db, uploads)" in output
    assert "Traceback" not in output
    assert (data / "uploads" / "report.pdf").read_bytes() == b"%PDF-1.7 a user's file"
    assert (data / "app.db").exists()
    assert (data / "counter_4242.db").exists()


def test_production_checks_count_the_default_workers(tmp_path: Path) -> None:
    """Without WEB_CONCURRENCY gunicorn runs a worker per CPU: the settings must be checked
    for that many, or in-process caches and rate limits would split between workers."""
    cpus = len(os.sched_getaffinity(0))
    if cpus < 2:
        pytest.skip("one CPU here: the default is one worker, which needs no Redis")
    env = gunicorn_env(
        tmp_path,
        APP_ENV="production",
        APP_SECRET_KEY=secrets.token_urlsafe(48),
        APP_DATABASE_URL="postgresql+asyncpg://app@db/app",
    )
    del env["WEB_CONCURRENCY"]
    refused = subprocess.run(
        [*GUNICORN, "--check-config"], env=env, capture_output=True, text=True, check=False
    )
    assert refused.returncode != 0
    assert "APP_REDIS_URL is required with more than one worker" in refused.stderr
    printed = subprocess.run(
        [*GUNICORN, "--print-config"],
        env=env | {"APP_REDIS_URL": "redis://cache:6379/0"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert re.search(rf"^workers\s+= {cpus}$", printed.stdout, re.MULTILINE), printed.stdout


@pytest.mark.parametrize(
    ("timeout", "graceful", "window"),
    [("30", "30", 25), ("10", "30", 5), ("0", "30", 25), ("30", "3", 1)],
)
def test_running_requests_are_cancelled_before_the_worker_is_killed(
    tmp_path: Path, timeout: str, graceful: str, window: int
) -> None:
    """A stopping worker is killed after the shorter of the two timeouts (a heartbeat
    timeout of 0 is none); uvicorn cancels what still runs 5 s before, so uploads clean up."""
    env = gunicorn_env(tmp_path, GUNICORN_TIMEOUT=timeout, GUNICORN_GRACEFUL_TIMEOUT=graceful)
    printed = subprocess.run(
        [sys.executable, "-c", f"import runpy; print(runpy.run_path({str(CONFIG)!r})"
         "['ServiceWorker'].CONFIG_KWARGS['timeout_graceful_shutdown'])"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert int(printed.stdout) == window
