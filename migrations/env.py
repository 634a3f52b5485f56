"""Alembic environment: async engines, one history for SQLite and PostgreSQL.

The URL comes from ``app.migrate`` (the CLI and the tests), from ``sqlalchemy.url`` in
alembic.ini, or from the service settings, in that order.
"""

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from app.db import report_unreachable
from app.models import Base
from app.settings import DB_CONNECT_TIMEOUT_SECONDS, Settings

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    return (
        config.attributes.get("database_url")
        or config.get_main_option("sqlalchemy.url")
        or Settings().effective_database_url
    )


def configure(**options: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things in place; batch mode recreates the table.
        render_as_batch=database_url().startswith("sqlite"),
        **options,
    )


def run_offline() -> None:
    configure(url=database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


# Any fixed number, the same in every release: the key of the advisory lock below.
MIGRATION_LOCK_KEY = 0x6D6967726174650A


def run_with_connection(connection: Connection) -> None:
    # app.migrate's, to tell the operator which revisions were applied.
    configure(connection=connection, on_version_apply=config.attributes.get("on_version_apply"))
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Two replicas or Jobs migrating at once both created the same tables and one
            # failed. The lock queues them; it is released when the transaction ends, and
            # the one that waited reads the version only then, finds it current and stops.
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
        context.run_migrations()


async def run_async() -> None:
    # Not app.db.create_engine: its SQLite connections enforce foreign keys, and a batch
    # migration that recreates a table would then cascade-delete the rows referring to it.
    url = database_url()
    connect_args: dict[str, float] = {}
    if not url.startswith("sqlite"):
        # Bounded, so an unreachable server is an error in seconds, not a minute's hang.
        connect_args["timeout"] = config.attributes.get(
            "connect_timeout_seconds", DB_CONNECT_TIMEOUT_SECONDS
        )
    engine = create_async_engine(url, poolclass=NullPool, connect_args=connect_args)
    report_unreachable(engine)
    if engine.dialect.name == "sqlite":
        # Stored in the file, so once here rather than on each of the service's
        # connections: readers run beside the writer.
        async with engine.connect() as connection:
            await connection.exec_driver_sql("PRAGMA journal_mode=WAL")
    async with engine.connect() as connection:
        await connection.run_sync(run_with_connection)
    await engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    asyncio.run(run_async())
