"""Infrastructure the service shares between processes: cache, rate-limit storage,
pub/sub broker, message history and revoked access tokens. Each is an interface with an
embedded, in-process implementation (no APP_REDIS_URL: one process, nothing to install)
and a Redis one (several workers and replicas)."""

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.backends.broker import (
    Broker,
    History,
    LocalFanout,
    MemoryHistory,
    RedisBroker,
    RedisHistory,
)
from app.backends.cache import Cache, DatabaseEpoch, MemoryCache, RedisCache
from app.backends.leases import Leases
from app.backends.ratelimit import RateLimiter
from app.backends.redis import RedisBackend, RedisUnavailable
from app.backends.revocation import MemoryRevocations, RedisRevocations, Revocations
from app.observability.logging import get_logger
from app.observability.outages import OutageLog
from app.observability.tracing import untraced
from app.settings import Settings

logger = get_logger(__name__)

# How long the shutdown waits for the backends' own tasks to end once cancelled.
CLOSE_TIMEOUT_SECONDS = 5.0


@dataclass
class Backends:
    cache: Cache
    limiter: RateLimiter
    broker: Broker
    history: History
    revocations: Revocations
    leases: Leases
    redis: RedisBackend | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        # A task that died of an error is reported, not re-raised: the rest of the
        # shutdown (Redis, the database pool, the last access lines) must still happen.
        # Bounded: a task that does not end on its cancellation must not hang the shutdown.
        done, pending = (
            await asyncio.wait(self.tasks, timeout=CLOSE_TIMEOUT_SECONDS)
            if self.tasks
            else (set(), set())
        )
        for task in pending:
            logger.error("backend task did not stop", task=task.get_name())
        for task in done:
            if not task.cancelled() and isinstance(task.exception(), Exception):
                logger.error("backend task failed", task=task.get_name(), exc_info=task.exception())
        await self.leases.close()
        if self.redis is not None:
            await self.redis.close()


def create_backends(settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]) -> Backends:
    """The embedded implementations without APP_REDIS_URL, the Redis ones with it."""
    if settings.redis_url is None:
        return Backends(
            cache=MemoryCache(),
            limiter=RateLimiter(None),
            broker=LocalFanout(),
            history=MemoryHistory(),
            revocations=MemoryRevocations(),
            leases=Leases(None),
        )
    redis = RedisBackend(
        settings.redis_url, settings.redis_timeout_seconds, settings.redis_breaker_seconds
    )
    cache = RedisCache(redis, DatabaseEpoch(sessionmaker))
    redis.on_connect = cache.sync_on_connect
    broker = RedisBroker(redis)
    backends = Backends(
        cache=cache,
        limiter=RateLimiter(redis),
        broker=broker,
        history=RedisHistory(redis),
        revocations=RedisRevocations(redis),
        leases=Leases(redis),
        redis=redis,
    )
    with untraced():
        backends.tasks = [
            asyncio.create_task(broker.run(), name="broker-pump"),
            asyncio.create_task(
                _every(settings.cache_epoch_sync_seconds, cache.sync_epoch),
                name="cache-epoch-sync",
            ),
        ]
    return backends


async def _every(seconds: float, job: Callable[[], Awaitable[None]]) -> None:
    # Bounds how long a replica that never lost Redis keeps an old epoch after another
    # replica wrote while it could not reach Redis (a partition, not a restart).
    outage = OutageLog(logger, "cache epoch sync failed", "cache epoch sync recovered")
    # Until cancelled, even when a library swallowed the cancellation mid-job (it then
    # looped on, and the shutdown waiting for it hung).
    while not asyncio.current_task().cancelling():  # type: ignore[union-attr]
        await asyncio.sleep(seconds)
        try:
            await job()
        except RedisUnavailable:
            pass
        except Exception:  # the database may be down too; try again next round
            outage.failed()
        else:
            outage.succeeded()
