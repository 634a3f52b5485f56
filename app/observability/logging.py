"""Structured logs with structlog: one JSON object per line, or a console rendering.

The service's own lines and those of uvicorn, gunicorn, SQLAlchemy and Alembic go through
one stdlib handler with structlog's ProcessorFormatter, so the output has one format.
Every line gets the request context bound by the middleware (request id, user id), the
current trace and span ids, and passes a redaction step: values under sensitive keys and
anything shaped like a JWT or a bearer credential are replaced before rendering.
"""

import logging.config
import re
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog
from structlog.types import EventDict, Processor, WrappedLogger

from app.observability.tracing import current_span_ids

LogFormat = Literal["json", "console"]
REDACTED = "[REDACTED]"
SENSITIVE_KEYS = frozenset(
    {
        "password",
        "current_password",
        "new_password",
        "token",
        "access_token",
        "refresh_token",
        "authorization",
        "cookie",
        "set-cookie",
        "secret",
        "secret_key",
        "client_secret",
    }
)
_CREDENTIALS = re.compile(
    r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"  # JWTs (header starts '{"')
    r"|(?i:bearer|basic)\s+[A-Za-z0-9._~+/=-]+"
)


def drop_color_message(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # uvicorn passes an ANSI-coloured copy of its message as an "extra"; never wanted here.
    event_dict.pop("color_message", None)
    return event_dict


def add_trace_context(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for key, value in current_span_ids().items():
        event_dict.setdefault(key, value)
    return event_dict


def redact(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    return _redact_mapping(event_dict)


def _redact_mapping(mapping: MutableMapping[str, Any]) -> Any:
    for key, value in mapping.items():
        if key.lower() in SENSITIVE_KEYS:
            mapping[key] = REDACTED
        else:
            mapping[key] = _redact_value(value)
    return mapping


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return _CREDENTIALS.sub(REDACTED, value)
    if isinstance(value, dict):
        return _redact_mapping(dict(value))
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(item) for item in value)
    return value


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        drop_color_message,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_context,
    ]


def formatter(log_format: LogFormat) -> structlog.stdlib.ProcessorFormatter:
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Tracebacks become text before redaction, so they are scrubbed too.
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
    )


def dict_config(level: str, log_format: LogFormat) -> dict[str, Any]:
    """stdlib logging config: one stdout handler; also gunicorn's ``logconfig_dict``."""
    quiet = {"handlers": [], "propagate": False, "level": "CRITICAL"}
    through_root = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "structlog": {"()": f"{__name__}.formatter", "log_format": log_format},
        },
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "formatter": "structlog",
            },
        },
        "root": {"level": level, "handlers": ["stdout"]},
        "loggers": {
            "gunicorn.error": through_root,
            "uvicorn": through_root,
            "uvicorn.error": through_root,
            # The access line comes from AccessLogMiddleware with the request context;
            # the servers' own access lines would duplicate it without that context.
            "gunicorn.access": quiet,
            "uvicorn.access": quiet,
        },
    }


def configure_logging(level: str, log_format: LogFormat) -> None:
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    logging.config.dictConfig(dict_config(level, log_format))
