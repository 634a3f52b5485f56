"""The item cache's own guarantees, on the in-process backend: concurrent misses share
one load, a fill that raced a write can never be read afterwards, and each lookup is
counted once."""

import asyncio

from prometheus_client import REGISTRY

from app.backends.cache import CacheUnavailable, MemoryCache
from app.items.cache import ItemCache


def test_concurrent_misses_share_one_database_load() -> None:
    cache = ItemCache(MemoryCache(), item_ttl=60, list_ttl=60)
    loads = 0

    async def load() -> bytes:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.05)  # a slow query: the others arrive while it runs
        return b'{"id": 1}'

    async def main() -> list[bytes | None]:
        return await asyncio.gather(*(cache.item(1, load) for _ in range(20)))

    assert asyncio.run(main()) == [b'{"id": 1}'] * 20
    assert loads == 1


def test_a_fill_that_raced_a_write_is_never_served() -> None:
    cache = ItemCache(MemoryCache(), item_ttl=60, list_ttl=60)

    async def main() -> bytes | None:
        async def stale_load() -> bytes:
            # The write commits and invalidates while this reader is still loading.
            await cache.invalidate(1)
            return b'{"title": "old"}'

        assert await cache.item(1, stale_load) == b'{"title": "old"}'

        async def fresh_load() -> bytes:
            return b'{"title": "new"}'

        return await cache.item(1, fresh_load)

    assert asyncio.run(main()) == b'{"title": "new"}'


class RefusingWrites(MemoryCache):
    """A cache that reads but cannot store (a full or read-only Redis)."""

    async def fill(self, key: str, slot: str, value: bytes, ttl_seconds: float) -> None:
        raise CacheUnavailable("READONLY You can't write against a read only replica.")


def test_a_lookup_is_counted_once_even_when_its_fill_fails() -> None:
    cache = ItemCache(RefusingWrites(), item_ttl=60, list_ttl=60)

    async def load() -> bytes:
        return b'{"id": 1}'

    def counts() -> tuple[float, ...]:
        results = (
            REGISTRY.get_sample_value("cache_requests_total", {"cache": "items", "result": r}) or 0
            for r in ("hit", "miss", "error")
        )
        fills = REGISTRY.get_sample_value("cache_fill_errors_total", {"cache": "items"}) or 0
        return (*results, fills)

    before = counts()
    assert asyncio.run(cache.item(1, load)) == b'{"id": 1}'
    after = counts()
    # One lookup, one miss; the failed store counted apart, not as a second lookup.
    assert tuple(b - a for a, b in zip(before, after, strict=True)) == (0, 1, 0, 1)
