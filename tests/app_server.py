"""The service itself as a separate process (``python -m app serve``), for tests that
need what only a real server shows: its working directory, its memory, its logs."""

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx2

from app import migrate
from deploy.stack.process import free_port, wait_for
from tests.api import PASSWORD


def server_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """A server's environment: SQLite and the data directory under ``tmp_path``, INFO
    logs, then ``settings`` (APP_* variables); none of the caller's APP_* variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith("APP_")} | {
        "APP_ENV": "test",
        "APP_DATA_DIR": str(tmp_path / "data"),
        "APP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'app.db'}",
        "APP_LOG_LEVEL": "INFO",
        **settings,
    }


@contextmanager
def app_server(
    cwd: Path, env: dict[str, str], log: Path, wrapper: Sequence[str] = ()
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Serve on a free port until the block ends; yields the base URL and the process.
    ``wrapper``: a command the server runs under, which must exec it (so the process is
    the server's)."""
    port = free_port()
    command = [
        *wrapper,
        *(sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)),
    ]
    with log.open("wb") as output:
        server = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        await_answer(f"{base}/health/live", server, log, "python -m app serve")
        yield base, server
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)


@contextmanager
def sqlite_server(tmp_path: Path, log: Path, **settings: str) -> Iterator[str]:
    """``app_server`` on a migrated SQLite database (``server_env``); yields the base URL."""
    env = server_env(tmp_path, **settings)
    migrate.upgrade(env["APP_DATABASE_URL"])
    with app_server(tmp_path, env, log) as (base, _):
        yield base


def await_answer(url: str, server: subprocess.Popen[bytes], log: Path, what: str) -> None:
    """Until ``url`` answers 200; a server that exits first fails with its log."""
    wait_for(lambda: answers(url), timeout=60, what=what, process=server, log_path=log)


def answers(url: str) -> bool:
    """Whether ``url`` answers 200 now."""
    try:
        return httpx2.get(url, timeout=1).status_code == 200
    except httpx2.HTTPError:
        return False


def signed_up(base: str, username: str) -> str:
    """Register ``username`` (password ``tests.api.PASSWORD``) on the server at ``base``
    and log in: the access token."""
    body = {"email": f"{username}@example.com", "username": username, "password": PASSWORD}
    assert httpx2.post(f"{base}/api/v1/auth/register", json=body).status_code == 201
    login = {"username": username, "password": PASSWORD}
    return httpx2.post(f"{base}/api/v1/auth/token", data=login).json()["access_token"]
