"""Replicas: real service processes (uvicorn, as ``python -m app serve`` runs it) sharing
one SQLite file and one real Redis. A chat message, a private message and a notification
cross from one process to the other; handshake refusals are real HTTP 403s; a client that
stops reading does not hold up anyone else; a replica that shuts down closes its sockets
with 1012; no token reaches a log line; a write on one replica is read back on the other
at once; and failed logins count against one budget on both."""

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
import redis
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from app import migrate
from app.cli import create_superuser
from app.realtime.schemas import SERVER_MAX_FRAME_BYTES
from app.settings import Settings
from deploy.stack.process import free_port, wait_for
from deploy.stack.redis import RedisServer
from tests.api import PASSWORD

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 10.0
SERVICE_RESTART = 1012
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws(self, path: str, token: str | None = None, **options: Any) -> ClientConnection:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return connect(
            f"ws://127.0.0.1:{self.port}{path}",
            additional_headers=headers,
            proxy=None,  # never an HTTP(S)_PROXY from the environment
            open_timeout=TIMEOUT,
            **options,
        )

    def ready(self) -> bool:
        try:
            response = httpx2.get(f"{self.http}/health/ready", timeout=2)
        except httpx2.HTTPError:
            return False
        return response.status_code == 200 and response.json()["checks"]["redis"] == "ok"

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)
        return self.process.returncode


@dataclass
class Cluster:
    a: Replica
    b: Replica
    start: Callable[[str], Replica]  # one more replica on the same database and Redis
    root_token: str
    redis_url: str

    def token(self, username: str) -> str:
        """A new account, registered on A and logged in on B (one JWT secret)."""
        response = httpx2.post(
            f"{self.a.http}/api/v1/auth/register",
            json={"email": f"{username}@example.com", "username": username, "password": PASSWORD},
        )
        assert response.status_code == 201, response.text
        return login(self.b, username)

    def user_id(self, token: str) -> int:
        headers = {"Authorization": f"Bearer {token}"}
        response = httpx2.get(f"{self.a.http}/api/v1/users/me", headers=headers)
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def logs(self) -> str:
        return self.a.log.read_text() + self.b.log.read_text()


def login(replica: Replica, username: str) -> str:
    response = httpx2.post(
        f"{replica.http}/api/v1/auth/token", data={"username": username, "password": PASSWORD}
    )
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("replicas")
    with RedisServer(base / "redis") as redis_server:
        database = f"sqlite+aiosqlite:///{base / 'app.db'}"
        migrate.upgrade(database)
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            env="test",
            database_url=database,
            data_dir=base / "data",
        )
        assert asyncio.run(create_superuser(settings, "root@example.com", "root", PASSWORD)) == 0
        env = {k: v for k, v in os.environ.items() if not k.startswith(("APP_", "OTEL_"))}
        env |= {
            "APP_ENV": "test",
            # One data directory: the replicas share the development JWT secret kept in it.
            "APP_DATA_DIR": str(base / "data"),
            "APP_DATABASE_URL": database,
            "APP_REDIS_URL": redis_server.url(),
            "APP_LOG_FORMAT": "json",
            "APP_RATE_LIMIT_DEFAULT": "100000/minute",
            "APP_RATE_LIMIT_LOGIN": "100000/minute",
            "APP_RATE_LIMIT_REGISTER": "100000/minute",
            "APP_RATE_LIMIT_CHAT_MESSAGES": "100000/minute",
            "APP_WS_MAX_SOCKETS_PER_USER": "2",
            # The code under test, whatever the working directory of the processes.
            "PYTHONPATH": str(ROOT),
        }
        replicas: list[Replica] = []

        def start(name: str) -> Replica:
            port, log = free_port(), base / f"{name}.log"
            command = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1"]
            with log.open("wb") as output:
                process = subprocess.Popen(
                    [*command, "--port", str(port)],
                    cwd=base,
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            replica = Replica(process, port, log)
            replicas.append(replica)
            wait_for(replica.ready, timeout=60, what=name, process=process, log_path=log)
            wait_for_pumps(redis_server.url(), sum(r.process.poll() is None for r in replicas))
            return replica

        try:
            a, b = start("a"), start("b")
            yield Cluster(a, b, start, login(a, "root"), redis_server.url())
        finally:
            for replica in replicas:
                replica.stop()


def wait_for_pumps(url: str, count: int) -> None:
    """Until every replica's broker pump holds its Redis pattern subscription: before
    that, a message published on another replica would not reach it."""
    client = redis.Redis.from_url(url)
    try:
        wait_for(
            lambda: sum(int(c["psub"]) > 0 for c in client.client_list()) >= count,
            timeout=TIMEOUT,
            what=f"{count} broker pumps subscribed in Redis",
        )
    finally:
        client.close()


def recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=TIMEOUT))


def send(ws: ClientConnection, **frame: Any) -> None:
    ws.send(json.dumps(frame))


def expect(ws: ClientConnection, kind: str, user: str) -> dict[str, Any]:
    frame = recv(ws)
    assert (frame["type"], frame.get("user", frame.get("from"))) == (kind, user), frame
    return frame


@contextmanager
def joined(replica: Replica, token: str, room: str, **options: Any) -> Iterator[ClientConnection]:
    """A chat member who has had the history and seen their own join."""
    with replica.ws(f"/api/v1/ws/chat/{room}", token, **options) as ws:
        assert recv(ws)["type"] == "history"
        assert recv(ws)["type"] == "join"
        yield ws


def close_code(ws: ClientConnection) -> int | None:
    """Read until the socket closes; the server's close code (None: no close frame)."""
    while True:
        try:
            ws.recv(timeout=TIMEOUT)
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None


def test_chat_and_private_messages_cross_replicas(cluster: Cluster) -> None:
    alice, bob = cluster.token("alice"), cluster.token("bob")
    with joined(cluster.a, alice, "lobby") as on_a, joined(cluster.b, bob, "lobby") as on_b:
        expect(on_a, "join", "bob")
        send(on_b, type="message", content="hello from B")
        said = expect(on_b, "message", "bob")
        assert said["content"] == "hello from B"
        assert recv(on_a) == said

        send(on_a, type="private", to="bob", content="just you")
        private = expect(on_b, "private", "alice")
        assert private["content"] == "just you"
        assert recv(on_a) == private
    # The history is shared as well: someone joining on A sees what was said on B.
    with cluster.a.ws("/api/v1/ws/chat/lobby", alice) as late:
        assert recv(late) == {"type": "history", "messages": [said]}


def test_a_notification_posted_to_b_reaches_a_user_on_a(cluster: Cluster) -> None:
    carol = cluster.token("carol")
    with cluster.a.ws("/api/v1/ws/notifications", carol) as on_a:
        send(on_a, type="ping")
        assert recv(on_a) == {"type": "pong"}  # subscribed from here on
        for body in [{"user_id": cluster.user_id(carol)}, {}]:
            response = httpx2.post(
                f"{cluster.b.http}/api/v1/notifications",
                json={"title": "Deploy at noon", **body},
                headers={"Authorization": f"Bearer {cluster.root_token}"},
            )
            assert response.status_code == 202, response.text
            assert recv(on_a) == response.json()


def test_a_user_deactivated_on_b_loses_their_socket_on_a_at_once(cluster: Cluster) -> None:
    ivy = cluster.token("ivy")
    with cluster.a.ws("/api/v1/ws/notifications", ivy) as on_a:
        send(on_a, type="ping")
        assert recv(on_a) == {"type": "pong"}  # subscribed from here on
        response = httpx2.patch(
            f"{cluster.b.http}/api/v1/users/{cluster.user_id(ivy)}",
            json={"is_active": False},
            headers={"Authorization": f"Bearer {cluster.root_token}"},
        )
        assert response.status_code == 200, response.text
        assert close_code(on_a) == POLICY_VIOLATION


def test_an_oversized_frame_is_refused_by_the_server_before_it_is_buffered(
    cluster: Cluster,
) -> None:
    """uvicorn would buffer up to 16 MiB of one frame before the app could refuse it, on a
    socket that has not authenticated yet too; the service caps it at 16 KiB (1009)."""
    with cluster.b.ws("/api/v1/ws/chat/lobby") as anonymous:
        anonymous.send("x" * SERVER_MAX_FRAME_BYTES * 4)
        assert close_code(anonymous) == MESSAGE_TOO_BIG


def test_the_socket_cap_counts_a_users_sockets_on_every_replica(cluster: Cluster) -> None:
    kim = cluster.token("kim")
    with joined(cluster.a, kim, "caps"), cluster.b.ws("/api/v1/ws/notifications", kim) as second:
        send(second, type="ping")
        assert recv(second)["type"] == "pong"  # admitted: two of two
        for replica in (cluster.a, cluster.b):
            with replica.ws("/api/v1/ws/notifications", kim) as third:
                with pytest.raises(ConnectionClosed) as refused:
                    recv(third)
                assert refused.value.rcvd is not None
                assert refused.value.rcvd.code == POLICY_VIOLATION
                assert refused.value.rcvd.reason == "Too many open sockets: at most 2 per user."

    def admitted_again() -> bool:
        # Both closed: their places are free again, as soon as the servers have seen it.
        with cluster.b.ws("/api/v1/ws/notifications", kim) as again:
            send(again, type="ping")
            try:
                return recv(again)["type"] == "pong"
            except ConnectionClosed:
                return False

    wait_for(admitted_again, timeout=TIMEOUT, what="the closed sockets' places to free up")


def test_handshake_refusals_are_http_403_and_tokens_stay_out_of_logs(cluster: Cluster) -> None:
    dave = cluster.token("dave")
    for path, headers in [
        ("/api/v1/ws/chat/lobby", {"Authorization": "Bearer not-a-token"}),
        (f"/api/v1/ws/chat/lobby?token={dave}", {}),
        (f"/api/v1/ws/notifications?access_token={dave}", {"Authorization": f"Bearer {dave}"}),
        ("/api/v1/ws/chat/no.dots", {"Authorization": f"Bearer {dave}"}),
    ]:
        with pytest.raises(InvalidStatus) as refused:
            connect(
                f"ws://127.0.0.1:{cluster.a.port}{path}", additional_headers=headers, proxy=None
            )
        assert refused.value.response.status_code == 403

    with cluster.b.ws("/api/v1/ws/chat/lobby") as browser:
        send(browser, type="auth", token=dave + "tampered")
        assert close_code(browser) == POLICY_VIOLATION
    with cluster.b.ws("/api/v1/ws/chat/lobby") as browser:
        send(browser, type="auth", token=dave)
        assert recv(browser)["type"] == "history"

    logs = cluster.logs()
    assert "/api/v1/ws/chat/lobby" in logs  # the servers did log these handshakes
    signature = dave.rsplit(".", 1)[1]
    assert signature not in logs


def test_a_client_that_stops_reading_does_not_hold_up_the_room(cluster: Cluster) -> None:
    erin, frank = cluster.token("erin"), cluster.token("frank")
    count = 4000
    # A small receive buffer and no compression: the server's writes to this client
    # block after a few hundred KiB instead of after many MiB.
    stalled_socket = socket.create_connection(("127.0.0.1", cluster.a.port))
    stalled_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    stalled = joined(
        cluster.a, erin, "flood", sock=stalled_socket, compression=None, max_queue=1,
        close_timeout=1,
    )  # fmt: skip
    with stalled, joined(cluster.a, frank, "flood", max_queue=None) as sender:
        # About 8 MB to a client that reads none of it, and it costs the others nothing.
        contents = [secrets.token_hex(1000) for _ in range(count)]
        for content in contents:
            send(sender, type="message", content=content)
        assert [recv(sender)["content"] for _ in range(count)] == contents
    wait_for(
        lambda: "slow client missed messages" in cluster.a.log.read_text(),
        timeout=TIMEOUT,
        what="the server to report what the stalled client missed",
    )


def test_clients_that_vanish_leave_no_errors(cluster: Cluster) -> None:
    gina, hank = cluster.token("gina"), cluster.token("hank")
    with joined(cluster.a, gina, "vanishing") as watcher:
        # Gone before authenticating, then gone mid-conversation without a close frame.
        with cluster.a.ws("/api/v1/ws/chat/vanishing") as unauthenticated:
            unauthenticated.socket.shutdown(socket.SHUT_RDWR)
        with joined(cluster.a, hank, "vanishing") as vanishing:
            expect(watcher, "join", "hank")
            send(vanishing, type="message", content="bye")
            vanishing.socket.shutdown(socket.SHUT_RDWR)
        expect(watcher, "message", "hank")
        expect(watcher, "leave", "hank")
    logs = cluster.a.log.read_text()
    assert "Traceback" not in logs
    assert "Exception in ASGI application" not in logs


def test_a_replica_shutting_down_closes_its_sockets_with_1012(cluster: Cluster) -> None:
    ivan, jane = cluster.token("ivan"), cluster.token("jane")
    c = cluster.start("c")
    with joined(cluster.a, ivan, "deploy") as staying, joined(c, jane, "deploy") as leaving:
        expect(staying, "join", "jane")
        with c.ws("/api/v1/ws/notifications", jane) as notified:
            # uvicorn re-raises the SIGTERM it handled, once its shutdown is complete.
            assert c.stop() in (0, -signal.SIGTERM)
            assert close_code(leaving) == SERVICE_RESTART
            assert close_code(notified) == SERVICE_RESTART
        # The replica said goodbye for its users before it went.
        expect(staying, "leave", "jane")
    log = c.log.read_text()
    assert "Application shutdown complete." in log
    assert "Traceback" not in log


def test_a_patch_through_b_is_seen_by_the_next_get_through_a(cluster: Cluster) -> None:
    headers = {"Authorization": f"Bearer {cluster.token('patcher')}"}
    created = httpx2.post(
        f"{cluster.a.http}/api/v1/items", json={"title": "Lamp", "price": 10}, headers=headers
    )
    assert created.status_code == 201
    url = f"/api/v1/items/{created.json()['id']}"
    assert httpx2.get(cluster.a.http + url).json()["title"] == "Lamp"  # now cached
    patched = httpx2.patch(cluster.b.http + url, json={"title": "Desk lamp"}, headers=headers)
    assert patched.status_code == 200
    assert httpx2.get(cluster.a.http + url).json()["title"] == "Desk lamp"


def test_failed_logins_on_both_replicas_share_one_budget(cluster: Cluster) -> None:
    cluster.token("guarded")
    statuses = [
        httpx2.post(
            f"{replica.http}/api/v1/auth/token",
            data={"username": "guarded", "password": "not the password"},
        ).status_code
        for replica in [cluster.a, cluster.b] * 3
    ]
    assert statuses == [401] * 5 + [429]


def test_sessions_ended_twice_close_the_sockets_the_second_time_too(cluster: Cluster) -> None:
    """A replica delivers what it publishes itself and skips it when Redis passes it back.
    When it told those by their bytes, it remembered what Redis never passed back
    (published while its pump was not subscribed, as after a Redis restart), and ending a
    user's sessions published the same bytes each time: a later end of their sessions on
    another replica was taken for that one and skipped, and a user deactivated on B kept
    their socket on A."""
    uma = cluster.token("uma")
    uma_id = cluster.user_id(uma)
    admin = {"Authorization": f"Bearer {cluster.root_token}"}
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        # No pump can subscribe for a while: A's own message never comes back to it.
        client.execute_command("ACL", "SETUSER", "default", "-psubscribe")
        client.client_kill_filter(_type="pubsub")
        wait_for(
            lambda: not any(int(c["psub"]) for c in client.client_list()),
            timeout=TIMEOUT,
            what="no broker pump subscribed",
        )
        response = httpx2.patch(
            f"{cluster.a.http}/api/v1/users/{uma_id}", json={"role": "moderator"}, headers=admin
        )
        assert response.status_code == 200, response.text  # her sessions ended, from A
    finally:
        client.execute_command("ACL", "SETUSER", "default", "+psubscribe")
        client.close()
    wait_for_pumps(cluster.redis_url, 2)

    with cluster.a.ws("/api/v1/ws/notifications", login(cluster.b, "uma")) as on_a:
        send(on_a, type="ping")
        assert recv(on_a) == {"type": "pong"}  # subscribed from here on
        response = httpx2.patch(
            f"{cluster.b.http}/api/v1/users/{uma_id}", json={"is_active": False}, headers=admin
        )
        assert response.status_code == 200, response.text
        assert close_code(on_a) == POLICY_VIOLATION
