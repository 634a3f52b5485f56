"""Tests of the test-support helpers themselves, PostgreSQL against a real server.

The application's database tests rely on `PostgresServer` to give them a real, isolated
server and to really take it away and bring it back; these tests check exactly that, so a
broken helper shows up here rather than as puzzling failures elsewhere.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from deploy.stack.postgres import PostgresServer, StopMode
from deploy.stack.process import is_alive, wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    with PostgresServer(tmp_path_factory.mktemp("postgres")) as server:
        yield server


async def _connect(server: PostgresServer, dbname: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=server.host, port=server.port, user="postgres", database=dbname, ssl=False
    )


def _query(server: PostgresServer, dbname: str, *statements: str) -> list[tuple[Any, ...]]:
    """Run `statements` in `dbname` and return the rows of the last one."""

    async def run() -> list[tuple[Any, ...]]:
        connection = await _connect(server, dbname)
        try:
            for statement in statements[:-1]:
                await connection.execute(statement)
            return [tuple(row) for row in await connection.fetch(statements[-1])]
        finally:
            await connection.close()

    return asyncio.run(run())


def _database_exists(server: PostgresServer, name: str) -> bool:
    return (name,) in _query(server, "postgres", "SELECT datname FROM pg_database")


def test_serves_the_configured_cluster_over_tcp(server: PostgresServer) -> None:
    rows = _query(
        server,
        "postgres",
        "SELECT current_user, current_setting('server_encoding'), current_setting('fsync')",
    )

    assert rows == [("postgres", "UTF8", "off")]
    assert server.url() == f"postgresql+asyncpg://postgres@127.0.0.1:{server.port}/postgres"
    assert server.url("app db", driver="postgresql") == (
        f"postgresql://postgres@127.0.0.1:{server.port}/app%20db"
    )


def test_creates_a_database_from_a_template_with_its_tables(server: PostgresServer) -> None:
    # Quotes and spaces prove the names are quoted as identifiers, not pasted into SQL.
    template, clone = 'template "quoted"', "clone of template"
    server.create_database(template)
    try:
        _query(
            server,
            template,
            "CREATE TABLE items (name text)",
            "INSERT INTO items VALUES ('made in the template')",
            "SELECT name FROM items",
        )
        server.create_database(clone, template=template)

        assert _query(server, clone, "SELECT name FROM items") == [("made in the template",)]
    finally:
        server.drop_database(clone)
        server.drop_database(template)
    assert not _database_exists(server, clone)


def test_drop_database_disconnects_its_clients(server: PostgresServer) -> None:
    server.create_database("busy")

    async def drop_while_connected() -> None:
        connection = await _connect(server, "busy")
        try:
            # In a thread, as a sync fixture would, while this client holds its connection.
            await asyncio.to_thread(server.drop_database, "busy")

            with pytest.raises((asyncpg.InterfaceError, asyncpg.PostgresConnectionError)):
                await connection.fetchval("SELECT 1")
        finally:
            await connection.close()

    asyncio.run(drop_while_connected())
    assert not _database_exists(server, "busy")


def test_drop_database_of_a_missing_database_is_a_no_op(server: PostgresServer) -> None:
    server.drop_database("never created")


def test_rejects_names_postgres_would_truncate(server: PostgresServer) -> None:
    with pytest.raises(ValueError, match="identifier"):
        server.create_database("x" * 64)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_stop_takes_the_server_away_and_start_brings_it_back(
    server: PostgresServer, mode: StopMode
) -> None:
    server.create_database(f"survivor {mode}")
    port, pid = server.port, server.pid
    assert pid is not None
    children = [
        int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    ]
    assert children, "a running postmaster has auxiliary processes"

    server.stop(mode)
    server.stop(mode)

    assert server.pid is None
    assert [p for p in [pid, *children] if is_alive(p)] == []
    assert not server.accepts_connections()
    with pytest.raises(ConnectionRefusedError):
        _query(server, "postgres", "SELECT 1")

    server.start()

    assert server.port == port
    assert server.pid not in (None, pid)
    assert _database_exists(server, f"survivor {mode}"), "start() must reuse the data dir"
    server.drop_database(f"survivor {mode}")


def test_wait_for_reports_an_exited_process_with_its_log(tmp_path: Path) -> None:
    log_path = tmp_path / "service.log"
    log_path.write_text("starting\nFATAL: could not bind: address already in use\n")
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])

    with pytest.raises(RuntimeError, match=r"exited with code 3(.|\n)*address already in use"):
        wait_for(lambda: False, timeout=30, what="service", process=process, log_path=log_path)


def test_wait_for_gives_up_after_the_timeout() -> None:
    with pytest.raises(RuntimeError, match=r"gave up waiting for service: still not ready"):
        wait_for(lambda: False, timeout=0.1, what="service")


def test_a_missing_binary_skips_unless_services_are_required(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hooks of the real conftest, in a throwaway test session.
    pytester.makeconftest("from tests.conftest import pytest_fixture_setup, pytest_runtest_call")
    pytester.makepyfile(
        """
        import pytest
        from deploy.stack.process import require_binary

        @pytest.fixture
        def server():
            return require_binary("no-such-binary", why="needed by a fixture")

        def test_in_a_fixture(server):
            pass

        def test_in_the_test():
            require_binary("no-such-binary", why="needed by the test")
        """
    )
    monkeypatch.delenv("REQUIRE_SERVICES", raising=False)
    skipped = pytester.runpytest("-rs")
    skipped.assert_outcomes(skipped=2)
    skipped.stdout.fnmatch_lines(["*no-such-binary*needed by a fixture*"])

    monkeypatch.setenv("REQUIRE_SERVICES", "1")
    required = pytester.runpytest()
    required.assert_outcomes(passed=0, failed=1, errors=1)
    required.stdout.fnmatch_lines(["*REQUIRE_SERVICES=1 makes this an error*"])
