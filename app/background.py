"""Fire-and-forget work that must not delay the response: audit records, e-mail.

FastAPI's BackgroundTasks only run after a *successful* response, but failed logins and
refresh-token reuse are exactly the events to record, so jobs are plain asyncio tasks kept
in a registry: each one's outcome is counted, a failure is logged and never reaches the
client, and shutdown waits for the jobs in flight (bounded) instead of dropping them.
"""

import asyncio
from collections.abc import Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request

from app.observability.logging import get_logger
from app.observability.metrics import BACKGROUND_TASKS

logger = get_logger(__name__)


class BackgroundJobs:
    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, name: str, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(self._run(name, job), name=f"job:{name}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _run(name: str, job: Coroutine[Any, Any, None]) -> None:
        try:
            await job
        except Exception:
            BACKGROUND_TASKS.labels(name, "failure").inc()
            logger.exception("background job failed", job=name)
        else:
            BACKGROUND_TASKS.labels(name, "success").inc()

    async def drain(self, timeout_seconds: float) -> None:
        if not self.tasks:
            return
        _, pending = await asyncio.wait(self.tasks, timeout=timeout_seconds)
        for task in pending:
            task.cancel()
        if pending:
            logger.warning("background jobs cancelled at shutdown", count=len(pending))


async def get_jobs(request: Request) -> BackgroundJobs:
    return request.app.state.jobs


JobsDep = Annotated[BackgroundJobs, Depends(get_jobs)]
