"""Uploads on a real server process: what only it shows.

- Uploads are streamed: a 200 MB upload raises the server's peak memory (VmHWM) by a few
  megabytes, not by the file's size (a memory bound, not a timing).
- A client gone mid-upload, or a full upload volume, leaves no file and no row behind.
"""

import contextlib
import hashlib
import http.client
import io
import json
import os
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx2
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app import migrate
from app.cli import create_superuser
from deploy.stack.postgres import PostgresServer
from deploy.stack.process import MissingBinary, require_binary, wait_for
from tests import prom
from tests.api import PASSWORD
from tests.app_server import app_server, server_env, signed_up
from tests.conftest import make_settings
from tests.uploads import BOUNDARY, HEAD, MIB, file_chunks, half_sent_upload, multipart_body

FILE_SIZE = 200 * MIB
ALLOWED_GROWTH = 32 * MIB


def peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def on_a_volume_of_its_own(size: int, uploads: Path) -> list[str]:
    """A wrapper running the server in a private mount namespace where ``uploads`` is a
    tmpfs of ``size`` bytes: a disk that really fills (ENOSPC), without root and without
    touching the machine's mounts."""
    unshare = require_binary("unshare", why="a private mount namespace (util-linux)")
    return [
        *(unshare, "--user", "--map-root-user", "--mount", "--"),
        *("sh", "-c", 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'),
        *("sh", str(size), str(uploads)),
    ]


def as_the_server_sees_it(server: subprocess.Popen[bytes], path: Path) -> Path:
    """``path`` in the server's mount namespace."""
    return Path(f"/proc/{server.pid}/root") / path.relative_to("/")


@contextlib.contextmanager
def upload_server(
    tmp_path: Path, max_upload_bytes: int, upload_volume_bytes: int | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes], str]]:
    """A real server on a migrated SQLite database, and a user's bearer token.
    ``upload_volume_bytes``: the size of a volume of its own for the uploads."""
    wrapper: list[str] = []
    if upload_volume_bytes is not None:
        uploads = tmp_path / "data" / "uploads"
        uploads.mkdir(parents=True)
        wrapper = on_a_volume_of_its_own(upload_volume_bytes, uploads)
        probe = subprocess.run([*wrapper, "true"], capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            raise MissingBinary(f"no tmpfs in a private mount namespace here: {probe.stderr}")
    env = server_env(tmp_path, APP_MAX_UPLOAD_BYTES=str(max_upload_bytes))
    migrate.upgrade(env["APP_DATABASE_URL"])
    with app_server(tmp_path, env, tmp_path / "server.log", wrapper) as (base, server):
        token = signed_up(base, "uploader")
        yield base, server, token


def test_a_200_mb_upload_keeps_the_server_within_its_memory_bound(tmp_path: Path) -> None:
    with upload_server(tmp_path, FILE_SIZE + MIB) as (base, server, token):
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
        # Hashed in a worker thread while the next chunks arrive: still every byte, in order.
        expected = hashlib.sha256()
        for chunk in file_chunks(FILE_SIZE):
            expected.update(chunk)
        assert big.json()["sha256"] == expected.hexdigest()
        growth = peak_rss(server.pid) - idle
        assert growth < ALLOWED_GROWTH, f"peak RSS grew by {growth / MIB:.1f} MiB"


def test_images_uploaded_at_once_are_decoded_one_at_a_time(tmp_path: Path) -> None:
    """A 40-megapixel image (under 1 MB as a JPEG) holds ~120 MB while it is decoded, once.
    Four arriving together must not hold four times that (memory bounds)."""
    buffer = io.BytesIO()
    gradient = Image.linear_gradient("L").resize((6300, 6300)).convert("RGB")
    gradient.save(buffer, "JPEG", quality=85)
    photo = buffer.getvalue()
    assert len(photo) < MIB

    def upload_photo(base: str, token: str) -> int:
        return httpx2.post(
            f"{base}/api/v1/files",
            files={"file": ("big.jpg", photo, "image/jpeg")},
            headers={"Authorization": f"Bearer {token}"},
            timeout=120,
        ).status_code

    with upload_server(tmp_path, 64 * MIB) as (base, server, token):
        idle = peak_rss(server.pid)
        assert upload_photo(base, token) == 201  # one decode's worth, plus the code paths
        after_one = peak_rss(server.pid)
        # 3 bytes a pixel: one decoded copy (~115 MiB), not three (an upright copy and a
        # full-size one for the thumbnail took it to ~440 MiB).
        assert after_one - idle < 250 * MIB, f"one image took {(after_one - idle) / MIB:.0f} MiB"
        with ThreadPoolExecutor(max_workers=4) as pool:
            statuses = list(pool.map(lambda _: upload_photo(base, token), range(4)))
        assert statuses == [201] * 4
        growth = peak_rss(server.pid) - after_one
    assert growth < 64 * MIB, f"peak RSS grew by {growth / MIB:.0f} MiB past one decode's"


@contextlib.contextmanager
def stalled_download(base: str, token: str, file_id: int) -> Iterator[None]:
    """A download whose client reads its first bytes, then nothing until the block ends."""
    address = urlsplit(base)
    with socket.create_connection((address.hostname, address.port)) as connection:
        connection.sendall(
            (
                f"GET /api/v1/files/{file_id}/content HTTP/1.1\r\n"
                f"Host: {address.netloc}\r\nAuthorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        assert connection.recv(12) == b"HTTP/1.1 200"
        yield


def test_uploads_arriving_and_downloads_leaving_hold_no_database_connection(
    tmp_path: Path, postgres: PostgresServer, postgres_template: str
) -> None:
    """Authenticating an upload or a download reads its user, and a download its file's
    row. Were that transaction kept while the bytes move, slow clients (a poor link, or a
    client trickling bytes on purpose) would hold the pool, and every other request would
    wait for a connection, then fail with a 503."""
    name = f"uploads_{os.getpid()}"
    postgres.create_database(name, template=postgres_template)
    env = server_env(
        tmp_path,
        APP_DATABASE_URL=postgres.url(name),
        APP_DB_POOL_SIZE="1",  # one connection: the first stalled upload would take it
        APP_DB_MAX_OVERFLOW="0",
        APP_DB_POOL_TIMEOUT_SECONDS="2",
        APP_MAX_UPLOAD_BYTES=str(64 * MIB),
    )
    uploads = tmp_path / "data" / "uploads"
    try:
        with app_server(tmp_path, env, tmp_path / "server.log") as (base, _):
            token = signed_up(base, "slow")
            bearer = {"Authorization": f"Bearer {token}"}
            with half_sent_upload(base, token, uploads), half_sent_upload(base, token, uploads):
                me = httpx2.get(f"{base}/api/v1/users/me", headers=bearer, timeout=30)
                assert me.status_code == 200, me.text
            # Far more than the sockets' buffers hold: the server waits on the client.
            file_id = text_upload(base, token, 32 * MIB).json()["id"]
            with stalled_download(base, token, file_id), stalled_download(base, token, file_id):
                me = httpx2.get(f"{base}/api/v1/users/me", headers=bearer, timeout=30)
                assert me.status_code == 200, me.text
    finally:
        postgres.drop_database(name)


def test_a_client_gone_mid_upload_leaves_nothing_behind(tmp_path: Path) -> None:
    """The connection drops with writes in flight: the staged file goes, no row appears."""
    uploads = tmp_path / "data" / "uploads"
    with upload_server(tmp_path, 64 * MIB) as (base, _, token):
        with half_sent_upload(base, token, uploads):
            pass
        deadline = time.monotonic() + 30
        while any(uploads.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(uploads.iterdir()) == []
        listing = httpx2.get(
            f"{base}/api/v1/files", headers={"Authorization": f"Bearer {token}"}
        ).json()
        assert listing["total"] == 0


def test_an_upload_whose_account_is_deleted_meanwhile_is_a_401_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    uploads = tmp_path / "data" / "uploads"
    env = server_env(tmp_path, APP_MAX_UPLOAD_BYTES=str(64 * MIB))
    migrate.upgrade(env["APP_DATABASE_URL"])
    settings = make_settings(env["APP_DATABASE_URL"], tmp_path / "data")
    anyio.run(create_superuser, settings, "root@example.com", "root", PASSWORD)
    with app_server(tmp_path, env, tmp_path / "server.log") as (base, _):
        token = signed_up(base, "leaving")
        bearer = {"Authorization": f"Bearer {token}"}
        user_id = httpx2.get(f"{base}/api/v1/users/me", headers=bearer).json()["id"]
        login = {"username": "root", "password": PASSWORD}
        root = httpx2.post(f"{base}/api/v1/auth/token", data=login).json()["access_token"]
        before = uploads_by_outcome(base)
        with half_sent_upload(base, token, uploads) as connection:
            deleted = httpx2.delete(
                f"{base}/api/v1/users/{user_id}", headers={"Authorization": f"Bearer {root}"}
            )
            assert deleted.status_code == 204
            tail = f"\r\n--{BOUNDARY}--\r\n".encode()
            left = 32 * MIB - len(HEAD) - 5 * MIB - len(tail)
            for sent in range(0, left, MIB):
                connection.sendall(b"a" * min(MIB, left - sent))
            connection.sendall(tail)
            response = http.client.HTTPResponse(connection)
            response.begin()
            body = json.loads(response.read())
        assert (response.status, response.getheader("Content-Type")) == (
            401,
            "application/problem+json",
        )
        assert body["detail"] == "The account no longer exists."
        assert list(uploads.iterdir()) == []
        after = uploads_by_outcome(base)
        assert after.get("aborted", 0) == before.get("aborted", 0) + 1


def text_upload(base: str, token: str, size: int, name: str = "x.txt") -> httpx2.Response:
    return httpx2.post(
        f"{base}/api/v1/files",
        files={"file": (name, b"a" * size, "text/plain")},
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )


def text_batch(base: str, token: str, *sizes: int) -> httpx2.Response:
    return httpx2.post(
        f"{base}/api/v1/files/batch",
        files=[("file", (f"{n}.txt", b"a" * size, "text/plain")) for n, size in enumerate(sizes)],
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )


def uploads_by_outcome(base: str) -> dict[str, float]:
    families = text_string_to_metric_families(httpx2.get(f"{base}/metrics").text)
    return {
        sample.labels["outcome"]: sample.value
        for family in families
        if family.name == "uploads"
        for sample in family.samples
        if sample.name == "uploads_total"
    }


def assert_refused_for_space(response: httpx2.Response) -> None:
    assert response.status_code == 507, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["connection"] == "close"
    assert response.json()["detail"].startswith("The server has no room")


def test_a_full_upload_volume_is_a_507_and_leaves_the_volume_as_it_was(tmp_path: Path) -> None:
    """A disk that fills is the server's condition: 507 problem+json, the staged file
    gone, no row, a warning for the operator, ``uploads_total{outcome="no_space"}``; and
    the service takes uploads again once there is room, without a restart."""
    with upload_server(tmp_path, 4 * MIB, upload_volume_bytes=MIB) as (base, server, token):
        auth = {"Authorization": f"Bearer {token}"}
        volume = as_the_server_sees_it(server, tmp_path / "data" / "uploads")
        filling = text_upload(base, token, MIB, "filling.txt")  # every block of the volume
        assert filling.status_code == 201, filling.text
        blobs = sorted(volume.iterdir())
        assert len(blobs) == 1

        on_a_full_volume = [
            text_upload(base, token, 100),  # buffered: its one write fails in a flush
            text_upload(base, token, 3 * MIB),  # fails mid-way, the rest still arriving
            text_batch(base, token, 10, 10),
        ]
        for response in on_a_full_volume:
            assert_refused_for_space(response)
        assert sorted(volume.iterdir()) == blobs  # no staged file left over
        assert httpx2.get(f"{base}/api/v1/files", headers=auth).json()["total"] == 1

        deleted = httpx2.delete(f"{base}/api/v1/files/{filling.json()['id']}", headers=auth)
        assert deleted.status_code == 204
        # The first file is stored, the second finds no room: the batch fails whole, and
        # the first file's blob goes too.
        too_much = text_batch(base, token, 600 * 1024, 600 * 1024)
        assert_refused_for_space(too_much)
        assert list(volume.iterdir()) == []
        assert httpx2.get(f"{base}/api/v1/files", headers=auth).json()["total"] == 0

        again = text_upload(base, token, 100)
        assert again.status_code == 201, again.text
        refused = len(on_a_full_volume) + 1
        outcomes = uploads_by_outcome(base)
        assert (outcomes["ok"], outcomes["no_space"]) == (2, refused)
    warnings = (tmp_path / "server.log").read_text().count("upload refused: the storage is full")
    assert warnings == refused


def test_a_crash_mid_upload_leaves_a_stage_that_a_later_start_removes(tmp_path: Path) -> None:
    """A worker killed mid-upload (SIGKILL: an OOM kill) leaves its staged file, which no
    request will ever remove. Each start (and every 10 minutes) removes staged files
    untouched for an hour, and nothing else: not a fresh stage, not a stored file."""
    uploads = tmp_path / "data" / "uploads"
    with upload_server(tmp_path, 64 * MIB) as (base, server, token):
        stored = text_upload(base, token, 100)
        assert stored.status_code == 201, stored.text
        with half_sent_upload(base, token, uploads):
            server.kill()
            server.wait()
    (left,) = uploads.glob(".upload-*")
    (kept,) = [path for path in uploads.iterdir() if path != left]
    hours_ago = time.time() - 2 * 3600
    for path in (left, kept):  # as if the restart came two hours later
        os.utime(path, (hours_ago, hours_ago))
    fresh = uploads / ".upload-in-flight-elsewhere.tmp"  # another worker's, live
    fresh.write_bytes(b"arriving")
    env = server_env(tmp_path, APP_MAX_UPLOAD_BYTES=str(64 * MIB))
    with app_server(tmp_path, env, tmp_path / "restart.log") as (base, _):
        wait_for(lambda: not left.exists(), timeout=30, what="the stale stage to be removed")
        assert fresh.exists()
        download = httpx2.get(
            f"{base}/api/v1/files/{stored.json()['id']}/content",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert download.status_code == 200
        assert download.content == b"a" * 100
    assert kept.exists()
    assert "removed stale staged uploads" in (tmp_path / "restart.log").read_text()


@contextlib.contextmanager
def refused_mid_body(
    base: str, head: str, first_bytes: bytes
) -> Iterator[tuple[http.client.HTTPResponse, socket.socket]]:
    """Send ``head`` (a request line and headers) and ``first_bytes`` of its body, then
    read the answer; yields it and the connection, open until the block ends."""
    address = urlsplit(base)
    with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
        connection.sendall(f"{head}Host: {address.netloc}\r\n\r\n".encode() + first_bytes)
        response = http.client.HTTPResponse(connection)
        response.begin()
        response.read()
        yield response, connection


def reset_while_sending(connection: socket.socket, chunk: bytes, times: int) -> bool:
    """Whether the peer resets ``connection`` before ``times`` sends of ``chunk`` are done."""
    try:
        for _ in range(times):
            connection.sendall(chunk)
    except (BrokenPipeError, ConnectionResetError):
        return True
    return False


def test_a_refusal_before_the_body_is_read_closes_the_connection(tmp_path: Path) -> None:
    """Uploads are streamed, so nothing reads a body the routes refuse before they start
    on it (no token, a type that is not multipart): kept alive, the connection would have
    the server read and discard the whole declared body, a terabyte, before the client's
    next request. The refusal closes it instead, as a 413 does; a client sending more
    finds the connection reset. A refusal after the body was read keeps it open."""
    with upload_server(tmp_path, 64 * MIB) as (base, _, token):
        declared = (
            "POST /api/v1/files HTTP/1.1\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {2**40}\r\n"
        )
        chunked = (
            "POST /api/v1/files HTTP/1.1\r\n"
            f"Authorization: Bearer {token}\r\n"
            "Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (MIB, b"a" * MIB)
        for head, first_bytes, status in ((declared, HEAD, 401), (chunked, chunk, 415)):
            with refused_mid_body(base, head, first_bytes) as (response, connection):
                assert response.status == status
                assert response.getheader("content-type") == "application/problem+json"
                assert response.getheader("connection") == "close"
                assert reset_while_sending(connection, chunk, 256)  # the server reads no more

        # A JSON body read whole and refused: the connection stays open for the next one.
        item = b'{"title": 1}'
        json_post = (
            "POST /api/v1/items HTTP/1.1\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(item)}\r\n"
        )
        with refused_mid_body(base, json_post, item) as (response, connection):
            assert response.status == 422
            assert response.getheader("connection") is None
            connection.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            again = http.client.HTTPResponse(connection)
            again.begin()
            assert again.status == 200


def test_an_unhandled_error_closes_the_connection_and_says_so(tmp_path: Path) -> None:
    """A 500 is rendered outside the middleware that marks refusals sent before the body
    was read, and lacked `Connection: close`: the server closes the connection after an
    unhandled error anyway, so a keep-alive client sent its next request, or the rest of
    an upload, into a closed connection. The table the routes read users from is renamed
    away under the server: every authenticated request fails unhandled."""
    with upload_server(tmp_path, 64 * MIB) as (base, _, token):
        with contextlib.closing(sqlite3.connect(tmp_path / "app.db")) as database:
            database.execute("ALTER TABLE users RENAME TO users_elsewhere")
        upload = (
            "POST /api/v1/files HTTP/1.1\r\n"
            f"Authorization: Bearer {token}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {2**40}\r\n"
        )
        with refused_mid_body(base, upload, HEAD) as (response, connection):
            assert response.status == 500
            assert response.getheader("connection") == "close"
            assert reset_while_sending(connection, b"a" * MIB, 256)  # the server reads no more
        read = f"GET /api/v1/users/me HTTP/1.1\r\nAuthorization: Bearer {token}\r\n"
        with refused_mid_body(base, read, b"") as (response, _):
            assert response.status == 500
            assert response.getheader("connection") == "close"


def test_a_download_its_client_leaves_is_a_499_and_its_file_is_closed(tmp_path: Path) -> None:
    """A client that drops a download midway (a closed tab, a killed curl) got a cut-off
    file: it was counted and logged as a 200, so dashboards showed a success the user
    never had. It is a 499, as an abandoned upload, and the server lets go of the file."""
    env = server_env(tmp_path, APP_LOG_FORMAT="json", APP_MAX_UPLOAD_BYTES=str(64 * MIB))
    migrate.upgrade(env["APP_DATABASE_URL"])
    log = tmp_path / "server.log"
    route = "/api/v1/files/{file_id}/content"
    with app_server(tmp_path, env, log) as (base, server):
        token = signed_up(base, "leaver")
        size = 16 * MIB  # far more than the sockets' buffers hold
        file_id = text_upload(base, token, size).json()["id"]

        def requests(status: int) -> float:
            samples = prom.parse(httpx2.get(f"{base}/metrics").text)
            labels = {"method": "GET", "route": route, "status": str(status)}
            return prom.value(samples, "http_requests_total", **labels)

        with stalled_download(base, token, file_id):
            pass  # read the status line, then close with the rest unread
        wait_for(lambda: requests(499) == 1, timeout=30, what="a 499", process=server, log_path=log)
        assert requests(200) == 0
        data = tmp_path / "data"
        open_files = [os.readlink(fd) for fd in Path(f"/proc/{server.pid}/fd").iterdir()]
        assert not [path for path in open_files if path.startswith(str(data))]

        whole = httpx2.get(
            f"{base}/api/v1/files/{file_id}/content",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert (whole.status_code, len(whole.content)) == (200, size)
        wait_for(lambda: requests(200) == 1, timeout=30, what="a 200", process=server, log_path=log)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    statuses = [line["status"] for line in lines if line.get("route") == route]
    assert statuses == [499, 200]
