"""The shipped nginx templates, rendered as the native stack renders them (and as the nginx
image's entrypoint does for compose), are accepted by the real `nginx -t`."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import pytest

from app.errors import problem_response
from app.middleware import SECURITY_HEADERS
from deploy.stack.nginx import NginxServer
from deploy.stack.process import free_port, wait_for
from tests.api import assert_problem
from tests.edge import FakeDns, echo_api, hang_up_api

ROOT = Path(__file__).resolve().parents[1]


def rendered(server: NginxServer) -> str:
    return "\n".join(p.read_text() for p in sorted(server.conf_dir.rglob("*.conf")))


def test_nginx_accepts_the_rendered_configuration(tmp_path: Path) -> None:
    server = NginxServer(tmp_path / "nginx", upstream="127.0.0.1:8000")
    server.write_config()
    report = server.check_config()
    assert "test is successful" in report
    text = rendered(server)
    assert "${" not in text  # every template variable has a value
    assert "server_tokens off;" in text


def test_nginx_t_really_reads_the_files(tmp_path: Path) -> None:
    server = NginxServer(tmp_path / "nginx", upstream="127.0.0.1:8000")
    server.write_config()
    site = server.conf_dir / "sites" / "api.conf"
    site.write_text(
        site.read_text().replace("proxy_request_buffering off;", "proxy_request_buffering maybe;")
    )
    # check_config renders again from the templates, so run nginx -t on the broken copy here.

    result = subprocess.run(server._nginx("-t"), capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "proxy_request_buffering" in result.stderr


@pytest.mark.parametrize("cap", [1024 * 1024, 10 * 1024 * 1024])
def test_upload_body_limits_follow_the_apps_cap(tmp_path: Path, cap: int) -> None:
    server = NginxServer(
        tmp_path / "nginx", upstream="127.0.0.1:8000", env={"APP_MAX_UPLOAD_BYTES": str(cap)}
    )
    server.write_config()
    site = (server.conf_dir / "sites" / "api.conf").read_text()
    limits = re.findall(r"client_max_body_size (\d+);", site)
    # Any other body: the app's default cap; one file plus multipart framing; a batch of
    # APP_MAX_BATCH_FILES (10) of those.
    assert limits == ["1048576", str(cap + 65536), str((cap + 65536) * 10)]


def test_json_bodies_are_refused_at_the_apps_cap(tmp_path: Path) -> None:
    port = free_port()
    nginx = NginxServer(
        tmp_path / "nginx",
        upstream=f"127.0.0.1:{port}",
        env={"APP_MAX_REQUEST_BODY_BYTES": "4096"},
    )
    with (
        echo_api("127.0.0.1", port),
        nginx,
        httpx2.Client(base_url=nginx.url, trust_env=False, timeout=10) as client,
    ):
        at_cap = client.post("/api/v1/items", content=b"x" * 4096)
        over = client.post("/api/v1/items", content=b"x" * 4097)
    assert at_cap.status_code == 200  # reached the api, which judges it
    body = assert_problem(over, 413)
    assert "larger than this endpoint accepts" in body["detail"]


def test_nginx_problems_are_titled_as_the_apps() -> None:
    """A client reads one problem shape whoever answers: nginx's own answers carry the status
    of their status line and the title the app gives it (RFC 9110's names)."""
    template = (ROOT / "nginx" / "templates" / "snippets" / "problems.conf.template").read_text()
    answers = re.findall(r"return (\d{3}) '(\{.*\})';", template)
    assert {status for status, _ in answers} >= {"404", "413", "429", "502", "503", "504"}
    scope = {"type": "http", "state": {}}
    for status, body in answers:
        problem = json.loads(body.replace("$edge_request_id", "id"))
        app_title = json.loads(problem_response(scope, int(status)).body)["title"]
        assert (problem["status"], problem["title"]) == (int(status), app_title), status


class ImpatientNginx(NginxServer):
    """The shipped configuration with the JSON API's 30 s read timeout cut to 1 s."""

    def write_config(self) -> Path:
        conf = super().write_config()
        site = self.conf_dir / "sites" / "api.conf"
        site.write_text(
            site.read_text().replace("proxy_read_timeout 30s;", "proxy_read_timeout 1s;")
        )
        return conf


def test_gateway_errors_say_their_own_status_and_invite_only_safe_retries(tmp_path: Path) -> None:
    port = free_port()
    nginx = ImpatientNginx(tmp_path / "nginx", upstream=f"127.0.0.1:{port}")
    with nginx, httpx2.Client(base_url=nginx.url, trust_env=False, timeout=10) as client:
        # Nothing listens: the request never reached the api, trying again is safe.
        refused = client.post("/api/v1/items", json={})
        assert_problem(refused, 502)
        assert refused.json()["title"] == "Bad Gateway"
        assert refused.headers["retry-after"] == "5"
        for name, value in SECURITY_HEADERS:  # the app's, all of them
            assert refused.headers[name.decode()] == value.decode()
        # The api read the request and hung up: it may have acted on it.
        with hang_up_api("127.0.0.1", port):
            cut = client.post("/api/v1/items", json={})
        assert_problem(cut, 502)
        assert "retry-after" not in cut.headers
        # Too slow: the POST may have been carried out, so no invitation to repeat it.
        with echo_api("127.0.0.1", port):
            late = client.post("/api/v1/items", json={}, headers={"X-Test-Delay": "3"})
        assert_problem(late, 504)
        assert late.json()["title"] == "Gateway Timeout"
        assert "retry-after" not in late.headers
        assert late.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("resolver", ["", "127.0.0.11"])
def test_nginx_accepts_both_ways_of_finding_the_api(tmp_path: Path, resolver: str) -> None:
    server = NginxServer(
        tmp_path / "nginx", upstream="127.0.0.1:8000", env={"NGINX_RESOLVER": resolver}
    )
    server.write_config()
    assert "test is successful" in server.check_config()
    nginx_conf = (server.conf_dir / "nginx.conf").read_text()
    mode = "resolve" if resolver else "static"
    assert f"include upstream/{mode}.conf;" in nginx_conf


def test_a_recreated_or_scaled_api_is_found_without_restarting_nginx(tmp_path: Path) -> None:
    """What `docker compose up -d` (the api recreated at a new address) and `--scale api=2`
    do to the name nginx proxies to, played with a DNS server whose answers change."""
    port = free_port()
    with FakeDns({"api": ["127.0.0.1"]}) as dns, echo_api("127.0.0.1", port):
        nginx = NginxServer(
            tmp_path / "nginx",
            upstream=f"api:{port}",
            env={"NGINX_RESOLVER": f"127.0.0.1:{dns.port}", "NGINX_RESOLVER_VALID": "1s"},
        )
        with nginx, httpx2.Client(base_url=nginx.url, trust_env=False, timeout=10) as client:

            def answered_by() -> str:
                response = client.get("/api/v1/items")
                return str(response.json()["server"]) if response.status_code == 200 else ""

            assert answered_by() == "127.0.0.1"
            with echo_api("127.0.0.2", port), echo_api("127.0.0.3", port):
                dns.records["api"] = ["127.0.0.2"]
                wait_for(lambda: answered_by() == "127.0.0.2", timeout=30, what="the new api")
                dns.records["api"] = ["127.0.0.2", "127.0.0.3"]
                seen: set[str] = set()
                wait_for(
                    lambda: seen.add(answered_by()) or {"127.0.0.2", "127.0.0.3"} <= seen,
                    timeout=30,
                    what="both replicas to get requests",
                )


@pytest.mark.parametrize("resolver", [False, True])
def test_connections_to_the_api_are_kept_alive_only_without_a_resolver(
    tmp_path: Path, resolver: bool
) -> None:
    """What the README says each way of finding the api costs: a looked-up-once upstream
    reuses its connections; a name looked up again (compose) opens one per request."""
    port = free_port()
    with FakeDns({"api": ["127.0.0.1"]}) as dns, echo_api("127.0.0.1", port) as api:
        env = {"NGINX_RESOLVER": f"127.0.0.1:{dns.port}"} if resolver else {}
        upstream = f"api:{port}" if resolver else f"127.0.0.1:{port}"
        nginx = NginxServer(tmp_path / "nginx", upstream=upstream, env=env)
        with nginx, httpx2.Client(base_url=nginx.url, trust_env=False, timeout=10) as client:
            for _ in range(20):
                assert client.get("/api/v1/items").status_code == 200
        opened = len(api.connections)  # type: ignore[attr-defined]
    assert opened == 20 if resolver else opened <= 2


@pytest.mark.parametrize("trusted", ["127.0.0.1", ""])
def test_clients_behind_a_trusted_load_balancer_get_their_own_budgets(
    tmp_path: Path, trusted: str
) -> None:
    """The test client plays a TLS-terminating load balancer at 127.0.0.1 that forwards two
    clients' logins; a client address gets one request a minute and a burst of one more."""
    port = free_port()
    nginx = NginxServer(
        tmp_path / "nginx",
        upstream=f"127.0.0.1:{port}",
        env={"NGINX_TRUSTED_PROXIES": trusted, "NGINX_EDGE_RATE": "1r/m", "NGINX_EDGE_BURST": "1"},
    )
    with echo_api("127.0.0.1", port), nginx:
        with httpx2.Client(base_url=nginx.url, trust_env=False, timeout=10) as client:

            def login(client_address: str) -> httpx2.Response:
                return client.post(
                    "/api/v1/auth/token",
                    data={"username": "someone", "password": "wrong"},
                    headers={"X-Forwarded-For": client_address, "X-Forwarded-Proto": "https"},
                )

            answers = [login(a) for a in ("198.51.100.1", "198.51.100.2") + ("198.51.100.1",) * 2]
        statuses = [r.status_code for r in answers]
        seen = answers[0].json()["headers"]
        if trusted:
            # Each client its own bucket; the app is told who the client is and its scheme.
            assert statuses == [200, 200, 200, 429]
            assert (seen["x-forwarded-for"], seen["x-forwarded-proto"]) == ("198.51.100.1", "https")
        else:
            # Nobody is trusted: the addresses are forged, every request is the peer's.
            assert statuses == [200, 200, 429, 429]
            assert (seen["x-forwarded-for"], seen["x-forwarded-proto"]) == ("127.0.0.1", "http")
        assert_problem(answers[-1], 429)
        logged = [json.loads(line) for line in nginx.access_log.read_text().splitlines()]
        expected = "198.51.100.1" if trusted else "127.0.0.1"
        assert logged[0]["client_ip"] == expected


def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes (what no HTTP client library would send); the status, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


MALFORMED = {
    "header line": (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400),
    "request line": (b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "TLS on the plain port": (b"\x16\x03\x01\x00\x05hello\r\n\r\n", 400),
    "TRACE": (b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "URI": (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    "header": (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    "cookies": (
        b"GET / HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"Cookie: c%d=%s\r\n" % (n, b"a" * 4000) for n in range(10))
        + b"\r\n",
        431,
    ),
    "transfer coding": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    "HTTP version": (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
}


@pytest.fixture(scope="module")
def lone_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxServer]:
    """nginx with nothing behind it: the answers below never reach the api."""
    with NginxServer(tmp_path_factory.mktemp("edge"), upstream=f"127.0.0.1:{free_port()}") as nginx:
        yield nginx


@pytest.mark.parametrize("case", MALFORMED)
def test_requests_nginx_refuses_get_problems_with_the_request_id(
    lone_edge: NginxServer, case: str
) -> None:
    request, status = MALFORMED[case]
    answered, headers, body = exchange(lone_edge.port, request)
    assert answered == status
    assert headers["content-type"] == "application/problem+json"
    problem = json.loads(body)
    assert (problem["status"], problem["request_id"]) == (status, headers["x-request-id"])
    # The app's security headers, all of them, as on the app's own answers.
    assert {
        name.decode(): value.decode() for name, value in SECURITY_HEADERS
    }.items() <= headers.items()
    if status == 405:
        assert "GET" in headers["allow"]


def slow_download(port: int, path: str, size: int, wait: Callable[[], None]) -> int:
    """GET `path` (a response of `size` bytes and more) as a client that reads nothing until
    `wait()` returns, then everything; the number of bytes received."""
    with socket.socket() as connection:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        connection.settimeout(30)
        connection.connect(("127.0.0.1", port))
        connection.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Test-Padding: {size}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        wait()
        received = 0
        while chunk := connection.recv(1 << 20):
            received += len(chunk)
    return received


def test_a_slow_download_is_not_spooled_to_a_temp_file(tmp_path: Path) -> None:
    """Under compose nginx's run directory is a tmpfs, memory: a stored file (up to
    APP_MAX_UPLOAD_BYTES) is handed on as the client reads it, never copied there whole."""
    port = free_port()
    size = 8 * 1024 * 1024
    spooled = "an upstream response is buffered to a temporary file"
    with (
        echo_api("127.0.0.1", port),
        NginxServer(tmp_path / "nginx", upstream=f"127.0.0.1:{port}") as nginx,
    ):
        proxy_temp = nginx.run_dir / "proxy"
        received = slow_download(
            nginx.port, "/api/v1/files/7/content", size, lambda: time.sleep(1.5)
        )
        assert received > size
        assert spooled not in nginx.log_path.read_text()
        assert not [p for p in proxy_temp.rglob("*") if p.is_file()]

        # Elsewhere (small JSON answers) nginx does spool, which the check above would see.
        def wait_for_spooling() -> None:
            wait_for(lambda: spooled in nginx.log_path.read_text(), timeout=10, what="spooling")

        assert slow_download(nginx.port, "/api/v1/items", size, wait_for_spooling) > size
