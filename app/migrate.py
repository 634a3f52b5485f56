"""Alembic, driven from Python so ``python -m app migrate`` works from any directory.

The scripts are found relative to this package: beside it in a source checkout
(``migrations/`` at the top level), inside it once installed from a wheel.
"""

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.script import ScriptDirectory
from sqlalchemy import column, inspect, select, table
from sqlalchemy.engine import Connection, make_url

from app.settings import DB_CONNECT_TIMEOUT_SECONDS

_PACKAGE_DIR = Path(__file__).resolve().parent


def script_location() -> Path:
    for candidate in (_PACKAGE_DIR / "migrations", _PACKAGE_DIR.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError("Alembic migration scripts not found next to the app package")


def alembic_config(
    database_url: str, connect_timeout_seconds: float = DB_CONNECT_TIMEOUT_SECONDS
) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    # Passed as an attribute, not a main option: ConfigParser would mangle a '%' in it.
    config.attributes["database_url"] = database_url
    config.attributes["connect_timeout_seconds"] = connect_timeout_seconds
    return config


def upgrade(
    database_url: str,
    revision: str = "head",
    connect_timeout_seconds: float = DB_CONNECT_TIMEOUT_SECONDS,
) -> list[str]:
    """The revisions applied, oldest first, each as "<id>: <description>" (none: the
    database was there already). Raises ``app.db.DatabaseUnreachable`` if no connection
    can be made in time."""
    return _migrate(command.upgrade, database_url, revision, connect_timeout_seconds)


def downgrade(
    database_url: str, revision: str, connect_timeout_seconds: float = DB_CONNECT_TIMEOUT_SECONDS
) -> list[str]:
    """Undo the revisions above ``revision``: those undone, newest first, as ``upgrade``
    names them."""
    return _migrate(command.downgrade, database_url, revision, connect_timeout_seconds)


def _migrate(
    run: Callable[[Config, str], None],
    database_url: str,
    revision: str,
    connect_timeout_seconds: float,
) -> list[str]:
    ensure_directory(database_url)
    config = alembic_config(database_url, connect_timeout_seconds)
    steps: list[str] = []

    def record(*, step: MigrationInfo, **_: object) -> None:
        steps.append(f"{step.up_revision_id}: {step.up_revision.doc}")

    config.attributes["on_version_apply"] = record
    run(config, revision)
    return steps


def ensure_directory(database_url: str) -> None:
    """Create a SQLite file's directory: SQLite creates the file, not its directory."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)


def is_ancestor(revision: str, of: Iterable[str]) -> bool:
    """Whether ``revision`` comes before one of ``of`` (so reaching it is a downgrade).
    Raises alembic's CommandError for a revision this code does not know."""
    scripts = _scripts()
    target = scripts.get_revision(revision)
    if target is None:  # "base": before everything
        return True
    return any(
        target.revision != head
        and target.revision in {r.revision for r in scripts.iterate_revisions(head, "base")}
        for head in of
    )


def latest_revisions() -> list[str]:
    """This code's latest revision (several only while branches are unmerged)."""
    return list(_scripts().get_heads())


@functools.cache
def _scripts() -> ScriptDirectory:
    # Read once per process: readiness asks on every probe.
    return ScriptDirectory(str(script_location()))


def is_current(connection: Connection) -> bool:
    """Whether the database's schema is this code's latest migration."""
    heads = latest_revisions()
    return set(MigrationContext.configure(connection).get_current_heads()) == set(heads)


# Alembic's default name, which migrations/env.py keeps.
VERSION_TABLE = table("alembic_version", column("version_num"))
SchemaState = Literal["current", "unmigrated", "outdated"]


def revisions(connection: Connection) -> set[str]:
    """The database's revisions (none: never migrated)."""
    # Read directly: alembic's MigrationContext logs two lines each time, every probe.
    if not inspect(connection).has_table(VERSION_TABLE.name):
        return set()
    return set(connection.execute(select(VERSION_TABLE.c.version_num)).scalars())


def unknown(revisions: Iterable[str]) -> set[str]:
    """Those of ``revisions`` this code has no migration for: a newer release's."""
    return set(revisions) - _known_revisions()


@functools.cache
def _known_revisions() -> frozenset[str]:
    return frozenset(script.revision for script in _scripts().walk_revisions())


def schema_state(connection: Connection) -> SchemaState:
    """Whether this code can serve on the database's schema: "unmigrated" (no migration
    applied), "outdated" (an older revision of this code's) or "current" — this code's
    latest, or a revision it does not know, a newer release's: during a rolling deploy
    the old replicas keep serving on the schema their successors migrated."""
    current = revisions(connection)
    if not current:
        return "unmigrated"
    if not unknown(current) and current != set(latest_revisions()):
        return "outdated"
    return "current"
