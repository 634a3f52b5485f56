"""``python -m app …``: serve, migrate, create-superuser, prune-blobs.

Every command reads the same settings as the service, and none takes a password on
the command line (it would show in ``ps`` and shell history).
"""

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import uvicorn
from alembic.util import CommandError
from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from app import migrate
from app.auth import service as auth_service
from app.backends.storage import LocalStorage
from app.db import DatabaseUnreachable, create_engine, create_sessionmaker
from app.errors import Conflict
from app.files import service as files_service
from app.security import PasswordHasher
from app.server import SERVER_OPTIONS
from app.settings import Settings, load_or_exit
from app.users.models import Role
from app.users.schemas import UserCreate

# Not 1 (a migration that failed, a name taken): the database may only not be up yet,
# which a wrapper script can tell apart and retry.
EXIT_UNREACHABLE = 3


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the API with uvicorn (one process)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)

    migrate_command = commands.add_parser(
        "migrate", help="apply database migrations up to the latest (or to --to)"
    )
    migrate_command.add_argument(
        "--to",
        metavar="REVISION",
        help="migrate up or down to this revision (e.g. 0004, or base): to undo a release's"
        " migrations with that release's image before rolling back to the one before",
    )

    superuser = commands.add_parser("create-superuser", help="create the first admin account")
    superuser.add_argument("--email", required=True)
    superuser.add_argument("--username", required=True)
    superuser.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )

    prune = commands.add_parser(
        "prune-blobs",
        help="remove stored upload bytes that no file refers to (left by a killed process)",
    )
    prune.add_argument(
        "--older-than",
        type=float,
        default=files_service.STALE_STAGE_SECONDS,
        metavar="SECONDS",
        help="only blobs committed at least this long ago (default: %(default)d)",
    )
    prune.add_argument("--dry-run", action="store_true", help="list them, remove nothing")

    args = parser.parse_args(argv)
    settings = load_or_exit()
    if args.command == "serve":
        run_server(settings, args.host, args.port)
        return
    try:
        if args.command == "migrate":
            run_migrations(settings, args.to)
        elif args.command == "prune-blobs":
            sys.exit(asyncio.run(prune_blobs(settings, args.older_than, dry_run=args.dry_run)))
        else:
            password = read_password(args.password_stdin)
            sys.exit(asyncio.run(create_superuser(settings, args.email, args.username, password)))
    except DatabaseUnreachable as exc:
        exit_unreachable(settings.effective_database_url, exc)


def run_migrations(settings: Settings, target: str | None = None) -> None:
    url = settings.effective_database_url
    timeout = settings.db_connect_timeout_seconds
    current = asyncio.run(_revisions(settings))
    if target is None and (newer := migrate.unknown(current)):
        # An image rolled back after its successor migrated: its migrate step failed, and
        # with it the deploy, while its replicas run on the newer schema (each release's
        # migrations keep the release before working; see app.migrate.schema_state).
        print(
            f"left at {', '.join(sorted(newer))}: a newer release's revision, which this"
            " release runs on (to undo it, run that release's `migrate --to`)"
        )
        return
    try:
        if target is not None and current and migrate.is_ancestor(target, current):
            for revision in migrate.downgrade(url, target, timeout):
                print(f"reverted {revision}")
            return
        applied = migrate.upgrade(url, target or "head", timeout)
    except CommandError as exc:
        # Alembic's own refusals are meant for operators ("Can't locate revision identified
        # by '0009'"); a traceback only hid them.
        sys.exit(f"not migrated: {exc}")
    # Which revisions a deploy applied, for its log: it said only that the database was
    # at the latest migration, whether anything had run or not.
    for revision in applied:
        print(f"applied {revision}")
    if not applied:
        print(f"already at {', '.join(sorted(current) or ['base'])}")


async def _revisions(settings: Settings) -> set[str]:
    migrate.ensure_directory(settings.effective_database_url)
    engine = create_engine(settings.effective_database_url, settings)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(migrate.revisions)
    finally:
        await engine.dispose()


def exit_unreachable(database_url: str, exc: DatabaseUnreachable) -> NoReturn:
    # One line naming the server, its password masked, instead of a driver's traceback.
    where = make_url(database_url).render_as_string(hide_password=True)
    print(f"cannot reach the database at {where}: {exc}", file=sys.stderr)
    sys.exit(EXIT_UNREACHABLE)


def run_server(settings: Settings, host: str, port: int) -> None:
    if settings.is_sqlite:
        # The embedded default needs no separate step; production runs `migrate` itself.
        migrate.upgrade(settings.effective_database_url)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        **SERVER_OPTIONS,
        # create_app configures logging (structlog) and writes the access line itself.
        log_config=None,
        access_log=False,
    )


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        # The line's end only, "\r\n" too (a file saved on Windows): any other character
        # at the end, a space say, is the password's.
        return sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if password := os.environ.get("APP_SUPERUSER_PASSWORD"):
        return password
    if not sys.stdin.isatty():
        sys.exit("no password: use --password-stdin, APP_SUPERUSER_PASSWORD or a terminal")
    try:
        first = getpass.getpass("Password: ")
        again = getpass.getpass("Password (again): ")
    except (KeyboardInterrupt, EOFError):
        # Ctrl-C or Ctrl-D at the prompt: the operator changed their mind, not a bug to
        # show a traceback for. A new line, as the prompt's own is never ended.
        print(file=sys.stderr)
        sys.exit("cancelled: no superuser created")
    if first != again:
        sys.exit("passwords do not match")
    return first


async def prune_blobs(settings: Settings, older_than_seconds: float, *, dry_run: bool) -> int:
    """One line per blob (removed, or to be removed), then how many and their size."""
    engine = create_engine(settings.effective_database_url, settings)
    count = size = 0
    try:
        if not await _migrated(engine):
            return 1
        storage = LocalStorage(settings.upload_dir)
        async with create_sessionmaker(engine)() as session:
            orphans = files_service.prune_orphans(
                session, storage, older_than_seconds, dry_run=dry_run
            )
            async for blob in orphans:
                print(f"{'would remove' if dry_run else 'removed'} {blob.key} ({blob.size} bytes)")
                count, size = count + 1, size + blob.size
    finally:
        await engine.dispose()
    verb = "would remove" if dry_run else "removed"
    print(f"{verb} {count} blob(s) no file refers to, {size} bytes")
    return 0


async def _migrated(engine: AsyncEngine) -> bool:
    """Whether the database is at the latest migration; if not, says so on stderr."""
    async with engine.connect() as connection:
        current = await connection.run_sync(migrate.is_current)
    if not current:
        # Rather than "no such table: …" at the end of a traceback.
        print(
            "the database is not at the latest migration; run `python -m app migrate` first",
            file=sys.stderr,
        )
    return current


async def create_superuser(settings: Settings, email: str, username: str, password: str) -> int:
    try:
        data = UserCreate(email=email, username=username, password=password)
    except ValidationError as exc:
        # Only where and why: pydantic's full message would echo the password.
        for error in exc.errors():
            print(f"invalid {'.'.join(map(str, error['loc']))}: {error['msg']}", file=sys.stderr)
        return 2
    engine = create_engine(settings.effective_database_url, settings)
    try:
        if not await _migrated(engine):
            return 1
        async with create_sessionmaker(engine)() as session:
            user = await auth_service.register(
                session, PasswordHasher(settings), data, role=Role.ADMIN, is_superuser=True
            )
    except Conflict as exc:
        print(f"not created: {exc.detail}", file=sys.stderr)
        return 1
    finally:
        await engine.dispose()
    print(f"superuser {user.username} (id {user.id}) created")
    return 0
