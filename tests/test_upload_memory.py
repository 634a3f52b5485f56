"""Uploads are streamed: a 200 MB upload raises the server's peak memory (VmHWM) by a few
megabytes, not by the file's size. A memory bound, measured on a real server process."""

import os
from collections.abc import Iterator
from pathlib import Path

import httpx2

from app import migrate
from tests.api import PASSWORD
from tests.app_server import app_server

MIB = 1024 * 1024
FILE_SIZE = 200 * MIB
ALLOWED_GROWTH = 32 * MIB
BOUNDARY = "memory-bound-boundary"


def peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def multipart_body(size: int) -> Iterator[bytes]:
    """A text file part of ``size`` bytes, produced 1 MiB at a time (never held whole)."""
    yield (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="file"; filename="big.txt"\r\n'
        "Content-Type: text/plain\r\n\r\n"
    ).encode()
    line = b"streamed, never buffered\n"
    chunk = (line * (MIB // len(line) + 1))[:MIB]
    for _ in range(size // MIB):
        yield chunk
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def test_a_200_mb_upload_keeps_the_server_within_its_memory_bound(tmp_path: Path) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    migrate.upgrade(database)
    env = {k: v for k, v in os.environ.items() if not k.startswith("APP_")} | {
        "APP_ENV": "test",
        "APP_DATA_DIR": str(tmp_path / "data"),
        "APP_DATABASE_URL": database,
        "APP_MAX_UPLOAD_BYTES": str(FILE_SIZE + MIB),
        "APP_LOG_LEVEL": "WARNING",
    }
    with app_server(tmp_path, env, tmp_path / "server.log") as (base, server):
        body = {"email": "big@example.com", "username": "big", "password": PASSWORD}
        assert httpx2.post(f"{base}/api/v1/auth/register", json=body).status_code == 201
        token = httpx2.post(
            f"{base}/api/v1/auth/token", data={"username": "big", "password": PASSWORD}
        ).json()["access_token"]
        headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        }
        # Warm up every code path once, so the baseline includes what a small upload costs.
        small = httpx2.post(
            f"{base}/api/v1/files", content=multipart_body(MIB), headers=headers, timeout=60
        )
        assert small.status_code == 201, small.text
        idle = peak_rss(server.pid)

        big = httpx2.post(
            f"{base}/api/v1/files", content=multipart_body(FILE_SIZE), headers=headers, timeout=300
        )
        assert big.status_code == 201, big.text
        assert big.json()["size"] == FILE_SIZE
        growth = peak_rss(server.pid) - idle
        assert growth < ALLOWED_GROWTH, f"peak RSS grew by {growth / MIB:.1f} MiB"
