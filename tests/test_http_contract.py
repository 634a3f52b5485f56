"""Problem details on every error, request ids, security headers, hosts and CORS."""

import gzip
import io
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi import Response
from fastapi.testclient import TestClient
from sqlalchemy import exc as sa_errors

from app.main import create_app
from app.settings import Settings
from tests.api import Api, assert_problem
from tests.conftest import make_settings
from tests.logs import attach, records


def test_unknown_path_and_wrong_method_are_problems(client: TestClient) -> None:
    assert_problem(client.get("/no/such/path"), 404)
    wrong_method = client.put("/api/v1/items")
    assert_problem(wrong_method, 405)
    assert "GET" in wrong_method.headers["allow"]


def test_unhandled_error_is_a_500_problem_without_traceback(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals: /etc/passwd")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom", headers={"X-Request-ID": "trace-me-500"})
    body = assert_problem(response, 500)
    assert body["request_id"] == "trace-me-500"
    assert "secret internals" not in response.text
    assert "Traceback" not in response.text
    assert response.headers["x-content-type-options"] == "nosniff"


def refused_port() -> int:
    with socket.socket() as probe:  # free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("database", "cause"),
    [
        (lambda: f"127.0.0.1:{refused_port()}", "ConnectionRefusedError"),
        (lambda: "db.example.invalid:5432", "gaierror"),  # RFC 2606: never resolves
    ],
    ids=["refused", "unresolvable"],
)
def test_a_database_outage_is_a_503_with_retry_after(
    tmp_path: Path, log_lines: io.StringIO, database: Callable[[], str], cause: str
) -> None:
    """The database cannot be reached: every request that needs it is a 503 problem with
    Retry-After, logged as one warning line with the error, no traceback."""
    down = make_settings(f"postgresql+asyncpg://app@{database()}/app", tmp_path)
    with TestClient(create_app(down)) as client:
        attach(log_lines)
        response = client.get("/api/v1/items")
    body = assert_problem(response, 503)
    assert body["detail"] == "A service this request needs is unavailable; try again shortly."
    assert response.headers["retry-after"] == "5"
    (line,) = [r for r in records(log_lines) if r.get("logger") == "app.errors"]
    assert line["level"] == "warning"
    assert line["event"] == "dependency unavailable"
    assert line["error"].startswith("DatabaseUnreachable: ")
    assert cause in line["error"]
    assert "exception" not in line
    assert line["request_id"] == body["request_id"]


def test_a_database_that_never_answers_is_a_503_after_the_connect_timeout(
    tmp_path: Path, log_lines: io.StringIO
) -> None:
    """The TCP connection is made (the kernel accepts it) but nothing answers the
    handshake, as with a hung server: APP_DB_CONNECT_TIMEOUT_SECONDS ends the wait."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        host, port = silent.getsockname()
        settings = make_settings(
            f"postgresql+asyncpg://app@{host}:{port}/app",
            tmp_path,
            db_connect_timeout_seconds=0.2,
        )
        with TestClient(create_app(settings)) as client:
            attach(log_lines)
            response = client.get("/api/v1/items")
    assert_problem(response, 503)
    (line,) = [r for r in records(log_lines) if r.get("logger") == "app.errors"]
    assert line["error"].startswith("DatabaseUnreachable: TimeoutError")


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (sa_errors.TimeoutError("QueuePool limit of size 5 overflow 10 reached"), 503),
        (
            sa_errors.OperationalError(
                "SELECT 1", {}, OSError("closed"), connection_invalidated=True
            ),
            503,
        ),
        (
            sa_errors.OperationalError(
                "SELECT * FROM no_such_table", {}, Exception("no such table")
            ),
            500,
        ),
        (sa_errors.ProgrammingError("SELEC 1", {}, Exception("syntax error")), 500),
    ],
)
def test_only_connection_level_database_errors_are_503s(
    settings: Settings, error: Exception, status: int
) -> None:
    """A lost connection or an exhausted pool is the database's condition (503); any other
    database error is a bug or a schema problem: a 500, re-raised for its traceback."""
    app = create_app(settings)

    @app.get("/db-error")
    async def db_error() -> None:
        raise error

    with TestClient(app, raise_server_exceptions=False) as client:
        assert_problem(client.get("/db-error"), status)
    if status == 500:
        with TestClient(app) as client, pytest.raises(type(error)):
            client.get("/db-error")


def test_sane_request_id_is_echoed(client: TestClient) -> None:
    response = client.get("/health/live", headers={"X-Request-ID": "abc-123.DEF_4:5"})
    assert response.headers["x-request-id"] == "abc-123.DEF_4:5"


@pytest.mark.parametrize("hostile", ["has space", "x" * 200, "semi;colon", "new\\nline", ""])
def test_insane_request_id_is_replaced(client: TestClient, hostile: str) -> None:
    response = client.get("/health/live", headers={"X-Request-ID": hostile})
    generated = response.headers["x-request-id"]
    assert generated != hostile
    assert len(generated) == 32
    assert int(generated, 16) >= 0


def test_every_response_gets_a_fresh_id(client: TestClient) -> None:
    ids = {client.get("/health/live").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


def test_security_headers_and_no_store(api: Api) -> None:
    alice = api.account("alice")
    for response in (
        api.client.get("/api/v1/users/me", headers=alice.headers),
        api.client.get("/api/v1/items"),
        api.client.get("/no/such/path"),
    ):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
    assert (
        api.client.get("/api/v1/users/me", headers=alice.headers).headers["cache-control"]
        == "no-store"
    )
    assert api.login("alice").headers["cache-control"] == "no-store"
    assert "cache-control" not in api.client.get("/api/v1/items").headers
    # A user's files: never in a shared cache, and checked each time by the browser.
    stored = api.client.post(
        "/api/v1/files", files={"file": ("a.txt", b"text\n", "text/plain")}, headers=alice.headers
    )
    for path in ("", f"/{stored.json()['id']}", f"/{stored.json()['id']}/content"):
        response = api.client.get(f"/api/v1/files{path}", headers=alice.headers)
        assert response.headers["cache-control"] == "private, no-cache", path


def test_headers_the_app_set_are_kept_or_replaced_never_duplicated(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/api/v1/auth/own-headers")
    async def own_headers() -> Response:
        headers = {"Cache-Control": "max-age=60", "X-Frame-Options": "SAMEORIGIN"}
        return Response("x", headers=headers)

    with TestClient(app) as client:
        response = client.get("/api/v1/auth/own-headers", headers={"X-Request-ID": "mine-1"})
    raw = [name.lower() for name, _ in response.headers.raw]
    for name in (b"cache-control", b"x-frame-options", b"x-request-id", b"referrer-policy"):
        assert raw.count(name) == 1, name
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-frame-options"] == "SAMEORIGIN"
    assert response.headers["x-request-id"] == "mine-1"
    assert response.headers["x-content-type-options"] == "nosniff"


def test_untrusted_host_is_a_400_problem(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(
        database_url, tmp_path, allowed_hosts="api.example.com,*.internal.example.com"
    )
    # Not a probe's path: those answer any host (test_health.py).
    with TestClient(create_app(settings), base_url="http://api.example.com") as client:
        assert client.get("/api/v1/items").status_code == 200
        subdomain = client.get("/api/v1/items", headers={"Host": "a.internal.example.com"})
        assert subdomain.status_code == 200
        for hostile in (
            "evil.example.com",
            "internal.example.com.evil",
            "evil.com/.internal.example.com",
            "evil.com?.internal.example.com",
            "a.internal.example.com:notaport",
        ):
            assert_problem(client.get("/api/v1/items", headers={"Host": hostile}), 400)


@pytest.mark.parametrize("allowed_hosts", ["*", "api.example.com"])
def test_two_host_headers_are_a_400_problem(
    database_url: str, tmp_path: Path, allowed_hosts: str
) -> None:
    """RFC 9112 section 3.2: whichever of them is allowed."""
    settings = make_settings(database_url, tmp_path, allowed_hosts=allowed_hosts)
    with TestClient(create_app(settings), base_url="http://api.example.com") as client:
        twice = [("host", "api.example.com"), ("host", "evil.com")]
        assert_problem(client.get("/health/live", headers=twice), 400)
        assert client.get("/health/live").status_code == 200


def test_head_answers_like_get_without_a_body(api: Api) -> None:
    """RFC 9110 section 9.1: every general-purpose server takes GET and HEAD."""
    item = api.create_item(api.account("alice"))
    for path in ("/health/live", "/api/v1/items", f"/api/v1/items/{item['id']}"):
        get, head = api.client.get(path), api.client.head(path)
        assert (head.status_code, head.content) == (200, b""), path
        assert head.headers["content-type"] == get.headers["content-type"]
        assert head.headers["content-length"] == get.headers["content-length"]
    assert_problem_head = api.client.head("/api/v1/items/999999")
    assert (assert_problem_head.status_code, assert_problem_head.content) == (404, b"")


def test_a_304_has_the_caching_headers_of_the_200(database_url: str, tmp_path: Path) -> None:
    """RFC 9110 section 15.4.5: a 304 carries the ETag, Cache-Control and Vary a 200
    would, or a cache would store the item under the wrong rules or for other origins."""
    settings = make_settings(database_url, tmp_path, cors_origins="https://app.example.com")
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings)
        url = f"/api/v1/items/{api.create_item(api.account('alice'))['id']}"
        origin = {"Origin": "https://app.example.com"}
        full = client.get(url, headers=origin)
        revalidated = client.get(url, headers=origin | {"If-None-Match": full.headers["etag"]})
    assert (revalidated.status_code, revalidated.content) == (304, b"")
    assert "origin" in full.headers["vary"].lower()
    for name in ("etag", "cache-control", "vary"):
        assert revalidated.headers.get(name) == full.headers.get(name), name


def test_405_lists_every_method_of_the_resource(api: Api) -> None:
    """RFC 9110 section 15.5.6; the router alone names those of the first route it tried."""
    for method, path, allowed in (
        ("PUT", "/api/v1/items", "GET, HEAD, POST"),
        ("PUT", "/api/v1/items/1", "DELETE, GET, HEAD, PATCH"),
        ("POST", "/api/v1/users/1", "DELETE, GET, HEAD, PATCH"),
        ("PUT", "/api/v1/files/1", "DELETE, GET, HEAD"),
        ("GET", "/api/v1/auth/token", "POST"),
    ):
        response = api.client.request(method, path)
        assert_problem(response, 405)
        assert response.headers["allow"] == allowed, (method, path)


def test_a_trailing_slash_is_a_404_not_a_redirect(client: TestClient) -> None:
    """A redirect would be built from the Host header, which the client chooses."""
    response = client.get("/api/v1/items/", headers={"Host": "evil.example"})
    assert_problem(response, 404)
    assert "location" not in response.headers


def test_cors_allows_configured_origins_only(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, tmp_path, cors_origins="https://app.example.com")
    with TestClient(create_app(settings)) as client:
        preflight = {"Access-Control-Request-Method": "POST"}
        allowed = client.options(
            "/api/v1/items", headers=preflight | {"Origin": "https://app.example.com"}
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
        denied = client.get("/api/v1/items", headers={"Origin": "https://evil.example.com"})
        assert "access-control-allow-origin" not in denied.headers


def test_openapi_lists_the_contract(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/api/v1/auth/register",
        "/api/v1/auth/token",
        "/api/v1/auth/refresh",
        "/api/v1/auth/logout",
        "/api/v1/users/me",
        "/api/v1/users",
        "/api/v1/users/{user_id}",
        "/api/v1/items",
        "/api/v1/items/{item_id}",
        "/health/live",
        "/health/ready",
    } <= set(paths)
    item = paths["/api/v1/items/{item_id}"]
    # The conditional answers: a revalidated read, and a stale If-Match (RFC 9110 §13).
    assert {"304", "412"} <= set(item["get"]["responses"])
    assert "412" in item["patch"]["responses"]
    assert "412" in item["delete"]["responses"]
    assert client.get("/docs").status_code == 200


def test_docs_can_be_switched_off(database_url: str, tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(database_url, tmp_path, docs_enabled=False))) as c:
        assert_problem(c.get("/docs"), 404)
        assert_problem(c.get("/openapi.json"), 404)


def test_bodies_over_the_request_cap_are_413_problems(api: Api) -> None:
    """Read whole before validation, so capped (APP_MAX_REQUEST_BODY_BYTES) as they arrive;
    uploads stream under their own cap and are not held to this one (tests/test_files.py)."""
    alice = api.account("alice")
    cap = api.settings.max_request_body_bytes
    for response in (
        api.client.post(
            "/api/v1/items",
            json={"title": "x", "price": 1, "description": "d" * cap},
            headers=alice.headers,
        ),
        api.client.post("/api/v1/auth/token", data={"username": "alice", "password": "p" * cap}),
    ):
        assert_problem(response, 413)
        assert response.headers["connection"] == "close"  # the rest stays unread
    assert api.client.get("/api/v1/items").json()["total"] == 0


def test_a_body_in_the_wrong_media_type_is_a_415_problem(api: Api) -> None:
    """The body may be fine; the Content-Type says it is something else, and a client
    should learn which one to send rather than read a list of validation errors."""
    alice = api.account("alice")
    item = '{"title": "Lamp", "price": 1}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = alice.headers | ({"Content-Type": content_type} if content_type else {})
        refused = api.client.post("/api/v1/items", content=item, headers=headers)
        body = assert_problem(refused, 415)
        assert body["detail"] == "Send the body as application/json."
    assert api.client.get("/api/v1/items").json()["total"] == 0
    # A JSON media type with a suffix is JSON.
    merge = {"Content-Type": "application/merge-patch+json"}
    assert (
        api.client.post("/api/v1/items", content=item, headers=alice.headers | merge).status_code
        == 201
    )
    # The token endpoint reads a form (OAuth2), and says so to a JSON client.
    login = api.client.post("/api/v1/auth/token", json={"username": "alice", "password": "x"})
    assert assert_problem(login, 415)["detail"] == (
        "Send the body as application/x-www-form-urlencoded."
    )
    # An empty body in the right type is still a 422: what is missing is the content.
    assert_problem(api.client.post("/api/v1/items", json=None, headers=alice.headers), 422)


def test_a_compressed_body_is_a_415_problem(api: Api) -> None:
    """Read as sent, it would fail as bad JSON; the client learns what is accepted."""
    alice = api.account("alice")
    refused = api.client.post(
        "/api/v1/items",
        content=gzip.compress(b'{"title": "Lamp", "price": 1}'),
        headers=alice.headers | {"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert_problem(refused, 415)
    assert refused.headers["accept-encoding"] == "identity"
    assert api.client.get("/api/v1/items").json()["total"] == 0
    identity = alice.headers | {"Content-Encoding": "identity"}
    created = api.client.post("/api/v1/items", json={"title": "Lamp", "price": 1}, headers=identity)
    assert created.status_code == 201


def test_no_content_answers_carry_no_body_headers(api: Api) -> None:
    """A 204 has no body, so no Content-Type (a client would look for JSON that is not
    there) and no Content-Length."""
    alice, admin = api.account("alice"), api.root()
    item = api.create_item(alice)
    uploaded = api.client.post(
        "/api/v1/files", files={"file": ("a.txt", b"hello", "text/plain")}, headers=alice.headers
    )
    assert uploaded.status_code == 201, uploaded.text
    answers = [
        api.client.delete(f"/api/v1/items/{item['id']}", headers=alice.headers),
        api.client.delete(f"/api/v1/files/{uploaded.json()['id']}", headers=alice.headers),
        api.client.post(
            "/api/v1/auth/logout",
            json={"refresh_token": alice.tokens["refresh_token"]},
            headers=alice.headers,
        ),
        api.client.delete(f"/api/v1/users/{alice.id}", headers=admin.headers),
    ]
    for answer in answers:
        assert answer.status_code == 204, answer.text
        assert answer.content == b""
        assert "content-type" not in answer.headers
        assert "content-length" not in answer.headers
