"""Migrations match the models on both databases, and the operator commands work from
any directory as a separate process, the way operators run them."""

import asyncio
import os
import pty
import re
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import httpx2
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncConnection

from app import migrate
from app.db import create_engine
from app.main import create_app
from app.models import Base
from deploy.stack.postgres import PostgresServer
from tests.api import Api
from tests.app_server import app_server
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parents[1]


async def schema_drift(database_url: str) -> list[object]:
    engine = create_engine(database_url)

    def compare(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)

    try:
        async with engine.connect() as connection:
            return await connection.run_sync(compare)
    finally:
        await engine.dispose()


async def table_names(database_url: str) -> set[str]:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            return set(await connection.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    assert asyncio.run(schema_drift(database_url)) == []


def test_downgrade_to_base_and_upgrade_again(database_url: str) -> None:
    config = migrate.alembic_config(database_url)
    command.downgrade(config, "base")
    assert asyncio.run(table_names(database_url)) <= {"alembic_version"}
    migrate.upgrade(database_url)
    assert {"users", "items", "refresh_tokens"} <= asyncio.run(table_names(database_url))


async def query(database_url: str, statement: str) -> list[tuple[object, ...]]:
    engine = create_engine(database_url)
    try:
        async with engine.begin() as connection:
            result = await connection.execute(text(statement))
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        await engine.dispose()


async def column_names(database_url: str, table: str) -> set[str]:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            columns = await connection.run_sync(lambda c: inspect(c).get_columns(table))
            return {column["name"] for column in columns}
    finally:
        await engine.dispose()


def test_accounts_outlive_the_token_generation_migration_both_ways(
    database_url: str, tmp_path: Path
) -> None:
    """0006 adds users.token_generation. Downgraded, the accounts and what they own stay
    (SQLite rebuilds the table); upgraded again they start at 0 and sign in; and the
    previous release, still serving during a rolling deploy, can add accounts (its
    INSERT names no generation)."""
    settings = make_settings(database_url, tmp_path / "data")
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings)
        alice = api.account("alice")
        item = api.create_item(alice)
    config = migrate.alembic_config(database_url)
    command.downgrade(config, "0005")
    assert "token_generation" not in asyncio.run(column_names(database_url, "users"))
    migrate.upgrade(database_url)
    asyncio.run(
        query(
            database_url,
            "INSERT INTO users (email, username, hashed_password, role, is_superuser,"
            " is_active, created_at, updated_at) VALUES ('bob@example.com', 'bob', 'x',"
            " 'user', false, true, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
        )
    )
    generations = "SELECT username, token_generation FROM users ORDER BY username"
    assert asyncio.run(query(database_url, generations)) == [("alice", 0), ("bob", 0)]
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings)
        api.sign_in(alice)
        assert client.get("/api/v1/users/me", headers=alice.headers).status_code == 200
        assert client.get(f"/api/v1/items/{item['id']}").status_code == 200


def test_a_migrated_sqlite_database_is_in_wal_mode(tmp_path: Path) -> None:
    # Readers beside the writer: several workers share the file. Stored in the file, so
    # a plain connection that sets nothing sees it.
    path = tmp_path / "app.db"
    migrate.upgrade(f"sqlite+aiosqlite:///{path}")
    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


SUPERUSER_ARGS = (
    *("create-superuser", "--email", "ops@example.com", "--username", "ops"),
    "--password-stdin",
)


def run_cli(
    *args: str, cwd: Path, env: dict[str, str], stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=cwd,
        env=os.environ | env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_migrate_and_create_superuser_from_another_directory(
    database_url: str, tmp_path: Path
) -> None:
    env = {"APP_ENV": "test", "APP_DATABASE_URL": database_url}
    migrated = run_cli("migrate", cwd=tmp_path, env=env)
    assert migrated.returncode == 0, migrated.stderr

    password = "an operator's long password"
    created = run_cli(
        "create-superuser",
        "--email",
        "Ops@example.com",
        "--username",
        "ops",
        "--password-stdin",
        cwd=tmp_path,
        env=env,
        stdin=password + "\n",
    )
    assert created.returncode == 0, created.stderr
    assert "superuser ops" in created.stdout
    assert password not in created.stdout + created.stderr

    again = run_cli(
        "create-superuser",
        "--email",
        "ops@example.com",
        "--username",
        "ops2",
        "--password-stdin",
        cwd=tmp_path,
        env=env,
        stdin=password + "\n",
    )
    assert again.returncode == 1
    assert "already exists" in again.stderr

    weak = run_cli(
        "create-superuser",
        "--email",
        "x@example.com",
        "--username",
        "x2x",
        cwd=tmp_path,
        env=env | {"APP_SUPERUSER_PASSWORD": "tiny!"},
    )
    assert weak.returncode == 2
    assert "invalid password" in weak.stderr
    assert "tiny!" not in weak.stdout + weak.stderr


def test_commands_report_an_unreachable_database_in_one_line(tmp_path: Path) -> None:
    """A server that accepts connections and never answers (a firewall, a hung host) and
    one that refuses them: one line naming the server, its password masked, and exit 3,
    within the connect timeout rather than asyncpg's minute, with no traceback."""
    password = "a-database-password"
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never accepts
        port = silent.getsockname()[1]
        for url in (
            f"postgresql+asyncpg://app:{password}@127.0.0.1:{port}/app",
            f"postgresql+asyncpg://app:{password}@127.0.0.1:{free_port()}/app",
        ):
            env = {
                "APP_ENV": "test",
                "APP_DATABASE_URL": url,
                "APP_DB_CONNECT_TIMEOUT_SECONDS": "1",
            }
            for args, stdin in (
                (("migrate",), ""),
                (SUPERUSER_ARGS, "an operator's long password\n"),
            ):
                failed = run_cli(*args, cwd=tmp_path, env=env, stdin=stdin)
                assert failed.returncode == 3, failed.stderr
                assert failed.stderr.startswith(
                    "cannot reach the database at postgresql+asyncpg://app:***@127.0.0.1:"
                )
                assert "Traceback" not in failed.stderr
                assert password not in failed.stdout + failed.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_replicas_migrating_one_new_database_at_once_all_succeed(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """Several replicas (or a Job and a rollout) starting with `migrate` against the same
    fresh database: without a lock two of them created the same tables and one failed."""
    postgres.create_database("migrated_at_once")
    url = postgres.url("migrated_at_once")
    codes, errors = asyncio.run(migrate_together(url, tmp_path, replicas=4))
    assert codes == [0] * 4, errors
    assert asyncio.run(schema_drift(url)) == []


async def migrate_together(
    database_url: str, cwd: Path, replicas: int
) -> tuple[list[int], list[str]]:
    """Runs `migrate` in several processes that all reach the database before any of them
    has created a table: a transaction of the test's holds the version table uncommitted
    until every one of them waits for a lock, then gives it up. Without this the processes
    overlap only by chance (their start-up takes longer than the migration)."""
    env = os.environ | {"APP_ENV": "test", "APP_DATABASE_URL": database_url}
    engine = create_engine(database_url)
    try:
        async with engine.connect() as holder, engine.connect() as observer:
            await holder.execute(text("CREATE TABLE alembic_version (version_num varchar(32))"))
            processes = [
                await asyncio.create_subprocess_exec(
                    *(sys.executable, "-m", "app", "migrate"),
                    cwd=cwd,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                for _ in range(replicas)
            ]
            async with asyncio.timeout(120):
                await wait_for_lock_waiters(observer, replicas)
            await holder.rollback()
        outcomes = [await process.communicate() for process in processes]
    finally:
        await engine.dispose()
    return (
        [process.returncode or 0 for process in processes],
        [stderr.decode() for _, stderr in outcomes],
    )


async def wait_for_lock_waiters(observer: AsyncConnection, count: int) -> None:
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    while True:
        found = (await observer.execute(waiting)).scalar_one()
        # pg_stat_activity is a snapshot per transaction: a new one for each look.
        await observer.rollback()
        if found >= count:
            return
        await asyncio.sleep(0.1)


def test_create_superuser_before_migrate_says_to_migrate(database_url: str, tmp_path: Path) -> None:
    """Run in the wrong order (a new database, a Job that raced the migration), it said
    "no such table: users" / "relation "users" does not exist" at the end of a traceback."""
    command.downgrade(migrate.alembic_config(database_url), "base")
    env = {"APP_ENV": "test", "APP_DATABASE_URL": database_url}
    refused = run_cli(*SUPERUSER_ARGS, cwd=tmp_path, env=env, stdin="a long enough password\n")
    assert refused.returncode == 1
    assert "run `python -m app migrate` first" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert run_cli("migrate", cwd=tmp_path, env=env).returncode == 0
    created = run_cli(*SUPERUSER_ARGS, cwd=tmp_path, env=env, stdin="a long enough password\n")
    assert created.returncode == 0, created.stderr


def test_migrate_leaves_a_database_a_newer_release_migrated(tmp_path: Path) -> None:
    """An image rolled back after its successor migrated: its migrate step failed ("Can't
    locate revision"), and with it the rollback (compose starts the api only once migrate
    succeeded), while the release itself runs on the newer schema."""
    path = tmp_path / "app.db"
    migrate.upgrade(f"sqlite+aiosqlite:///{path}")
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    env = {"APP_ENV": "test", "APP_DATABASE_URL": f"sqlite+aiosqlite:///{path}"}
    left = run_cli("migrate", cwd=tmp_path, env=env)
    assert left.returncode == 0, left.stderr
    assert left.stdout.startswith("left at 9999: a newer release's revision")
    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [
            ("9999",)
        ]
    unknown = run_cli("migrate", "--to", "9999", cwd=tmp_path, env=env)
    assert unknown.returncode == 1
    assert unknown.stderr == "not migrated: Can't locate revision identified by '9999'\n"


def test_migrate_to_an_earlier_revision_and_back(database_url: str, tmp_path: Path) -> None:
    """Undoing a release's migrations (with its own image, which has their downgrades)
    before rolling back to the release before, which then finds its own schema."""
    env = {"APP_ENV": "test", "APP_DATABASE_URL": database_url}
    latest = migrate.latest_revisions()[0]
    previous = f"{int(latest) - 1:04d}"
    reverted = run_cli("migrate", "--to", previous, cwd=tmp_path, env=env)
    assert reverted.returncode == 0, reverted.stderr
    assert reverted.stdout.splitlines()[0].startswith(f"reverted {latest}: ")
    assert current_revisions(database_url) == {previous}
    again = run_cli("migrate", "--to", previous, cwd=tmp_path, env=env)
    assert again.stdout == f"already at {previous}\n"
    forward = run_cli("migrate", cwd=tmp_path, env=env)
    assert forward.returncode == 0, forward.stderr
    assert forward.stdout.splitlines()[0].startswith(f"applied {latest}: ")
    assert current_revisions(database_url) == {latest}


def current_revisions(database_url: str) -> set[str]:
    async def read() -> set[str]:
        engine = create_engine(database_url)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(migrate.revisions)
        finally:
            await engine.dispose()

    return asyncio.run(read())


@pytest.mark.parametrize("key", ["\x03", "\x04"], ids=["ctrl-c", "ctrl-d"])
def test_create_superuser_given_up_at_the_prompt(key: str, tmp_path: Path) -> None:
    """Ctrl-C or Ctrl-D at the password prompt ended in a KeyboardInterrupt or EOFError
    traceback."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    migrate.upgrade(database_url)
    env = os.environ | {"APP_ENV": "test", "APP_DATABASE_URL": database_url}
    code, output = run_in_terminal(
        [sys.executable, "-m", "app", *SUPERUSER_ARGS[:-1]], env, b"Password: ", key.encode()
    )
    assert code == 1
    assert "cancelled: no superuser created" in output
    assert "Traceback" not in output


def run_in_terminal(
    command: list[str], env: dict[str, str], prompt: bytes, keys: bytes
) -> tuple[int, str]:
    """Runs ``command`` on a terminal of its own (getpass reads /dev/tty), types ``keys``
    once ``prompt`` is shown, and returns its exit code and everything it wrote."""
    pid, terminal = pty.fork()
    if pid == 0:  # the child: nothing but exec, it is a fork of the test process
        try:
            os.execve(command[0], command, env)  # noqa: S606 - a fixed argv, no shell
        finally:
            os._exit(127)
    output = b""
    typed = False
    try:
        while True:
            ready, _, _ = select.select([terminal], [], [], 60)
            if not ready:
                break  # it hangs: the assertions on the output say how
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # EIO: the child has exited and closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if not typed and prompt in output:
                os.write(terminal, keys)
                typed = True
    finally:
        if not typed:
            os.kill(pid, signal.SIGKILL)
        os.close(terminal)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_create_superuser_reads_a_password_line_ended_by_crlf(tmp_path: Path) -> None:
    """A password file saved on Windows: the superuser logs in with the password, not the
    password and a carriage return."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    migrate.upgrade(database_url)
    password = "an operator's long password "
    created = run_cli(
        *SUPERUSER_ARGS,
        cwd=tmp_path,
        env={"APP_ENV": "test", "APP_DATABASE_URL": database_url},
        stdin=password + "\r\n",
    )
    assert created.returncode == 0, created.stderr
    settings = make_settings(database_url, tmp_path / "data")
    with TestClient(create_app(settings)) as client:
        assert Api(client, settings).login("ops", password).status_code == 200


def test_production_refuses_weak_settings_without_printing_them(tmp_path: Path) -> None:
    refused = run_cli("migrate", cwd=tmp_path, env={"APP_ENV": "production"})
    assert refused.returncode == 1
    assert "APP_SECRET_KEY is required" in refused.stderr
    assert "Traceback" not in refused.stderr

    weak_secret = "weak-secret-value"
    refused = run_cli(
        "migrate", cwd=tmp_path, env={"APP_ENV": "production", "APP_SECRET_KEY": weak_secret}
    )
    assert refused.returncode == 1
    assert "at least 32 bytes" in refused.stderr
    assert weak_secret not in refused.stderr


def test_serve_runs_the_embedded_default_from_any_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APP_")}
    with app_server(tmp_path, env, tmp_path / "serve.log") as (base, server):
        ready = httpx2.get(f"{base}/health/ready")
        assert ready.json()["checks"]["database"] == "ok"
        assert "server" not in ready.headers  # it would name the software to every client
        assert httpx2.get(f"{base}/docs").status_code == 200
        registered = httpx2.post(
            f"{base}/api/v1/auth/register",
            json={"email": "a@example.com", "username": "alice", "password": "long enough pw"},
        )
        assert registered.status_code == 201
    # Data, the migrated database and the generated secret live under ./var of the cwd.
    assert (tmp_path / "var" / "app.db").is_file()
    assert (tmp_path / "var" / "secret_key").is_file()
    assert server.returncode == 0


def test_every_make_target_declared_has_a_recipe() -> None:
    """A target named in .PHONY but never written answers "Nothing to be done" and exits
    0: `make lint` passed without linting anything."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.M)
    assert phony is not None
    targets = phony.group(1).split()
    assert {"run", "test", "lint", "stack"} <= set(targets)
    for target in targets:
        dry_run = subprocess.run(
            ["make", "--dry-run", "--no-print-directory", target],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert dry_run.returncode == 0, dry_run.stderr
        assert dry_run.stdout.strip(), f"make {target} does nothing"
        assert "Nothing to be done" not in dry_run.stdout, f"make {target} does nothing"


def test_migrate_names_the_revisions_it_applies(tmp_path: Path) -> None:
    """A deploy's log said "database is at the latest migration" whether a migration had
    run or not: which ones, if any, nobody could tell."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    migrate.upgrade(database_url, "0003")
    env = {"APP_ENV": "test", "APP_DATABASE_URL": database_url}
    migrated = run_cli("migrate", cwd=tmp_path, env=env)
    assert migrated.returncode == 0, migrated.stderr
    lines = migrated.stdout.splitlines()
    (latest,) = migrate.latest_revisions()
    assert lines[0] == "applied 0004: files"
    assert lines[-1].startswith(f"applied {latest}: ")
    again = run_cli("migrate", cwd=tmp_path, env=env)
    assert again.stdout == f"already at {latest}\n"
