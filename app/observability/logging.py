"""Structured logs with structlog: one JSON object per line, or a console rendering.

Two paths, one format. The service's own lines (``get_logger``) are rendered by structlog
itself and written straight to the stream: going through stdlib logging and
ProcessorFormatter cost ~200 µs per access line here (bench/RESULTS.md). Lines of
uvicorn, gunicorn, SQLAlchemy and Alembic come through stdlib logging and get the same
processors from a ProcessorFormatter. Every line gets the request context bound by the
middleware (request id, user id), the current trace and span ids, and passes a redaction
step: values under sensitive keys and anything shaped like a JWT or a bearer credential
are replaced before rendering.

Every line ends up in one LineOutput (log_output.py), which writes the access lines in
batches and any other line at once, keeping their order.

Loggers are cached on first use, so where lines go, at which level and in which format
is read at call time from ``_output``: reconfiguring (a new app in the same process, a
test capturing the output) takes effect for every logger.

The access line, written on every request, skips structlog altogether (``render_line``):
its bound logger and processor chain cost ~40 µs per line here, the same object rendered
directly a few µs (bench/RESULTS.md); a test keeps the two alike.
"""

import asyncio
import importlib.util
import logging
import logging.config
import os
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import orjson
import structlog
from structlog.types import EventDict, Processor, WrappedLogger

from app.observability.log_output import LineOutput, open_output
from app.observability.redaction import marked, may_hold_secrets, redact_mapping
from app.observability.tracing import current_span_ids

LogFormat = Literal["json", "console"]
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


def _json(event_dict: EventDict, **_: Any) -> str:
    return orjson.dumps(event_dict, default=str).decode()


def _renderer(log_format: LogFormat) -> Processor:
    if log_format == "json":
        return structlog.processors.JSONRenderer(serializer=_json)
    return structlog.dev.ConsoleRenderer(colors=False)


class _Output:
    lines: LineOutput = open_output(None, 0)
    level: int = logging.INFO
    render: Processor = _renderer("console")
    json: bool = False


_output = _Output()


class _StreamLogger:
    """What structlog writes to: one line per event on the current output stream."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name

    def msg(self, message: str) -> None:
        _write(message)

    debug = info = warning = warn = error = exception = critical = fatal = msg


def _write(line: str) -> None:
    _output.lines.write(line.encode() + b"\n")


class OutputHandler(logging.Handler):
    """The stdlib handler: lines of servers and libraries join the same output, in order
    with the service's own (gunicorn's ``logconfig_dict`` names it too)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write(self.format(record))
        except Exception:
            self.handleError(record)


def get_logger(name: str) -> Any:
    """The service's logger for ``name`` (shown as ``logger`` in every line)."""
    return structlog.get_logger(name)


def _add_logger_name(logger: WrappedLogger, _: str, event_dict: EventDict) -> EventDict:
    if name := getattr(logger, "name", None):
        event_dict["logger"] = name
    return event_dict


def _below_level(_: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    if _LEVELS.get(method_name, logging.INFO) < _output.level:
        raise structlog.DropEvent
    return event_dict


def _render(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> Any:
    return _output.render(logger, method_name, event_dict)


# The request context of every line. Two plain ContextVars rather than structlog's
# merge_contextvars, which walks every context variable of the task on each line.
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
user_id_var: ContextVar[int | None] = ContextVar("user_id", default=None)


def add_request_context(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    if (request_id := request_id_var.get()) is not None:
        event_dict.setdefault("request_id", request_id)
    if (user_id := user_id_var.get()) is not None:
        event_dict.setdefault("user_id", user_id)
    return event_dict


def drop_color_message(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # uvicorn passes an ANSI-coloured copy of its message as an "extra"; never wanted here.
    event_dict.pop("color_message", None)
    return event_dict


def add_trace_context(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for key, value in current_span_ids().items():
        event_dict.setdefault(key, value)
    return event_dict


def redact(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    return redact_mapping(event_dict) if may_hold_secrets(event_dict) else event_dict


_TIMESTAMP = structlog.processors.TimeStamper(fmt="iso", utc=True)
# Tracebacks become text before redaction, so they are scrubbed too.
_FINAL: list[Processor] = [structlog.processors.format_exc_info, redact]


def formatter(log_format: LogFormat) -> structlog.stdlib.ProcessorFormatter:
    """For lines that come through stdlib logging (servers, libraries)."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            add_request_context,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            drop_color_message,
            _TIMESTAMP,
            add_trace_context,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_FINAL,
            _renderer(log_format),
        ],
    )


class WithoutServerDuplicates(logging.Filter):
    """Drops the server's lines that the app writes better itself:

    - what the server logs of WebSocket traffic: uvicorn's line for each handshake
      (``"WebSocket /path?query" 403``) and, at DEBUG, the websockets library's trace of
      every handshake line, header and frame, which it writes through uvicorn's logger.
      They print query strings, cookies and messages, any of which may hold a token, a
      password or a user's words; HttpMiddleware writes an access line for every socket.
    - uvicorn's traceback of an error the app did not handle, which it logs after the
      request's context is gone: ``log_unhandled`` logged it already, with that context;
      likewise of a response its shutdown cut short (``log_cut_short``).
    - uvicorn's error that a WebSocket app "returned without completing handshake" when
      the app refused the handshake with an HTTP response (a 429, a 403), which is a
      completed handshake: uvicorn forgets to mark it so (encode/uvicorn PR #3138).
      HttpMiddleware notes the refusal (``note_handshake_refused``) in the connection's
      context, which uvicorn's log call runs in; any other such error is kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.DEBUG and record.pathname.startswith(_WEBSOCKETS_CODE):
            return False
        if record.exc_info and getattr(record.exc_info[1], _LOGGED_BY_APP, False):
            return False
        if record.msg == _NO_HANDSHAKE and _handshake_refused.get():
            return False
        return not (isinstance(record.msg, str) and record.msg.startswith(_SERVER_SOCKET_LINE))


def log_unhandled(exc: Exception) -> None:
    """Log the traceback of an error no handler answered, while the request's context
    (its id, trace and span) is still bound, for the server's log to skip it."""
    get_logger("app.errors").error("unhandled error", exc_info=exc)
    setattr(exc, _LOGGED_BY_APP, True)


def log_cut_short(cancelled: asyncio.CancelledError) -> None:
    """Note a response the server's shutdown cancelled after it started (its client got a
    cut-off body) as a warning with the request's context, for the server's log to skip
    its traceback: a deploy or a recycle ran out of time, the service did not fail."""
    get_logger("app.errors").warning("response cut short by shutdown")
    setattr(cancelled, _LOGGED_BY_APP, True)


_LOGGED_BY_APP = "_logged_by_app"
_NO_HANDSHAKE = "ASGI callable returned without completing handshake."
_handshake_refused: ContextVar[bool] = ContextVar("handshake_refused", default=False)


def note_handshake_refused() -> None:
    """The WebSocket handshake being served was answered with an HTTP response. Left set:
    the server logs after the app has returned, in the same context."""
    _handshake_refused.set(True)


_SERVER_SOCKET_LINE = '%s - "WebSocket %s"'
# Where the websockets library's code is (uvicorn's default WebSocket protocol), found
# without importing it; a prefix no path has when it is not installed.
_websockets = importlib.util.find_spec("websockets")
_WEBSOCKETS_CODE = (
    os.path.join(_websockets.submodule_search_locations[0], "")
    if _websockets is not None and _websockets.submodule_search_locations
    else "\0"
)


def dict_config(level: str, log_format: LogFormat) -> dict[str, Any]:
    """stdlib logging config: one handler; also gunicorn's ``logconfig_dict``."""
    quiet = {"handlers": [], "propagate": False, "level": "CRITICAL"}
    through_root = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "structlog": {"()": f"{__name__}.formatter", "log_format": log_format},
        },
        "filters": {"no_duplicates": {"()": f"{__name__}.WithoutServerDuplicates"}},
        "handlers": {
            "output": {"class": f"{__name__}.OutputHandler", "formatter": "structlog"},
        },
        "root": {"level": level, "handlers": ["output"]},
        "loggers": {
            "gunicorn.error": through_root,
            "uvicorn": through_root,
            "uvicorn.error": through_root | {"filters": ["no_duplicates"]},
            # The access line comes from access_log.py with the request context;
            # the servers' own access lines would duplicate it without that context.
            "gunicorn.access": quiet,
            "uvicorn.access": quiet,
            # At DEBUG the SQLite driver prints every statement with its parameters:
            # password hashes, e-mail addresses. Its warnings and errors still come out.
            "aiosqlite": through_root | {"level": "INFO"},
        },
    }


def configure_logging(
    level: str, log_format: LogFormat, stream: TextIO | None = None, flush_seconds: float = 0
) -> None:
    """Where (stdout unless ``stream``), from which level and in which format lines go;
    ``flush_seconds``: how long access lines may wait to be written (log_output.py)."""
    _output.lines = open_output(stream, flush_seconds)
    _output.level = logging.getLevelNamesMapping()[level]
    _output.render = _renderer(log_format)
    _output.json = log_format == "json"
    structlog.configure(
        processors=[
            _below_level,
            add_request_context,
            structlog.processors.add_log_level,
            _add_logger_name,
            _TIMESTAMP,
            add_trace_context,
            *_FINAL,
            _render,
        ],
        logger_factory=_StreamLogger,
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=True,
    )
    logging.config.dictConfig(dict_config(level, log_format))
    capture_warnings()


def capture_warnings() -> None:
    """Python warnings (Pillow's on a malformed image, SQLAlchemy's…) as lines of this
    format, at WARNING from ``py.warnings`` with the request's context, instead of plain
    text on stderr, the one kind of line a log pipeline could not parse."""
    logging.captureWarnings(True)


def is_enabled(method_name: str) -> bool:
    """Whether a line at this level would be written (callers can skip building it)."""
    return _LEVELS[method_name] >= _output.level


def render_line(
    logger_name: str,
    method_name: str,
    event_dict: EventDict,
    *,
    untrusted: str,
    timestamp: float,
) -> bytes:
    """The line the processor chain would make of a line whose fields are all given —
    plain values under non-sensitive keys, the request context and span ids included, no
    exception — such as the access line; ``timestamp``: when it happened (time.time()).

    Rendered here, without structlog's cost: the same object as the chain makes (level,
    logger, timestamp, redaction). ``untrusted`` joins the string values that do not come
    from this code (paths, ids…), NUL-separated: the only places a credential can hide,
    searched at once, because the chain's generic check costs more than the whole line.
    """
    if marked(untrusted.lower()):
        redact_mapping(event_dict)
    event_dict["level"] = method_name
    event_dict["logger"] = logger_name
    moment = datetime.fromtimestamp(timestamp, UTC)
    if _output.json:
        # orjson writes it as the chain's TimeStamper does (ISO 8601, "Z"), in C.
        event_dict["timestamp"] = moment
        return orjson.dumps(event_dict, default=str, option=_LINE_OPTIONS)
    event_dict["timestamp"] = moment.isoformat().replace("+00:00", "Z")
    return (_output.render(None, method_name, event_dict) + "\n").encode()


def hold_line(render: Callable[[], bytes]) -> None:
    """Queue the line ``render()`` makes, to be written with others (log_output.py)."""
    _output.lines.hold(render)


_LINE_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_APPEND_NEWLINE
