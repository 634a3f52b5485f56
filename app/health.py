"""Liveness and readiness.

``/health/live`` answers from memory only, so a slow database never gets a healthy
process restarted. ``/health/ready`` checks each dependency under a short timeout and
reports every check, so an operator sees which one failed.
"""

import asyncio
import logging
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine

from app import migrate
from app.backends.redis import RedisBackend
from app.observability.tracing import untraced
from app.settings import SettingsDep

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/health", tags=["health"])

# "unmigrated" and "outdated": the database answers, but its schema is not one this code
# can serve on (app.migrate.schema_state).
CheckState = Literal["ok", "unavailable", "disabled", "unmigrated", "outdated"]


class Health(BaseModel):
    status: Literal["ok", "degraded", "unavailable"]
    checks: dict[str, CheckState] = {}


@router.get("/live", response_model=Health)
async def live() -> Health:
    return Health(status="ok")


@router.get("/ready", response_model=Health, responses={503: {"model": Health}})
async def ready(request: Request, settings: SettingsDep) -> JSONResponse:
    """503 without the database; 200 "degraded" without Redis, which the service survives
    (reads fall back to the database, limits to per-process counters)."""
    timeout = settings.health_timeout_seconds
    with untraced():  # probes come every few seconds: not worth a trace each
        # Side by side: one after the other, a slow database and a slow Redis added their
        # timeouts (1.25 s), past the 1 s a Kubernetes probe waits by default.
        database, redis = await asyncio.gather(
            _check_database(request, timeout),
            _check_redis(request.app.state.backends.redis, timeout),
        )
    checks: dict[str, CheckState] = {"database": database, "redis": redis}
    if checks["database"] != "ok":
        status, code = "unavailable", 503
    elif checks["redis"] == "unavailable":
        status, code = "degraded", 200
    else:
        status, code = "ok", 200
    return JSONResponse(Health(status=status, checks=checks).model_dump(), status_code=code)


async def _check_redis(redis: RedisBackend | None, limit_seconds: float) -> CheckState:
    if redis is None:
        return "disabled"
    try:
        async with asyncio.timeout(limit_seconds):
            return "ok" if await redis.ping() else "unavailable"
    except TimeoutError:
        return "unavailable"


async def _check_database(request: Request, limit_seconds: float) -> CheckState:
    # The check runs as a task of its own that the probe stops waiting for at the
    # deadline. Awaited directly, a check cancelled on a connection that had stopped
    # answering (a hung server, a connection a firewall forgot) went on to close it
    # gracefully, which SQLAlchemy gives 2 s more: the probe answered at 3 s, past the 1 s
    # a kubelet waits. The closing now goes on after the answer (_let_go).
    check = asyncio.create_task(_schema_state(request.app.state.probe_engine))
    try:
        async with asyncio.timeout(limit_seconds):
            schema = await asyncio.shield(check)
    except Exception as exc:  # any failure means "not ready"; the reason goes to the log
        logger.warning("readiness: database check failed: %r", exc)
        return "unavailable"
    finally:
        _let_go(check)
    if schema != "current":
        # Ready on a database never migrated, the replica answered every request with a 500.
        logger.warning("readiness: the database schema is %s: run `python -m app migrate`", schema)
        return schema
    return "ok"


async def _schema_state(engine: AsyncEngine) -> migrate.SchemaState:
    async with engine.connect() as connection:
        return await connection.run_sync(migrate.schema_state)


# Checks given up at their deadline, until they have closed their connection: the event
# loop keeps only weak references to tasks.
_closing: set[asyncio.Task[migrate.SchemaState]] = set()


def _let_go(check: asyncio.Task[migrate.SchemaState]) -> None:
    """Cancel ``check`` if it is still running, and let it finish without the probe."""
    if not check.done():
        check.cancel()
        _closing.add(check)
    # Also when done: one that failed just as the deadline passed has an exception the
    # probe never read.
    check.add_done_callback(_forget)


def _forget(check: asyncio.Task[migrate.SchemaState]) -> None:
    _closing.discard(check)
    if not check.cancelled():
        check.exception()  # retrieved: the probe has logged the failure already
