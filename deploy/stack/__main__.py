"""`python -m deploy.stack` (`make stack`): run the native stack in the foreground.

Prints one `name: URL` line per service once everything is ready, keeps every log under
`STACK_DIR` (default: a new temporary directory), and stops everything it started on
Ctrl-C, SIGTERM or SIGHUP — or as soon as one of its servers exits by itself.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from deploy.stack.process import MissingBinary
from deploy.stack.stack import Stack

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stopped(Exception):
    """A stop signal arrived while the stack was still starting."""


def main() -> int:
    directory = Path(os.environ.get("STACK_DIR") or tempfile.mkdtemp(prefix="fastapi-ops-stack-"))
    http_port = os.environ.get("STACK_HTTP_PORT")
    stack = Stack(directory, int(http_port) if http_port else None)
    stop = threading.Event()
    starting = True

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if starting:
            raise _Stopped

    for stop_signal in _STOP_SIGNALS:
        signal.signal(stop_signal, on_signal)
    print(f"stack: starting in {stack.directory}", flush=True)
    try:
        stack.start()
    except _Stopped:
        print("stack: stopped while starting", flush=True)
        return 0
    except (MissingBinary, RuntimeError) as exc:
        print(f"stack: could not start: {exc}", file=sys.stderr, flush=True)
        return 1
    starting = False
    try:
        for name, url in stack.endpoints().items():
            print(f"{name}: {url}", flush=True)
        print(f"stack: ready; logs under {stack.directory}; Ctrl-C stops it", flush=True)
        while not stop.wait(1.0):
            if failed := stack.failed():
                names = ", ".join(server.what for server in failed)
                print(f"stack: {names} exited; stopping the rest", file=sys.stderr, flush=True)
                return 1
        return 0
    finally:
        stack.stop()
        print("stack: stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
