"""Rate-limit counters: global through Redis, with a per-process fallback.

Uses the ``limits`` library's async API (sliding window counters). With Redis the
counters are shared by every worker and replica; without it, or while it is unreachable,
each process counts on its own. Which limit applies during an outage is the caller's
choice (``fallback``): the same one for general traffic (fail open, locally bounded), a
stricter one for login and registration.
"""

import math
import time
from dataclasses import dataclass

from limits import RateLimitItem
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from app.backends.redis import RedisBackend


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_after_seconds: int
    shared: bool


class RateLimiter:
    def __init__(self, redis: RedisBackend | None) -> None:
        self.redis = redis
        self.local = SlidingWindowCounterRateLimiter(MemoryStorage())
        self.shared: SlidingWindowCounterRateLimiter | None = None
        if redis is not None:
            storage = RedisStorage(
                f"async+{redis.url}",
                implementation="redispy",
                wrap_exceptions=True,
                key_prefix="ratelimit",
                socket_timeout=redis.timeout_seconds,
                socket_connect_timeout=redis.timeout_seconds,
            )
            self.shared = SlidingWindowCounterRateLimiter(storage)

    async def hit(
        self, item: RateLimitItem, *identifiers: str, fallback: RateLimitItem | None = None
    ) -> Decision:
        """Count one request; ``allowed`` is False when it is over the limit."""
        return await self._run(item, identifiers, fallback)

    async def clear(self, item: RateLimitItem, *identifiers: str) -> None:
        """Forget what was counted: in the shared counters, and in this process's, which
        held the count if Redis was unreachable when it was made."""
        if self.shared is not None and self.redis is not None and self.redis.available:
            try:
                await self.shared.clear(item, *identifiers)
            except StorageError as exc:
                self.redis.failed(exc.storage_error)
        await self.local.clear(item, *identifiers)

    async def _run(
        self,
        item: RateLimitItem,
        identifiers: tuple[str, ...],
        fallback: RateLimitItem | None,
    ) -> Decision:
        if self.shared is None or self.redis is None:
            # Embedded mode: the local counters are the real ones.
            return await _decide(self.local, item, identifiers, shared=False)
        if self.redis.available:
            try:
                return await _decide(self.shared, item, identifiers, shared=True)
            except StorageError as exc:
                self.redis.failed(exc.storage_error)
        return await _decide(self.local, fallback or item, identifiers, shared=False)


async def _decide(
    limiter: SlidingWindowCounterRateLimiter,
    item: RateLimitItem,
    identifiers: tuple[str, ...],
    *,
    shared: bool,
) -> Decision:
    if await limiter.hit(item, *identifiers):
        return Decision(True, item.amount, -1, 0, shared)
    # Only a refusal pays for the extra round trip that the response headers need.
    stats = await limiter.get_window_stats(item, *identifiers)
    reset = max(1, math.ceil(stats.reset_time - time.time()))
    return Decision(False, item.amount, stats.remaining, reset, shared)
