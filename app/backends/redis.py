"""The Redis client, configured for a dependency that may disappear.

Timeouts are short (``APP_REDIS_TIMEOUT_SECONDS``, well below a request's budget) and
commands are not retried: callers fall back (to the database, to a local limiter) rather
than wait. After a failure to reach Redis a breaker keeps callers away for a moment, so an
outage costs one timeout per process instead of one per request. An error Redis answers
(out of memory, a read-only replica) fails that command alone: it cost no wait, and the
commands that still work (reads, such as whether a token was revoked) must go on.
"""

import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

ConnectHook = Callable[[Connection], Awaitable[None]]


class RedisUnavailable(Exception):
    """Redis failed or the breaker is open; the caller takes its fallback."""


class RedisBackend:
    def __init__(self, url: str, timeout_seconds: float, breaker_seconds: float) -> None:
        self.url = url
        self.timeout_seconds = timeout_seconds
        self.breaker_seconds = breaker_seconds
        self._open_until = 0.0
        # Run on every new connection before its first command (set by the cache).
        self.on_connect: ConnectHook | None = None
        self.client: Redis = Redis.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 0),
            redis_connect_func=self._connected,
        )

    async def _connected(self, connection: Connection) -> None:
        await connection.on_connect()
        if self.on_connect is not None:
            await self.on_connect(connection)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._open_until

    def failed(self, exc: BaseException) -> None:
        """Note a command that failed with ``exc``: the breaker opens if Redis could not be
        reached in time, not for an error it answered (the module says why)."""
        if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
            self._open_until = time.monotonic() + self.breaker_seconds

    async def call(self, operation: Callable[[Redis], Awaitable[Any]]) -> Any:
        """Run ``operation`` against Redis or raise RedisUnavailable."""
        if not self.available:
            raise RedisUnavailable("breaker open")
        try:
            return await operation(self.client)
        except (RedisError, OSError) as exc:
            self.failed(exc)
            raise RedisUnavailable(str(exc)) from exc

    async def ping(self) -> bool:
        # Readiness asks Redis itself, breaker or not, and a success closes the breaker:
        # recovery shows up at the next probe.
        try:
            await self.client.ping()
        except (RedisError, OSError):
            return False
        self._open_until = 0.0
        return True

    async def close(self) -> None:
        await self.client.aclose()
