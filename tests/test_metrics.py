"""The metrics middleware and /metrics in one process: route labels, statuses,
exceptions, WebSockets, content negotiation, access restriction, domain counters."""

import asyncio
import contextlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx2
import psutil
import pytest
from fastapi import WebSocket, WebSocketDisconnect
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    Summary,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.samples import Exemplar
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import Message, Receive, Scope, Send

from app import migrate
from app.main import create_app
from app.observability import metrics, system
from app.observability.http_metrics import RouteSeries, observe_websocket
from app.observability.system import HOST_CPU, SystemSampler, block_device_of
from app.observability.tracing import tracer_provider_from_env
from app.settings import Settings
from deploy.stack.process import wait_for
from tests.api import PASSWORD, Api, assert_problem
from tests.app_server import app_server, server_env
from tests.conftest import make_settings
from tests.logs import attach, records
from tests.prom import Samples, parse, series, value
from tests.uploads import MIB


def scrape(client: TestClient, root_path: str = "") -> Samples:
    response = client.get(f"{root_path}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def requests_total(samples: Samples, method: str, route: str, status: str) -> float:
    return value(samples, "http_requests_total", method=method, route=route, status=status)


def test_route_templates_label_requests(api: Api) -> None:
    client = api.client
    before = scrape(client)
    client.get("/api/v1/items/123")
    client.get("/api/v1/items/456")
    client.get("/api/v1/items")
    client.put("/api/v1/items/1")
    after = scrape(client)

    def delta(method: str, route: str, status: str) -> float:
        return requests_total(after, method, route, status) - requests_total(
            before, method, route, status
        )

    assert delta("GET", "/api/v1/items/{item_id}", "404") == 2
    assert delta("GET", "/api/v1/items", "200") == 1
    assert delta("PUT", "/api/v1/items/{item_id}", "405") == 1
    routes = {labels["route"] for labels in series(after, "http_requests_total")}
    assert not any("123" in route or "456" in route for route in routes)


def test_unmatched_paths_share_one_label(client: TestClient) -> None:
    before = scrape(client)
    for n in range(20):
        client.get(f"/scanner/probe-{n}.php")
    after = scrape(client)
    assert (
        requests_total(after, "GET", "UNMATCHED", "404")
        - requests_total(before, "GET", "UNMATCHED", "404")
        == 20
    )
    assert not any("probe" in labels["route"] for labels in series(after, "http_requests_total"))


def test_methods_outside_the_standard_set_share_one_label(client: TestClient) -> None:
    odd = ("PROPFIND", "TRACE", "BREW", "X-SCAN")
    before = scrape(client)
    for method in odd:
        client.request(method, "/api/v1/items")
    after = scrape(client)
    assert requests_total(after, "OTHER", "/api/v1/items", "405") - requests_total(
        before, "OTHER", "/api/v1/items", "405"
    ) == len(odd)
    methods = {labels["method"] for labels in series(after, "http_requests_total")}
    assert not methods.intersection(odd)


@pytest.fixture
def extended_app(settings: Settings) -> Iterator[TestClient]:
    """The service with a mounted sub-app, a failing route and a websocket route."""
    app = create_app(settings)
    app.mount(
        "/sub",
        Starlette(routes=[Route("/things/{n}", lambda _: PlainTextResponse("thing"))]),
    )

    @app.get("/explode/{kind}")
    async def explode(kind: str) -> None:
        raise RuntimeError(kind)

    @app.get("/explode-midway")
    async def explode_midway() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"the first part, "
            raise RuntimeError("and no more")

        return StreamingResponse(body())

    @app.websocket("/ws-test/{room}")
    async def echo(websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        async for text in websocket.iter_text():  # until the client leaves
            await websocket.send_text(text)

    with TestClient(app, raise_server_exceptions=False, root_path="/svc") as client:
        yield client


def test_root_path_mounts_and_exceptions(extended_app: TestClient) -> None:
    client = extended_app
    before = scrape(client, "/svc")
    # As behind a proxy that serves the app under /svc: paths include the root path.
    assert client.get("/svc/sub/things/7").text == "thing"
    assert_problem(client.get("/svc/explode/now"), 500)
    cut_off = client.get("/svc/explode-midway")
    assert (cut_off.status_code, cut_off.content) == (200, b"the first part, ")
    client.get("/svc/api/v1/items")
    after = scrape(client, "/svc")

    def delta(route: str, status: str) -> float:
        return requests_total(after, "GET", route, status) - requests_total(
            before, "GET", route, status
        )

    assert delta("/svc/sub/things/{n}", "200") == 1
    assert delta("/svc/explode/{kind}", "500") == 1
    # Counted as what its client got: a 200 cut off, not a 200.
    assert (delta("/svc/explode-midway", "500"), delta("/svc/explode-midway", "200")) == (1, 0)
    assert delta("/svc/api/v1/items", "200") == 1
    for labels in series(after, "http_requests_in_progress"):
        if labels["route"] != "/svc/metrics":
            assert value(after, "http_requests_in_progress", **labels) == 0


def test_under_a_root_path_the_edge_policy_sees_the_app_path(
    extended_app: TestClient, log_lines: io.StringIO
) -> None:
    """Servers put the root path in front of ``path``: the prefixes that choose the body
    cap, ``no-store`` and the probes' quiet access lines are the app's paths."""
    client = extended_app
    attach(log_lines)
    account = {"email": "root@example.com", "username": "rooted", "password": PASSWORD}
    assert client.post("/svc/api/v1/auth/register", json=account).status_code == 201
    token = client.post("/svc/api/v1/auth/token", data={**account, "username": "rooted"})
    assert token.headers["cache-control"] == "no-store"
    bearer = {"Authorization": f"Bearer {token.json()['access_token']}"}
    # Over the 1 MiB cap of other bodies, within the uploads' own.
    text = b"line of text\n" * 100_000
    upload = client.post("/svc/api/v1/files", files={"file": ("big.txt", text)}, headers=bearer)
    assert upload.status_code == 201, upload.text
    client.get("/svc/health/live")
    paths = [r.get("path") for r in records(log_lines) if r.get("logger") == "app.access"]
    assert "/svc/api/v1/files" in paths
    assert "/svc/health/live" not in paths  # at DEBUG, as without a root path


def test_head_is_labelled_by_the_get_route_and_sends_no_body(extended_app: TestClient) -> None:
    client = extended_app
    before = scrape(client, "/svc")
    assert client.head("/svc/api/v1/items").status_code == 200
    # No HEAD (nor GET) route at this path: the GET route that serves it names it.
    client.head("/svc/api/v1/files/batch")
    after = scrape(client, "/svc")
    labels = {"method": "HEAD", "route": "/svc/api/v1/items"}
    for name in ("http_response_size_bytes_count", "http_response_size_bytes_sum"):
        assert value(after, name, **labels) - value(before, name, **labels) == (
            1 if name.endswith("count") else 0
        )
    route = "/svc/api/v1/files/{file_id}"
    assert (
        requests_total(after, "HEAD", route, "401") - requests_total(before, "HEAD", route, "401")
        == 1
    )


def test_websockets_are_counted_separately_and_while_they_are_open(
    extended_app: TestClient,
) -> None:
    """A session that lasts hours must show in the counters while it lasts, not once it
    ends (nor never, when its worker is killed)."""
    client = extended_app
    route = "/svc/ws-test/{room}"
    before = scrape(client, "/svc")

    def counted(samples: Samples) -> tuple[float, ...]:
        return tuple(
            value(samples, name, **labels) - value(before, name, **labels)
            for name, labels in [
                ("websocket_connections_total", {"route": route}),
                ("websocket_messages_total", {"route": route, "direction": "received"}),
                ("websocket_messages_total", {"route": route, "direction": "sent"}),
            ]
        )

    with client.websocket_connect("/svc/ws-test/lobby") as websocket:
        for text in ("one", "two"):
            websocket.send_text(text)
            assert websocket.receive_text() == text
        # The echo's count follows its send, which the client may have seen first.
        wait_for(
            lambda: counted(scrape(client, "/svc")) == (1, 2, 2),
            timeout=10,
            what="the open socket's connection and messages counted",
        )
        during = scrape(client, "/svc")
    after = scrape(client, "/svc")
    assert value(during, "websocket_connections_active", route=route) == 1
    assert value(after, "websocket_connections_active", route=route) == 0
    assert counted(after) == (1, 2, 2)
    assert not any(labels["route"] == route for labels in series(after, "http_requests_total"))


def test_a_message_whose_send_failed_is_not_counted_as_sent() -> None:
    """The client was gone: websocket_messages_total counts messages that left."""
    route = "/ws-gone"
    app = Starlette(routes=[WebSocketRoute(route, lambda _: None)])
    sent = registry_value("websocket_messages_total", route=route, direction="sent")

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "delivered"})
        await send({"type": "websocket.send", "text": "lost"})

    async def server_send(message: Message) -> None:
        if message.get("text") == "lost":
            raise OSError("connection reset by peer")

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    scope = {"type": "websocket", "path": route, "root_path": "", "app": app}
    before = sent() or 0.0
    with pytest.raises(OSError, match="reset"):
        asyncio.run(observe_websocket(handler, scope, receive, server_send))
    assert sent() == before + 1


def test_a_websocket_refused_for_its_host_is_counted(database_url: str, tmp_path: Path) -> None:
    """As its HTTP counterpart is (a 400): websocket_connections_total counts sockets
    accepted or refused."""
    settings = make_settings(database_url, tmp_path, allowed_hosts="api.example.com")
    route = "/api/v1/ws/notifications"
    with TestClient(create_app(settings), base_url="http://api.example.com") as client:
        before = value(scrape(client), "websocket_connections_total", route=route)
        with (
            pytest.raises(WebSocketDisconnect) as refused,
            client.websocket_connect(route, headers={"Host": "evil.example.com"}),
        ):
            pass
        after = value(scrape(client), "websocket_connections_total", route=route)
    assert refused.value.code == 1008
    assert after - before == 1


def test_the_service_websockets_are_labelled_with_their_route(api: Api) -> None:
    """The chat and notification sockets live in included routers, which FastAPI keeps
    apart from its API routes; each must keep its own template, not UNMATCHED."""
    alice = api.account("alice")
    before = scrape(api.client)
    for path in ("/api/v1/ws/chat/lobby", "/api/v1/ws/notifications"):
        with api.client.websocket_connect(path, headers=alice.headers):
            pass
    after = scrape(api.client)
    for route in ("/api/v1/ws/chat/{room}", "/api/v1/ws/notifications"):
        connections = "websocket_connections_total"
        assert value(after, connections, route=route) - value(before, connections, route=route) == 1
    unmatched = {"route": "UNMATCHED"}
    assert value(after, "websocket_connections_total", **unmatched) == value(
        before, "websocket_connections_total", **unmatched
    )


def test_histogram_and_sizes_follow_requests(api: Api) -> None:
    alice = api.account("alice")
    before = scrape(api.client)
    body = {"title": "Lamp", "price": 3}
    for _ in range(3):
        api.client.post("/api/v1/items", json=body, headers=alice.headers)
    after = scrape(api.client)
    labels = {"method": "POST", "route": "/api/v1/items"}
    for name in (
        "http_request_duration_seconds_count",
        "http_request_size_bytes_count",
        "http_response_size_bytes_count",
    ):
        assert value(after, name, **labels) - value(before, name, **labels) == 3
    inf = {**labels, "le": "+Inf"}
    assert (
        value(after, "http_request_duration_seconds_bucket", **inf)
        - value(before, "http_request_duration_seconds_bucket", **inf)
        == 3
    )
    sent = value(after, "http_request_size_bytes_sum", **labels) - value(
        before, "http_request_size_bytes_sum", **labels
    )
    assert sent == 3 * len(b'{"title":"Lamp","price":3}')


def test_login_and_refresh_outcomes_are_counted(api: Api) -> None:
    before = scrape(api.client)
    alice = api.account("alice")
    api.login("alice", "wrong password")
    api.login("nobody", "wrong password")
    first = alice.tokens["refresh_token"]
    api.client.post("/api/v1/auth/refresh", json={"refresh_token": first})
    api.client.post("/api/v1/auth/refresh", json={"refresh_token": first})
    api.client.post("/api/v1/auth/refresh", json={"refresh_token": "garbage"})
    after = scrape(api.client)

    def delta(name: str, outcome: str) -> float:
        return value(after, name, outcome=outcome) - value(before, name, outcome=outcome)

    assert delta("auth_logins_total", "success") == 1
    assert delta("auth_logins_total", "invalid_credentials") == 2
    assert delta("auth_logins_total", "locked") == 0
    assert delta("auth_token_refreshes_total", "success") == 1
    assert delta("auth_token_refreshes_total", "reuse_detected") == 1
    assert delta("auth_token_refreshes_total", "invalid") == 1


def test_a_login_refused_for_a_spent_failure_budget_is_counted_as_locked(api: Api) -> None:
    api.account("carol")
    before = scrape(api.client)
    for _ in range(5):  # the default budget: 5 failures in 15 minutes
        assert_problem(api.login("carol", "wrong password"), 401)
    assert_problem(api.login("carol", PASSWORD), 429)  # the right one, unchecked
    after = scrape(api.client)

    def delta(outcome: str) -> float:
        name = "auth_logins_total"
        return value(after, name, outcome=outcome) - value(before, name, outcome=outcome)

    assert (delta("invalid_credentials"), delta("locked"), delta("success")) == (5, 1, 0)


def test_a_token_revoked_unused_is_invalid_not_reuse(api: Api, log_lines: io.StringIO) -> None:
    """Reuse means a spent token came back (a copy is in other hands); one revoked by a
    logout or a password change and never used is merely invalid, or every such client
    would raise the security signal."""
    alice, bob = api.account("alice"), api.account("bob")
    attach(log_lines)
    before = scrape(api.client)
    logout = {"refresh_token": alice.tokens["refresh_token"]}
    api.client.post("/api/v1/auth/logout", json=logout, headers=alice.headers)
    change = {"current_password": PASSWORD, "password": "a new passphrase 42"}
    assert api.client.patch("/api/v1/users/me", json=change, headers=bob.headers).is_success
    for old in (alice.tokens["refresh_token"], bob.tokens["refresh_token"]):
        assert_problem(api.client.post("/api/v1/auth/refresh", json={"refresh_token": old}), 401)
    after = scrape(api.client)

    def delta(outcome: str) -> float:
        name = "auth_token_refreshes_total"
        return value(after, name, outcome=outcome) - value(before, name, outcome=outcome)

    assert (delta("invalid"), delta("reuse_detected")) == (2, 0)
    assert not any("reuse" in r["event"] for r in records(log_lines))


def items_exemplars(
    database_url: str, tmp_path: Path, headers: dict[str, str]
) -> tuple[list[Exemplar], InMemorySpanExporter]:
    """The duration exemplars of GET /api/v1/items (the registry is the process's: other
    tests' requests have theirs too) after one sent with ``headers``."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # the SDK's default sampler: the caller's decision, or on
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(make_settings(database_url, tmp_path), tracer_provider=provider)
    with TestClient(app) as client:
        client.get("/api/v1/items", headers=headers)
        response = client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
    exemplars = [
        sample.exemplar
        for family in text_string_to_metric_families(response.text)
        if family.name == "http_request_duration_seconds"
        for sample in family.samples
        if sample.exemplar and sample.labels.get("route") == "/api/v1/items"
    ]
    return exemplars, exporter


def test_openmetrics_with_trace_exemplars(database_url: str, tmp_path: Path) -> None:
    exemplars, exporter = items_exemplars(database_url, tmp_path, {})
    server_span = next(s for s in exporter.get_finished_spans() if s.name == "GET /api/v1/items")
    trace_id = format(server_span.context.trace_id, "032x")
    assert trace_id in {exemplar.labels["trace_id"] for exemplar in exemplars}


def test_no_exemplar_points_to_a_trace_that_was_not_sampled(
    database_url: str, tmp_path: Path
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    # The caller did not sample this trace (flags 00): the service does not either.
    traceparent = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-00"}
    exemplars, exporter = items_exemplars(database_url, tmp_path, traceparent)
    exported = {format(span.context.trace_id, "032x") for span in exporter.get_finished_spans()}
    assert trace_id not in exported  # nothing of it exported...
    # ...so no exemplar may send someone looking for it.
    assert trace_id not in {exemplar.labels["trace_id"] for exemplar in exemplars}


@pytest.mark.parametrize(
    ("variables", "name"),
    [
        ({}, "fastapi-ops-service"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=checkout,team=pay"}, "checkout"),
        ({"OTEL_SERVICE_NAME": "api", "OTEL_RESOURCE_ATTRIBUTES": "service.name=x"}, "api"),
    ],
)
def test_the_service_name_follows_the_otel_variables(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], name: str
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # never reached
    for key, setting in variables.items():
        monkeypatch.setenv(key, setting)
    provider = tracer_provider_from_env()
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == name
    finally:
        provider.shutdown()


def test_a_scrape_passes_over_a_file_a_worker_is_still_creating(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prometheus_client creates a worker's file empty and sizes it just after: a scrape in
    between (workers starting, every max_requests recycle) was a 500 for the whole scrape."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from prometheus_client import Counter; Counter('ready_total', '').inc(3)",
        ],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
        check=True,
    )
    (directory / "counter_999999.db").touch()  # a worker's file, not sized yet
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert value(parse(response.text), "ready_total") == 3


def test_metrics_can_be_restricted_to_scraper_networks(database_url: str, tmp_path: Path) -> None:
    closed = make_settings(database_url, tmp_path, metrics_allowed_networks="10.0.0.0/8")
    with TestClient(create_app(closed)) as client:
        assert_problem(client.get("/metrics"), 403)
    # TestClient's peer address is "testclient", which is no network address at all; a
    # real loopback peer is checked in test_gunicorn.
    open_to_all = make_settings(database_url, tmp_path / "other")
    with TestClient(create_app(open_to_all)) as client:
        assert client.get("/metrics").status_code == 200


def test_system_metrics_in_a_single_process(client: TestClient) -> None:
    # The sampler starts with the app; give its first sample (in a thread) a moment.
    wait_for(
        lambda: value(scrape(client), "app_worker_open_fds", worker="0") > 0,
        timeout=10,
        what="the first system metrics sample",
    )
    samples = scrape(client)
    assert value(samples, "app_worker_resident_memory_bytes", worker="0") > 10 * 2**20
    assert value(samples, "app_worker_open_fds", worker="0") > 0
    assert value(samples, "app_worker_threads", worker="0") >= 1
    assert value(samples, "app_host_memory_bytes", state="total") > 0
    assert value(samples, "app_host_disk_bytes", volume="data", state="total") > 0
    assert len(series(samples, "app_host_load_average")) == 3


def test_the_data_volume_is_found_by_its_device_number() -> None:
    """Disk IO is read from psutil's per-disk counters, named as the kernel names devices
    (``dm-0``, ``nvme0n1p2``), not as mount tables do (``/dev/mapper/vg-lv``,
    ``/dev/root``), under which nothing would ever be found."""
    checkout = Path(__file__).parent
    device = os.stat(checkout).st_dev
    if os.major(device) == 0:
        pytest.skip("this checkout is on no block device (tmpfs, overlayfs): nothing to find")
    name = block_device_of(checkout)
    assert name in psutil.disk_io_counters(perdisk=True)
    major, minor = Path(f"/sys/class/block/{name}/dev").read_text().split(":")
    assert (int(major), int(minor)) == (os.major(device), os.minor(device))
    assert block_device_of(Path("/proc")) is None  # no block device under it


def test_a_failing_system_sample_is_counted_and_sampling_goes_on(
    database_url: str, tmp_path: Path, log_lines: io.StringIO
) -> None:
    """The data volume vanishes (the disk sample fails): the failures are counted, logged
    once, sampling resumes when the volume is back, and the app still shuts down cleanly
    (a sampler that died of the error used to make the shutdown raise it)."""
    data_dir = tmp_path / "data"
    settings = make_settings(database_url, data_dir, system_metrics_interval_seconds=0.05)

    def sampler_events() -> list[str]:
        lines = records(log_lines)
        return [r["event"] for r in lines if r.get("logger") == "app.observability.system"]

    with TestClient(create_app(settings)) as client:
        attach(log_lines)

        def failures() -> float:
            return value(scrape(client), "app_system_sample_failures_total", worker="0")

        def received() -> float:
            return value(scrape(client), "app_host_network_bytes_total", direction="receive")

        before = failures()  # the registry is the process's: other tests' samples count
        received_before = received()
        shutil.rmtree(data_dir)
        wait_for(lambda: failures() >= before + 3, timeout=10, what="three failed samples")
        # The rest of the host is still sampled.
        with socket.create_server(("127.0.0.1", 0)) as server:
            with socket.create_connection(server.getsockname()) as client_end:
                client_end.sendall(b"x" * 65536)  # loopback traffic, in the host's counters
            wait_for(lambda: received() > received_before, timeout=10, what="network samples")
        data_dir.mkdir()
        wait_for(lambda: len(sampler_events()) == 2, timeout=10, what="sampling to recover")
        settled = failures()
        time.sleep(0.3)  # several intervals: sampling goes on, and does not fail again
        assert failures() == settled
    assert sampler_events() == [
        "system metrics: sampling failed",
        "system metrics: sampling recovered",
    ]


def registry_value(name: str, **labels: str) -> Callable[[], float | None]:
    """Reads a sample of this process's registry (the sampler's series are module-level)."""
    return lambda: REGISTRY.get_sample_value(name, labels)


def test_a_worker_is_charged_all_its_cpu_time(tmp_path: Path) -> None:
    """Its start (imports, the app's set-up) included, which a first sample taken as a mere
    baseline left out: most of a short-lived worker's CPU time."""
    env = server_env(tmp_path, APP_SYSTEM_METRICS_INTERVAL_SECONDS="0.1")
    migrate.upgrade(env["APP_DATABASE_URL"])
    with app_server(tmp_path, env, tmp_path / "server.log") as (base, server):
        time.sleep(0.5)  # idle sampling intervals: what it uses meanwhile is next to nothing
        samples = parse(httpx2.get(f"{base}/metrics").text)
        times = psutil.Process(server.pid).cpu_times()
    exported = value(samples, "app_worker_cpu_seconds_total", worker="0")
    assert exported >= 0.9 * (times.user + times.system), (exported, times)


def test_an_event_loop_stall_stays_visible_for_several_scrapes(tmp_path: Path) -> None:
    """Prometheus scrapes every 15 s: a stall shown for one 5 s sampling interval only was
    missed two times in three."""
    sampler = SystemSampler(tmp_path, interval_seconds=0.02)
    lag = registry_value("app_worker_event_loop_lag_seconds", worker="0")

    async def stall_then_idle() -> float | None:
        task = asyncio.create_task(sampler.run())
        await asyncio.sleep(0.1)
        time.sleep(1.5)  # noqa: ASYNC251 - the stall: the loop blocked, as by CPU-bound work
        await asyncio.sleep(0.6)  # a few samples later
        shown = lag()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return shown

    shown = asyncio.run(stall_then_idle())
    assert shown is not None
    assert shown >= 1.0


def test_the_host_cpu_is_not_reported_from_a_first_reading(tmp_path: Path) -> None:
    """psutil's first utilisation reading compares with nothing (it is 0.0): written, it
    showed an idle host after every start or takeover of the host sampling."""
    utilisation = registry_value("app_host_cpu_utilisation_ratio")
    sampler = SystemSampler(tmp_path, interval_seconds=60)
    HOST_CPU.set(-1.0)  # no utilisation at all: what the first sample leaves
    sampler.sample()
    assert utilisation() == -1.0
    sampler.sample()
    shown = utilisation()
    assert shown is not None
    assert 0.0 <= shown <= 1.0


# A worker sampling the host until told to stop, as one that a deploy stops.
HOST_HOLDER = """
import sys
from pathlib import Path

from app.observability.system import SystemSampler

sampler = SystemSampler(Path(sys.argv[1]), interval_seconds=60)
sampler.sample()
print(sampler.host_lease.held(), flush=True)
sys.stdin.readline()
sampler.sample()
"""


def loopback_traffic(size: int) -> None:
    """``size`` bytes over TCP on the loopback: host traffic, as psutil counts it."""
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as client,
    ):
        peer, _ = server.accept()
        with peer:
            sender = threading.Thread(target=client.sendall, args=(bytes(size),))
            sender.start()
            received = 0
            while received < size:
                received += len(peer.recv(MIB))
            sender.join()


def test_a_worker_taking_the_host_over_counts_the_bytes_since_the_last_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the worker holding the host lease counts the host's bytes. One taking it over
    (the holder stopped by a deploy or a recycle) counted from a first reading of its own:
    the bytes since the last holder's last sample were never counted."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOST_HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "True\n"
        taker = SystemSampler(tmp_path, interval_seconds=60)
        taker.sample()  # an interval before the holder's last sample
        assert not taker.host_lease.held()
        holder.communicate("\n", timeout=60)  # its last sample; it exits
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert holder.returncode == 0
    received = registry_value("app_host_network_bytes_total", direction="receive")
    before = received() or 0.0
    loopback_traffic(8 * MIB)
    taker.sample()
    assert taker.host_lease.held()
    assert (received() or 0.0) - before >= 8 * MIB


def test_request_series_update_like_the_public_methods() -> None:
    """The middleware writes to prometheus_client's value objects directly; the outcome
    must equal what observe()/inc() produce, bucket boundaries included."""
    route = "/pinned/{n}"
    durations = [0.0, 0.005, 0.0051, 0.25, 7.5, 11.0]
    series = RouteSeries("PATCH", route)
    reference = CollectorRegistry()
    histogram = Histogram("d", "d", buckets=metrics.LATENCY_BUCKETS, registry=reference)
    sizes = Summary("s", "s", registry=reference)
    for seconds in durations:
        series.start()
        series.finish(201, seconds, 3, 5, None)
        histogram.observe(seconds)
        sizes.observe(3)
    samples = parse(generate_latest().decode())
    expected = parse(generate_latest(reference).decode())
    labels = {"method": "PATCH", "route": route}
    for bound in [*metrics.LATENCY_BUCKETS, "+Inf"]:
        le = "+Inf" if bound == "+Inf" else str(bound)
        assert value(samples, "http_request_duration_seconds_bucket", **labels, le=le) == value(
            expected, "d_bucket", le=le
        ), le
    assert value(samples, "http_request_duration_seconds_sum", **labels) == sum(durations)
    assert value(samples, "http_request_size_bytes_count", **labels) == value(expected, "s_count")
    assert value(samples, "http_request_size_bytes_sum", **labels) == value(expected, "s_sum")
    assert value(samples, "http_response_size_bytes_sum", **labels) == 5 * len(durations)
    assert value(samples, "http_requests_total", **labels, status="201") == len(durations)
    assert value(samples, "http_requests_in_progress", **labels) == 0


def test_the_readme_lists_every_metric_with_its_labels() -> None:
    """Dashboards and alerts are written from the README's table: a metric missing from it,
    or a label it leaves out, is one nobody queries; a name in it that the service does not
    export is a query that finds nothing."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Metrics (`GET /metrics`)", 1)[1].split("\n### ", 1)[0]
    rows = {
        name: labels
        for line in section.splitlines()
        if line.startswith("| `")
        for names, labels in [line.split("|")[1:3]]
        for name in re.findall(r"`([a-z_]+)`", names)
    }
    exported = {
        wrapper._name + ("_total" if isinstance(wrapper, Counter) else ""): wrapper._labelnames
        for module in (metrics, system)
        for wrapper in vars(module).values()
        if isinstance(wrapper, MetricWrapperBase)
    }
    assert len(exported) > 30
    assert sorted(set(exported) - set(rows)) == []
    assert sorted(set(rows) - set(exported)) == []
    unlisted = {
        name: [label for label in labels if f"`{label}`" not in rows[name]]
        for name, labels in exported.items()
    }
    assert {name: labels for name, labels in unlisted.items() if labels} == {}
