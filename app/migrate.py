"""Alembic, driven from Python so ``python -m app migrate`` works from any directory.

The scripts are found relative to this package: beside it in a source checkout
(``migrations/`` at the top level), inside it once installed from a wheel.
"""

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
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
) -> None:
    """Raises ``app.db.DatabaseUnreachable`` if no connection can be made in time."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(database_url, connect_timeout_seconds), revision)


def is_current(connection: Connection) -> bool:
    """Whether the database's schema is this code's latest migration."""
    heads = ScriptDirectory(str(script_location())).get_heads()
    return set(MigrationContext.configure(connection).get_current_heads()) == set(heads)
