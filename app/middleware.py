"""The service's HTTP middleware: one pure ASGI layer around every request and websocket.

It refuses untrusted hosts, gives every request an id (the client's when sane), adds the
id and the security headers to every response, feeds the HTTP metrics and writes the
access line. Pure ASGI rather than ``BaseHTTPMiddleware``: measured here the latter costs
~180 µs per request, breaks contextvars and buffers streaming responses. One layer rather
than one per concern: every layer costs a coroutine and a wrapped ``send`` per message on
every request, and these concerns read the same request, amend the same response start
and need the same status and timing (bench/RESULTS.md). Each concern keeps its own
helper: the edge policy below, the metrics in observability/http_metrics.py, the access
line in observability/access_log.py. Exceptions are counted as 500, logged with the
request's context (which is gone by the time the server logs them) and re-raised; a
request the server cancels on shutdown is answered a 503 its client may retry (counted a
503 with a warning if its response had started and is cut short), a socket closed with 1012.
"""

import asyncio
import contextlib
import random
import re
import time
from collections.abc import Awaitable, Iterable
from contextvars import Token
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import CLIENT_CLOSED_REQUEST, problem_response, shutting_down
from app.observability.access_log import level_of, log_request
from app.observability.http_metrics import RouteSeries, SeriesLookup, observe_websocket
from app.observability.logging import (
    log_cut_short,
    log_unhandled,
    note_handshake_refused,
    request_id_var,
)
from app.observability.metrics import multiprocess_enabled
from app.observability.routes import app_path, route_template
from app.observability.tracing import current_span_ids, is_sampled

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_NAME = b"x-request-id"
# Echo only ids that are safe to put in logs and headers; anything else is replaced.
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")

# Baseline browser hardening for an API.
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
_CACHE_CONTROL = b"cache-control"
# The Cache-Control of every response under these paths, replacing the app's own. Tokens
# and accounts are never stored. A user's files may be kept by their own browser but never
# by a shared cache, and are checked each time (their ETag makes that a 304): without it a
# browser could go on showing a deleted file from its heuristic cache. A probe's answer is
# only true when given: a cached "ok" would hide an outage from a load balancer.
CACHE_POLICIES = (
    (("/api/v1/auth", "/api/v1/users", "/health/"), (_CACHE_CONTROL, b"no-store")),
    (("/api/v1/files",), (_CACHE_CONTROL, b"private, no-cache")),
)
# Asked for by address, not by the public name: the image's HEALTHCHECK
# (127.0.0.1:8000), kubelet probes (the pod's IP) and Prometheus (the instance's
# address). APP_ALLOWED_HOSTS does not apply to them, or setting it would mark every
# instance unhealthy and unscraped; their answers name no host (/metrics has its own
# network allow-list).
ANY_HOST_PATHS = frozenset({"/health/live", "/health/ready", "/metrics"})
# Where bodies are streamed, and capped, by the routes themselves (uploads): elsewhere they
# are read whole before validation, so HttpMiddleware caps them.
STREAMED_BODY_PREFIXES = ("/api/v1/files",)
# Response headers that, when the app set them, the merge must look at one by one.
_MERGED = frozenset({name for name, _ in SECURITY_HEADERS} | {_REQUEST_ID_NAME, _CACHE_CONTROL})
_NO_SPAN: dict[str, str] = {}
# Where HttpMiddleware keeps the method the client sent when it hands a HEAD to the routes
# as a GET (see client_method).
_CLIENT_METHOD = "app.client_method"
# The message a route sends (client_left) when its client went away mid-response: the
# middleware records it and never passes it on.
_CLIENT_LEFT = "app.client_left"
# Distinct (method, path) pairs whose RequestPlan is remembered per process; beyond that,
# it is worked out on each request, as for the first request of each pair.
PLAN_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """What HttpMiddleware does with a request that depends on its method and path alone:
    worked out once per (method, path), as that costs a walk of the route table."""

    series: RouteSeries
    cache_control: tuple[bytes, bytes] | None  # forced on the response (CACHE_POLICIES)
    max_body: int | None  # None where the routes cap bodies themselves
    log_level: str
    hosts: "HostPolicy"  # the Host headers accepted (ANY_HOST_PATHS or APP_ALLOWED_HOSTS)


class HttpMiddleware:
    """The edge policy, metrics and access line of every request (see the module).

    ``traced``: whether OpenTelemetry is on; only then are trace ids looked up (for
    exemplars and the access line), as there can be no current span otherwise.
    ``max_body_bytes``: the largest request body outside STREAMED_BODY_PREFIXES; a larger
    one is refused (413) as soon as it is passed, before the app holds it all.
    """

    def __init__(
        self, app: ASGIApp, allowed_hosts: Iterable[str], traced: bool, max_body_bytes: int
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.hosts = HostPolicy(allowed_hosts)
        self.any_host = HostPolicy(["*"])
        self.series = SeriesLookup()
        self.plans: dict[tuple[str, str, str], RequestPlan] = {}
        self.traced = traced
        self.exemplars = traced and not multiprocess_enabled()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await (self._websocket if scope["type"] == "websocket" else self.app)(
                scope, receive, send
            )
            return
        client_request_id, hosts = _edge_headers(scope["headers"])
        request_id, token = _bind_request_id(scope, client_request_id)
        id_header = (_REQUEST_ID_NAME, request_id.encode())
        key = (scope["method"], scope["path"], scope.get("root_path", ""))
        plan = self.plans.get(key) or self._plan(scope, key)
        cache_control, max_body, series = plan.cache_control, plan.max_body, plan.series
        series.start()
        start = time.perf_counter()
        status = 500
        request_bytes = response_bytes = 0
        body_read = started = False

        async def counting_receive() -> Message:
            nonlocal request_bytes, body_read
            message = await receive()
            if message["type"] == "http.request":
                body_read = not message.get("more_body", False)
                body = message.get("body", b"")
                if body and not request_bytes:  # the body's first bytes
                    refuse_content_coding(scope["headers"])
                request_bytes += len(body)
                if max_body is not None and request_bytes > max_body:
                    # An HTTPException: FastAPI turns other errors of a body read into 400s.
                    raise HTTPException(413, "The request body is too large.")
            return message

        # A plain function handing back send's awaitable, not a coroutine of its own:
        # one coroutine less per message.
        def observed_send(message: Message) -> Awaitable[None]:
            nonlocal status, started, response_bytes
            if message["type"] == "http.response.body":
                response_bytes += len(message.get("body", b""))
            elif message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = response_headers(message.get("headers", ()), id_header, cache_control)
                if status >= 400 and not body_read and declares_body(scope["headers"]):
                    headers = closing(headers)
                message["headers"] = headers
            elif message["type"] == _CLIENT_LEFT:  # checked only past the usual messages
                status = CLIENT_CLOSED_REQUEST
                return _noted()
            return send(message)

        try:
            if plan.hosts.allows(hosts):
                # HEAD is GET without the body (RFC 9110 section 9.3.2), which the server
                # drops; FastAPI routes only take the methods they list.
                app_scope = scope
                if scope["method"] == "HEAD":
                    app_scope = {**scope, "method": "GET", _CLIENT_METHOD: "HEAD"}
                await self.app(app_scope, counting_receive, observed_send)
            else:
                response = problem_response(scope, 400, "Invalid host header.")
                await response(scope, receive, observed_send)
        except asyncio.CancelledError as exc:
            # The server cancels what still runs when its graceful shutdown runs out (a
            # deploy, a recycle), and would answer a plain-text 500 and log an error. The
            # client did nothing wrong and the service is not failing: a 503 tells it to
            # retry. Nothing above this layer waits on the cancellation; the request ends.
            if started:
                # Too late for that: the client gets a cut-off body (the server closes the
                # connection). Counted as the 503 it would have been told, not as the 2xx
                # that started, and noted as a warning rather than the server's traceback.
                status = 503
                log_cut_short(exc)
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            await shutting_down(scope)(scope, receive, observed_send)
        except Exception as exc:
            # Also after the response started: its client got a cut-off body, not a 2xx.
            status = 500
            log_unhandled(exc)
            raise
        finally:
            elapsed = time.perf_counter() - start
            span_ids = current_span_ids() if self.traced else _NO_SPAN
            trace_id = span_ids.get("trace_id") if self.exemplars and is_sampled() else None
            # The server drops a HEAD response's body: none of it was sent.
            sent = 0 if scope["method"] == "HEAD" else response_bytes
            series.finish(status, elapsed, request_bytes, sent, trace_id)
            log_request(scope, plan.log_level, series.route, status, elapsed, span_ids)
            request_id_var.reset(token)

    def _plan(self, scope: Scope, key: tuple[str, str, str]) -> RequestPlan:
        path = app_path(scope)
        plan = RequestPlan(
            series=self.series(scope),
            cache_control=next(
                (header for prefixes, header in CACHE_POLICIES if path.startswith(prefixes)), None
            ),
            max_body=None if path.startswith(STREAMED_BODY_PREFIXES) else self.max_body_bytes,
            log_level=level_of(path),
            hosts=self.any_host if path in ANY_HOST_PATHS else self.hosts,
        )
        if len(self.plans) < PLAN_CACHE_SIZE:  # clients choose paths and methods
            self.plans[key] = plan
        return plan

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A socket gets the access line of its handshake too, written when it closes:
        101 accepted, 403 refused (the server answers a close before accept so), 500 if
        the app failed first, 499 if the client left first. The server's own lines for
        sockets are dropped (logging.py): they carry the query string."""
        client_request_id, hosts = _edge_headers(scope["headers"])
        request_id, token = _bind_request_id(scope, client_request_id)
        id_header = (_REQUEST_ID_NAME, request_id.encode())
        start = time.perf_counter()
        status: int | None = None

        def observed_send(message: Message) -> Awaitable[None]:
            nonlocal status
            if status is None:
                kind = message["type"]
                if kind == "websocket.accept":
                    status = 101
                    message["headers"] = [*message.get("headers", ()), id_header]
                elif kind == "websocket.close":
                    status = 403
                elif kind == "websocket.http.response.start":
                    status = message["status"]
                    note_handshake_refused()
            return send(message)

        try:
            app = self.app if self.hosts.allows(hosts) else _refuse_websocket
            await observe_websocket(app, scope, receive, observed_send)
        except asyncio.CancelledError:
            # As for a request (see __call__): the server's shutdown cancels the sockets
            # whose handlers did not end on its 1012 in time, and would log a traceback each.
            # Such a socket is closed as a restart, which clients reconnect after.
            if status != 101:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            with contextlib.suppress(Exception):  # the server may have closed it already
                await send({"type": "websocket.close", "code": 1012})
        except BaseException as exc:
            status = status or 500
            if isinstance(exc, Exception):
                log_unhandled(exc)
            raise
        finally:
            span_ids = current_span_ids() if self.traced else _NO_SPAN
            seconds = time.perf_counter() - start
            level = level_of(app_path(scope))
            log_request(scope, level, route_template(scope), status or 499, seconds, span_ids)
            request_id_var.reset(token)


def client_method(scope: Scope) -> str:
    """The request's method as the client sent it: a route sees a HEAD as a GET, but a
    response that would read its body only to have the server drop it (a file) should
    not read it."""
    return scope.get(_CLIENT_METHOD) or scope["method"]


async def client_left(send: Send) -> None:
    """Tell HttpMiddleware that the client went away before the response was all sent:
    the request is counted and logged as a 499, not as the 2xx whose start it was sent.
    uvicorn's send returns quietly once the client is gone, so only the route can tell."""
    await send({"type": _CLIENT_LEFT})


async def _noted() -> None:
    """What observed_send hands back for a message it keeps rather than sends."""


async def _refuse_websocket(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "websocket.close", "code": 1008})


def _edge_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes | None, list[bytes]]:
    """The client's first X-Request-ID and every Host header, in one pass over the headers."""
    request_id = None
    hosts = []
    for name, value in headers:
        if name == b"host":
            hosts.append(value)
        elif name == _REQUEST_ID_NAME and request_id is None:
            request_id = value
    return request_id, hosts


def _bind_request_id(scope: Scope, client_request_id: bytes | None) -> tuple[str, Token[str]]:
    """Give the request (or websocket) its id: in its state, and in the logging context so
    that every log line of it carries the id (reset with the token when it ends)."""
    request_id = choose_request_id(client_request_id)
    scope.setdefault("state", {})["request_id"] = request_id
    return request_id, request_id_var.set(request_id)


def choose_request_id(client_request_id: bytes | None) -> str:
    """The client's X-Request-ID when it is safe to log and echo, else a new random id."""
    if client_request_id is not None and _SANE_REQUEST_ID.fullmatch(client_request_id):
        return client_request_id.decode("ascii")
    # Not os.urandom: a syscall per request for an id that only has to be unique (the
    # random module reseeds in forked workers, so they do not repeat each other).
    return f"{random.getrandbits(128):032x}"


def declares_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the request's headers announce a body (RFC 9112 section 6.3)."""
    return any(
        (name == b"content-length" and value.strip() != b"0") or name == b"transfer-encoding"
        for name, value in headers
    )


def closing(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` with ``Connection: close``: a refusal sent before the request's body
    was read. Kept alive, the connection would make the server read and discard the rest
    of the body (a declared terabyte, or a chunked body that never ends) before the
    client's next request; closed, the client learns at once, and the server reads no
    more. The server closes the connection after a response that says so."""
    return [header for header in headers if header[0] != b"connection"] + [
        (b"connection", b"close")
    ]


def refuse_content_coding(headers: Iterable[tuple[bytes, bytes]]) -> None:
    """A 415 for a body sent compressed (RFC 9110 section 8.4.1): read as it is, gzip
    bytes would be stored as an upload's content or fail as bad JSON."""
    for name, value in headers:
        if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            raise HTTPException(
                415,
                "Request bodies are accepted without a Content-Encoding.",
                # What would have been accepted (RFC 9110 section 15.5.16).
                headers={"Accept-Encoding": "identity"},
            )


def response_headers(
    headers: Iterable[tuple[bytes, bytes]],
    id_header: tuple[bytes, bytes],
    cache_control: tuple[bytes, bytes] | None,
) -> list[tuple[bytes, bytes]]:
    """The response's headers plus the security headers it lacks, ``cache_control``
    instead of its own Cache-Control where given, and the request id unless it has one
    already (problem responses do: 500s are rendered outside this middleware)."""
    # Raw header lists, not MutableHeaders: this runs on every response. Names are
    # lowercase, as ASGI requires of applications.
    result = list(headers)
    for name, _ in result:
        if name in _MERGED:
            break
    else:  # the usual case: nothing of ours to keep or replace
        result += SECURITY_HEADERS
        if cache_control:
            result.append(cache_control)
        result.append(id_header)
        return result
    present = _MERGED.intersection([name for name, _ in result])
    result += [header for header in SECURITY_HEADERS if header[0] not in present]
    if cache_control:
        result = [header for header in result if header[0] != _CACHE_CONTROL]
        result.append(cache_control)
    if _REQUEST_ID_NAME not in present:
        result.append(id_header)
    return result


class HostPolicy:
    """Which Host headers are accepted: exact names or ``*.example.com`` wildcards; ``*``
    allows any host. Never two Host headers. Refused requests get problem+json like every
    other error."""

    def __init__(self, allowed_hosts: Iterable[str]) -> None:
        self.allowed = [host.lower() for host in allowed_hosts]
        self.allow_any = "*" in self.allowed

    def allows(self, hosts: list[bytes]) -> bool:
        """``hosts``: the request's Host headers."""
        if len(hosts) > 1:  # RFC 9112 section 3.2: a 400, whichever host is allowed
            return False
        if self.allow_any:
            return True
        header = hosts[0].decode("latin-1").strip().lower() if hosts else ""
        if not _HOST_HEADER.fullmatch(header):
            return False
        host = _hostname(header)
        return any(
            host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:]))
            for pattern in self.allowed
        )


# A name or an IP literal, and a port: nothing else may reach the patterns, which compare
# ends ("evil.com/.example.com" ends with ".example.com" too).
_HOST_HEADER = re.compile(r"(?:\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::[0-9]{1,5})?")


def _hostname(host_header: str) -> str:
    """The host without its port; IPv6 literals keep their brackets."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host
