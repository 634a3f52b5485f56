"""Tests of the test-support helper `RedisServer` against a real redis-server.

Tests of the service's Redis behaviour rely on it to really take Redis away and bring it
back with its old data; these tests check exactly that, so a broken helper shows up here
rather than as puzzling failures elsewhere.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import deploy.stack.redis as redis_service
from deploy.stack.process import HOST, is_alive
from deploy.stack.redis import RedisServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    # Per test: they stop, kill and restart it, and start takes a few milliseconds.
    with RedisServer(tmp_path / "redis") as server:
        yield server


def _client(url: str) -> redis.Redis:
    # No retries: a stopped server must show up as an error, not as a slow test.
    return redis.Redis.from_url(url, socket_timeout=2, retry_on_error=[], retry=None)


def _get(url: str, key: str) -> bytes | None:
    with _client(url) as client:
        value: bytes | None = client.get(key)
        return value


def _set(url: str, key: str, value: str) -> None:
    with _client(url) as client:
        client.set(key, value)


def _redis_processes_on(port: int) -> list[int]:
    """Pids of live redis-server processes serving `port`.

    Redis rewrites its command line to a title: "/usr/bin/redis-server 127.0.0.1:PORT".
    """
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # not a process, or it exited meanwhile
            continue
        program, _, title = cmdline.partition(b" ")
        if program.endswith(b"redis-server") and title.startswith(f"{HOST}:{port}".encode()):
            pids.append(int(proc.name))
    return pids


def _assert_gone(server: RedisServer, port: int, pid: int) -> None:
    assert server.pid is None
    assert not is_alive(pid)
    assert _redis_processes_on(port) == []
    assert not server.accepts_connections()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, port), timeout=2).close()
    with pytest.raises(redis.ConnectionError):
        _get(server.url(), "anything")


def test_serves_its_url_with_the_configured_settings(server: RedisServer) -> None:
    assert server.accepts_connections()
    assert server.pid is not None
    assert _redis_processes_on(server.port) == [server.pid]
    assert server.url() == f"redis://127.0.0.1:{server.port}/0"
    assert server.url(3) == f"redis://127.0.0.1:{server.port}/3"

    _set(server.url(3), "key", "in db 3")

    assert _get(server.url(3), "key") == b"in db 3"
    assert _get(server.url(0), "key") is None
    with _client(server.url()) as client:
        config = client.config_get("*")
    assert config["bind"] == "127.0.0.1"
    assert config["dir"] == str(server.base_dir.resolve())
    assert config["dbfilename"] == "dump.rdb"
    assert config["save"] == ""
    assert config["appendonly"] == "no"
    assert config["shutdown-on-sigterm"] == "save"
    assert config["shutdown-on-sigint"] == "nosave"
    assert server.log_path.read_text().strip(), "Redis logs to its file"


def test_stop_keeps_the_data_and_start_brings_it_back_on_the_same_port(
    server: RedisServer,
) -> None:
    url, port, pid = server.url(2), server.port, server.pid
    assert pid is not None
    _set(url, "survivor", "from before the stop")

    server.stop()
    server.stop()

    _assert_gone(server, port, pid)
    assert server.dump_path.is_file()

    server.start()

    assert server.port == port
    assert server.pid not in (None, pid)
    assert _get(url, "survivor") == b"from before the stop"


def test_a_client_created_before_the_stop_reconnects_after_the_start(
    server: RedisServer,
) -> None:
    with _client(server.url()) as client:
        client.set("key", "value")
        server.stop()
        with pytest.raises(redis.ConnectionError):
            client.get("key")
        server.start()

        assert client.get("key") == b"value"


def test_stop_without_save_keeps_only_the_last_saved_data(server: RedisServer) -> None:
    _set(server.url(), "saved", "1")
    server.stop()
    server.start()
    _set(server.url(), "unsaved", "1")
    port, pid = server.port, server.pid
    assert pid is not None

    server.stop(save=False)

    _assert_gone(server, port, pid)
    server.start()
    assert _get(server.url(), "saved") == b"1"
    assert _get(server.url(), "unsaved") is None


def test_kill_loses_the_writes_since_the_last_save(server: RedisServer) -> None:
    _set(server.url(), "unsaved", "1")
    port, pid = server.port, server.pid
    assert pid is not None

    server.kill()
    server.kill()

    _assert_gone(server, port, pid)
    assert not server.dump_path.exists()
    server.start()
    assert _get(server.url(), "unsaved") is None


def test_the_context_manager_saves_and_leaves_no_process(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        _set(server.url(), "key", "value")
        port, pid = server.port, server.pid
        assert pid is not None

    _assert_gone(server, port, pid)
    with RedisServer(tmp_path) as again:
        assert _get(again.url(), "key") == b"value"


def test_start_refuses_to_start_a_running_server(server: RedisServer) -> None:
    with pytest.raises(RuntimeError, match="already running"):
        server.start()


def test_a_failed_save_on_stop_is_an_error_not_silent_data_loss(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis refuses to exit when the final save fails; the helper must not wait for long.
    monkeypatch.setattr(redis_service, "_STOP_TIMEOUT", 1.0)
    port, pid = server.port, server.pid
    assert pid is not None
    shutil.rmtree(server.base_dir)

    with pytest.raises(RuntimeError, match="was killed; its data may not be"):
        server.stop()

    _assert_gone(server, port, pid)
