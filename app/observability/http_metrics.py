"""HTTP and WebSocket metrics, fed by the service's one HTTP middleware (app/middleware.py).

Written here rather than taken from prometheus-fastapi-instrumentator: that package costs
more per request (bench/RESULTS.md), has no exemplars, and reads route paths in a way
that FastAPI's routing changes have broken. Requests are labelled with the route
template (``/api/v1/items/{item_id}``), never the raw path, so a scanner cannot create
series; paths that match no route share the label ``UNMATCHED`` (see routes.py).
"""

import threading
from bisect import bisect_left
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observability import metrics
from app.observability.routes import route_template

# The methods that get a label of their own; clients choose the method, so any other
# (TRACE, PROPFIND, made-up ones…) shares OTHER, or each would add series on every route.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "OTHER"

# The 5xx statuses the service answers itself, whose series each route creates at 0 with
# its others rather than at its first error: a counter born at 1 shows no increase to
# rate() or increase(), so a rare failure never reached the error panels and ratios. 500
# is an unhandled error, 503 a dependency gone (app/errors.py), one request at a time when
# a connection dies under it. No other 5xx: 502 and 504 are nginx's (its own metrics count
# them), and each status listed is one more series per route.
SERVER_ERRORS = (500, 503)

# Serialises the in-process updates below; one acquisition per request instead of one
# per value.
_LOCK = threading.Lock()


class RouteSeries:
    """The HTTP series of one (method, route): ``start`` and ``finish`` each request.

    ``labels()`` is paid once per series, not per request. And the updates go straight to
    the children's value objects — the objects, files and float values that
    ``inc()``/``observe()`` update — because those public methods re-check on every call
    what is settled here once (that the metric is a labelled child) and take a lock per
    value, which made up most of the metrics' cost per request. tests/test_metrics.py
    pins the outcome against the public methods (counts, sums, bucket boundaries), in
    case prometheus_client changes.
    """

    def __init__(self, method: str, route: str) -> None:
        self.method, self.route = method, route
        self._files = metrics.multiprocess_enabled()
        self._record = _record_to_files if self._files else _record_in_process
        self.in_progress = metrics.HTTP_IN_PROGRESS.labels(method, route)._value
        self.duration = metrics.HTTP_DURATION.labels(method, route)
        self.duration_sum = self.duration._sum
        self._buckets = list(self.duration._buckets)
        self._bounds = list(self.duration._upper_bounds)
        request_size = metrics.HTTP_REQUEST_SIZE.labels(method, route)
        response_size = metrics.HTTP_RESPONSE_SIZE.labels(method, route)
        self.request_count, self.request_sum = request_size._count, request_size._sum
        self.response_count, self.response_sum = response_size._count, response_size._sum
        self._requests: dict[int, Any] = {
            status: metrics.HTTP_REQUESTS.labels(method, route, str(status))._value
            for status in SERVER_ERRORS
        }

    def start(self) -> None:
        if self._files:
            self.in_progress.inc(1)
            return
        with _LOCK:
            self.in_progress._value += 1

    def finish(
        self,
        status: int,
        seconds: float,
        request_bytes: int,
        response_bytes: int,
        trace_id: str | None,
    ) -> None:
        requests = self._requests.get(status)
        if requests is None:
            counter = metrics.HTTP_REQUESTS.labels(self.method, self.route, str(status))
            requests = self._requests[status] = counter._value
        bucket = None
        if trace_id:
            # Exemplars are single-process only: this takes _LOCK like _record_in_process.
            with _LOCK:
                self.duration.observe(seconds, {"trace_id": trace_id})
        else:
            # The first bucket whose bound is >= the value, as Histogram.observe picks it.
            bucket = self._buckets[bisect_left(self._bounds, seconds)]
        self._record(self, requests, bucket, seconds, request_bytes, response_bytes)


# One request's updates, applied together: to plain floats under _LOCK in one process; in
# multiprocess mode each value writes its mmapped file, which only inc() knows how to do.
# ``bucket`` is None when observe() has recorded the duration already (an exemplar).


def _record_in_process(
    series: RouteSeries,
    requests: Any,
    bucket: Any,
    seconds: float,
    request_bytes: int,
    response_bytes: int,
) -> None:
    # The values' own locks are bypassed: these series are written only here, under
    # _LOCK, and a scrape reading a float mid-request is what a lock would give too.
    with _LOCK:
        series.in_progress._value -= 1
        requests._value += 1
        series.request_count._value += 1
        series.request_sum._value += request_bytes
        series.response_count._value += 1
        series.response_sum._value += response_bytes
        if bucket is not None:
            series.duration_sum._value += seconds
            bucket._value += 1


def _record_to_files(
    series: RouteSeries,
    requests: Any,
    bucket: Any,
    seconds: float,
    request_bytes: int,
    response_bytes: int,
) -> None:
    series.in_progress.inc(-1)
    requests.inc(1)
    series.request_count.inc(1)
    series.request_sum.inc(request_bytes)
    series.response_count.inc(1)
    series.response_sum.inc(response_bytes)
    if bucket is not None:
        series.duration_sum.inc(seconds)
        bucket.inc(1)


class SeriesLookup:
    """The RouteSeries of a request, by method and route template: ``labels()`` is paid
    once per series. HttpMiddleware remembers each path's series, so this runs once per
    (method, path), not per request."""

    def __init__(self) -> None:
        self.by_labels: dict[tuple[str, str], RouteSeries] = {}

    def __call__(self, scope: Scope) -> RouteSeries:
        method = scope["method"]
        labels = (method if method in METHODS else OTHER_METHOD, route_template(scope))
        series = self.by_labels.get(labels)
        if series is None:
            series = self.by_labels[labels] = RouteSeries(*labels)
        return series


async def observe_websocket(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run a websocket session, counting its connection and messages by route as they
    happen: a session that lasts hours shows in the counters while it lasts, and what a
    worker counted is not lost with it when it is killed. A connection counts when its
    handshake reaches the app (accepted or refused), a message it sends once the send
    has succeeded."""
    route = route_template(scope)
    # Bound once per session, not per message.
    active = metrics.WEBSOCKET_CONNECTIONS.labels(route)
    received = metrics.WEBSOCKET_MESSAGES.labels(route, "received")
    sent = metrics.WEBSOCKET_MESSAGES.labels(route, "sent")
    accepted = False

    async def counting_receive() -> Message:
        message = await receive()
        if message["type"] == "websocket.receive":
            received.inc()
        return message

    async def counting_send(message: Message) -> None:
        nonlocal accepted
        await send(message)
        if message["type"] == "websocket.send":
            sent.inc()
        elif message["type"] == "websocket.accept":
            accepted = True
            active.inc()

    metrics.WEBSOCKET_CONNECTIONS_TOTAL.labels(route).inc()
    try:
        await app(scope, counting_receive, counting_send)
    finally:
        if accepted:
            active.dec()
