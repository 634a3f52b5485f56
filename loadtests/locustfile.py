"""Locust scenarios for the service's hot paths, through the edge.

Every simulated user registers once and logs in (authentication), and renews its access
token with the refresh token shortly before it expires. Three in four are
``ApiUser``s: they mostly read items (the cached reads), sometimes create one and
sometimes upload a PNG (``--upload-bytes``, 1 MiB by default), deleting it again at once so
that nothing piles up on the service's volumes run after run. One in four is a
``ChatUser``: it sends chat messages over a websocket and times each until it comes back
through the broker. Run it with the compose ``loadtest`` profile, or locally with
``locust -f loadtests/locustfile.py --host http://127.0.0.1:8080``; the chat needs the
``websockets`` package (the compose image is built with it, loadtests/Dockerfile).

The service's own limits apply to load tests too: registration and login are limited per
client address (5 and 10 per minute by default), so raise ``APP_RATE_LIMIT_REGISTER``,
``APP_RATE_LIMIT_LOGIN``, ``APP_RATE_LIMIT_DEFAULT``, ``APP_RATE_LIMIT_UPLOADS`` and
``APP_RATE_LIMIT_CHAT_MESSAGES`` for a test with many users.

Options of this scenario (command line, or the ``LOCUST_*`` variable ``_options`` gives
each; ``locust --help`` is printed before this file is imported, so it does not list them):
``--think-min`` / ``--think-max``, the seconds a user waits between two tasks;
``--upload-bytes``, the size of an upload (keep it under ``APP_MAX_UPLOAD_BYTES``); and the
thresholds a headless run is judged by — it exits with status 1 when more than
``--max-fail-ratio`` of the requests failed, or when the 95th percentile latency of a
request other than authentication passed ``--max-p95-ms`` (0: no latency threshold).
Authentication is left out of the latency threshold: it hashes a password on purpose
slowly (argon2id) and is rate limited, so it has no place in the latency objective.
"""

import functools
import json
import logging
import math
import random
import struct
import time
import uuid
import zlib
from typing import Any
from urllib.parse import urlsplit

from locust import HttpUser, events, task
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import WorkerRunner
from websockets.sync.client import ClientConnection, connect

API = "/api/v1"
AUTH = f"{API}/auth/"
PASSWORD = "load-test-password"  # noqa: S105 - throwaway accounts made by the test itself
CHAT_ROUTE = f"{API}/ws/chat/{{room}}"
CHAT_ROOMS = 4
CHAT_TIMEOUT = 10.0  # seconds
# Renew an access token once this share of its lifetime has passed, so that no request
# meets an expired token (a 401 would be a failure, and its write lost).
RENEW_AFTER = 0.75
# The service's latency objective (the histogram buckets in app/observability/metrics.py
# are chosen around it).
LATENCY_OBJECTIVE_MS = 250.0


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument(
        "--think-min", type=float, default=0.5, env_var="LOCUST_THINK_MIN",
        help="fewest seconds a user waits between two tasks",
    )  # fmt: skip
    parser.add_argument(
        "--think-max", type=float, default=2.0, env_var="LOCUST_THINK_MAX",
        help="most seconds a user waits between two tasks",
    )  # fmt: skip
    parser.add_argument(
        "--upload-bytes", type=int, default=1024 * 1024, env_var="LOCUST_UPLOAD_BYTES",
        help="about how many bytes each upload has (a PNG of random pixels)",
    )  # fmt: skip
    parser.add_argument(
        "--max-fail-ratio", type=float, default=0.01, env_var="LOCUST_MAX_FAIL_RATIO",
        help="exit with status 1 if a larger share of the requests failed",
    )  # fmt: skip
    parser.add_argument(
        "--max-p95-ms", type=float, default=LATENCY_OBJECTIVE_MS, env_var="LOCUST_MAX_P95_MS",
        help="exit with status 1 if the 95th percentile latency of a request other "
        "than authentication is above this (0: no latency threshold)",
    )  # fmt: skip


@events.quitting.add_listener
def _judge(environment: Environment, **_: Any) -> None:
    """Set the exit status from the thresholds, replacing Locust's "any failure fails"."""
    if isinstance(environment.runner, WorkerRunner):
        return  # the master (or a local runner) holds every worker's numbers
    breaches = threshold_breaches(environment)
    for breach in breaches:
        logging.error("threshold: %s", breach)
    environment.process_exit_code = 1 if breaches else 0


def threshold_breaches(environment: Environment) -> list[str]:
    options = environment.parsed_options
    stats = environment.stats
    breaches = []
    if stats.total.num_requests == 0:
        breaches.append("no request was made")
    elif stats.total.fail_ratio > options.max_fail_ratio:
        breaches.append(
            f"{stats.total.fail_ratio:.2%} of the requests failed "
            f"(at most {options.max_fail_ratio:.2%} allowed)"
        )
    if options.max_p95_ms > 0:
        for entry in stats.entries.values():
            if entry.name.startswith(AUTH) or not entry.num_requests:
                continue
            p95 = entry.get_response_time_percentile(0.95)
            if p95 > options.max_p95_ms:
                breaches.append(
                    f"{entry.method} {entry.name}: 95th percentile {p95:.0f} ms "
                    f"(at most {options.max_p95_ms:g} ms allowed)"
                )
    return breaches


@functools.cache
def png(size: int) -> bytes:
    """A square RGB PNG of about ``size`` bytes, made here so the scenario ships no binary
    fixture, and once per process: making it for every request would spend the client's
    CPU. Its pixels are random, so they compress no better than a photo's and the file is
    as large as asked (1 MiB: 591 by 591 pixels): the upload crosses the service's chunk
    boundaries and its image is decoded, cleaned and thumbnailed at a realistic size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    side = max(1, math.isqrt(size // 3))
    row = 3 * side
    pixels = random.randbytes(row * side)  # noqa: S311 - noise, not a secret
    rows = b"".join(b"\x00" + pixels[y * row : (y + 1) * row] for y in range(side))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 1))
        + chunk(b"IEND", b"")
    )


class SignedUpUser(HttpUser):
    """A user with an account of its own: registers once, then logs in."""

    abstract = True

    def wait_time(self) -> float:
        options = self.environment.parsed_options
        return random.uniform(options.think_min, options.think_max)  # noqa: S311

    def on_start(self) -> None:
        self.username = f"load-{uuid.uuid4().hex[:16]}"
        with self.client.post(
            f"{API}/auth/register",
            json={
                "email": f"{self.username}@example.com",
                "username": self.username,
                "password": PASSWORD,
            },
            catch_response=True,
        ) as response:
            if response.status_code != 201:
                response.failure(f"register: {response.status_code}")
                raise StopUser()
        self.login()

    def login(self) -> None:
        with self.client.post(
            f"{API}/auth/token",
            data={"username": self.username, "password": PASSWORD},
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"login: {response.status_code}")
                raise StopUser()
            self._use(response.json())

    def _use(self, tokens: dict[str, Any]) -> None:
        self.token = tokens["access_token"]
        # Refresh tokens rotate: each is spent by its refresh and the next one comes back.
        self.refresh_token = tokens["refresh_token"]
        self.renew_at = time.monotonic() + tokens["expires_in"] * RENEW_AFTER
        self.client.headers["Authorization"] = f"Bearer {self.token}"

    def renew_token_if_due(self) -> bool:
        """Whether the access token was renewed. Access tokens live 15 minutes by default,
        and a long test outlives them; a refresh is cheap, while a login hashes the
        password (argon2id), so a login only stands in for a refresh that failed."""
        if time.monotonic() < self.renew_at:
            return False
        with self.client.post(
            f"{API}/auth/refresh", json={"refresh_token": self.refresh_token}, catch_response=True
        ) as response:
            if response.status_code == 200:
                self._use(response.json())
                return True
            response.failure(f"refresh: {response.status_code}")
        self.login()
        return True


class ApiUser(SignedUpUser):
    """Reads items (the cached reads), sometimes writes one, now and then uploads a file
    and deletes it."""

    weight = 3

    def on_start(self) -> None:
        self.item_ids: list[int] = []
        super().on_start()

    @task(10)
    def list_items(self) -> None:
        self.renew_token_if_due()
        with self.client.get(
            f"{API}/items", params={"limit": 20}, name=f"{API}/items", catch_response=True
        ) as response:
            if response.status_code == 200:
                ids = [item["id"] for item in response.json()["items"]]
                if ids:
                    self.item_ids = ids
            else:
                response.failure(f"status {response.status_code}")

    @task(20)
    def read_item(self) -> None:
        self.renew_token_if_due()
        if not self.item_ids:
            self.list_items()
            if not self.item_ids:
                return
        item_id = random.choice(self.item_ids)  # noqa: S311 - not security-relevant
        self.client.get(f"{API}/items/{item_id}", name=f"{API}/items/{{item_id}}")

    @task(3)
    def create_item(self) -> None:
        self.renew_token_if_due()
        response = self.client.post(
            f"{API}/items",
            json={
                "title": f"item {uuid.uuid4().hex[:8]}",
                "description": "created by the load test",
                "price": round(random.uniform(1, 100), 2),  # noqa: S311
            },
        )
        if response.status_code == 201:
            self.item_ids.append(response.json()["id"])

    @task(1)
    def upload_png(self) -> None:
        self.renew_token_if_due()
        image = png(self.environment.parsed_options.upload_bytes)
        response = self.client.post(
            f"{API}/files",
            files={"file": ("load-test.png", image, "image/png")},
            data={"description": "load test upload"},
        )
        if response.status_code == 201:
            self.client.delete(
                f"{API}/files/{response.json()['id']}", name=f"{API}/files/{{file_id}}"
            )


class MessageRefused(RuntimeError):
    """The service refused a message (its per-user message limit): a failure to report,
    on a socket that is fine."""


class ChatUser(SignedUpUser):
    """Chats in one of a few rooms over a websocket: each task sends a message and waits
    for it to come back through the broker (Redis pub/sub across replicas), and reports
    that round trip to Locust as a ``WS`` request. The service closes a socket when the
    token it was opened with expires, so a renewed token opens a new one. A socket that
    failed is opened again by the next task; one whose message was refused is kept (its
    message limit is the user's, not the socket's)."""

    weight = 1

    def on_start(self) -> None:
        super().on_start()
        self.room = f"load-{random.randrange(CHAT_ROOMS)}"  # noqa: S311
        self.socket: ClientConnection | None = None

    def on_stop(self) -> None:
        if self.socket is not None:
            self.socket.close()

    @task
    def chat(self) -> None:
        if self.renew_token_if_due() and self.socket is not None:
            self.socket.close()
            self.socket = None
        started = time.perf_counter()
        content = uuid.uuid4().hex
        received = 0
        error: Exception | None = None
        try:
            socket = self.socket or self._connect()
            socket.send(json.dumps({"type": "message", "content": content}))
            while True:  # others' messages, joins and leaves come too
                frame = socket.recv(timeout=CHAT_TIMEOUT)
                received += len(frame)
                event = json.loads(frame)
                if event["type"] == "error":
                    raise MessageRefused(f"the service refused the message: {event['detail']}")
                if event["type"] == "message" and event["content"] == content:
                    break
        except StopUser:
            raise
        except Exception as exc:  # reported to Locust as this request's failure
            error = exc
            if self.socket is not None and not isinstance(exc, MessageRefused):
                self.socket.close()
                self.socket = None
        self.environment.events.request.fire(
            request_type="WS",
            name=CHAT_ROUTE,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=received,
            exception=error,
            context={},
        )

    def _connect(self) -> ClientConnection:
        url = urlsplit(self.host)
        scheme = "wss" if url.scheme == "https" else "ws"
        self.socket = connect(
            f"{scheme}://{url.netloc}{API}/ws/chat/{self.room}",
            additional_headers={"Authorization": f"Bearer {self.token}"},
            open_timeout=CHAT_TIMEOUT,
            proxy=None,
            # The socket outlives a task, so no `with` block can hold it; on_stop and a
            # failure close it.
            legacy=True,
        )
        return self.socket
