"""A throwaway PostgreSQL server for tests, run from the machine's own binaries.

Tests of SQL behaviour, migrations and health checks need the real engine, including the
moment it goes away. `postgres` runs as a foreground child of the test process (not the
pg_ctl daemon) so a fixture owns its whole life and nothing outlives `stop()`. The data
directory survives `stop()`: `start()` brings the same databases back on the same port,
which is what an application holding a connection URL needs to reconnect.

PostgreSQL refuses to run as root. Under root the server and initdb run as the `postgres`
OS user, which the Debian packages create. That is done by the child dropping privileges
itself (Popen's user/group), not through runuser: runuser blocks SIGINT and SIGQUIT, turns
SIGTERM into a "smart" shutdown that waits for every client, and SIGKILLs the server 2s
later, so the shutdown mode could not be chosen.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import asyncpg

from deploy.stack.process import (
    ProgramServer,
    find_binary,
    prepare_dir_for_user,
    require_binary,
)

SUPERUSER = "postgres"
StopMode = Literal["fast", "immediate"]

_OS_USER = "postgres"
_WHY = "tests that need a real database run PostgreSQL (Debian: apt-get install postgresql-15)"
_STOP_TIMEOUT = 30.0
_CONNECT_TIMEOUT = 2.0
_STOP_SIGNALS: dict[StopMode, signal.Signals] = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}
# NAMEDATALEN - 1: PostgreSQL silently truncates longer names, so two long test database
# names could end up naming the same database.
_MAX_IDENTIFIER_BYTES = 63


@dataclass(frozen=True)
class _Identity:
    """Who the server processes run as; all None means "as we are"."""

    user: int | None = None
    group: int | None = None
    extra_groups: list[int] | None = None
    name: str | None = None


class PostgresServer(ProgramServer):
    """A PostgreSQL cluster in `base_dir`, started and stopped on demand.

    Layout: `base_dir/data` (cluster), `base_dir/socket` (Unix socket), `base_dir/postgres.log`.
    """

    what = "PostgreSQL"
    start_timeout = 30.0

    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir, "postgres.log")
        self.data_dir = base_dir / "data"
        self.socket_dir = base_dir / "socket"
        self._postgres = "postgres"  # the binary, found on start()
        self._identity = _Identity()

    def url(self, dbname: str = "postgres", driver: str = "postgresql+asyncpg") -> str:
        """SQLAlchemy URL for `dbname`, as the password-less superuser over TCP."""
        return f"{driver}://{SUPERUSER}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def start(self) -> None:
        """Run initdb if the cluster does not exist yet, start the server, wait until it serves."""
        if self._process is not None:
            raise RuntimeError(f"PostgreSQL in {self.data_dir} is already running")
        self._postgres, initdb = _server_binaries()
        self._identity = _server_identity()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for directory in (self.data_dir, self.socket_dir):
            if self._identity.name is None:
                directory.mkdir(mode=0o700, exist_ok=True)
            else:
                prepare_dir_for_user(directory, self._identity.name)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(initdb, self._identity)
        super().start()

    def command(self) -> list[str]:
        return [
            self._postgres,
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-k", str(self.socket_dir),
            "-c", f"listen_addresses={self.host}",
            # Durability is worthless for a throwaway cluster and costs most of its I/O.
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
        ]  # fmt: skip

    def launch_options(self) -> dict[str, Any]:
        identity = self._identity
        return {
            "user": identity.user,
            "group": identity.group,
            "extra_groups": identity.extra_groups,
        }

    def ready(self) -> bool:
        return self.accepts_connections()

    def stop(self, mode: StopMode = "fast") -> None:
        """Shut the server down and reap it; does nothing if it is not running.

        "fast" rolls back open transactions and disconnects clients cleanly; "immediate"
        is the crash-like exit that needs recovery on the next start. A hung shutdown must
        not hang the caller: the backends exit by themselves once the postmaster is gone.
        """
        self._signal_and_reap(_STOP_SIGNALS[mode], _STOP_TIMEOUT)

    def accepts_connections(self) -> bool:
        """Whether a client can connect and run a query right now."""
        try:
            asyncio.run(self._execute("SELECT 1"))
        except (OSError, asyncpg.PostgresError):
            return False
        return True

    def create_database(self, name: str, template: str | None = None) -> None:
        """Create database `name`, as a copy of `template` if given.

        PostgreSQL refuses to copy a template that has open connections.
        """
        statement = f"CREATE DATABASE {_quote_identifier(name)}"
        if template is not None:
            statement += f" TEMPLATE {_quote_identifier(template)}"
        asyncio.run(self._execute(statement))

    def drop_database(self, name: str) -> None:
        """Drop database `name` if it exists, disconnecting anyone still using it."""
        statement = f"DROP DATABASE IF EXISTS {_quote_identifier(name)} WITH (FORCE)"
        # Seen rarely under load: the server closes the admin connection mid-statement
        # while it terminates the victim's sessions. The statement is idempotent: retry.
        for attempt in range(3):
            try:
                asyncio.run(self._execute(statement))
                return
            except asyncpg.exceptions.ConnectionDoesNotExistError:
                if attempt == 2:
                    raise

    def _initdb(self, initdb: str, identity: _Identity) -> None:
        command = [
            initdb,
            "-D", str(self.data_dir),
            "-U", SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            # Unicode case mapping for lower()/ILIKE (case-insensitive searches), with the
            # C locale's byte order kept for sorting.
            "--lc-ctype=C.UTF-8",
            # The cluster is thrown away after the run; syncing it to disk is wasted time.
            "--no-sync",
        ]  # fmt: skip
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            cwd=self.base_dir,
            user=identity.user,
            group=identity.group,
            extra_groups=identity.extra_groups,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb into {self.data_dir} failed with code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )

    async def _execute(self, statement: str) -> None:
        connection = await asyncpg.connect(
            host=self.host,
            port=self.port,
            user=SUPERUSER,
            database="postgres",
            ssl=False,
            timeout=_CONNECT_TIMEOUT,
        )
        try:
            await connection.execute(statement)
        finally:
            await connection.close()


def _server_binaries() -> tuple[str, str]:
    """Paths of `postgres` and the `initdb` of the same installation."""
    postgres = require_binary("postgres", why=_WHY, extra_dirs=_versioned_bin_dirs())
    # An initdb from another major version writes a cluster this server cannot open.
    sibling = find_binary("initdb", [str(Path(postgres).resolve().parent)])
    initdb = sibling or require_binary("initdb", why=_WHY, extra_dirs=_versioned_bin_dirs())
    return postgres, initdb


def _versioned_bin_dirs() -> list[str]:
    """Debian's /usr/lib/postgresql/<version>/bin directories, newest version first."""
    versions: dict[str, tuple[int, ...]] = {}
    for bin_dir in glob.glob("/usr/lib/postgresql/*/bin"):
        name = Path(bin_dir).parent.name
        if re.fullmatch(r"\d+(\.\d+)*", name):
            versions[bin_dir] = tuple(int(part) for part in name.split("."))
    return sorted(versions, key=versions.__getitem__, reverse=True)


def _server_identity() -> _Identity:
    if os.geteuid() != 0:
        return _Identity()
    try:
        account = pwd.getpwnam(_OS_USER)
    except KeyError:
        raise RuntimeError(
            f"running as root, but there is no {_OS_USER!r} OS user to run PostgreSQL as "
            "(it refuses to run as root; the postgresql Debian package creates that user)"
        ) from None
    return _Identity(
        user=account.pw_uid,
        group=account.pw_gid,
        extra_groups=os.getgrouplist(_OS_USER, account.pw_gid),
        name=_OS_USER,
    )


def _quote_identifier(name: str) -> str:
    if not name or "\x00" in name or len(name.encode()) > _MAX_IDENTIFIER_BYTES:
        raise ValueError(
            f"{name!r} is not a usable PostgreSQL identifier "
            f"(1 to {_MAX_IDENTIFIER_BYTES} bytes, no NUL)"
        )
    return '"' + name.replace('"', '""') + '"'
