"""A throwaway Redis server for tests, run from the machine's own `redis-server`.

Tests of caching and of what the service does when Redis goes away need the real server,
including the moment it stops and comes back "with its old data". `redis-server` runs as a
foreground child of the test process (never daemonized) so a fixture owns its whole life
and nothing outlives `stop()`; `start()` after `stop()` reuses the port and the directory,
so a client holding the URL reconnects and finds the data it left.

Persistence is one RDB snapshot, written exactly when `stop()` asks for it. `--save ""`
turns off the background snapshots (no forks, no data written at moments a test does not
choose), and on its own it also makes SIGTERM exit *without* saving. Redis 7.0's
`shutdown-on-sigterm`/`shutdown-on-sigint` settings make the signal choose instead:
SIGTERM saves synchronously before exiting, SIGINT does not. That is cheaper than an
append-only file with `appendfsync always` (an fsync per write, for data thrown away after
the run) and leaves `kill()` meaning what a crash means: writes since the last save are lost.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

from deploy.stack.process import ProgramServer, require_binary

_WHY = "tests that need a real Redis run redis-server (Debian: apt-get install redis-server)"
_STOP_TIMEOUT = 30.0
_PING_TIMEOUT = 1.0
_DUMP_FILE = "dump.rdb"


class RedisServer(ProgramServer):
    """A Redis server keeping its data in `base_dir`, started and stopped on demand.

    Layout: `base_dir/dump.rdb` (the snapshot `stop()` writes), `base_dir/redis.log`.
    """

    what = "Redis"
    start_timeout = 30.0

    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir, "redis.log")
        self.dump_path = base_dir / _DUMP_FILE

    def url(self, db: int = 0) -> str:
        """redis:// URL of logical database `db`."""
        return f"redis://{self.host}:{self.port}/{db}"

    def command(self) -> list[str]:
        # Errors in the command line are printed before Redis opens its log file, into
        # the same file (the launcher appends our child's output there).
        return [
            require_binary("redis-server", why=_WHY),
            "--port", str(self.port),
            "--bind", self.host,
            "--daemonize", "no",
            # Absolute: Redis chdirs into --dir and reopens the log file for every line.
            "--dir", str(self.base_dir.resolve()),
            "--logfile", str(self.log_path.resolve()),
            "--dbfilename", _DUMP_FILE,
            "--save", "",
            "--appendonly", "no",
            "--shutdown-on-sigterm", "save",
            "--shutdown-on-sigint", "nosave",
        ]  # fmt: skip

    def ready(self) -> bool:
        """Loaded (the snapshot, if any) and answering."""
        return self.accepts_connections()

    def stop(self, save: bool = True) -> None:
        """Shut the server down and reap it; does nothing if it is not running.

        With `save` the data set is written to the snapshot first, so the next `start()`
        brings it back; without, the next `start()` finds the previous snapshot, if any.
        Raises RuntimeError if the save failed: Redis then refuses to exit, so it is killed,
        and a test expecting its data back would otherwise fail far from the cause.
        """
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM if save else signal.SIGINT)
            try:
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                self._process = None
                raise RuntimeError(
                    f"Redis on {self.host}:{self._port} did not exit within {_STOP_TIMEOUT:g}s"
                    f" of being asked to stop (save={save}) and was killed; its data may not be"
                    f" in {self.dump_path}: see {self.log_path}"
                ) from None
        self._process = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; writes since the last save are lost."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        self._process = None

    def accepts_connections(self) -> bool:
        """Whether the server answers PING right now (not while it is loading its snapshot)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=_PING_TIMEOUT) as sock:
                sock.sendall(b"PING\r\n")
                with sock.makefile("rb") as replies:
                    return replies.readline() == b"+PONG\r\n"
        except OSError:
            return False
