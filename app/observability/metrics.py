"""Every Prometheus metric the service exports, in one catalogue.

Dashboards and alerts are written against these names, so they are defined once here
and imported where the code lives. Gauges always name their ``multiprocess_mode``:
under gunicorn each worker writes its own file and the mode decides how the files are
combined at scrape time (prometheus_client multiprocess mode).

Label values are bounded: routes are templates, outcomes and reasons are fixed sets.
"""

import os

from prometheus_client import Counter, Gauge, Histogram, Summary, disable_created_metrics

# prometheus_client writes a file there as soon as a metric exists; a fresh tmpfs (or a
# one-off `python -m app migrate` in the container) may not have the directory yet.
if _multiproc_dir := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(_multiproc_dir, exist_ok=True)

# The *_created series double every counter's output and no dashboard here uses them.
disable_created_metrics()

# Around a 250 ms latency objective: fine resolution below it, coarse above.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


# HTTP, from app.observability.http_metrics.
HTTP_REQUESTS = Counter(
    "http_requests_total", "HTTP requests handled.", ["method", "route", "status"]
)
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time from the request's arrival to the end of its response.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
HTTP_IN_PROGRESS = Gauge(
    "http_requests_in_progress",
    "HTTP requests being handled now.",
    ["method", "route"],
    multiprocess_mode="livesum",
)
HTTP_REQUEST_SIZE = Summary("http_request_size_bytes", "Request body sizes.", ["method", "route"])
HTTP_RESPONSE_SIZE = Summary(
    "http_response_size_bytes", "Response body sizes.", ["method", "route"]
)

# WebSockets, counted by the same middleware.
WEBSOCKET_CONNECTIONS = Gauge(
    "websocket_connections_active",
    "Open WebSocket connections.",
    ["route"],
    multiprocess_mode="livesum",
)
WEBSOCKET_CONNECTIONS_TOTAL = Counter(
    "websocket_connections_total", "WebSocket connections accepted or refused.", ["route"]
)
WEBSOCKET_MESSAGES = Counter(
    "websocket_messages_total", "WebSocket messages.", ["route", "direction"]
)
WEBSOCKET_REFUSALS = Counter(
    "websocket_refusals_total",
    "WebSockets the service closed before serving them: credentials in the URL, failed "
    "authentication, or a user already at APP_WS_MAX_SOCKETS_PER_USER.",
    ["reason"],
)
REALTIME_DROPPED = Counter(
    "realtime_messages_dropped_total",
    "Real-time messages dropped because a slow subscriber's inbox was full.",
)

# Authentication, from app.auth.service.
LOGINS = Counter("auth_logins_total", "Login attempts by outcome.", ["outcome"])
TOKEN_REFRESHES = Counter(
    "auth_token_refreshes_total",
    "Refresh-token exchanges by outcome; reuse_detected means a stolen token was presented.",
    ["outcome"],
)

# Hooks for the cache, rate limiter, uploads and background tasks.
CACHE_REQUESTS = Counter("cache_requests_total", "Cache lookups by result.", ["cache", "result"])
CACHE_FILL_ERRORS = Counter(
    "cache_fill_errors_total",
    "Values loaded after a miss that the cache could not store.",
    ["cache"],
)
RATE_LIMIT_REJECTIONS = Counter(
    "rate_limit_rejections_total", "Requests refused with 429.", ["limit"]
)
UPLOAD_BYTES = Counter("upload_bytes_total", "Bytes of accepted uploads.")
UPLOADS = Counter(
    "uploads_total",
    "Uploaded files by outcome: ok, too_large, bad_type, bomb, invalid, aborted, no_space.",
    ["outcome"],
)
THUMBNAIL_DURATION = Histogram(
    "thumbnail_duration_seconds",
    "Time to check, clean and thumbnail one uploaded image (in a worker thread).",
    buckets=LATENCY_BUCKETS,
)
BACKGROUND_TASKS = Counter(
    "background_tasks_total", "Background task runs by outcome.", ["task", "outcome"]
)

# Pre-create known outcomes so alerts see a 0 instead of a missing series.
for _outcome in ("success", "invalid_credentials", "locked"):
    LOGINS.labels(_outcome)
for _outcome in ("success", "invalid", "reuse_detected"):
    TOKEN_REFRESHES.labels(_outcome)
for _outcome in ("ok", "too_large", "bad_type", "bomb", "invalid", "aborted", "no_space"):
    UPLOADS.labels(_outcome)
# Rare by nature (a cancellation happens at a shutdown): a series born at 1 shows no increase.
for _task in ("audit", "email"):
    for _outcome in ("success", "failure", "cancelled", "dropped"):
        BACKGROUND_TASKS.labels(_task, _outcome)
BACKGROUND_TASKS.labels("email", "skipped")
# The same for the other fixed label sets: a first rejection, refusal or cache error since
# the start (often the only one, or the start of an incident) must show on the dashboards.
for _limit in ("default", "login", "register", "login-failures", "uploads", "chat-messages"):
    RATE_LIMIT_REJECTIONS.labels(_limit)
for _reason in ("credentials_in_url", "authentication", "socket_cap"):
    WEBSOCKET_REFUSALS.labels(_reason)
for _result in ("hit", "miss", "error"):
    CACHE_REQUESTS.labels("items", _result)
CACHE_FILL_ERRORS.labels("items")
