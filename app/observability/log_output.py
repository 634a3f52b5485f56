"""Where log lines go: whole lines, written to the output stream's bytes buffer.

Why the access line is held back: rendering it and writing it on every request was the
largest cost of the middleware stack (bench/RESULTS.md) — a system call per request, and
rendering code run once between two requests' worth of other code, which on these
machines costs several times what the same code costs run back to back. So, like nginx's
``access_log … buffer= flush=``, the request path only queues what the line needs; the
lines are rendered and written together: ``flush_seconds`` after the first (by a timer;
should its loop be busy or gone, by the next line held after that), when HELD_LINES are
waiting, before any other line (so the output keeps its order), and at exit. Every other
line — errors, warnings, server messages — is written at once. The cost: on a SIGKILL or
a crash of the interpreter, up to ``flush_seconds`` of access lines are lost.
``flush_seconds=0`` writes every line at once.

Writes carry whole lines and at most PIPE_BUF bytes (unless one line is longer), which a
pipe keeps whole. A longer line (an error's traceback, a long path) the kernel may split
when the pipe is full, and another worker's lines would land in the middle: so where
several processes share the stream (gunicorn's workers and master, which share
PROMETHEUS_MULTIPROC_DIR too) each writes under an flock on a file in that directory.
"""

import asyncio
import atexit
import contextlib
import fcntl
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TextIO

# The largest write a pipe keeps whole (POSIX: at least 512, Linux: 4096).
CHUNK_BYTES = select.PIPE_BUF
# Lines waiting at most; beyond this they are written by the request that adds one.
HELD_LINES = 128

Render = Callable[[], bytes]
_NOT_DUE = float("inf")
SHARED_LOCK_FILE = "log-output.lock"


class SharedWrites:
    """Writes to a stream that other processes write to as well, one process at a time:
    an flock on ``path``, a file every one of them opens (None: this process is alone)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        fd = self._open()
        if fd is None:
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _open(self) -> int | None:
        if self.path is None:
            return None
        # The file is gone when gunicorn emptied the directory after this process opened
        # it (the master, at its start): the others lock a new one.
        if self._fd is not None and os.fstat(self._fd).st_nlink == 0:
            self.forget()
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:  # no directory (yet): writing unlocked beats not writing
                return None
        return self._fd

    def forget(self) -> None:
        """Drop this process's handle; in a forked child, the parent's (a lock shared with
        the parent would exclude nobody)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LineOutput:
    """Whole lines to one stream: ``write`` now, ``hold`` for later."""

    def __init__(
        self, stream: TextIO, flush_seconds: float, shared: SharedWrites | None = None
    ) -> None:
        # Threads log too (the thread pool, SQLAlchemy), so the queue is shared under a lock.
        self._lock = threading.Lock()
        self.shared = shared or SharedWrites(None)
        self._held: list[Render] = []
        self._due = _NOT_DUE  # when the held lines must be out (monotonic clock)
        self.flush_seconds = flush_seconds
        self.stream = stream
        binary = getattr(stream, "buffer", None)
        self._emit: Callable[[bytes | bytearray], object]
        if binary is not None:
            self._emit, self._flush_stream = binary.write, binary.flush
        else:  # a text-only stream (io.StringIO in tests)
            self._emit = lambda data: stream.write(bytes(data).decode())
            self._flush_stream = stream.flush

    def write(self, line: bytes) -> None:
        """Write one line (ending in a newline) now, after the held ones."""
        with self._lock:
            self._drain((line,))

    def hold(self, render: Render) -> None:
        """Queue the line ``render()`` makes (ending in a newline), to be written later."""
        with self._lock:
            self._held.append(render)
            now = time.monotonic()
            # Past due: the timer's loop is busy or gone (a test's short-lived loop); the
            # line that finds it so writes them.
            if len(self._held) >= HELD_LINES or not self.flush_seconds or now > self._due:
                self._drain(())
                return
            if self._due != _NOT_DUE:
                return
            self._due = now + self.flush_seconds
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop to flush later from: now, then
            self.flush()
        else:
            loop.call_later(self.flush_seconds, self.flush)

    def flush(self) -> None:
        with self._lock:
            self._drain(())

    def _drain(self, lines: Iterable[bytes]) -> None:
        self._due = _NOT_DUE
        pending = [render() for render in self._held]
        pending.extend(lines)
        if pending:
            with self.shared.exclusive():
                chunk = bytearray()
                for line in pending:
                    if chunk and len(chunk) + len(line) > CHUNK_BYTES:
                        self._write_chunk(chunk)
                    chunk += line
                self._write_chunk(chunk)
        self._held.clear()

    def _write_chunk(self, chunk: bytearray) -> None:
        # Flushed chunk by chunk: the stream's own buffer would merge them.
        self._emit(chunk)
        self._flush_stream()
        chunk.clear()

    def forget_held(self) -> None:
        """In a forked child: the parent still holds these lines and writes them itself."""
        self._lock = threading.Lock()
        self._held.clear()
        self._due = _NOT_DUE
        self.shared.forget()


_current: LineOutput | None = None


def open_output(stream: TextIO | None, flush_seconds: float) -> LineOutput:
    """The LineOutput for ``stream`` (stdout when None), flushed at exit. Replacing the
    current one writes out what it held."""
    global _current
    flush_all()
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    shared = SharedWrites(Path(directory) / SHARED_LOCK_FILE if directory else None)
    _current = LineOutput(stream or sys.stdout, flush_seconds, shared)
    return _current


def flush_all() -> None:
    if _current is not None:
        # At exit a test's stream may be closed already; nothing is left to write to.
        with contextlib.suppress(ValueError, OSError):
            _current.flush()


def _forget_held_in_child() -> None:
    if _current is not None:
        _current.forget_held()


atexit.register(flush_all)
os.register_at_fork(after_in_child=_forget_held_in_child)
