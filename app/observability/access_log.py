"""One structured access line per request, as pure ASGI middleware.

It replaces uvicorn's and gunicorn's access logs (disabled in logging.py) because it
knows what they do not: the route template, the request id, the user and the trace.
Probe and scrape requests are logged at DEBUG so they do not drown the rest.
"""

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observability.logging import get_logger
from app.observability.routes import route_template

logger = get_logger("app.access")
QUIET_PATHS = frozenset({"/health/live", "/health/ready", "/metrics"})


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            client = scope.get("client")
            log = logger.debug if scope["path"] in QUIET_PATHS else logger.info
            log(
                "request",
                method=scope["method"],
                route=route_template(scope),
                path=scope["path"],
                status=status,
                duration_ms=round((time.perf_counter() - start) * 1000, 3),
                client_ip=client[0] if client else None,
                user_id=scope.get("state", {}).get("user_id"),
            )
