"""Fire-and-forget work that must not delay the response: audit records, e-mail.

FastAPI's BackgroundTasks only run after a *successful* response, but failed logins and
refresh-token reuse are exactly the events to record, so jobs are plain asyncio tasks kept
in a registry: each one's outcome is counted, a failure is logged and never reaches the
client, and shutdown waits for the jobs in flight (bounded) instead of dropping them.
"""

import asyncio
import collections
from collections.abc import Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request

from app.observability.logging import get_logger
from app.observability.metrics import BACKGROUND_TASKS

logger = get_logger(__name__)


class BackgroundJobs:
    def __init__(self, max_jobs_per_task: int) -> None:
        # Each task with its job's name: what shutdown cancels is counted by name.
        self.tasks: dict[asyncio.Task[None], str] = {}
        self.max_jobs_per_task = max_jobs_per_task
        self.in_flight: collections.Counter[str] = collections.Counter()

    def spawn(self, name: str, job: Coroutine[Any, Any, str | None]) -> None:
        """Run ``job``; it is counted as ``success`` unless it returns another outcome (an
        e-mail that was only logged is ``skipped``: nobody received it). While
        ``max_jobs_per_task`` jobs of that name are in flight (their dependency is stalled),
        it is dropped instead, counted as ``dropped`` and logged."""
        if self.in_flight[name] >= self.max_jobs_per_task:
            job.close()
            BACKGROUND_TASKS.labels(name, "dropped").inc()
            logger.warning("background job dropped: too many in flight", job=name)
            return
        task = asyncio.create_task(self._run(name, job), name=f"job:{name}")
        self.tasks[task] = name
        self.in_flight[name] += 1
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.in_flight[self.tasks.pop(task)] -= 1

    @staticmethod
    async def _run(name: str, job: Coroutine[Any, Any, str | None]) -> None:
        try:
            outcome = await job
        except Exception:
            BACKGROUND_TASKS.labels(name, "failure").inc()
            logger.exception("background job failed", job=name)
        else:
            BACKGROUND_TASKS.labels(name, outcome or "success").inc()

    async def drain(self, timeout_seconds: float) -> None:
        """Wait for the jobs in flight, then cancel the rest: each one lost that way is
        counted (``outcome="cancelled"``) and the log says how many of each, since the
        work they stood for (an audit record, an e-mail) will not happen."""
        if not self.tasks:
            return
        _, pending = await asyncio.wait(self.tasks, timeout=timeout_seconds)
        if not pending:
            return
        lost = collections.Counter(self.tasks[task] for task in pending)
        for task in pending:
            task.cancel()
        for name, count in lost.items():
            BACKGROUND_TASKS.labels(name, "cancelled").inc(count)
        logger.warning("background jobs cancelled at shutdown", jobs=dict(lost))
        # Let them unwind (close a connection, roll back) before the loop goes away; a job
        # that ignores its cancellation is not waited for past this.
        await asyncio.wait(pending, timeout=1)


async def get_jobs(request: Request) -> BackgroundJobs:
    return request.app.state.jobs


JobsDep = Annotated[BackgroundJobs, Depends(get_jobs)]
