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
    engine = request.app.state.probe_engine
    try:
        async with asyncio.timeout(limit_seconds), engine.connect() as connection:
            schema = await connection.run_sync(migrate.schema_state)
    except Exception as exc:  # any failure means "not ready"; the reason goes to the log
        logger.warning("readiness: database check failed: %r", exc)
        return "unavailable"
    if schema != "current":
        # Ready on a database never migrated, the replica answered every request with a 500.
        logger.warning("readiness: the database schema is %s: run `python -m app migrate`", schema)
        return schema
    return "ok"
