"""HTTP and WebSocket metrics and the access line, as one pure ASGI middleware.

Written here rather than taken from prometheus-fastapi-instrumentator: that package costs
more per request (bench/RESULTS.md), has no exemplars, and reads route paths in a way
that FastAPI's routing changes have broken. Requests are labelled with the route
template (``/api/v1/items/{item_id}``), never the raw path, so a scanner cannot create
series; paths that match no route share the label ``UNMATCHED`` (see routes.py).
Exceptions are counted as 500 and re-raised for the server to log.

Metrics and the access line need the same timing, status and route of each request, so
one layer observes it and feeds both: every ASGI layer costs a coroutine and a wrapped
``send`` per message on every request (bench/RESULTS.md).
"""

import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observability import metrics
from app.observability.access_log import log_request
from app.observability.routes import route_template
from app.observability.tracing import current_span_ids

# Distinct (method, path) pairs remembered per process; beyond that, lookups walk the
# route table as the first request of each pair does.
SERIES_CACHE_SIZE = 4096
_NO_SPAN: dict[str, str] = {}


class _RouteSeries:
    """The HTTP series of one (method, route), updated once per request.

    ``labels()`` is paid once per series, not per request. And the updates go straight to
    the children's value objects — the same objects, locks and multiprocess files that
    ``inc()``/``observe()`` update — because those public methods re-check on every call
    what is settled here once (that the metric is a labelled child), which made up most
    of the metrics' cost per request. tests/test_metrics.py pins the outcome against the
    public methods (counts, sums, bucket boundaries), in case prometheus_client changes.
    """

    def __init__(self, method: str, route: str) -> None:
        self.method, self.route = method, route
        self.in_progress = metrics.HTTP_IN_PROGRESS.labels(method, route)._value.inc
        self.duration = metrics.HTTP_DURATION.labels(method, route)
        self._duration_sum = self.duration._sum.inc
        self._duration_buckets = [bucket.inc for bucket in self.duration._buckets]
        self._bounds = list(self.duration._upper_bounds)
        request_size = metrics.HTTP_REQUEST_SIZE.labels(method, route)
        response_size = metrics.HTTP_RESPONSE_SIZE.labels(method, route)
        self._request_count, self._request_sum = request_size._count.inc, request_size._sum.inc
        self._response_count = response_size._count.inc
        self._response_sum = response_size._sum.inc
        self._requests: dict[int, Callable[[float], None]] = {}

    def finish(
        self,
        status: int,
        seconds: float,
        request_bytes: int,
        response_bytes: int,
        trace_id: str | None,
    ) -> None:
        self.in_progress(-1)
        count = self._requests.get(status)
        if count is None:
            counter = metrics.HTTP_REQUESTS.labels(self.method, self.route, str(status))
            count = self._requests[status] = counter._value.inc
        count(1)
        if trace_id:
            self.duration.observe(seconds, {"trace_id": trace_id})
        else:
            self._duration_sum(seconds)
            # The first bucket whose bound is >= the value, as Histogram.observe picks it.
            self._duration_buckets[bisect_left(self._bounds, seconds)](1)
        self._request_count(1)
        self._request_sum(request_bytes)
        self._response_count(1)
        self._response_sum(response_bytes)


class HttpObservabilityMiddleware:
    """Times each request once, then updates its metrics and writes its access line.

    ``traced``: whether OpenTelemetry is on; only then are trace ids looked up (for
    exemplars and the access line), as there can be no current span otherwise.
    """

    def __init__(self, app: ASGIApp, traced: bool) -> None:
        self.app = app
        self.traced = traced
        self.exemplars = traced and not metrics.multiprocess_enabled()
        self.series: dict[tuple[str, str], _RouteSeries] = {}
        # Also keyed by the request's path: one dict hit instead of a regex walk of the
        # route table on every request. Bounded, since clients choose paths.
        self.by_path: dict[tuple[str, str, str], _RouteSeries] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await (self._websocket if scope["type"] == "websocket" else self.app)(
                scope, receive, send
            )
            return
        series = self.by_path.get((scope["method"], scope["path"], scope.get("root_path", "")))
        if series is None:
            series = self._new_series(scope)
        start = time.perf_counter()
        status = 500
        request_bytes = response_bytes = 0
        series.in_progress(1)

        async def counting_receive() -> Message:
            nonlocal request_bytes
            message = await receive()
            if message["type"] == "http.request":
                request_bytes += len(message.get("body", b""))
            return message

        # A plain function handing back send's awaitable, not a coroutine of its own:
        # one coroutine less per message.
        def counting_send(message: Message) -> Awaitable[None]:
            nonlocal status, response_bytes
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                response_bytes += len(message.get("body", b""))
            return send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            elapsed = time.perf_counter() - start
            span_ids = current_span_ids() if self.traced else _NO_SPAN
            trace_id = span_ids.get("trace_id") if self.exemplars else None
            series.finish(status, elapsed, request_bytes, response_bytes, trace_id)
            log_request(scope, series.route, status, elapsed, span_ids)

    def _new_series(self, scope: Scope) -> _RouteSeries:
        method = scope["method"]
        labels = (method, route_template(scope))
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = _RouteSeries(*labels)
        if len(self.by_path) < SERIES_CACHE_SIZE:
            self.by_path[method, scope["path"], scope.get("root_path", "")] = series
        return series

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
