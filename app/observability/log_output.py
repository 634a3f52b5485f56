"""Where log lines go: whole lines, written to the output stream's bytes buffer.

Why buffered: writing and flushing the access line on every request was a system call
per request, the largest single cost of the middleware stack (bench/RESULTS.md). Like
nginx's ``access_log … buffer= flush=``, access lines are collected and written together
at most ``flush_seconds`` after the first of them, and before any other line (so the
output keeps its order), when the buffer fills, and at exit. Every other line — errors,
warnings, server messages — is written at once, with what is pending. The cost: on a
SIGKILL or a crash of the interpreter, up to ``flush_seconds`` of access lines are lost.
``flush_seconds=0`` writes every line at once.

Writes carry whole lines and at most PIPE_BUF bytes (unless one line is longer), so the
lines of several workers sharing one pipe or file never interleave mid-line.
"""

import asyncio
import atexit
import contextlib
import os
import select
import sys
import threading
from collections.abc import Callable
from typing import TextIO

# The largest write a pipe keeps whole (POSIX: at least 512, Linux: 4096).
CHUNK_BYTES = select.PIPE_BUF


class LineOutput:
    """Whole lines to one stream; ``write(..., flush=False)`` may hold them back."""

    def __init__(self, stream: TextIO, flush_seconds: float) -> None:
        # Threads log too (the thread pool, SQLAlchemy), so the buffer is shared under a lock.
        self._lock = threading.Lock()
        self._pending = bytearray()
        self._flush_scheduled = False
        self.flush_seconds = flush_seconds
        self.stream = stream
        binary = getattr(stream, "buffer", None)
        self._emit: Callable[[bytes | bytearray], object]
        if binary is not None:
            self._emit, self._flush_stream = binary.write, binary.flush
        else:  # a text-only stream (io.StringIO in tests)
            self._emit = lambda data: stream.write(bytes(data).decode())
            self._flush_stream = stream.flush

    def write(self, line: bytes, *, flush: bool = True) -> None:
        """Write one line (ending in a newline); held back only when ``flush`` is false."""
        with self._lock:
            if self._pending and len(self._pending) + len(line) > CHUNK_BYTES:
                self._drain()
            self._pending += line
            if flush or not self.flush_seconds:
                self._drain()
                return
            if self._flush_scheduled:
                return
            self._flush_scheduled = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop to flush later from: now, then
            self.flush()
        else:
            loop.call_later(self.flush_seconds, self.flush)

    def flush(self) -> None:
        with self._lock:
            self._drain()

    def _drain(self) -> None:
        self._flush_scheduled = False
        if self._pending:
            self._emit(self._pending)
            self._pending.clear()
        self._flush_stream()

    def forget_pending(self) -> None:
        """In a forked child: the parent still holds these lines and writes them itself."""
        self._lock = threading.Lock()
        self._pending.clear()
        self._flush_scheduled = False


_outputs: list[LineOutput] = []


def open_output(stream: TextIO | None, flush_seconds: float) -> LineOutput:
    """A LineOutput for ``stream`` (stdout when None), flushed at exit. Replacing one
    writes out what the replaced one held."""
    while _outputs:
        _outputs.pop().flush()
    output = LineOutput(stream or sys.stdout, flush_seconds)
    _outputs.append(output)
    return output


def flush_all() -> None:
    for output in _outputs:
        # At exit a test's stream may be closed already; nothing is left to write to.
        with contextlib.suppress(ValueError, OSError):
            output.flush()


def _forget_pending_in_child() -> None:
    for output in _outputs:
        output.forget_pending()


atexit.register(flush_all)
os.register_at_fork(after_in_child=_forget_pending_in_child)
