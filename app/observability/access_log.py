"""One structured access line per request.

It replaces uvicorn's and gunicorn's access logs (disabled in logging.py) because it
knows what they do not: the route template, the request id, the user and the trace.
Probe and scrape requests are logged at DEBUG so they do not drown the rest.

A function, not a middleware of its own: HttpMiddleware (app/middleware.py)
times each request once for the metrics and this line, so the line costs no ASGI layer.
"""

from starlette.types import Scope

from app.observability.logging import is_enabled, write_line

LOGGER = "app.access"
QUIET_PATHS = frozenset({"/health/live", "/health/ready", "/metrics"})


def log_request(
    scope: Scope, route: str, status: int, seconds: float, span_ids: dict[str, str]
) -> None:
    path = scope["path"]
    level = "debug" if path in QUIET_PATHS else "info"
    if not is_enabled(level):
        return
    method = scope["method"]
    client = scope.get("client")
    client_ip = client[0] if client else None
    state = scope.get("state") or {}
    request_id = state.get("request_id")
    event = {
        "event": "request",
        "method": method,
        "route": route,
        "path": path,
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
        "client_ip": client_ip,
        "user_id": state.get("user_id"),
    }
    if request_id is not None:
        event["request_id"] = request_id
    if span_ids:
        event.update(span_ids)
    write_line(
        LOGGER,
        level,
        event,
        untrusted=f"{method}\0{route}\0{path}\0{client_ip}\0{request_id}",
    )
