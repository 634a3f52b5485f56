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
from sqlalchemy import text

from app.settings import SettingsDep

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/health", tags=["health"])

CheckState = Literal["ok", "unavailable", "disabled"]


class Health(BaseModel):
    status: Literal["ok", "degraded", "unavailable"]
    checks: dict[str, CheckState] = {}


@router.get("/live", response_model=Health)
async def live() -> Health:
    return Health(status="ok")


@router.get("/ready", response_model=Health, responses={503: {"model": Health}})
async def ready(request: Request, settings: SettingsDep) -> JSONResponse:
    database = await _check_database(request, settings.health_timeout_seconds)
    checks: dict[str, CheckState] = {"database": database, "redis": "disabled"}
    healthy = database == "ok"
    body = Health(status="ok" if healthy else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if healthy else 503)


async def _check_database(request: Request, limit_seconds: float) -> CheckState:
    try:
        async with asyncio.timeout(limit_seconds), request.app.state.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except Exception as exc:  # any failure means "not ready"; the reason goes to the log
        logger.warning("readiness: database check failed: %r", exc)
        return "unavailable"
    return "ok"
