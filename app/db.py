"""Database engine, session factory and the declarative base.

One code path serves SQLite (the embedded default) and PostgreSQL (production); the
differences that matter — foreign keys, pool sizing — are settled here once (WAL, which
SQLite stores in the file, by the migrations).
"""

import re
import traceback
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

from fastapi import Depends, Path, Request
from pydantic import AfterValidator, BeforeValidator
from sqlalchemy import DateTime, Dialect, MetaData, TypeDecorator, event
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import ConnectionPoolEntry

from app.settings import Settings

# Stable constraint names make migrations reproducible on both databases.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware timestamps on both databases (SQLite hands back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar = {datetime: UTCDateTime()}


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class DatabaseUnreachable(ConnectionError):
    """No connection to the database could be made: refused, a host that does not resolve,
    a timeout, a server starting up or out of connection slots, credentials refused. The
    database's condition, not a bug (app/errors.py answers it with a 503)."""


def create_engine(
    url: str, settings: Settings | None = None, *, connections: int | None = None
) -> AsyncEngine:
    """``connections``: a pool of exactly that many, never more (the readiness probe's own
    engine); otherwise the settings' pool."""
    # A failed statement's error (logged with its traceback) would otherwise print its
    # parameters: login names, e-mail addresses, password hashes.
    options: dict[str, Any] = {"hide_parameters": True}
    pool: dict[str, Any] = {}
    if connections is not None:
        pool = {"pool_size": connections, "max_overflow": 0}
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30}, **options, **pool)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    else:
        options["pool_pre_ping"] = True
        if settings is not None:
            options |= {
                "pool_size": settings.db_pool_size,
                "max_overflow": settings.db_max_overflow,
                "pool_timeout": settings.db_pool_timeout_seconds,
                # asyncpg's timeout covers the whole connect, the TCP and the handshake.
                "connect_args": {"timeout": settings.db_connect_timeout_seconds},
            }
        engine = create_async_engine(url, **(options | pool))
    report_unreachable(engine)
    return engine


def report_unreachable(engine: AsyncEngine) -> None:
    """Make every failure to connect through ``engine`` a ``DatabaseUnreachable``."""
    event.listen(engine.sync_engine, "do_connect", _connect_or_unreachable)


def _connect_or_unreachable(
    dialect: Dialect, _record: ConnectionPoolEntry, cargs: Any, cparams: Any
) -> DBAPIConnection:
    # Connecting fails in as many ways as drivers and networks have (asyncpg lets socket
    # errors through as they are); all of them mean the same to a request.
    try:
        return dialect.connect(*cargs, **cparams)
    except Exception as exc:
        # A timeout has no message: its name alone, not "TimeoutError: ".
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise DatabaseUnreachable(reason) from exc


def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    # SQLite ignores foreign keys unless asked. Both settings are the connection's own and
    # touch no lock. WAL, a property of the file, is set once by the migrations: asking
    # for it here on every new connection failed now and then, at once and busy timeout
    # or not, with "database is locked" (seen with two engines on one file).
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
    # SQLite's own lower() knows ASCII only, so a case-insensitive search for "été" missed
    # "ÉTÉ" (searches compare lower(column) with lower(term)); Python's knows Unicode.
    dbapi_connection.create_function("lower", 1, _lower, deterministic=True)


def _lower(value: str | None) -> str | None:
    return value.lower() if isinstance(value, str) else value


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessionmaker() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


async def roll_back_failed_commit(session: AsyncSession, error: BaseException) -> None:
    """Roll back after ``error`` failed a commit, before answering the request otherwise.

    The failed statement's frames hold its driver cursor, which SQLAlchemy's aiosqlite
    adapter does not close on error; released here, while its connection is idle.
    Otherwise the cursor lives on in the exception's reference cycle, and when the
    garbage collector frees it on the event loop's thread, sqlite3 waits there, with the
    loop stopped, for the connection's mutex — held meanwhile by whichever request reuses
    the connection and waits for the database lock, which another request of this loop
    holds: every request stalls for the 30 s busy timeout."""
    await session.rollback()
    traceback.clear_frames(error.__traceback__)


# Ids are 32-bit INTEGER columns on PostgreSQL: a larger path id is a 422, not a driver error.
MAX_ID = 2**31 - 1


def _canonical_id(value: object) -> object:
    # Pydantic would read "1_0" as 10 and "1.0", "+1", " 1" or "01" as 1: one resource
    # under many URLs, which rules keyed on the path (a proxy's, a cache's) would miss.
    if isinstance(value, str) and not _DIGITS.fullmatch(value):
        raise ValueError("Input should be an id: decimal digits without a leading zero")
    return value


_DIGITS = re.compile(r"[1-9][0-9]*")
IdPath = Annotated[int, BeforeValidator(_canonical_id), Path(ge=1, le=MAX_ID)]


def _without_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise ValueError("Input should not contain NUL characters")
    return value


# PostgreSQL's text cannot hold U+0000 (the driver fails: a 500) and SQLite stores it, so a
# client's string that reaches SQL is refused with a 422 when it holds one, on both.
WithoutNul = AfterValidator(_without_nul)
