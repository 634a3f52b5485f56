"""The route template of a request, known before the request is handled.

Metrics need it before dispatch (``http_requests_in_progress`` is labelled by route), and
the metrics and the access line need it on every request, so it must be cheap (the
middleware also remembers it per path): the application's routes are compiled once into
a flat table of
(regex, template, methods) — FastAPI (0.16x) keeps included routers as objects whose
``effective_route_contexts()`` yield the routes with their prefixes applied; older
versions and Starlette list them directly — and the request is matched against that
table with plain regex matches, once per request (the result is kept in the scope).
Mounted applications are compiled recursively, so a sub-app route is labelled with its
full template; a mount without a route table is labelled ``/mount/{path}``. Routes added
after the first request are not seen (they are labelled ``UNMATCHED``). The test suite
pins these labels against the installed FastAPI.
"""

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from starlette.routing import BaseRoute, Mount
from starlette.types import Scope

UNMATCHED = "UNMATCHED"
_SCOPE_KEY = "app.route_template"


@dataclass(frozen=True, slots=True)
class _Entry:
    regex: re.Pattern[str]
    template: str
    # None for WebSocket routes and mounts; HTTP routes list their methods.
    methods: frozenset[str] | None
    mount: tuple["_Entry", ...] | None = None
    is_mount: bool = False


def route_template(scope: Scope) -> str:
    cached = scope.get(_SCOPE_KEY)
    if cached is not None:
        return cached
    method = scope.get("method") if scope["type"] == "http" else None
    # HEAD is served by the GET route (HttpMiddleware calls the app so): named after it.
    method = "GET" if method == "HEAD" else method
    template = _match(_table(scope.get("app")), app_path(scope), method)
    result = UNMATCHED if template is None else scope.get("root_path", "") + template
    scope[_SCOPE_KEY] = result
    return result


def allowed_methods(scope: Scope) -> set[str]:
    """Every method the app's routes take at the request's path, for a 405's Allow header
    (the router names only those of the first route that matched the path)."""
    path = app_path(scope)
    return {
        method
        for entry in _table(scope.get("app"))
        if entry.methods is not None and entry.regex.match(path)
        for method in entry.methods
    }


def app_path(scope: Scope) -> str:
    """The request's path within the app: servers put ``root_path`` in front of it."""
    root_path = scope.get("root_path", "")
    path = scope["path"]
    return path[len(root_path) :] if root_path and path.startswith(root_path) else path


def _table(app: Any) -> tuple[_Entry, ...]:
    state = getattr(app, "state", None)
    router = getattr(app, "router", None)
    if state is None or router is None:
        return ()
    table = getattr(state, "route_template_table", None)
    if table is None:
        table = tuple(_compile(router.routes))
        state.route_template_table = table
    return table


def _compile(routes: Iterable[Any]) -> Iterator[_Entry]:
    for route in _flatten(routes):
        regex = getattr(route, "path_regex", None)
        if regex is None:
            continue
        if isinstance(route, Mount):
            children = tuple(_compile(route.routes)) if route.routes else None
            yield _Entry(regex, route.path, None, children, is_mount=True)
        else:
            methods = getattr(route, "methods", None)
            yield _Entry(regex, route.path_format, frozenset(methods) if methods else None)


def _match(table: tuple[_Entry, ...], path: str, method: str | None) -> str | None:
    partial: str | None = None
    for entry in table:
        found = entry.regex.match(path)
        if found is None:
            continue
        if entry.is_mount:
            inner = _match(entry.mount, "/" + found["path"], method) if entry.mount else None
            return entry.template + (inner or "/{path}")
        if method is None:
            if entry.methods is None:
                return entry.template
        elif entry.methods is not None:
            if method in entry.methods:
                return entry.template
            # The path exists with another method (405): keep the template, but let a
            # later full match win, as the router does.
            partial = partial or entry.template
    return partial


def _flatten(routes: Iterable[Any]) -> Iterator[BaseRoute]:
    for route in routes:
        effective = getattr(route, "effective_route_contexts", None)
        if callable(effective):
            for context in effective():
                # An included router's WebSocket routes and mounts come as a context
                # around a prefixed Starlette route, which holds the regex; API routes
                # are the context itself.
                yield getattr(context, "starlette_route", None) or context
        else:
            yield route
