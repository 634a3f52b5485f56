"""Access lines are written in batches, yet none is lost, reordered or split."""

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO

from app.observability.log_output import CHUNK_BYTES, HELD_LINES, LineOutput


def line(n: int, pad: int = 0) -> bytes:
    return json.dumps({"n": n, "pad": "x" * pad}).encode() + b"\n"


def numbers(path: Path) -> list[int]:
    return [json.loads(text)["n"] for text in path.read_text().splitlines()]


def held(n: int, pad: int = 0) -> Callable[[], bytes]:
    return lambda: line(n, pad)


Scenario = Callable[[LineOutput, Path], Awaitable[None]]


def run(tmp_path: Path, flush_seconds: float, scenario: Scenario) -> None:
    """``scenario`` in an event loop, with a LineOutput writing to a file it can read."""
    path = tmp_path / "out.log"

    async def main(stream: TextIO) -> None:
        await scenario(LineOutput(stream, flush_seconds), path)

    with path.open("w") as stream:
        asyncio.run(main(stream))


def test_held_lines_wait_for_the_next_other_line_and_keep_their_order(tmp_path: Path) -> None:
    async def scenario(output: LineOutput, path: Path) -> None:
        output.hold(held(1))
        output.hold(held(2))
        assert numbers(path) == []  # held back
        output.write(line(3))  # e.g. an error: written at once, after the held ones
        assert numbers(path) == [1, 2, 3]

    run(tmp_path, 60, scenario)


def test_held_lines_are_written_within_flush_seconds(tmp_path: Path) -> None:
    async def scenario(output: LineOutput, path: Path) -> None:
        output.hold(held(1))
        for _ in range(200):  # up to 10 s: waiting, not timing
            if numbers(path):
                break
            await asyncio.sleep(0.05)
        assert numbers(path) == [1]

    run(tmp_path, 0.05, scenario)


def test_lines_held_past_due_are_written_by_the_next_one(tmp_path: Path) -> None:
    """The loop that was to flush them is gone (or busy): the next held line writes them."""
    path = tmp_path / "out.log"
    with path.open("w") as stream:
        output = LineOutput(stream, flush_seconds=0.05)

        async def hold(n: int) -> None:
            output.hold(held(n))

        asyncio.run(hold(1))  # its timer dies with this loop
        time.sleep(0.1)  # past due
        assert numbers(path) == []
        asyncio.run(hold(2))
        assert numbers(path) == [1, 2]


def test_flush_seconds_zero_writes_every_line_at_once(tmp_path: Path) -> None:
    async def scenario(output: LineOutput, path: Path) -> None:
        output.hold(held(1))
        assert numbers(path) == [1]

    run(tmp_path, 0, scenario)


def test_held_lines_are_bounded(tmp_path: Path) -> None:
    async def scenario(output: LineOutput, path: Path) -> None:
        for n in range(HELD_LINES):
            output.hold(held(n))
        assert numbers(path) == list(range(HELD_LINES))  # the last one wrote them all

    run(tmp_path, 60, scenario)


class _Writes:
    """The binary side of a stream, recording each write it is handed."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes | bytearray) -> int:
        self.writes.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


class _Stream:
    def __init__(self) -> None:
        self.buffer = _Writes()


def test_writes_are_whole_lines_no_larger_than_a_pipe_keeps_whole() -> None:
    stream = _Stream()

    async def scenario() -> None:
        output = LineOutput(stream, flush_seconds=60)  # type: ignore[arg-type]
        for n in range(100):
            output.hold(held(n, pad=n * 7 % 300))
        output.flush()

    asyncio.run(scenario())
    writes = stream.buffer.writes
    assert 1 < len(writes) < 50  # batched: not one write per line, nor one for all
    assert all(len(data) <= CHUNK_BYTES and data.endswith(b"\n") for data in writes)
    lines = b"".join(writes).splitlines()
    assert [json.loads(text)["n"] for text in lines] == list(range(100))


def test_held_lines_are_written_when_the_process_exits(tmp_path: Path) -> None:
    """A worker that stops normally (gunicorn's max_requests, a deploy) loses no line."""
    program = textwrap.dedent(
        """
        import asyncio
        import time
        from functools import partial
        from app.observability.logging import configure_logging, hold_line, render_line

        async def main():
            configure_logging("INFO", "json", flush_seconds=60)
            for n in range(50):
                hold_line(partial(render_line, "app.access", "info", {"event": "request", "n": n},
                                  untrusted="", timestamp=time.time()))

        asyncio.run(main())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(text) for text in result.stdout.splitlines()]
    assert [record["n"] for record in lines] == list(range(50))
    assert all(record["logger"] == "app.access" for record in lines)


def test_workers_sharing_a_pipe_never_split_each_others_long_lines(tmp_path: Path) -> None:
    """Lines longer than a pipe keeps whole (an error's traceback) from several workers on
    one stdout, read by a collector that falls behind: the kernel splits such writes when
    the pipe is full, and other lines landed in their middle, two records lost each."""
    writer = textwrap.dedent(
        """
        import sys
        from app.observability.log_output import open_output
        worker = sys.argv[1]
        output = open_output(None, flush_seconds=0)
        for n in range(150):
            trace = "x" * (3000 + n * 97 % 12000)
            output.write(f'{{"worker": {worker}, "n": {n}, "exception": "{trace}"}}\\n'.encode())
            if n % 3 == 0:
                output.write(f'{{"worker": {worker}, "n": {n}, "event": "request"}}\\n'.encode())
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    read_end, write_end = os.pipe()
    workers = [
        subprocess.Popen([sys.executable, "-c", writer, str(n)], stdout=write_end, env=env)
        for n in range(3)
    ]
    os.close(write_end)
    received = bytearray()
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while data := pipe.read(4096):  # a collector a little behind the writers
            received += data
            time.sleep(0.001)
    for worker in workers:
        assert worker.wait(timeout=60) == 0
    records = [json.loads(text) for text in received.splitlines()]  # each line one record
    assert len(records) == 3 * (150 + 50)
