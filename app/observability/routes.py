"""The route template of a request, known before the request is handled.

Metrics need it before dispatch (``http_requests_in_progress`` is labelled by route), so
the request is matched against the application's routes with Starlette's public
``BaseRoute.matches``. FastAPI (0.16x) keeps included routers as objects whose
``effective_route_contexts()`` yield the routes with their prefixes applied; older
versions and Starlette list the routes directly. Mounted applications are searched
recursively, so a sub-app route is labelled with its full template; a mount whose app
has no route table is labelled ``/mount/{path}``. The test suite pins these labels.
"""

from collections.abc import Iterable, Iterator
from typing import Any

from starlette.routing import BaseRoute, Match, Mount
from starlette.types import Scope

UNMATCHED = "UNMATCHED"


def route_template(scope: Scope) -> str:
    app = scope.get("app")
    routes = getattr(getattr(app, "router", None), "routes", None)
    if routes is None:
        return UNMATCHED
    template = _match(routes, scope)
    if template is None:
        return UNMATCHED
    return scope.get("root_path", "") + template


def _match(routes: Iterable[BaseRoute], scope: Scope) -> str | None:
    partial: str | None = None
    for route in _flatten(routes):
        match, child_scope = route.matches(scope)
        if match is Match.NONE:
            continue
        if isinstance(route, Mount):
            inner = _match(route.routes, {**scope, **child_scope}) if route.routes else None
            template = route.path + (inner or "/{path}")
        else:
            template = getattr(route, "path_format", None) or getattr(route, "path", UNMATCHED)
        if match is Match.FULL:
            return template
        # A PARTIAL match is a path that exists with another method (405): keep the
        # template, but let a later FULL match win, as the router does.
        partial = partial or template
    return partial


def _flatten(routes: Iterable[Any]) -> Iterator[BaseRoute]:
    for route in routes:
        effective = getattr(route, "effective_route_contexts", None)
        if callable(effective):
            yield from effective()
        else:
            yield route
