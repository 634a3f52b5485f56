"""RFC 9457 problem details for every error the service returns.

Clients, nginx and the load tests rely on one shape: ``type``, ``title``, ``status``,
``detail`` and ``request_id``, served as ``application/problem+json``. Validation errors
add ``errors`` without echoing the rejected input (it may be a password). A 500 carries
no traceback; the exception is re-raised to the server, which logs it.
"""

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, ClassVar

from fastapi import FastAPI, Request, params
from fastapi.exceptions import RequestValidationError
from python_multipart.multipart import parse_options_header
from sqlalchemy import exc as sqlalchemy_errors
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.types import Scope

from app.observability.logging import get_logger
from app.observability.routes import allowed_methods

logger = get_logger(__name__)

PROBLEM_JSON = "application/problem+json"


class AppError(Exception):
    """An error a service raises on purpose; rendered as problem+json with its status."""

    status_code = HTTPStatus.BAD_REQUEST
    default_headers: ClassVar[Mapping[str, str]] = {}

    def __init__(self, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = {**self.default_headers, **(headers or {})}


class Unauthorized(AppError):
    status_code = HTTPStatus.UNAUTHORIZED
    default_headers: ClassVar[Mapping[str, str]] = {"WWW-Authenticate": "Bearer"}


class Forbidden(AppError):
    status_code = HTTPStatus.FORBIDDEN


class NotFound(AppError):
    status_code = HTTPStatus.NOT_FOUND


class Conflict(AppError):
    status_code = HTTPStatus.CONFLICT


class PayloadTooLarge(AppError):
    status_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    # The rest of the body is unread: closing the connection spares reading it to the end
    # only to find the next request (RFC 9110 section 15.5.14).
    default_headers: ClassVar[Mapping[str, str]] = {"Connection": "close"}


class InsufficientStorage(AppError):
    """507 (RFC 4918 section 11.5): the server has no room for an upload now; the client
    did nothing wrong and may retry later."""

    status_code = HTTPStatus.INSUFFICIENT_STORAGE
    # As for a 413: the rest of the body may be unread.
    default_headers: ClassVar[Mapping[str, str]] = {"Connection": "close"}


class UnsupportedMediaType(AppError):
    status_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class UnprocessableContent(AppError):
    status_code = HTTPStatus.UNPROCESSABLE_ENTITY


class UnsatisfiableRange(AppError):
    status_code = HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE


class PreconditionFailed(AppError):
    status_code = HTTPStatus.PRECONDITION_FAILED


def request_id_of(scope: Scope) -> str | None:
    """The id HttpMiddleware (app/middleware.py) put in the request state, if it ran."""
    return scope.get("state", {}).get("request_id")


# Renamed by RFC 9110, as nginx's own problems (nginx/) and Python 3.13 name them; Python
# 3.11 still has the old names.
_RFC_9110_TITLES = {
    413: "Content Too Large",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
}


def problem_response(
    scope: Scope,
    status: int,
    detail: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    phrase = _RFC_9110_TITLES.get(status) or (
        HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    )
    request_id = request_id_of(scope)
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": phrase,
        "status": int(status),
        "detail": detail or phrase,
        "request_id": request_id,
    }
    if extra:
        body.update(extra)
    response_headers = dict(headers or {})
    if request_id:
        # Responses built outside the middleware stack (500s) still carry the id.
        response_headers.setdefault("X-Request-ID", request_id)
    response_headers.setdefault("X-Content-Type-Options", "nosniff")
    return JSONResponse(
        body, status_code=int(status), headers=response_headers, media_type=PROBLEM_JSON
    )


async def _app_error(request: Request, exc: AppError) -> JSONResponse:
    return problem_response(request.scope, exc.status_code, exc.detail, headers=exc.headers)


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else None
    headers = exc.headers
    if exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
        # RFC 9110 section 15.5.6: every method the resource takes, HEAD with GET (served
        # by app/middleware.py).
        methods = allowed_methods(request.scope)
        if "GET" in methods:
            methods.add("HEAD")
        if methods:
            headers = {**(headers or {}), "Allow": ", ".join(sorted(methods))}
    elif exc.status_code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:  # the middleware's body cap
        headers = {**(headers or {}), **PayloadTooLarge.default_headers}
    return problem_response(request.scope, exc.status_code, detail, headers=headers)


FORM_MEDIA_TYPES = frozenset({b"application/x-www-form-urlencoded", b"multipart/form-data"})


def _unread_media_type(request: Request, exc: RequestValidationError) -> str | None:
    """The media type the route reads its body as, when the request was sent as another.

    FastAPI parses a body as JSON only under a JSON media type and as a form only under a
    form one; any other body reaches validation unparsed and fails there, but what the
    client got wrong is the Content-Type: a 415 that names the right one, not a 422.
    """
    body_field = getattr(request.scope.get("route"), "body_field", None)
    if body_field is None:
        return None
    if isinstance(body_field.field_info, params.Form):
        # The parser Starlette reads forms with, so both agree on what a form type is.
        sent, _ = parse_options_header(request.headers.get("content-type", ""))
        return (
            "application/x-www-form-urlencoded" if sent and sent not in FORM_MEDIA_TYPES else None
        )
    # The raw bytes of a non-empty body: FastAPI did not take it for JSON.
    return "application/json" if isinstance(exc.body, bytes) else None


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    if expected := _unread_media_type(request, exc):
        detail = f"Send the body as {expected}."
        return problem_response(request.scope, HTTPStatus.UNSUPPORTED_MEDIA_TYPE, detail)
    errors = [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type")}
        for error in exc.errors()
    ]
    return problem_response(
        request.scope,
        HTTPStatus.UNPROCESSABLE_ENTITY,
        "The request is not valid.",
        extra={"errors": errors},
    )


# nginx's code for a request whose client left before the answer: it is never sent, but
# the metrics and the access line record it, instead of a 500 for the server's own error.
CLIENT_CLOSED_REQUEST = 499


async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)


# What a database outage looks like to a request: no connection could be made
# (app.db.DatabaseUnreachable, a ConnectionError), the pool's timeout waiting for a free
# connection, and a statement whose connection died under it (a DBAPIError that
# invalidated it). Any other database error is a bug or a schema problem: a 500, logged
# with its traceback.
DEPENDENCY_ERRORS: tuple[type[Exception], ...] = (
    ConnectionError,
    sqlalchemy_errors.TimeoutError,
    sqlalchemy_errors.DBAPIError,
)
RETRY_AFTER_SECONDS = 5


async def _dependency_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """503 with Retry-After, not a 500: clients and proxies may retry, and an outage logs
    one line per request instead of a traceback each (the error is in the line)."""
    if isinstance(exc, sqlalchemy_errors.DBAPIError) and not exc.connection_invalidated:
        raise exc  # on to the 500 handler, and the traceback to the server's log
    logger.warning("dependency unavailable", error=f"{type(exc).__name__}: {exc}")
    return problem_response(
        request.scope,
        HTTPStatus.SERVICE_UNAVAILABLE,
        "A service this request needs is unavailable; try again shortly.",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def shutting_down(scope: Scope) -> JSONResponse:
    """The answer to a request the server cancelled when its graceful shutdown ran out:
    the client may retry it, on another worker or replica."""
    return problem_response(
        scope,
        HTTPStatus.SERVICE_UNAVAILABLE,
        "The server stopped before this request finished; try again.",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS), "Connection": "close"},
    )


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    # The server closes the connection after an error escapes the application (uvicorn
    # does once the response has started, as this one will have), whether or not the body
    # was read. Said so, a client does not send its next request on it, nor the rest of a
    # body the route never read (HttpMiddleware says so on its own refusals; this answer
    # is rendered outside it).
    return problem_response(
        request.scope,
        HTTPStatus.INTERNAL_SERVER_ERROR,
        "Internal error.",
        headers={"Connection": "close"},
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_exception)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    # An upload whose client goes away mid-body (request.stream() raises this).
    app.add_exception_handler(ClientDisconnect, _client_gone)  # type: ignore[arg-type]
    for error in DEPENDENCY_ERRORS:
        app.add_exception_handler(error, _dependency_unavailable)
    # Registered for Exception, Starlette runs this in ServerErrorMiddleware, outside
    # every user middleware; hence problem_response adds the request id itself.
    app.add_exception_handler(Exception, _unhandled)
