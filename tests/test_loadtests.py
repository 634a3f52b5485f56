"""The Locust scenario (loadtests/locustfile.py), run by Locust itself against the native
stack, the way a team runs a load test without Docker: every hot path it claims to
exercise must be hit, without a failure, and its thresholds must decide the exit status.

No latency is asserted here (a test must not time the machine): the passing run switches
the latency threshold off, and the failing run sets it where no real request can meet it.
"""

from __future__ import annotations

import ast
import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from deploy.stack.process import free_port, wait_for
from tests import prom
from tests.stack import ROOT, RunningStack, start_stack

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
LOCUST = Path(sys.executable).with_name("locust")
USERS = 4
# How many more requests than Locust reports the service may count (see the test).
UNREPORTED = range(USERS + 1)
CHAT = ("WS", "/api/v1/ws/chat/{room}")
# (method, name) of every request the scenario makes: authentication, the cached reads,
# the writes, the upload and its deletion, and the chat's round trips.
HOT_PATHS = {
    ("POST", "/api/v1/auth/register"),
    ("POST", "/api/v1/auth/token"),
    ("GET", "/api/v1/items"),
    ("GET", "/api/v1/items/{item_id}"),
    ("POST", "/api/v1/items"),
    ("POST", "/api/v1/files"),
    ("DELETE", "/api/v1/files/{file_id}"),
    CHAT,
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    yield from load_test_stack(tmp_path_factory)


# Access tokens that expire a few times within a run.
SHORT_TOKEN_TTL = 4


@pytest.fixture(scope="module")
def short_token_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    yield from load_test_stack(tmp_path_factory, APP_ACCESS_TOKEN_TTL_SECONDS=str(SHORT_TOKEN_TTL))


def load_test_stack(
    tmp_path_factory: pytest.TempPathFactory, **settings: str
) -> Iterator[RunningStack]:
    # The limits a load test raises (README, "Load tests"): otherwise the service's own
    # rate limits and the edge's would answer 429 to a few busy users.
    running = start_stack(
        tmp_path_factory.mktemp("loadtest") / "stack",
        **settings,
        STACK_HTTP_PORT=str(free_port()),
        APP_RATE_LIMIT_REGISTER="1000/minute",
        APP_RATE_LIMIT_LOGIN="1000/minute",
        APP_RATE_LIMIT_DEFAULT="100000/minute",
        APP_RATE_LIMIT_UPLOADS="100000/minute",
        APP_RATE_LIMIT_CHAT_MESSAGES="100000/minute",
        NGINX_EDGE_RATE="10000r/s",
        NGINX_EDGE_BURST="10000",
    )
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.stop(signal.SIGTERM)


def locust(stack: RunningStack, seconds: int, *options: str) -> subprocess.CompletedProcess[str]:
    """A headless run through the edge; its final statistics are the JSON on stdout."""
    command = [
        str(LOCUST),
        "--locustfile", str(LOCUSTFILE),
        "--headless", "--json",
        "--users", str(USERS), "--spawn-rate", str(USERS),
        "--run-time", f"{seconds}s",
        # A user in the middle of a task finishes it when the time is up (one between
        # tasks is killed: see UNREPORTED).
        "--stop-timeout", "30",
        "--host", stack.edge,
        *options,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120, cwd=ROOT)


def by_request(stdout: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(entry["method"], entry["name"]): entry for entry in json.loads(stdout)}


def test_every_hot_path_is_exercised_without_a_failure(stack: RunningStack) -> None:
    # Almost no think time: the upload (1 task in 34) comes up many times in a short run.
    run = locust(stack, 15, "--think-min", "0", "--think-max", "0.05", "--max-p95-ms", "0")
    assert run.returncode == 0, run.stderr[-3000:]
    stats = by_request(run.stdout)
    assert set(stats) == HOT_PATHS, run.stderr[-3000:]
    for request, entry in stats.items():
        assert entry["num_requests"] > 0, request
        assert entry["num_failures"] == 0, (request, run.stderr[-3000:])
    # Every user signed up and logged in once, and the service counted what Locust
    # reported. It may count one request more per user: Locust 2.32 stops a user that is
    # between two tasks by killing it, and when the kill lands just as the next task has
    # begun, that task's request reaches the service but is never reported. (It hit the
    # chat's last message in every run, as Locust's debug log showed the send and then
    # the kill; the HTTP counts have matched exactly so far.)
    assert stats["POST", "/api/v1/auth/register"]["num_requests"] == USERS
    assert stats["POST", "/api/v1/auth/token"]["num_requests"] == USERS
    scraped = scrape(stack)
    uploads = prom.value(
        scraped, "http_requests_total", method="POST", route="/api/v1/files", status="201"
    )
    assert uploads - stats["POST", "/api/v1/files"]["num_requests"] in UNREPORTED
    assert prom.value(scraped, "uploads_total", outcome="ok") == uploads
    # Uploads of the default size (1 MiB: the streamed path's chunks, not one read), each
    # an image the service thumbnailed, and each deleted again (a killed user may leave
    # the one it had just begun).
    assert prom.value(scraped, "upload_bytes_total") / uploads >= 1024 * 1024
    assert prom.value(scraped, "thumbnail_duration_seconds_count") == uploads
    deleted = stats["DELETE", "/api/v1/files/{file_id}"]["num_requests"]
    assert deleted == stats["POST", "/api/v1/files"]["num_requests"]
    assert uploads - deleted in UNREPORTED
    # Chat messages are counted when their socket closes, as the users stop.
    chats = stats[CHAT]["num_requests"]
    wait_for(
        lambda: chat_messages(scrape(stack)) - chats in UNREPORTED,
        timeout=30,
        what=f"{chats} chat messages (or a few more) in the service's websocket metrics",
    )


def scrape(stack: RunningStack) -> prom.Samples:
    return prom.parse(httpx2.get(f"{stack.urls['api']}/metrics", trust_env=False).text)


def chat_messages(samples: prom.Samples) -> float:
    return prom.value(samples, "websocket_messages_total", route=CHAT[1], direction="received")


def test_access_tokens_are_renewed_before_they_expire(short_token_stack: RunningStack) -> None:
    """An expired token used to be replaced after a request failed with 401 (its write
    lost), by a login (a slow password hash) although a refresh token was at hand."""
    run = locust(short_token_stack, 15, "--think-min", "0", "--think-max", "0.05",
                 "--max-p95-ms", "0")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    stats = by_request(run.stdout)
    assert all(entry["num_failures"] == 0 for entry in stats.values()), run.stderr[-3000:]
    # Each user renews once per 3 s (three quarters of the lifetime) with a refresh, and
    # logs in only when it starts.
    assert stats["POST", "/api/v1/auth/refresh"]["num_requests"] >= USERS * 2
    assert stats["POST", "/api/v1/auth/token"]["num_requests"] == USERS
    assert stats[CHAT]["num_requests"] > 0


def test_a_missed_latency_threshold_fails_the_run_and_says_where(stack: RunningStack) -> None:
    # No response comes back within a microsecond: every request other than
    # authentication misses the threshold, and nothing fails.
    run = locust(stack, 5, "--think-min", "0", "--think-max", "0.05", "--max-p95-ms", "0.001")
    assert run.returncode == 1, run.stderr[-3000:]
    assert all(entry["num_failures"] == 0 for entry in json.loads(run.stdout))
    breached = set(re.findall(r"threshold: (GET|POST) (\S+): 95th percentile", run.stderr))
    reads = {("GET", "/api/v1/items"), ("GET", "/api/v1/items/{item_id}")}
    assert reads <= breached, run.stderr[-3000:]
    assert not {name for _, name in breached if name.startswith("/api/v1/auth/")}


def test_the_readme_names_every_option_and_its_variable() -> None:
    """`locust --help` does not list a locustfile's options (it is printed before the
    locustfile is imported): the README's table is where users find them."""
    options = {
        (call.args[0].value, keyword.value.value)
        for call in ast.walk(ast.parse(LOCUSTFILE.read_text()))
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "add_argument"
        and isinstance(call.args[0], ast.Constant)
        for keyword in call.keywords
        if keyword.arg == "env_var" and isinstance(keyword.value, ast.Constant)
    }
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (`--.+?`) \| (`LOCUST_.+?`) \|", readme, re.M)
    documented = {
        pair
        for names, variables in rows
        for pair in zip(
            re.findall(r"`(.+?)`", names), re.findall(r"`(.+?)`", variables), strict=True
        )
    }
    assert options, "no option found in the locustfile"
    assert documented == options


# Run in a process of its own: importing Locust monkey-patches the interpreter (gevent).
_REFUSED_CHAT = """
import json, sys
sys.path.insert(0, "loadtests")
from locust.env import Environment
import locustfile

class RefusingSocket:
    closed = False
    def send(self, data): pass
    def recv(self, timeout=None):
        return json.dumps({"type": "error", "detail": "Too many messages; wait 3 s."})
    def close(self): self.closed = True

locustfile.ChatUser.host = "http://127.0.0.1:9"
environment = Environment(user_classes=[locustfile.ChatUser])
failures = []
environment.events.request.add_listener(lambda **event: failures.append(event["exception"]))
user = locustfile.ChatUser(environment)
socket = RefusingSocket()
user.socket, user.room, user.renew_at = socket, "load-0", float("inf")
user.chat()
kept = user.socket is socket and not socket.closed
print(json.dumps({"kept": kept, "failures": [type(f).__name__ for f in failures]}))
"""


def test_a_refused_chat_message_is_a_failure_on_a_socket_kept() -> None:
    """The service's message limit answers an error event on a healthy socket. Closing it
    made the next task open another, which logs in again: a rate limit turned into a storm
    of logins (each an argon2 hash) that measured the wrong path."""
    result = subprocess.run(
        [sys.executable, "-c", _REFUSED_CHAT], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == {"kept": True, "failures": ["MessageRefused"]}
