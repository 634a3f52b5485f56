"""HTTP and WebSocket metrics, as pure ASGI middleware.

Written here rather than taken from prometheus-fastapi-instrumentator: that package costs
more per request (bench/RESULTS.md), has no exemplars, and reads route paths in a way
that FastAPI's routing changes have broken. Requests are labelled with the route
template (``/api/v1/items/{item_id}``), never the raw path, so a scanner cannot create
series; paths that match no route share the label ``UNMATCHED`` (see routes.py).
Exceptions are counted as 500 and re-raised for the server to log.
"""

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observability import metrics
from app.observability.routes import route_template
from app.observability.tracing import current_trace_id


class _RouteSeries:
    """The labelled children of one (method, route): ``labels()`` is the costly part of
    an update, so it is paid once per series, not once per request."""

    def __init__(self, method: str, route: str) -> None:
        self.method, self.route = method, route
        self.in_progress = metrics.HTTP_IN_PROGRESS.labels(method, route)
        self.duration = metrics.HTTP_DURATION.labels(method, route)
        self.request_size = metrics.HTTP_REQUEST_SIZE.labels(method, route)
        self.response_size = metrics.HTTP_RESPONSE_SIZE.labels(method, route)
        self.requests: dict[int, Any] = {}

    def count(self, status: int) -> None:
        counter = self.requests.get(status)
        if counter is None:
            counter = self.requests[status] = metrics.HTTP_REQUESTS.labels(
                self.method, self.route, str(status)
            )
        counter.inc()


class HttpMetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.exemplars = not metrics.multiprocess_enabled()
        self.series: dict[tuple[str, str], _RouteSeries] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = (scope["method"], route_template(scope))
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = _RouteSeries(*key)
        start = time.perf_counter()
        status = 500
        request_bytes = response_bytes = 0
        series.in_progress.inc()

        async def counting_receive() -> Message:
            nonlocal request_bytes
            message = await receive()
            if message["type"] == "http.request":
                request_bytes += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, response_bytes
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                response_bytes += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            series.in_progress.dec()
            elapsed = time.perf_counter() - start
            series.count(status)
            trace_id = current_trace_id() if self.exemplars else None
            series.duration.observe(elapsed, {"trace_id": trace_id} if trace_id else None)
            series.request_size.observe(request_bytes)
            series.response_size.observe(response_bytes)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = route_template(scope)
        accepted = False
        received = sent = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "websocket.receive":
                received += 1
            return message

        async def counting_send(message: Message) -> None:
            nonlocal accepted, sent
            if message["type"] == "websocket.accept":
                accepted = True
                metrics.WEBSOCKET_CONNECTIONS.labels(route).inc()
            elif message["type"] == "websocket.send":
                sent += 1
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            metrics.WEBSOCKET_CONNECTIONS_TOTAL.labels(route).inc()
            if accepted:
                metrics.WEBSOCKET_CONNECTIONS.labels(route).dec()
            metrics.WEBSOCKET_MESSAGES.labels(route, "received").inc(received)
            metrics.WEBSOCKET_MESSAGES.labels(route, "sent").inc(sent)
