"""One structured access line per request, and per websocket (its handshake's status).

It replaces uvicorn's and gunicorn's access logs (disabled in logging.py) because it
knows what they do not: the route template, the request id, the user and the trace.
Probe and scrape requests are logged at DEBUG so they do not drown the rest.

A function, not a middleware of its own: HttpMiddleware (app/middleware.py) times each
request once for the metrics and this line, so the line costs no ASGI layer.
"""

import time
from functools import partial

from starlette.types import Scope

from app.observability.logging import hold_line, is_enabled, render_line

LOGGER = "app.access"
QUIET_PATHS = frozenset({"/health/live", "/health/ready", "/metrics"})


def level_of(path: str) -> str:
    """The level of the access lines of ``path`` (the path within the app)."""
    return "debug" if path in QUIET_PATHS else "info"


def log_request(
    scope: Scope, level: str, route: str, status: int, seconds: float, span_ids: dict[str, str]
) -> None:
    """Queue the access line of a finished request (``level``: its path's ``level_of``):
    only what it needs is taken here; it is rendered later, with others (log_output.py)."""
    if not is_enabled(level):
        return
    client = scope.get("client")
    state = scope.get("state") or {}
    hold_line(
        partial(
            _line,
            time.time(),
            level,
            scope.get("method", "GET"),  # a websocket's handshake is a GET
            route,
            scope["path"],
            status,
            seconds,
            client[0] if client else None,
            state.get("user_id"),
            state.get("request_id"),
            span_ids,
        )
    )


def _line(
    timestamp: float,
    level: str,
    method: str,
    route: str,
    path: str,
    status: int,
    seconds: float,
    client_ip: str | None,
    user_id: int | None,
    request_id: str | None,
    span_ids: dict[str, str],
) -> bytes:
    event = {
        "event": "request",
        "method": method,
        "route": route,
        "path": path,
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
        "client_ip": client_ip,
        "user_id": user_id,
    }
    if request_id is not None:
        event["request_id"] = request_id
    if span_ids:
        event.update(span_ids)
    return render_line(
        LOGGER,
        level,
        event,
        untrusted=f"{method}\0{route}\0{path}\0{client_ip}\0{request_id}",
        timestamp=timestamp,
    )
