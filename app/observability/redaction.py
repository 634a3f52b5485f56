"""What counts as a secret in a log line or a span, and how it is blanked.

Values under sensitive keys, and anything shaped like a JWT or a bearer credential, are
replaced with ``[REDACTED]``: in every log line (logging.py) and in the query strings
that tracing copies into spans (tracing.py). The checks come cheap first (substring
tests before any regex), as they run on every line.
"""

import re
from collections.abc import MutableMapping
from typing import Any

from structlog.types import EventDict

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
# A query parameter named like a secret, and its value (up to the next parameter).
_SENSITIVE_PARAM = re.compile(
    r"(^|[?&;])(" + "|".join(map(re.escape, sorted(SENSITIVE_KEYS))) + r")=[^&;#]*",
    re.IGNORECASE,
)


def may_hold_secrets(event_dict: EventDict) -> bool:
    """False when redaction would change nothing: no sensitive key, only plain values and
    strings, none with a credential marker. One pass and one joined search instead of a
    call per value: this runs on every line."""
    strings = []
    for value in event_dict.values():
        kind = type(value)
        if kind is str:
            strings.append(value)
        elif kind not in _PLAIN:
            return True
    if not SENSITIVE_KEYS.isdisjoint(map(str.lower, event_dict)):
        return True
    # NUL-joined: a marker cannot span two values.
    return marked("\0".join(strings).lower())


def marked(lowered: str) -> bool:
    return "eyj" in lowered or "bearer" in lowered or "basic" in lowered


def redact_mapping(mapping: MutableMapping[str, Any]) -> Any:
    for key, value in mapping.items():
        if key.lower() in SENSITIVE_KEYS:
            mapping[key] = REDACTED
        elif type(value) not in _PLAIN:
            mapping[key] = _redact_value(value)
    return mapping


# Values that cannot hold a credential; skipped without a call (this runs on every line).
_PLAIN = frozenset({int, float, bool, type(None)})


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        # Cheap substring tests first: the regex runs only on strings that could match.
        if marked(value.lower()):
            return _CREDENTIALS.sub(REDACTED, value)
        return value
    if isinstance(value, dict):
        return redact_mapping(dict(value))
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(item) for item in value)
    return value


def redact_query(text: str) -> str:
    """``text`` (a URL, a path and its query, or a query string) with the values of
    parameters named like a secret, and whatever looks like a credential, replaced."""
    text = _SENSITIVE_PARAM.sub(rf"\1\2={REDACTED}", text)
    return _redact_value(text)
