"""HTTP conditional requests (RFC 9110 section 13): what If-Match, If-None-Match,
If-Modified-Since and If-Unmodified-Since make of a resource with given validators,
evaluated in the order of RFC 9110 section 13.2.2.

Used by file downloads (ETag and Last-Modified) and by items (ETag only).
"""

from email.utils import parsedate_to_datetime

from starlette.datastructures import Headers


def precondition(request: Headers, method: str, etag: str, last_modified: str | None) -> int | None:
    """What the request's conditional headers make of a resource with these validators:
    412 (a precondition failed), 304 (the client's copy is current), or None (send it).
    Without ``last_modified`` the date conditions are ignored (RFC 9110 section 13.1.3)."""
    safe = method in ("GET", "HEAD")
    modified = _http_date(last_modified)
    if_match = joined(request.getlist("if-match"))
    if_none_match = joined(request.getlist("if-none-match"))
    if if_match is not None and not etag_listed(if_match, etag, weak=False):
        return 412
    unmodified_since = _http_date(request.get("if-unmodified-since"))
    if (
        if_match is None
        and modified is not None
        and unmodified_since is not None
        and modified > unmodified_since
    ):
        return 412
    if if_none_match is not None and etag_listed(if_none_match, etag, weak=True):
        return 304 if safe else 412
    modified_since = _http_date(request.get("if-modified-since"))
    if if_none_match is None and safe and modified is not None and modified_since is not None:
        return 304 if modified <= modified_since else None
    return None


def joined(lines: list[str] | None) -> str | None:
    """A list header (If-Match, If-None-Match) from the lines it came on, None without
    one. A client or a proxy may split a list over several lines (RFC 9110 section 5.3):
    read as one, a tag on a later line is not missed."""
    return ", ".join(lines) if lines else None


def etag_listed(header: str, etag: str, *, weak: bool) -> bool:
    """Whether an If-Match / If-None-Match header names ``etag`` (a strong one), by the
    weak comparison (a W/ tag matches too) or the strong one."""
    if header.strip() == "*":
        return True
    tags = [tag.strip() for tag in header.split(",")]
    return etag in tags or (weak and f"W/{etag}" in tags)


def _http_date(value: str | None) -> float | None:
    """Seconds since the epoch; None for no date or an invalid one (then the header is
    ignored, RFC 9110 section 13.1.3)."""
    if value is None:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    # OverflowError: a number too large for a C integer (a year, an hour, a zone offset
    # of twenty digits), which email.utils lets through where others are ValueErrors.
    except (TypeError, ValueError, OverflowError):
        return None
