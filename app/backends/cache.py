"""A versioned cache of serialised responses.

Values are stored under ``key`` + the current value of a version counter (``version_key``);
invalidating bumps the counter instead of deleting, so a reader that missed, loaded from
the database and fills afterwards writes under the version it read *before* loading: a
write that happened meanwhile makes that fill unreachable rather than stale.

The Redis implementation also prefixes every key with an epoch (see CacheEpoch): the
lookup reads epoch, version and value in one Lua call, so all three are consistent.
"""

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.backends.models import CacheEpoch
from app.backends.redis import RedisBackend, RedisUnavailable


@dataclass(frozen=True, slots=True)
class Lookup:
    value: bytes | None
    # Where a fill for this lookup goes: the version (and epoch) seen by the lookup.
    slot: str


class CacheUnavailable(Exception):
    pass


class Cache(Protocol):
    async def lookup(self, key: str, version_key: str) -> Lookup: ...

    async def fill(self, key: str, slot: str, value: bytes, ttl_seconds: float) -> None: ...

    async def bump(self, *version_keys: str) -> None:
        """Invalidate; raises CacheUnavailable when that could not be done."""


class MemoryCache:
    """One process's cache: bounded LRU with per-entry expiry."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self.versions: dict[str, int] = {}
        self.values: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def lookup(self, key: str, version_key: str) -> Lookup:
        slot = f"{key}:{self.versions.get(version_key, 0)}"
        entry = self.values.get(slot)
        if entry is None or entry[0] < time.monotonic():
            return Lookup(None, slot)
        self.values.move_to_end(slot)
        return Lookup(entry[1], slot)

    async def fill(self, key: str, slot: str, value: bytes, ttl_seconds: float) -> None:
        self.values[slot] = (time.monotonic() + ttl_seconds, value)
        self.values.move_to_end(slot)
        while len(self.values) > self.max_entries:
            self.values.popitem(last=False)

    async def bump(self, *version_keys: str) -> None:
        for version_key in version_keys:
            self.versions[version_key] = self.versions.get(version_key, 0) + 1


EPOCH_KEY = "cache:epoch"
# Version counters outlive any value stored under them (values expire within minutes).
VERSION_TTL_SECONDS = 86_400

_LOOKUP = """
local epoch = redis.call('GET', KEYS[1]) or '0'
local prefix = 'cache:' .. epoch .. ':'
local version = redis.call('GET', prefix .. ARGV[1]) or '0'
local slot = prefix .. ARGV[2] .. ':' .. version
return {slot, redis.call('GET', slot)}
"""
_BUMP = """
local prefix = 'cache:' .. (redis.call('GET', KEYS[1]) or '0') .. ':'
for i = 2, #ARGV do
    redis.call('INCR', prefix .. ARGV[i])
    redis.call('EXPIRE', prefix .. ARGV[i], ARGV[1])
end
return 1
"""
_RAISE_EPOCH = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
    redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""


class DatabaseEpoch:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self.sessionmaker = sessionmaker

    async def current(self) -> int:
        async with self.sessionmaker() as session:
            return await session.scalar(select(CacheEpoch.epoch).where(CacheEpoch.id == 1)) or 0

    async def bump(self) -> None:
        async with self.sessionmaker() as session:
            await session.execute(
                update(CacheEpoch).where(CacheEpoch.id == 1).values(epoch=CacheEpoch.epoch + 1)
            )
            await session.commit()


class RedisCache:
    def __init__(self, redis: RedisBackend, epoch: DatabaseEpoch) -> None:
        self.redis = redis
        self.epoch = epoch
        self._lookup = redis.client.register_script(_LOOKUP)
        self._bump = redis.client.register_script(_BUMP)

    async def lookup(self, key: str, version_key: str) -> Lookup:
        try:
            slot, value = await self.redis.call(
                lambda _: self._lookup(keys=[EPOCH_KEY], args=[version_key, key])
            )
        except RedisUnavailable as exc:
            raise CacheUnavailable(str(exc)) from exc
        return Lookup(value, slot.decode())

    async def fill(self, key: str, slot: str, value: bytes, ttl_seconds: float) -> None:
        try:
            await self.redis.call(
                lambda client: client.set(slot, value, px=int(ttl_seconds * 1000))
            )
        except RedisUnavailable as exc:
            raise CacheUnavailable(str(exc)) from exc

    async def bump(self, *version_keys: str) -> None:
        try:
            await self.redis.call(
                lambda _: self._bump(keys=[EPOCH_KEY], args=[VERSION_TTL_SECONDS, *version_keys])
            )
        except RedisUnavailable as exc:
            # Redis may come back with the old values: move everyone to a new namespace.
            await self.epoch.bump()
            raise CacheUnavailable(str(exc)) from exc

    async def sync_epoch(self) -> None:
        """Raise Redis' epoch to the database's (never lower it)."""
        epoch = await self.epoch.current()
        await self.redis.call(lambda client: client.eval(_RAISE_EPOCH, 1, EPOCH_KEY, epoch))

    async def sync_on_connect(self, connection: Connection) -> None:
        # Runs before the new connection serves its first command: a Redis that restarted
        # (every connection is new afterwards) is brought to the current epoch first.
        try:
            epoch = await self.epoch.current()
        except SQLAlchemyError as exc:
            # A Redis error, so that redis-py drops the connection instead of pooling it
            # unsynced (it only disconnects on its own errors) and callers take their
            # fallback instead of failing: the broker pump retries, requests go on.
            raise RedisConnectionError(f"cache epoch unavailable: {exc}") from exc
        await connection.send_command("EVAL", _RAISE_EPOCH, 1, EPOCH_KEY, epoch)
        await connection.read_response()
