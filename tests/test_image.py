"""The container image as an operator runs it: built from the Dockerfile with podman, run
with a read-only root filesystem against a real PostgreSQL and Redis (issue #6).

It checks what someone deploying the image would notice: the service becomes ready with
both dependencies, every process runs as the unprivileged user, the image's own
HEALTHCHECK passes, nothing but /data and /tmp is writable, the logs are JSON lines, and
``podman stop`` lets a request in flight finish and exits cleanly instead of being killed.
"""

import itertools
import json
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from deploy.stack.postgres import PostgresServer
from deploy.stack.process import free_port, wait_for
from deploy.stack.redis import RedisServer
from tests.api import PASSWORD
from tests.container import Podman, base_image, build_image, ulimit_options

pytestmark = pytest.mark.podman

APP_UID = 10001
WORKERS = 2
# podman's wait before SIGKILL: above gunicorn's own graceful timeout (30 s by default), so
# a kill can only mean that gunicorn did not stop by itself.
STOP_GRACE_SECONDS = 60
START_TIMEOUT = 90
BOUNDARY = "image-test-boundary"
CHUNK = b"uploaded slowly, one piece at a time\n" * 1024
CHUNKS_AFTER_STOP = 40

_names = itertools.count()


@dataclass
class Container:
    podman: Podman
    name: str
    base_url: str
    log_path: Path
    database: str

    def inspect(self, template: str) -> str:
        return self.podman.run("inspect", "--format", template, self.name).stdout.strip()

    def exec(self, *command: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        options = ["--user", user] if user is not None else []
        return self.podman.run("exec", *options, self.name, *command, check=False)

    def log_lines(self) -> list[str]:
        result = self.podman.run("logs", self.name)
        return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]

    def serving(self) -> bool:
        try:
            if httpx2.get(f"{self.base_url}/health/live", timeout=1).status_code == 200:
                return True
        except httpx2.HTTPError:
            pass
        if self.inspect("{{.State.Running}}") != "true":
            raise RuntimeError(
                f"container {self.name} exited before serving:\n" + "\n".join(self.log_lines())
            )
        return False


@pytest.fixture(scope="module")
def podman() -> Podman:
    return Podman.find()


@pytest.fixture(scope="module")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    work_dir = tmp_path_factory.mktemp("image")
    return build_image(podman, base_image(podman, work_dir), work_dir / "build.log")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def start_container(
    podman: Podman,
    image: str,
    postgres: PostgresServer,
    postgres_template: str,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[], Container]]:
    """Starts a container of the image, each with a database of its own, and waits until
    it serves; every container is removed (and its database dropped) at the end."""
    started: list[Container] = []

    def start() -> Container:
        name = f"fastapi-ops-image-test-{os.getpid()}-{next(_names)}"
        database = name.replace("-", "_")
        postgres.create_database(database, template=postgres_template)
        port = free_port()
        log_path = tmp_path_factory.mktemp("container") / "container.log"
        container = Container(podman, name, f"http://127.0.0.1:{port}", log_path, database)
        started.append(container)
        env = {
            "APP_ENV": "production",
            "APP_SECRET_KEY": secrets.token_urlsafe(48),
            "APP_DATABASE_URL": postgres.url(database),
            "APP_REDIS_URL": redis_server.url(),
            "WEB_CONCURRENCY": str(WORKERS),
            # The host's network: PostgreSQL and Redis listen on its loopback only.
            "GUNICORN_BIND": f"127.0.0.1:{port}",
        }
        podman.run(
            "run", "--detach", "--name", name,
            "--network", "host",
            "--read-only",
            "--tmpfs", "/tmp:rw,mode=1777",  # noqa: S108 - the container's /tmp
            # U: owned by the user the image runs as, which writes its uploads there.
            "--tmpfs", "/data:rw,mode=0700,U",
            *ulimit_options(),
            # A log file of our own, kept with the test's files when it fails.
            "--log-driver", "k8s-file", "--log-opt", f"path={log_path}",
            *(f"--env={key}={value}" for key, value in env.items()),
            image,
        )  # fmt: skip
        wait_for(
            container.serving,
            timeout=START_TIMEOUT,
            what=f"container {name} to serve on {container.base_url}",
            log_path=log_path,
        )
        return container

    yield start
    for container in started:
        podman.run("rm", "--force", "--time", "0", container.name, check=False)
        postgres.drop_database(container.database)


@pytest.fixture(scope="module")
def running(start_container: Callable[[], Container]) -> Container:
    return start_container()


def test_ready_with_its_database_and_redis(running: Container) -> None:
    response = httpx2.get(f"{running.base_url}/health/ready", timeout=10)
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}


def test_every_process_runs_as_the_unprivileged_user(running: Container) -> None:
    rows = running.podman.run("top", running.name, "huser", "args").stdout.splitlines()[1:]
    assert len(rows) == 1 + WORKERS, rows
    assert all(row.split()[0] == str(APP_UID) for row in rows), rows

    # The same seen from the host's kernel: real, effective, saved and filesystem ids.
    master = int(running.inspect("{{.State.Pid}}"))
    workers = children(master)
    assert len(workers) == WORKERS
    for pid in (master, *workers):
        assert proc_ids(pid, "Uid") == [APP_UID] * 4, pid
        assert proc_ids(pid, "Gid") == [APP_UID] * 4, pid


def test_the_image_healthcheck_passes(running: Container) -> None:
    result = running.podman.run("healthcheck", "run", running.name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert running.inspect("{{.State.Health.Status}}") == "healthy"


def test_only_data_and_tmp_are_writable(running: Container) -> None:
    # As root inside the container: only the read-only mount can refuse it.
    refused = running.exec("touch", "/opt/app/written", user="0")
    assert refused.returncode != 0
    assert "Read-only file system" in refused.stderr
    for path in ("/data/written", "/tmp/written"):  # noqa: S108 - inside the container
        written = running.exec("touch", path)
        assert written.returncode == 0, written.stderr


def test_logs_are_json_lines(running: Container) -> None:
    response = httpx2.get(f"{running.base_url}/api/v1/users/me", timeout=10)
    assert response.status_code == 401

    def access_logged() -> bool:
        return any('"/api/v1/users/me"' in line for line in running.log_lines())

    wait_for(access_logged, timeout=10, what="the access log line")
    entries = [json.loads(line) for line in running.log_lines()]
    assert all({"event", "level", "timestamp"} <= entry.keys() for entry in entries)
    assert any(entry["logger"] == "gunicorn.error" for entry in entries)
    access = [entry for entry in entries if entry.get("path") == "/api/v1/users/me"]
    assert access[0]["event"] == "request"
    assert access[0]["status"] == 401


def test_stop_finishes_the_request_in_flight_and_exits_cleanly(
    start_container: Callable[[], Container],
) -> None:
    container = start_container()
    headers = {
        "Authorization": f"Bearer {access_token(container.base_url)}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
    }
    in_flight = threading.Event()
    stopping = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield (
            f"--{BOUNDARY}\r\n"
            'Content-Disposition: form-data; name="file"; filename="slow.txt"\r\n'
            "Content-Type: text/plain\r\n\r\n"
        ).encode()
        yield CHUNK
        in_flight.set()
        # The rest is sent only once the worker has started shutting down with this
        # request unfinished, and slowly, as a client on a poor network would.
        if not stopping.wait(timeout=STOP_GRACE_SECONDS):
            raise RuntimeError("the container never started shutting down")
        for _ in range(CHUNKS_AFTER_STOP):
            time.sleep(0.05)
            yield CHUNK
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    outcome: dict[str, Any] = {}

    def upload() -> None:
        try:
            outcome["response"] = httpx2.post(
                f"{container.base_url}/api/v1/files",
                content=slow_body(),
                headers=headers,
                timeout=STOP_GRACE_SECONDS,
            )
        except Exception as exc:  # reported by the assertion below
            outcome["error"] = exc

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert in_flight.wait(timeout=30)
    stop = subprocess.Popen(
        container.podman.command("stop", "--time", str(STOP_GRACE_SECONDS), container.name),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(
            lambda: "Waiting for connections to close" in container.log_path.read_text(),
            timeout=STOP_GRACE_SECONDS,
            what="a worker to wait for the upload in flight",
            log_path=container.log_path,
        )
    finally:
        stopping.set()
        uploader.join(timeout=STOP_GRACE_SECONDS)
        stop_output, _ = stop.communicate(timeout=STOP_GRACE_SECONDS + 30)

    response = outcome.get("response")
    assert response is not None, f"the upload failed: {outcome.get('error')!r}"
    assert response.status_code == 201, response.text
    assert response.json()["size"] == len(CHUNK) * (1 + CHUNKS_AFTER_STOP)
    assert stop.returncode == 0, stop_output
    # 137 would mean podman had to SIGKILL it at the end of the grace period.
    assert container.inspect("{{.State.ExitCode}}") == "0"
    entries = [json.loads(line) for line in container.log_lines()]
    # gunicorn logs SIGKILLed or failing workers as errors, yet still exits 0.
    assert not [entry for entry in entries if entry["level"] in ("error", "critical")]
    assert entries[-1]["event"] == "Shutting down: Master"


def access_token(base_url: str) -> str:
    with httpx2.Client(base_url=base_url, timeout=30) as client:
        account = {"email": "slow@example.com", "username": "slow", "password": PASSWORD}
        registered = client.post("/api/v1/auth/register", json=account)
        assert registered.status_code == 201, registered.text
        login = client.post("/api/v1/auth/token", data={"username": "slow", "password": PASSWORD})
        assert login.status_code == 200, login.text
        token: str = login.json()["access_token"]
        return token


def children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            lines = status.read_text().splitlines()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        ppid = next(line.split()[1] for line in lines if line.startswith("PPid:"))
        if int(ppid) == pid:
            found.append(int(status.parent.name))
    return found


def proc_ids(pid: int, kind: str) -> list[int]:
    """The real, effective, saved and filesystem user (or group) ids of `pid`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{kind}:"):
            return [int(value) for value in line.split()[1:]]
    raise AssertionError(f"no {kind} line in /proc/{pid}/status")
