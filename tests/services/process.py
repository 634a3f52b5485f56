"""What every server the tests run has in common: a foreground child process, a port
chosen on the first start and kept for later ones (a client holding the URL reconnects
after a restart), and a context manager that stops it."""

import os
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any, Self

HOST = "127.0.0.1"


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class ServerProcess:
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
