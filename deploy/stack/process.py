"""Running real servers from the machine's own binaries, for the native stack and the tests.

Mocks and in-process stand-ins hide the behaviour the tests exist to check (a server that
goes away, SQL the real engine rejects), and a user without Docker needs the real thing too.
Every server is a foreground child process: whoever started it owns its whole life and
nothing outlives `stop()`. A port is chosen on the first start and kept for later ones (a
client holding the URL reconnects after a restart), and a server that does not come up
fails with the tail of its own log instead of a bare timeout.
"""

from __future__ import annotations

import collections
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

HOST = "127.0.0.1"
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


class MissingBinary(RuntimeError):
    """A program the stack needs is not installed; the message says which package has it."""


def require_binary(name: str, *, why: str, extra_dirs: Sequence[str] = ()) -> str:
    """Return the path of `name`, or raise MissingBinary saying why it is needed."""
    found = find_binary(name, extra_dirs)
    if found is not None:
        return found
    where = ", ".join(["PATH", *extra_dirs])
    raise MissingBinary(f"{name!r} was not found on {where}: {why}")


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
    under a root-only tree (pytest's temporary directories are mode 0700): the
    ancestors get o+x (enter, not list), nothing more.
    """
    account = pwd.getpwnam(user)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(path, account.pw_uid, account.pw_gid)
    for ancestor in path.resolve().parents:
        mode = stat.S_IMODE(ancestor.stat().st_mode)
        if not mode & stat.S_IXOTH:
            ancestor.chmod(mode | stat.S_IXOTH)


def run_logged(
    command: Sequence[str],
    log_path: Path,
    *,
    what: str,
    timeout: float | None = None,
    **options: Any,
) -> None:
    """Run `command` to the end, its output appended to `log_path`.

    Raises RuntimeError with the tail of the log if it fails: a one-shot step (initdb, a
    migration, an image build) says why it failed there.
    """
    with log_path.open("ab") as log:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
            **options,
        )
    if result.returncode != 0:
        raise RuntimeError(f"{what} exited with code {result.returncode}{_log_tail(log_path)}")


def _log_tail(log_path: Path | None) -> str:
    if log_path is None:
        return ""
    try:
        with log_path.open(encoding="utf-8", errors="replace") as log:
            lines = collections.deque(log, maxlen=_LOG_TAIL_LINES)
    except FileNotFoundError:
        return f"\n(no log was written at {log_path})"
    return f"\n--- last {len(lines)} lines of {log_path} ---\n{''.join(lines)}"


def accepts_tcp(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def answers_ok(url: str) -> bool:
    """Whether a GET of `url` answers 200 right now."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (our own URL)
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class ServerProcess:
    what = "server"  # for messages: which server this is

    def __init__(self, base_dir: Path, log_name: str) -> None:
        self.base_dir = base_dir
        self.log_path = base_dir / log_name
        self.host = HOST
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server has no port until start() picks one")
        return self._port

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs, else None."""
        return None if self._process is None else self._process.pid

    def _launch(self, command: list[str], **options: Any) -> None:
        """Run ``command`` in the foreground, its output appended to the log file."""
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                # Ctrl-C must reach pytest, whose fixture teardown then stops the server.
                start_new_session=True,
                **options,
            )

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _signal_and_reap(self, stop_signal: signal.Signals, timeout: float) -> None:
        """Ask the server to exit, SIGKILL it if it has not within `timeout`, reap it."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(stop_signal)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None


class ProgramServer(ServerProcess):
    """A server that is one command line, ready when `ready()` says so, stopped by a signal."""

    stop_signal = signal.SIGTERM
    start_timeout = 60.0
    stop_timeout = 30.0

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The child's environment; None inherits ours."""
        return None

    def launch_options(self) -> dict[str, Any]:
        """More keyword arguments for Popen (the user and groups to run as, …)."""
        return {}

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError(f"{self.what} in {self.base_dir} is already running")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._port is None:
            self._port = free_port()
        self._launch(self.command(), env=self.environment(), **self.launch_options())
        try:
            wait_for(
                self.ready,
                timeout=self.start_timeout,
                what=f"{self.what} on {self.host}:{self._port}",
                process=self._process,
                log_path=self.log_path,
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self._signal_and_reap(self.stop_signal, self.stop_timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
