"""The native stack (`python -m deploy.stack`) as a test's child process: started on free
ports in a directory of the test's, its printed URLs and its log files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from deploy.stack.process import wait_for

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RunningStack:
    process: subprocess.Popen[bytes]
    directory: Path
    urls: dict[str, str]
    output: Path

    @property
    def edge(self) -> str:
        return self.urls["nginx"]

    def nginx_lines(self) -> list[dict[str, Any]]:
        return _json_lines(self.directory / "nginx" / "access.log")

    def app_lines(self) -> list[dict[str, Any]]:
        return _json_lines(self.directory / "api" / "api.log")

    def logged(self, log: str, request_id: str) -> list[dict[str, Any]]:
        """The lines of `log` ("nginx" or "app") for `request_id`, once there is one: both
        write their line after the response has left."""
        lines = self.nginx_lines if log == "nginx" else self.app_lines

        def found() -> list[dict[str, Any]]:
            return [r for r in lines() if r.get("request_id") == request_id]

        wait_for(lambda: bool(found()), timeout=10, what=f"{log}'s log line for {request_id}")
        return found()

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def stop(self, stop_signal: signal.Signals) -> int:
        self.process.send_signal(stop_signal)
        return self.process.wait(timeout=120)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def start_stack(directory: Path, **env: str) -> RunningStack:
    output = directory.parent / f"{directory.name}.out"
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("APP_", "STACK_"))}
    environment |= {"STACK_DIR": str(directory), **env}
    with output.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "deploy.stack"],
            cwd=ROOT,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: "stack: ready" in output.read_text(),
            timeout=180,
            what="python -m deploy.stack",
            process=process,
            log_path=output,
        )
    except BaseException:
        process.kill()
        process.wait()
        raise
    lines = output.read_text().splitlines()
    urls = dict(line.split(": ", 1) for line in lines if not line.startswith("stack:"))
    return RunningStack(process, directory, urls, output)
