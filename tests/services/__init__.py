"""Support for tests that start real service processes from the machine's own binaries.

Mocks and in-process stand-ins hide the behaviour these tests exist to check (a server that
goes away, SQL the real engine rejects), so the fixtures run the real thing. These helpers
keep that honest and cheap: a missing binary skips the test locally but fails it when
REQUIRE_SERVICES=1 (CI must never pass by skipping), and a server that does not come up
fails with the tail of its own log instead of a bare timeout.
"""

from __future__ import annotations

import collections
import os
import pwd
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

_POLL_INTERVAL = 0.05
_LOG_TAIL_LINES = 40


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing was listening on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_binary(name: str, extra_dirs: Sequence[str] = ()) -> str | None:
    """Return the path of executable `name`, searching PATH first and then `extra_dirs`."""
    # Empty entries would make shutil.which search the current directory.
    search_path = [p for p in (os.environ.get("PATH", os.defpath), *extra_dirs) if p]
    return shutil.which(name, path=os.pathsep.join(search_path))


def require_binary(name: str, *, why: str, extra_dirs: Sequence[str] = ()) -> str:
    """Return the path of `name`, or skip the test (fail it when REQUIRE_SERVICES=1)."""
    found = find_binary(name, extra_dirs)
    if found is not None:
        return found
    where = ", ".join(["PATH", *extra_dirs])
    message = f"{name!r} was not found on {where}: {why}"
    if os.environ.get("REQUIRE_SERVICES") == "1":
        pytest.fail(
            f"{message} (REQUIRE_SERVICES=1 makes this an error, not a skip)", pytrace=False
        )
    pytest.skip(message)


def wait_for(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    process: subprocess.Popen[Any] | None = None,
    log_path: Path | None = None,
) -> None:
    """Poll `predicate` until it is true.

    Raises RuntimeError, with the tail of `log_path`, if `process` exits first or `timeout`
    seconds pass: the log is where a server says why it did not come up.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            problem = f"the process exited with code {process.returncode}"
        elif time.monotonic() >= deadline:
            problem = f"still not ready after {timeout:g}s"
        else:
            time.sleep(_POLL_INTERVAL)
            continue
        raise RuntimeError(f"gave up waiting for {what}: {problem}{_log_tail(log_path)}")


def prepare_dir_for_user(path: Path, user: str) -> None:
    """Create `path` (mode 0700) owned by `user`, and make all its ancestors traversable.

    Needs root. It lets a server that refuses to run as root (PostgreSQL) keep its files
    under a root-only tree such as pytest's /tmp/pytest-of-root, which is mode 0700: the
    ancestors get o+x (enter, not list), nothing more.
    """
    account = pwd.getpwnam(user)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(path, account.pw_uid, account.pw_gid)
    for ancestor in path.resolve().parents:
        mode = stat.S_IMODE(ancestor.stat().st_mode)
        if not mode & stat.S_IXOTH:
            ancestor.chmod(mode | stat.S_IXOTH)


def _log_tail(log_path: Path | None) -> str:
    if log_path is None:
        return ""
    try:
        with log_path.open(encoding="utf-8", errors="replace") as log:
            lines = collections.deque(log, maxlen=_LOG_TAIL_LINES)
    except FileNotFoundError:
        return f"\n(no log was written at {log_path})"
    return f"\n--- last {len(lines)} lines of {log_path} ---\n{''.join(lines)}"
