"""Liveness never touches the database; readiness reports it, including when it is down."""

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from alembic import command
from fastapi import Request
from fastapi.testclient import TestClient
from sqlalchemy import text

from app import health, migrate
from app.backends.redis import RedisBackend
from app.db import create_engine
from app.health import CheckState
from app.main import create_app
from deploy.stack.postgres import PostgresServer
from tests.conftest import make_settings
from tests.test_migrations_and_cli import wait_for_lock_waiters

HEALTHY = {"status": "ok", "checks": {"database": "ok", "redis": "disabled"}}
DOWN = {"status": "unavailable", "checks": {"database": "unavailable", "redis": "disabled"}}


def test_live_and_ready(client: TestClient) -> None:
    live = client.get("/health/live")
    assert live.json() == {"status": "ok", "checks": {}}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == HEALTHY
    # No cache between a load balancer and the instance may answer for it.
    assert live.headers["cache-control"] == ready.headers["cache-control"] == "no-store"


def test_readiness_follows_a_postgres_that_stops_and_comes_back(tmp_path: Path) -> None:
    with PostgresServer(tmp_path / "pg") as server:
        server.create_database("app")
        migrate.upgrade(server.url("app"))
        # The server commits asynchronously (synchronous_commit=off): written to disk now,
        # the migrations survive the crash-like stop below.
        asyncio.run(execute(server.url("app"), "CHECKPOINT"))
        settings = make_settings(server.url("app"), tmp_path / "data", health_timeout_seconds=2)
        with TestClient(create_app(settings)) as client:
            assert client.get("/health/ready").json() == HEALTHY

            server.stop(mode="immediate")
            ready = client.get("/health/ready")
            assert ready.status_code == 503
            assert ready.json() == DOWN
            assert client.get("/health/live").status_code == 200

            server.start()
            ready = client.get("/health/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json() == HEALTHY


def test_unreachable_database_is_not_ready_but_alive(tmp_path: Path) -> None:
    settings = make_settings(
        "postgresql+asyncpg://nobody@127.0.0.1:9/none", tmp_path, health_timeout_seconds=1
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/health/ready").status_code == 503
        assert client.get("/health/live").status_code == 200


def test_probes_and_scrapes_by_address_pass_the_allowed_hosts(
    database_url: str, tmp_path: Path
) -> None:
    """The image's HEALTHCHECK asks 127.0.0.1:8000, a kubelet the pod's IP, Prometheus
    the instance's address: with APP_ALLOWED_HOSTS set to the public name they got 400s,
    so every instance was unhealthy (restarted, never ready) and unscraped."""
    settings = make_settings(
        database_url,
        tmp_path / "data",
        allowed_hosts=["api.example.com"],
        metrics_allowed_networks=["127.0.0.0/8"],
    )
    app = create_app(settings)
    with TestClient(app, base_url="http://127.0.0.1:8000", client=("127.0.0.1", 5000)) as client:
        assert client.get("/health/live").status_code == 200
        assert client.get("/health/ready").json() == HEALTHY
        assert client.get("/metrics").status_code == 200
        # Everything else still answers the public name only.
        assert client.get("/api/v1/items").status_code == 400
        public = client.get("/api/v1/items", headers={"Host": "api.example.com"})
        assert public.status_code == 200


def test_the_database_and_redis_are_checked_side_by_side(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked one after the other, a slow database and a slow Redis added their timeouts
    (1.25 s measured), past the 1 s Kubernetes waits for a probe: every replica turned
    unready together. Each check here finishes only once the other has started, so run in
    sequence the first gives up waiting and the probe fails."""
    started = {"database": asyncio.Event(), "redis": asyncio.Event()}

    async def waits_for(other: str, mine: str) -> CheckState:
        started[mine].set()
        try:
            async with asyncio.timeout(5):
                await started[other].wait()
        except TimeoutError:
            return "unavailable"
        return "ok"

    async def check_database(request: Request, limit_seconds: float) -> CheckState:
        return await waits_for("redis", "database")

    async def check_redis(redis: RedisBackend | None, limit_seconds: float) -> CheckState:
        return await waits_for("database", "redis")

    monkeypatch.setattr(health, "_check_database", check_database)
    monkeypatch.setattr(health, "_check_redis", check_redis)
    ready = client.get("/health/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}


def test_readiness_needs_no_connection_of_the_requests_pool(tmp_path: Path) -> None:
    """Under load, with every pooled connection taken, the probe waited for one and failed:
    every replica turned unready at once and the load balancer dropped them all. Here a
    request parked on a lock holds the only pooled connection: the probe still answers 200,
    and 503 once the database is really down."""
    with PostgresServer(tmp_path / "pg") as server:
        server.create_database("app")
        migrate.upgrade(server.url("app"))
        settings = make_settings(
            server.url("app"),
            tmp_path / "data",
            db_pool_size=1,
            db_max_overflow=0,
            health_timeout_seconds=2,
        )
        with TestClient(create_app(settings)) as client:
            asyncio.run(probe_with_the_pool_held(client, server))


async def probe_with_the_pool_held(client: TestClient, server: PostgresServer) -> None:
    engine = create_engine(server.url("app"))
    try:
        async with engine.connect() as holder, engine.connect() as observer:
            await holder.execute(text("LOCK TABLE items IN ACCESS EXCLUSIVE MODE"))
            parked = asyncio.create_task(asyncio.to_thread(client.get, "/api/v1/items"))
            async with asyncio.timeout(60):
                await wait_for_lock_waiters(observer, 1)
            ready = await asyncio.to_thread(client.get, "/health/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json() == HEALTHY
            await holder.rollback()
            assert (await parked).status_code == 200
    finally:
        await engine.dispose()
    server.stop(mode="immediate")
    ready = await asyncio.to_thread(client.get, "/health/ready")
    assert ready.status_code == 503
    assert ready.json() == DOWN


async def execute(database_url: str, statement: str) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


def test_readiness_follows_the_schema_not_only_the_connection(
    database_url: str, tmp_path: Path
) -> None:
    """On a database never migrated the probe said ready while every request was a 500.
    Not ready either on an older revision of this release's; ready on this release's latest
    and on one it does not know: a newer release's, that old replicas keep serving on
    during a rolling deploy."""
    config = migrate.alembic_config(database_url)
    command.downgrade(config, "base")
    asyncio.run(execute(database_url, "DROP TABLE alembic_version"))
    settings = make_settings(database_url, tmp_path / "data")
    with TestClient(create_app(settings)) as client:
        ready = client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == "unmigrated"

        command.upgrade(config, "0004")
        ready = client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == "outdated"

        migrate.upgrade(database_url)
        assert client.get("/health/ready").json() == HEALTHY

        asyncio.run(execute(database_url, "UPDATE alembic_version SET version_num = '9999'"))
        assert client.get("/health/ready").json() == HEALTHY


def test_a_hung_database_connection_is_answered_within_the_timeout(
    postgres: PostgresServer, postgres_template: str, tmp_path: Path
) -> None:
    """The probe's connection stopped answering (its server process hung, or a firewall
    forgot the connection): cancelled at the timeout, SQLAlchemy closed it gracefully,
    which waits up to 2 s more, so the probe answered at 2.5 s instead of 0.5 s, past what
    a kubelet waits. Later probes make a new connection and recover with the database."""
    name = f"hung_{os.getpid()}"
    postgres.create_database(name, template=postgres_template)
    try:
        settings = make_settings(postgres.url(name), tmp_path / "data", health_timeout_seconds=0.5)
        with TestClient(create_app(settings)) as client:
            assert client.get("/health/ready").json() == HEALTHY
            with stopped(asyncio.run(probe_backend(postgres.url(name)))):
                started = time.monotonic()
                ready = client.get("/health/ready")
                elapsed = time.monotonic() - started
                assert ready.json() == DOWN
                assert elapsed < 1.2, f"answered after {elapsed:.1f} s"
            deadline = time.monotonic() + 10
            while (ready := client.get("/health/ready")).status_code != 200:
                assert time.monotonic() < deadline, ready.text
                time.sleep(0.2)
            assert ready.json() == HEALTHY
    finally:
        postgres.drop_database(name)


async def probe_backend(database_url: str) -> int:
    """The pid of the server process behind the probe's pooled connection, the only
    other one on the database (no request has used the app's own pool)."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            return (
                await connection.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                        " AND pid <> pg_backend_pid()"
                    )
                )
            ).scalar_one()
    finally:
        await engine.dispose()


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
