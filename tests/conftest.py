"""Fixtures: the API against SQLite and a real PostgreSQL, one fresh database per test.

PostgreSQL is started once per session from the system binaries; migrations run once
into a template database and every test gets ``CREATE DATABASE … TEMPLATE`` of it, so
tests commit for real (as the service does) and still never see each other's rows.
"""

import itertools
import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from fastapi.testclient import TestClient

from app import migrate
from app.main import create_app
from app.settings import Settings
from deploy.stack.postgres import PostgresServer
from deploy.stack.process import MissingBinary
from tests.api import Api

pytest_plugins = ["pytester", "tests.logs"]  # tests.logs: the log_lines fixture

DATABASES = ["sqlite", "postgresql"]
_database_names = itertools.count()


_own_basetemp = pytest.StashKey[Path]()
_passed = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    # A base directory of our own: pytest prunes old numbered directories under the
    # shared one, and another pytest run on this machine would delete the live data
    # directories of this run's PostgreSQL and Redis servers.
    if config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix="fastapi-ops-tests-")
        config.stash[_own_basetemp] = Path(config.option.basetemp)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_passed] = exitstatus == 0


def pytest_unconfigure(config: pytest.Config) -> None:
    # Kept after a failure, for the server logs in it.
    own = config.stash.get(_own_basetemp, None)
    if own is not None and config.stash.get(_passed, False):
        shutil.rmtree(own, ignore_errors=True)


def skip_or_fail(missing: MissingBinary) -> NoReturn:
    """A missing server binary skips the test locally; CI (REQUIRE_SERVICES=1) must never
    pass by skipping, so there it fails."""
    if os.environ.get("REQUIRE_SERVICES") == "1":
        pytest.fail(
            f"{missing} (REQUIRE_SERVICES=1 makes this an error, not a skip)", pytrace=False
        )
    pytest.skip(str(missing))


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, Any, Any]:
    try:
        return (yield)
    except MissingBinary as missing:
        skip_or_fail(missing)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    except MissingBinary as missing:
        skip_or_fail(missing)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's APP_* variables must not change what the tests exercise."""
    for name in list(os.environ):
        if name.startswith("APP_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    with PostgresServer(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_template(postgres: PostgresServer) -> str:
    postgres.create_database("app_template")
    migrate.upgrade(postgres.url("app_template"))
    return "app_template"


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    migrate.upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        path = tmp_path / "app.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    name = f"test_{os.getpid()}_{next(_database_names)}"
    server.create_database(name, template=request.getfixturevalue("postgres_template"))
    yield server.url(name)
    server.drop_database(name)


def make_settings(database_url: str, data_dir: Path, **overrides: object) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        env="test",
        database_url=database_url,
        data_dir=data_dir,
        **overrides,
    )


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url, tmp_path / "data")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def api(client: TestClient, settings: Settings) -> Api:
    return Api(client, settings)
