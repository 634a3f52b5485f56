"""The per-user socket cap's leases on a real Redis: shared by every process, renewed while
held, given back on close, and lapsing when their holder dies without giving them back."""

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import redis.asyncio as redis_asyncio

from app.backends.leases import PREFIX, Leases
from app.backends.redis import RedisBackend
from deploy.stack.redis import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def backend(server: RedisServer) -> RedisBackend:
    return RedisBackend(server.url(), timeout_seconds=2, breaker_seconds=0)


async def granted(leases: Leases, stack: AsyncExitStack, limit: int = 2) -> bool:
    """Takes a lease (kept until ``stack`` closes) and says whether it was granted."""
    return await stack.enter_async_context(leases.hold("user:1", limit))


def test_the_cap_is_shared_and_a_closed_socket_frees_its_place(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        one, two = Leases(backend(redis_server)), Leases(backend(redis_server))  # two workers
        async with AsyncExitStack() as first, AsyncExitStack() as second:
            assert await granted(one, first)
            assert await granted(two, second)
            async with AsyncExitStack() as third:
                assert not await granted(one, third)
                assert not await granted(two, third)
            await second.aclose()
            async with AsyncExitStack() as again:
                assert await granted(one, again)

    asyncio.run(main())


def test_sockets_closed_while_redis_stalls_free_their_places_when_it_answers_again(
    redis_server: RedisServer,
) -> None:
    """Redis stopped (SIGSTOP) while a user's two sockets close: their leases cannot be
    given back then, but must be once Redis answers, well before they would lapse (60 s),
    or the user is refused with no socket open."""
    pid = redis_server.pid
    assert pid is not None

    async def leases_in_redis() -> int:
        async with redis_asyncio.Redis.from_url(redis_server.url()) as client:
            return await client.zcard(PREFIX + "user:1")

    async def main() -> None:
        # The service's timeout; a breaker that stays open through the second close.
        leases = Leases(RedisBackend(redis_server.url(), timeout_seconds=0.25, breaker_seconds=5))
        async with AsyncExitStack() as first, AsyncExitStack() as second:
            assert await granted(leases, first)
            assert await granted(leases, second)
            os.kill(pid, signal.SIGSTOP)
            try:
                await second.aclose()  # the other way round, cancel scopes would cross
                await first.aclose()
            finally:
                os.kill(pid, signal.SIGCONT)
        async with asyncio.timeout(30):  # half a lease's term
            while True:  # polled: nothing announces the release
                if await leases_in_redis() == 0:
                    break
                await asyncio.sleep(0.1)
        other = Leases(backend(redis_server))  # another worker: both places are free
        async with AsyncExitStack() as again:
            assert await granted(other, again)
            assert await granted(other, again)
        await leases.close()

    asyncio.run(main())


# A worker holding one socket's lease, SIGKILLed by the test: it never gives it back.
DYING_HOLDER = """
import asyncio, sys
import redis.asyncio as redis_asyncio

from app.backends.leases import PREFIX, Leases
from app.backends.redis import RedisBackend

async def main():
    leases = Leases(RedisBackend(sys.argv[1], 2, 0), lease_seconds=3)
    async with leases.hold("user:1", 2) as granted:
        print(granted, flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


def test_a_held_lease_outlives_its_term_and_a_dead_holders_lapses(
    redis_server: RedisServer,
) -> None:
    dying = subprocess.Popen(
        [sys.executable, "-c", DYING_HOLDER, redis_server.url()], stdout=subprocess.PIPE, text=True
    )
    try:
        assert dying.stdout is not None
        assert dying.stdout.readline() == "True\n"
    finally:
        dying.send_signal(signal.SIGKILL)
        dying.wait()

    async def main() -> None:
        live = Leases(backend(redis_server), lease_seconds=3)
        async with AsyncExitStack() as held:
            assert await granted(live, held)  # beside the dead one's: 2 of 2
            # Renewed every third of its term, the live one is still counted after more
            # than two terms; the dead one is not.
            await asyncio.sleep(7)
            other = Leases(backend(redis_server))
            async with AsyncExitStack() as probe:
                assert await granted(other, probe)
            async with AsyncExitStack() as probe:
                assert not await granted(other, probe, limit=1)

    asyncio.run(main())


@pytest.mark.parametrize("redis", ["none", "unreachable"])
def test_without_redis_each_process_counts_its_own(redis_server: RedisServer, redis: str) -> None:
    if redis == "unreachable":
        redis_server.stop()

    async def main() -> None:
        leases = Leases(None if redis == "none" else backend(redis_server))
        async with AsyncExitStack() as first:
            assert await granted(leases, first, limit=1)
            async with AsyncExitStack() as second:
                assert not await granted(leases, second, limit=1)
        async with AsyncExitStack() as again:
            assert await granted(leases, again, limit=1)
        assert leases.local == {}

    asyncio.run(main())
