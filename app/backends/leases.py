"""How many WebSockets each user holds open, counted across workers and replicas.

Each open socket holds a lease: a member of its holder's sorted set in Redis, scored with
its expiry on Redis' own clock (replicas' clocks do not matter). The socket renews it while
it lives and gives it back when it closes; a worker that dies without giving its leases
back loses them when they expire, so a crash cannot lock a user out for longer than one
lease. A lease that cannot be given back at once (Redis stalled, or the breaker open) is
given back in the background, tried again until Redis takes it or it has lapsed anyway:
the closed socket's place comes free as soon as Redis answers again. Without Redis, or
while it cannot be reached, each process counts its own sockets: the cap still bounds what
one user holds, per process.
"""

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import anyio

from app.backends.redis import RedisBackend, RedisUnavailable

LEASE_SECONDS = 60
PREFIX = "leases:"
# How long the closing socket waits for Redis to take its lease back before leaving that to
# the background, and how long the background waits between its tries.
RELEASE_SECONDS = 1.0
RELEASE_RETRY_SECONDS = 1.0

# The expired leases go first, so the count is of live sockets only.
_TAKE = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
    return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
# Without XX: a lease that lapsed while Redis could not be reached is counted again, since
# its socket is still open.
_RENEW = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


class Leases:
    def __init__(self, redis: RedisBackend | None, lease_seconds: int = LEASE_SECONDS) -> None:
        self.redis = redis
        self.lease_seconds = lease_seconds
        self.local: defaultdict[str, set[str]] = defaultdict(set)
        # Strong references: the event loop keeps only weak ones to its tasks.
        self._releases: set[asyncio.Task[None]] = set()
        if redis is not None:
            self._take = redis.client.register_script(_TAKE)
            self._renew = redis.client.register_script(_RENEW)

    @asynccontextmanager
    async def hold(self, holder: str, limit: int) -> AsyncIterator[bool]:
        """Yields whether ``holder`` may hold one more (``limit`` at most); the lease, if
        granted, is renewed until the block ends and then given back."""
        member = uuid.uuid4().hex
        redis = self.redis
        shared = None if redis is None else await self._take_shared(redis, holder, member, limit)
        if redis is None or shared is None:
            async with self._hold_local(holder, member, limit) as granted:
                yield granted
            return
        if not shared:
            yield False
            return
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._keep, redis, holder, member)
                yield True
                tasks.cancel_scope.cancel()
        finally:
            # Shielded: a socket closed by a cancellation (shutdown) still gives it back;
            # bounded: the handler is not held up by a stalled Redis.
            released = False
            with anyio.move_on_after(RELEASE_SECONDS, shield=True):
                released = await self._give_back(redis, holder, member)
            if not released:
                self._give_back_later(redis, holder, member)

    async def close(self) -> None:
        """Stop giving leases back in the background (shutdown): they lapse by themselves."""
        for task in self._releases:
            task.cancel()
        await asyncio.gather(*self._releases, return_exceptions=True)

    @asynccontextmanager
    async def _hold_local(self, holder: str, member: str, limit: int) -> AsyncIterator[bool]:
        members = self.local[holder]
        if len(members) >= limit:
            yield False
            return
        members.add(member)
        try:
            yield True
        finally:
            members.discard(member)
            if not members:
                del self.local[holder]

    async def _take_shared(
        self, redis: RedisBackend, holder: str, member: str, limit: int
    ) -> bool | None:
        """Whether Redis granted the lease; None when it cannot be asked."""
        args = [limit, member, self.lease_seconds]
        try:
            return bool(await redis.call(lambda _: self._take(keys=[PREFIX + holder], args=args)))
        except RedisUnavailable:
            return None

    async def _give_back(self, redis: RedisBackend, holder: str, member: str) -> bool:
        """Whether Redis took the lease back (removing it twice is harmless)."""
        try:
            await redis.call(lambda client: client.zrem(PREFIX + holder, member))
        except RedisUnavailable:
            return False
        return True

    def _give_back_later(self, redis: RedisBackend, holder: str, member: str) -> None:
        task = asyncio.get_running_loop().create_task(self._retry_give_back(redis, holder, member))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _retry_give_back(self, redis: RedisBackend, holder: str, member: str) -> None:
        # Renewed at most a term ago, the lease lapses within one: no need to try longer.
        with anyio.move_on_after(self.lease_seconds):
            while True:
                await anyio.sleep(RELEASE_RETRY_SECONDS)
                if await self._give_back(redis, holder, member):
                    return

    async def _keep(self, redis: RedisBackend, holder: str, member: str) -> None:
        args = [member, self.lease_seconds]
        while True:
            await anyio.sleep(self.lease_seconds / 3)
            # A failed renewal waits for the next round; a lease that lapsed meanwhile is
            # added back then.
            with suppress(RedisUnavailable):
                await redis.call(lambda _: self._renew(keys=[PREFIX + holder], args=args))
