"""End to end through nginx on the native stack (`python -m deploy.stack`), as an operator
without Docker runs it: real PostgreSQL, Redis, gunicorn with two workers, nginx rendered
from the shipped templates, Prometheus and the exporters."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest
from websockets.sync.client import connect

from deploy.stack.process import free_port, is_alive, wait_for
from tests.api import PASSWORD, assert_problem
from tests.stack import RunningStack, start_stack

UPLOAD_CAP = 1024 * 1024
# nginx/entrypoint.d/19-app-limits.envsh: the body may exceed the file cap by this much.
MULTIPART_ALLOWANCE = 65536
# Each prints a line, and each is a Prometheus job (monitoring/prometheus/prometheus.yml).
SERVICES = ("postgres", "redis", "api", "nginx", "prometheus")
TIMEOUT = 30


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    running = start_stack(
        tmp_path_factory.mktemp("stack") / "dir",
        STACK_HTTP_PORT=str(free_port()),
        APP_MAX_UPLOAD_BYTES=str(UPLOAD_CAP),
    )
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.stop(signal.SIGTERM)


@pytest.fixture
def edge(stack: RunningStack) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=stack.edge, timeout=TIMEOUT, trust_env=False) as client:
        yield client


def sign_up(client: httpx2.Client, username: str) -> dict[str, str]:
    registered = client.post(
        "/api/v1/auth/register",
        json={"email": f"{username}@example.com", "username": username, "password": PASSWORD},
    )
    assert registered.status_code == 201, registered.text
    token = client.post("/api/v1/auth/token", data={"username": username, "password": PASSWORD})
    assert token.status_code == 200, token.text
    return {"Authorization": f"Bearer {token.json()['access_token']}"}


def test_prints_one_line_per_service_and_keeps_every_log_in_its_directory(
    stack: RunningStack,
) -> None:
    for name in SERVICES:
        assert name in stack.urls, stack.output.read_text()
    for log in ("postgres/postgres.log", "redis/redis.log", "api/api.log", "api/migrate.log",
                "nginx/access.log", "nginx/error.log", "prometheus/prometheus.log"):  # fmt: skip
        assert (stack.directory / log).is_file(), log


def test_health_register_login_and_items_through_nginx(edge: httpx2.Client) -> None:
    ready = edge.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}

    owner = sign_up(edge, "e2e-owner")
    created = edge.post("/api/v1/items", json={"title": "Lamp", "price": 12.5}, headers=owner)
    assert created.status_code == 201, created.text
    item_id = created.json()["id"]
    assert edge.get(f"/api/v1/items/{item_id}").json()["title"] == "Lamp"
    patched = edge.patch(f"/api/v1/items/{item_id}", json={"title": "Desk lamp"}, headers=owner)
    assert patched.status_code == 200
    # The cached read must not serve the old title after the write.
    assert edge.get(f"/api/v1/items/{item_id}").json()["title"] == "Desk lamp"
    assert edge.delete(f"/api/v1/items/{item_id}", headers=owner).status_code == 204
    assert_problem(edge.get(f"/api/v1/items/{item_id}"), 404)


def test_websocket_chat_round_trip_through_the_upgrade(
    stack: RunningStack, edge: httpx2.Client
) -> None:
    headers = sign_up(edge, "e2e-chatter")
    url = stack.edge.replace("http://", "ws://") + "/api/v1/ws/chat/lobby"
    with connect(url, additional_headers=headers, proxy=None, open_timeout=TIMEOUT) as ws:
        assert json.loads(ws.recv(timeout=TIMEOUT))["type"] == "history"
        assert json.loads(ws.recv(timeout=TIMEOUT))["type"] == "join"
        ws.send(json.dumps({"type": "message", "content": "through nginx"}))
        frame = json.loads(ws.recv(timeout=TIMEOUT))
        assert (frame["type"], frame["user"], frame["content"]) == (
            "message",
            "e2e-chatter",
            "through nginx",
        )
        ws.send(json.dumps({"type": "ping"}))
        assert json.loads(ws.recv(timeout=TIMEOUT)) == {"type": "pong"}


def test_an_upload_at_the_cap_passes_and_one_over_it_is_refused_by_nginx(
    stack: RunningStack, edge: httpx2.Client
) -> None:
    headers = sign_up(edge, "e2e-uploader")
    at_cap = b"a" * UPLOAD_CAP
    accepted = edge.post(
        "/api/v1/files", files={"file": ("cap.txt", at_cap, "text/plain")}, headers=headers
    )
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["size"] == UPLOAD_CAP

    too_big = b"a" * (UPLOAD_CAP + MULTIPART_ALLOWANCE + 1)
    refused = edge.post(
        "/api/v1/files", files={"file": ("big.txt", too_big, "text/plain")}, headers=headers
    )
    body = assert_problem(refused, 413)
    # nginx's own answer: the request never reached the app.
    request_id = refused.headers["x-request-id"]
    (line,) = stack.logged("nginx", request_id)
    assert (line["status"], line["upstream_addr"]) == (413, "")
    assert "larger than this endpoint accepts" in body["detail"]
    assert not [r for r in stack.app_lines() if r.get("request_id") == request_id]
    listed = edge.get("/api/v1/files", headers=headers).json()
    assert [f["original_name"] for f in listed["items"]] == ["cap.txt"]


def test_the_request_id_is_the_same_at_the_edge_in_the_app_and_in_both_logs(
    stack: RunningStack, edge: httpx2.Client
) -> None:
    given = edge.get("/api/v1/items", headers={"X-Request-ID": "e2e-given-id"})
    generated = edge.get("/api/v1/items")
    assert given.headers["x-request-id"] == "e2e-given-id"
    minted = generated.headers["x-request-id"]
    assert len(minted) == 32  # nginx's $request_id
    for request_id in ("e2e-given-id", minted):
        assert stack.logged("app", request_id)
        assert stack.logged("nginx", request_id)


def test_the_app_sees_the_real_client_ip_not_a_forged_forwarded_for(
    stack: RunningStack, edge: httpx2.Client
) -> None:
    edge.get(
        "/api/v1/items",
        headers={"X-Request-ID": "e2e-forged", "X-Forwarded-For": "203.0.113.9"},
    )
    (line,) = stack.logged("app", "e2e-forged")
    assert line["client_ip"] == "127.0.0.1"


def test_metrics_are_scraped_directly_but_not_served_on_the_public_port(
    stack: RunningStack, edge: httpx2.Client
) -> None:
    for path in ("/metrics", "/metrics?format=openmetrics", "//metrics", "/%6detrics"):
        response = edge.get(path)
        assert_problem(response, 404)  # nginx's own answer, in the app's error format
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "http_requests_total" not in response.text
    direct = httpx2.get(f"{stack.urls['api']}/metrics", trust_env=False)
    assert direct.status_code == 200
    assert "http_requests_total" in direct.text


def test_json_is_compressed_at_the_edge(edge: httpx2.Client) -> None:
    owner = sign_up(edge, "e2e-gzip")
    for n in range(20):  # a list long enough to be worth compressing
        edge.post("/api/v1/items", json={"title": f"Item {n}", "price": 1}, headers=owner)
    plain = edge.get("/api/v1/items", headers={"Accept-Encoding": "identity"})
    packed = edge.get("/api/v1/items", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in plain.headers
    assert packed.headers["content-encoding"] == "gzip"
    assert packed.json() == plain.json()  # httpx decodes it


def test_stored_files_go_out_as_stored(edge: httpx2.Client) -> None:
    """Not gzipped like JSON: a download keeps its length, strong ETag and ranges."""
    owner = sign_up(edge, "e2e-download")
    text = b"a line of a log file, compressible\n" * 2000
    stored = edge.post(
        "/api/v1/files", files={"file": ("app.log", text, "text/plain")}, headers=owner
    ).json()
    path = f"/api/v1/files/{stored['id']}/content"
    whole = edge.get(path, headers=owner | {"Accept-Encoding": "gzip"})
    assert "content-encoding" not in whole.headers
    assert whole.headers["content-length"] == str(len(text))
    etag = whole.headers["etag"]
    assert not etag.startswith("W/")
    resumed = edge.get(
        path, headers=owner | {"Accept-Encoding": "gzip", "Range": "bytes=100-", "If-Range": etag}
    )
    assert (resumed.status_code, resumed.content) == (206, text[100:])


def test_prometheus_reports_every_target_up(stack: RunningStack) -> None:
    def targets() -> dict[str, str]:
        answer = httpx2.get(f"{stack.urls['prometheus']}/api/v1/targets", trust_env=False)
        active = answer.json()["data"]["activeTargets"]
        return {t["labels"]["job"]: t["health"] for t in active}

    # The first scrape of each target happens within one scrape interval (15 s).
    wait_for(
        lambda: targets() == dict.fromkeys(SERVICES, "up"),
        timeout=90,
        what="every Prometheus target to be up",
    )


def test_the_edge_answers_floods_with_429_problems(
    stack: RunningStack, edge: httpx2.Client
) -> None:
    def probe(_: int) -> httpx2.Response:
        return edge.get("/health/live")

    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(probe, range(600)))
    statuses = {r.status_code for r in responses}
    assert statuses == {200, 429}, statuses
    limited = next(r for r in responses if r.status_code == 429)
    assert_problem(limited, 429)
    assert limited.headers["retry-after"] == "1"
    time.sleep(3)  # let the bucket drain (burst 100 at 50 r/s) for the other tests


def test_sigint_stops_everything_the_stack_started(tmp_path: Path) -> None:
    port = free_port()
    running = start_stack(tmp_path / "stack", STACK_HTTP_PORT=str(port))
    assert running.urls["nginx"] == f"http://127.0.0.1:{port}"
    children = running.descendants()
    names = {child.name() for child in children}
    assert {"postgres", "redis-server", "nginx", "prometheus"} <= names, names
    assert running.stop(signal.SIGINT) == 0
    assert [c.pid for c in children if is_alive(c.pid) and c.status() != "zombie"] == []
    assert running.output.read_text().rstrip().endswith("stack: stopped")
