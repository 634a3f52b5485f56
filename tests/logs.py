"""Reading what the service logs, as production renders it (JSON lines)."""

import io
import json
from collections.abc import Iterator

import pytest

from app.observability.logging import configure_logging


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Everything logged (the service's lines and stdlib ones), as production renders it."""
    yield io.StringIO()
    configure_logging("INFO", "console")


def attach(buffer: io.StringIO, level: str = "INFO") -> None:
    # After create_app, which configures logging to standard output.
    configure_logging(level, "json", stream=buffer)


def records(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]
