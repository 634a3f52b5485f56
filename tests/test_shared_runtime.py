"""Cached reads, rate limits and readiness on a real Redis shared by two app instances
("replicas" A and B on one database), including Redis going away and coming back with
its old data."""

import asyncio
import io
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis as redis_lib
import redis.asyncio as redis_asyncio
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import update

from app import migrate
from app.backends import create_backends
from app.backends.broker import CHANNEL_PREFIX, RedisBroker, Subscription
from app.backends.cache import EPOCH_KEY, DatabaseEpoch, RedisCache
from app.backends.models import CacheEpoch
from app.backends.redis import RedisBackend, RedisUnavailable
from app.db import create_engine, create_sessionmaker
from app.main import create_app
from app.settings import Settings
from deploy.stack.process import wait_for
from deploy.stack.redis import RedisServer
from tests.api import PASSWORD, Api, assert_problem
from tests.conftest import make_settings
from tests.logs import attach, records
from tests.prom import parse, value


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    # One per test: these tests stop and restart it.
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def replicas(
    database_url: str, tmp_path: Path, redis_server: RedisServer
) -> Iterator[tuple[Api, Api]]:
    """Two app instances on one database and one Redis, like two replicas."""
    settings = make_settings(
        database_url, tmp_path / "data", redis_url=redis_server.url(), redis_breaker_seconds=0
    )
    with ExitStack() as stack:
        a = stack.enter_context(TestClient(create_app(settings)))
        b = stack.enter_context(TestClient(create_app(settings)))
        yield Api(a, settings), Api(b, settings)


def cache_results(client: TestClient) -> dict[str, float]:
    samples = parse(client.get("/metrics").text)
    return {
        result: value(samples, "cache_requests_total", cache="items", result=result)
        for result in ("hit", "miss", "error")
    }


def test_item_reads_are_served_from_the_cache(replicas: tuple[Api, Api]) -> None:
    a, b = replicas
    alice = a.account("alice")
    item = a.create_item(alice)
    url = f"/api/v1/items/{item['id']}"
    before = cache_results(b.client)
    first = b.client.get(url)
    second = b.client.get(url)
    after = cache_results(b.client)
    assert first.json() == second.json() == item
    assert first.headers["content-type"] == "application/json"
    assert after["miss"] - before["miss"] == 1
    assert after["hit"] - before["hit"] == 1
    # The other replica finds what B stored.
    hits = cache_results(a.client)["hit"]
    assert a.client.get(url).json() == item
    assert cache_results(a.client)["hit"] == hits + 1


def test_a_write_on_one_replica_is_seen_by_the_next_read_on_the_other(
    replicas: tuple[Api, Api],
) -> None:
    a, b = replicas
    alice = a.account("alice")
    item = a.create_item(alice, title="Lamp")
    url = f"/api/v1/items/{item['id']}"
    assert a.client.get(url).json()["title"] == "Lamp"  # cached on A's side
    assert a.client.get("/api/v1/items").json()["total"] == 1  # list page cached too

    patched = b.client.patch(url, json={"title": "Desk lamp"}, headers=alice.headers)
    assert patched.status_code == 200
    assert a.client.get(url).json()["title"] == "Desk lamp"
    assert a.client.get("/api/v1/items").json()["items"][0]["title"] == "Desk lamp"

    b.create_item(alice, title="Chair")
    assert a.client.get("/api/v1/items").json()["total"] == 2
    assert b.client.delete(url, headers=alice.headers).status_code == 204
    assert_problem(a.client.get(url), 404)
    assert [i["title"] for i in a.client.get("/api/v1/items").json()["items"]] == ["Chair"]


def test_ready_reports_redis(replicas: tuple[Api, Api], redis_server: RedisServer) -> None:
    a, _ = replicas
    assert a.client.get("/health/ready").json() == {
        "status": "ok",
        "checks": {"database": "ok", "redis": "ok"},
    }
    redis_server.stop()
    degraded = a.client.get("/health/ready")
    assert degraded.status_code == 200
    assert degraded.json() == {
        "status": "degraded",
        "checks": {"database": "ok", "redis": "unavailable"},
    }
    redis_server.start()
    assert a.client.get("/health/ready").json()["status"] == "ok"


def test_reads_survive_a_redis_outage_and_recover(
    replicas: tuple[Api, Api], redis_server: RedisServer
) -> None:
    a, _ = replicas
    alice = a.account("alice")
    item = a.create_item(alice)
    url = f"/api/v1/items/{item['id']}"
    assert a.client.get(url).status_code == 200

    redis_server.stop()
    errors = cache_results(a.client)["error"]
    for _ in range(3):
        response = a.client.get(url)
        assert response.status_code == 200
        assert response.json() == item
    assert a.client.get("/api/v1/items").json()["total"] == 1
    assert cache_results(a.client)["error"] > errors

    redis_server.start()

    def served_from_cache() -> bool:
        # Each pooled connection to the old server fails once and that read falls back to
        # the database; recovered means a read is a cache hit again, with no error.
        before = cache_results(a.client)
        assert a.client.get(url).json() == item
        after = cache_results(a.client)
        return after["hit"] > before["hit"] and after["error"] == before["error"]

    wait_for(served_from_cache, timeout=10, what="error-free cache hits after Redis came back")


def test_a_write_during_the_outage_is_not_hidden_by_redis_old_data(
    replicas: tuple[Api, Api], redis_server: RedisServer
) -> None:
    a, b = replicas
    alice = a.account("alice")
    item = a.create_item(alice, title="Before")
    url = f"/api/v1/items/{item['id']}"
    # Both replicas have read (and so cached) the old version.
    assert a.client.get(url).json()["title"] == "Before"
    assert b.client.get(url).json()["title"] == "Before"
    assert b.client.get("/api/v1/items").json()["items"][0]["title"] == "Before"

    redis_server.stop()  # saves: the old cached copies come back with it
    patched = a.client.patch(url, json={"title": "After"}, headers=alice.headers)
    assert patched.status_code == 200
    redis_server.start()

    for replica in (b, a):
        assert replica.client.get(url).json()["title"] == "After"
        assert replica.client.get("/api/v1/items").json()["items"][0]["title"] == "After"


def test_rate_limits_are_one_budget_across_replicas(replicas: tuple[Api, Api]) -> None:
    a, b = replicas
    a.register("alice")
    statuses = [
        (a if n % 2 else b).login("alice", "a wrong password").status_code for n in range(6)
    ]
    # Five failures per account per 15 minutes, counted together on both replicas.
    assert statuses == [401] * 5 + [429]
    refused = a.login("alice")
    body = assert_problem(refused, 429)
    assert body["title"] == "Too Many Requests"
    assert int(refused.headers["retry-after"]) > 0
    assert refused.headers["ratelimit-limit"] == "5"
    assert refused.headers["ratelimit-remaining"] == "0"


def test_guesses_sent_together_to_both_replicas_are_checked_at_most_the_budget(
    replicas: tuple[Api, Api],
) -> None:
    """Each guess spends the shared budget before it is checked, whichever replica has it."""
    a, b = replicas
    a.register("alice")
    with ThreadPoolExecutor(10) as pool:
        statuses = Counter(
            pool.map(lambda n: (a, b)[n % 2].login("alice", f"wrong {n}").status_code, range(10))
        )
    assert statuses == Counter({401: 5, 429: 5})


def test_a_login_on_one_replica_clears_the_failures_counted_on_the_other(
    replicas: tuple[Api, Api],
) -> None:
    a, b = replicas
    a.register("alice")
    assert [a.login("alice", "a typo").status_code for _ in range(4)] == [401] * 4
    assert b.login("alice").status_code == 200
    assert [a.login("alice", "a typo").status_code for _ in range(5)] == [401] * 5


def test_an_account_has_one_failure_budget_whatever_it_is_called(
    replicas: tuple[Api, Api],
) -> None:
    """Its username in any case and its e-mail address spend the same five guesses, and so
    does a wrong current password when changing it (with a stolen access token, say)."""
    a, b = replicas
    alice = a.account("alice")
    guesses = [
        a.login("alice", "wrong one"),
        b.login("ALICE", "wrong two"),
        a.login("alice@example.com", "wrong three"),
    ] + [
        b.client.patch(
            "/api/v1/users/me",
            json={"password": "a new password", "current_password": f"wrong {n}"},
            headers=alice.headers,
        )
        for n in range(2)
    ]
    assert [r.status_code for r in guesses] == [401, 401, 401, 403, 403]
    for replica, login in ((a, "Alice@Example.com"), (b, "alice")):
        assert_problem(replica.login(login), 429)
    changed = a.client.patch(
        "/api/v1/users/me",
        json={"password": "a new password", "current_password": PASSWORD},
        headers=alice.headers,
    )
    assert_problem(changed, 429)
    # Other changes need no password, and spend nothing.
    renamed = a.client.patch("/api/v1/users/me", json={"username": "alicia"}, headers=alice.headers)
    assert renamed.status_code == 200


def test_login_limit_per_client_address(replicas: tuple[Api, Api]) -> None:
    a, b = replicas
    statuses = [(a if n % 2 else b).login(f"nobody{n}", "x").status_code for n in range(11)]
    assert statuses == [401] * 10 + [429]


def test_limiter_falls_back_locally_while_redis_is_down(
    replicas: tuple[Api, Api], redis_server: RedisServer
) -> None:
    a, _ = replicas
    redis_server.stop()
    # Login is held to the strict per-process fallback (3/minute by default)...
    statuses = [a.login(f"nobody{n}", "x").status_code for n in range(4)]
    assert statuses == [401, 401, 401, 429]
    # ...while general traffic keeps flowing under the normal limit.
    assert all(a.client.get("/api/v1/items").status_code == 200 for _ in range(10))
    redis_server.start()
    assert a.login("nobody-else", "x").status_code == 401


def test_production_refuses_in_process_backends_with_several_workers() -> None:
    with pytest.raises(ValueError, match="APP_REDIS_URL is required"):
        Settings(
            _env_file=None,  # type: ignore[call-arg]
            env="production",
            secret_key="kM9v-Qz2xT7rL0pWn5sB8yHc3dFj6gAe",
            database_url="postgresql+asyncpg://app@db/app",
            WEB_CONCURRENCY=2,
        )


def test_redis_and_database_calls_are_traced_within_requests_only(
    database_url: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = make_settings(
        database_url, tmp_path, redis_url=redis_server.url(), cache_epoch_sync_seconds=0.02
    )
    with TestClient(create_app(settings, tracer_provider=provider)) as client:
        assert client.get("/health/ready").json()["checks"] == {"database": "ok", "redis": "ok"}
        assert client.get("/api/v1/items").status_code == 200
        refused = client.post("/api/v1/auth/token", data={"username": "x", "password": "wrong1234"})
        assert refused.status_code == 401
        time.sleep(0.2)  # the epoch sync's Redis and database calls, ten rounds of them
    spans = exporter.get_finished_spans()

    def in_trace_of(name: str) -> set[str | None]:
        request = next(span for span in spans if span.name == name)
        in_trace = [span for span in spans if span.context.trace_id == request.context.trace_id]
        return {span.attributes.get("db.system") for span in in_trace}

    items = in_trace_of("GET /api/v1/items")
    assert "redis" in items  # the cache lookup
    assert {"sqlite", "postgresql"} & items  # the miss went to the database
    assert "redis" in in_trace_of("POST /api/v1/auth/token")  # the shared rate limits
    # Probes and periodic jobs start no traces: every trace is a request's.
    requests = {span.context.trace_id for span in spans if span.kind is SpanKind.SERVER}
    orphans = {span.name for span in spans if span.context.trace_id not in requests}
    assert not orphans


def test_logout_on_one_replica_revokes_the_access_token_on_the_other(
    replicas: tuple[Api, Api],
) -> None:
    a, b = replicas
    alice = a.account("alice")
    assert b.client.get("/api/v1/users/me", headers=alice.headers).status_code == 200
    logout = a.client.post(
        "/api/v1/auth/logout",
        json={"refresh_token": alice.tokens["refresh_token"]},
        headers=alice.headers,
    )
    assert logout.status_code == 204
    assert_problem(b.client.get("/api/v1/users/me", headers=alice.headers), 401)


def test_a_redis_connection_opened_while_the_database_is_down_is_dropped_not_pooled(
    tmp_path: Path, redis_server: RedisServer, log_lines: io.StringIO
) -> None:
    """Each new Redis connection first pushes the database's cache epoch into Redis. When
    the database cannot be read then, the connection must not be kept unsynced (a Redis
    back with old data would serve what a write changed meanwhile), the caller gets its
    fallback rather than an error, and the broker's pump keeps trying rather than dying,
    saying so once rather than once a try."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"  # no tables yet: the read fails
    attach(log_lines)

    async def main() -> None:
        engine = create_engine(url)
        sessionmaker = create_sessionmaker(engine)
        redis = RedisBackend(redis_server.url(), timeout_seconds=2, breaker_seconds=0)
        cache = RedisCache(redis, DatabaseEpoch(sessionmaker))
        redis.on_connect = cache.sync_on_connect
        broker = RedisBroker(redis, reconnect_seconds=0.05)
        pump = asyncio.create_task(broker.run())
        try:
            with pytest.raises(RedisUnavailable):
                await redis.call(lambda client: client.get(EPOCH_KEY))
            await asyncio.sleep(0.3)  # the pump's connections failed the same way, 6 times
            assert not pump.done()

            # The database comes back, a step ahead of Redis.
            await asyncio.to_thread(migrate.upgrade, url)
            async with sessionmaker() as session:
                await session.execute(update(CacheEpoch).values(epoch=7))
                await session.commit()
            assert await redis.call(lambda client: client.get(EPOCH_KEY)) == b"7"
            async with broker.subscribe("room") as inbox:
                for _ in range(100):  # until the pump has subscribed again
                    # Published by another process: the broker delivers its own at once.
                    await redis.call(lambda client: client.publish(CHANNEL_PREFIX + "room", b"hi"))
                    try:
                        assert await asyncio.wait_for(inbox.queue.get(), 0.1) == b"hi"
                        break
                    except TimeoutError:
                        continue
                else:
                    pytest.fail("the broker's pump never delivered again")
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            await redis.close()
            await engine.dispose()

    asyncio.run(main())
    pump_lines = [r["event"] for r in records(log_lines) if r["event"].startswith("broker:")]
    assert pump_lines == ["broker: redis subscription lost", "broker: redis subscription restored"]


async def pumps_subscribed(url: str) -> int:
    """How many broker pumps hold their pattern subscription in Redis."""
    # A connection of its own each time: a pooled one would not survive the restart.
    async with redis_asyncio.Redis.from_url(url) as client:
        clients = await client.client_list()
    return sum(int(client["psub"]) > 0 for client in clients)


async def wait_for_pumps(url: str, count: int) -> None:
    async with asyncio.timeout(10):
        while True:  # polled: Redis tells no one when a client subscribes
            if await pumps_subscribed(url) == count:
                return
            await asyncio.sleep(0.02)


async def received_until(inbox: Subscription, last: bytes) -> list[bytes]:
    """What ``inbox`` got, up to and including ``last``."""
    messages: list[bytes] = []
    async with asyncio.timeout(10):
        while not messages or messages[-1] != last:
            messages.append(await inbox.queue.get())
    return messages


def test_messages_sent_while_redis_restarts_reach_the_senders_process_once(
    redis_server: RedisServer,
) -> None:
    """After a restart, a process's pump waits before subscribing again, and Redis passes
    what is published meanwhile to nobody: the members on the sender's process must still
    get every message, and once only when the pump is back."""

    async def main() -> None:
        url = redis_server.url()
        backends = [RedisBackend(url, timeout_seconds=2, breaker_seconds=0) for _ in range(3)]
        # Three processes, whose pumps wait 3 s before subscribing again after losing
        # Redis: long enough a gap for a restart and the messages sent in it.
        here, there, elsewhere = (RedisBroker(redis, reconnect_seconds=3) for redis in backends)
        pumps = [asyncio.create_task(broker.run()) for broker in (here, there)]
        try:
            await wait_for_pumps(url, 2)
            async with (
                here.subscribe("room") as sender,
                here.subscribe("room") as neighbour,
                there.subscribe("room") as remote,
            ):
                await here.publish("room", b"before")
                # In threads: the pumps must see Redis go, as they would in production.
                await asyncio.to_thread(redis_server.stop)
                await asyncio.to_thread(redis_server.start)
                for redis in backends:
                    # Pooled connections to the old server would each fail one PUBLISH,
                    # which the outage path covers: here every PUBLISH succeeds.
                    await redis.client.connection_pool.disconnect()
                assert await pumps_subscribed(url) == 0
                gap = [f"gap {n}".encode() for n in range(5)]
                for message in gap:
                    await here.publish("room", message)
                # Else these were not published in the gap this test is about.
                assert await pumps_subscribed(url) == 0

                await wait_for_pumps(url, 2)
                await here.publish("room", b"after")
                # Published once "after" reached Redis, so it comes through both pumps
                # after "after" (or its copy, on here's) has.
                await elsewhere.publish("room", b"last")
                for inbox in (sender, neighbour):
                    assert await received_until(inbox, b"last") == [
                        b"before", *gap, b"after", b"last"
                    ]  # fmt: skip
                # Another process's members miss what was sent while its pump was down.
                assert await received_until(remote, b"last") == [b"before", b"after", b"last"]
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for redis in backends:
                await redis.close()

    asyncio.run(main())


def test_an_echo_that_comes_back_after_many_other_messages_is_skipped_all_the_same(
    redis_server: RedisServer, log_lines: io.StringIO
) -> None:
    """A process delivers what it publishes itself and skips it when Redis passes it back.
    Told by a memory of what it had sent, which kept the last 10,000, the echo of a message
    that came back after more had been sent (a burst on a busy worker, or a spell of Redis
    refusing publishes, whose messages never come back) was taken for a stranger's and
    delivered twice."""
    count = 12_000
    attach(log_lines, "ERROR")  # not a warning for each message of the burst

    async def main() -> None:
        url = redis_server.url()
        redis = RedisBackend(url, timeout_seconds=2, breaker_seconds=60)
        here = RedisBroker(redis)
        pump = asyncio.create_task(here.run())
        messages = [f"burst {n}".encode() for n in range(count)]

        async def burst() -> None:
            # Run right after "first" set off, before its echo can be back: with the
            # breaker open none of these waits for anything, nor reaches Redis.
            redis.failed(RedisConnectionError("refused for the test"))
            for message in messages:
                await here.publish("room", message)
            assert await redis.ping()  # closes the breaker

        try:
            await wait_for_pumps(url, 1)
            async with here.subscribe("room", count + 10) as inbox:
                await asyncio.gather(here.publish("room", b"first"), burst())
                # From another process, after the first's echo: through the pump after it.
                await redis.call(lambda client: client.publish(CHANNEL_PREFIX + "room", b"last"))
                assert await received_until(inbox, b"last") == [b"first", *messages, b"last"]
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            await redis.close()

    asyncio.run(main())


def test_identical_messages_from_another_process_are_each_delivered(
    redis_server: RedisServer,
) -> None:
    """A message Redis never passed back to its sender's pump (published before it
    subscribed, as after a Redis restart) must not make the sender's process skip the same
    bytes later published elsewhere: each is a message of its own."""

    async def main() -> None:
        url = redis_server.url()
        backends = [RedisBackend(url, timeout_seconds=2, breaker_seconds=0) for _ in range(2)]
        here, there = (RedisBroker(redis) for redis in backends)
        pump: asyncio.Task[None] | None = None
        try:
            async with here.subscribe("room") as inbox:
                await here.publish("room", b"hello")  # no pump subscribed yet
                pump = asyncio.create_task(here.run())
                await wait_for_pumps(url, 1)
                for message in (b"hello", b"hello", b"last"):
                    await there.publish("room", message)
                assert await received_until(inbox, b"last") == [b"hello"] * 3 + [b"last"]
        finally:
            if pump is not None:
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
            for redis in backends:
                await redis.close()

    asyncio.run(main())


def test_processes_publishing_the_same_messages_at_once_deliver_each_once(
    redis_server: RedisServer,
) -> None:
    """Two processes publish the same bytes at the same time, each over several connections:
    every member, on either, gets every one of them once, its own process's and the
    other's."""
    senders, each = 4, 100  # per process: publishers at once, messages from each

    async def main() -> None:
        url = redis_server.url()
        backends = [RedisBackend(url, timeout_seconds=2, breaker_seconds=0) for _ in range(2)]
        here, there = (RedisBroker(redis) for redis in backends)
        pumps = [asyncio.create_task(broker.run()) for broker in (here, there)]

        async def send(broker: RedisBroker) -> None:
            for _ in range(each):
                await broker.publish("room", b"same")

        try:
            await wait_for_pumps(url, 2)
            total = 2 * senders * each
            async with (
                here.subscribe("room", total + 1) as near,
                there.subscribe("room", total + 1) as far,
            ):
                await asyncio.gather(*(send(b) for b in (here, there) for _ in range(senders)))
                # From a third process: through each pump after every echo.
                last = CHANNEL_PREFIX + "room", b"last"
                await backends[0].call(lambda client: client.publish(*last))
                for inbox in (near, far):
                    assert await received_until(inbox, b"last") == [b"same"] * total + [b"last"]
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for redis in backends:
                await redis.close()

    asyncio.run(main())


def test_replicas_of_the_previous_release_read_and_send_the_same_messages(
    redis_server: RedisServer,
) -> None:
    """A rolling deploy runs both releases on one Redis. The previous release's pump takes
    every message on the ``rt:*`` channels as it comes, the bytes to its clients as they
    are, and publishes the bytes alone: what this release publishes there must be exactly
    the message, nothing more, and what that one publishes must reach this one's members."""

    async def main() -> None:
        url = redis_server.url()
        redis = RedisBackend(url, timeout_seconds=2, breaker_seconds=0)
        here = RedisBroker(redis)
        pump = asyncio.create_task(here.run())
        previous = redis_asyncio.Redis.from_url(url)  # a replica of the previous release
        try:
            async with previous.pubsub() as pubsub, here.subscribe("room") as inbox:
                await pubsub.psubscribe(CHANNEL_PREFIX + "*")
                await wait_for_pumps(url, 2)
                await here.publish("room", b"from this release")
                await here.publish("user:7", b"private")
                await previous.publish(CHANNEL_PREFIX + "room", b"from the previous one")
                assert await received_until(inbox, b"from the previous one") == [
                    b"from this release", b"from the previous one"
                ]  # fmt: skip
                seen = []
                async with asyncio.timeout(10):
                    while len(seen) < 3:
                        message = await pubsub.get_message(timeout=1)
                        if message is not None and message["type"] == "pmessage":
                            seen.append((message["channel"], message["data"]))
                assert seen == [
                    (b"rt:room", b"from this release"),
                    (b"rt:user:7", b"private"),
                    (b"rt:room", b"from the previous one"),
                ]
                assert await pubsub.get_message(timeout=0.2) is None  # nothing else
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            await redis.close()
            await previous.aclose()

    asyncio.run(main())


def test_the_cache_epoch_sync_logs_an_outage_once_not_once_a_round(
    tmp_path: Path, redis_server: RedisServer, log_lines: io.StringIO
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"  # no tables yet: the read fails
    settings = make_settings(
        url, tmp_path, redis_url=redis_server.url(), cache_epoch_sync_seconds=0.02
    )
    attach(log_lines)

    def sync_lines() -> list[str]:
        return [r["event"] for r in records(log_lines) if r["event"].startswith("cache epoch")]

    async def main() -> None:
        engine = create_engine(url)
        backends = create_backends(settings, create_sessionmaker(engine))
        try:
            await asyncio.sleep(0.3)  # some fifteen rounds with the database unreadable
            assert sync_lines() == ["cache epoch sync failed"]
            await asyncio.to_thread(migrate.upgrade, url)
            for _ in range(100):
                if len(sync_lines()) > 1:
                    break
                await asyncio.sleep(0.02)
        finally:
            await backends.close()
            await engine.dispose()

    asyncio.run(main())
    assert sync_lines() == ["cache epoch sync failed", "cache epoch sync recovered"]


def test_closing_the_backends_goes_on_past_a_task_that_failed(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # The lifespan closes the database pool and writes the last access lines after this.
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    settings = make_settings(url, tmp_path, redis_url=redis_server.url())

    async def broken() -> None:
        raise RuntimeError("a bug in a background loop")

    async def main() -> None:
        engine = create_engine(url)
        backends = create_backends(settings, create_sessionmaker(engine))
        backends.tasks.append(asyncio.create_task(broken()))
        await asyncio.sleep(0)
        await backends.close()
        assert all(task.done() for task in backends.tasks)
        await engine.dispose()

    asyncio.run(main())


def test_a_redis_that_refuses_writes_still_refuses_revoked_tokens(
    database_url: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A full Redis (maxmemory, noeviction) or a read-only replica answers every write
    with an error, the rate limiter's included, but still reads: a revoked token must stay
    refused. An error Redis answers is no outage, so it must not open the breaker, behind
    which the revocation check lets every token through."""
    settings = make_settings(
        database_url, tmp_path / "data", redis_url=redis_server.url(), redis_breaker_seconds=60
    )
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings)
        alice, bob = api.account("alice"), api.account("bob")
        logout = client.post(
            "/api/v1/auth/logout",
            json={"refresh_token": alice.tokens["refresh_token"]},
            headers=alice.headers,
        )
        assert logout.status_code == 204
        admin = redis_lib.Redis.from_url(redis_server.url())
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        try:
            for _ in range(5):
                assert client.get("/api/v1/users/me", headers=bob.headers).status_code == 200
                assert_problem(client.get("/api/v1/users/me", headers=alice.headers), 401)
        finally:
            admin.config_set("maxmemory", 0)
            admin.close()
