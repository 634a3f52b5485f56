"""Locust scenario for the API: a registered user reading and writing through the edge.

Each simulated user registers once, logs in, and then mostly reads items (the cached-read
hot path), sometimes creates one and sometimes uploads a small PNG. Run it with the
compose ``loadtest`` profile, or locally with ``locust -f loadtests/locustfile.py
--host http://127.0.0.1:8080``.

The service's own limits apply to load tests too: registration and login are limited per
client address (5 and 10 per minute by default), so raise ``APP_RATE_LIMIT_REGISTER``,
``APP_RATE_LIMIT_LOGIN`` and ``APP_RATE_LIMIT_DEFAULT`` for a test with many users.
"""

import random
import struct
import uuid
import zlib

from locust import HttpUser, between, task
from locust.exception import StopUser

API = "/api/v1"
PASSWORD = "load-test-password"  # noqa: S105 - throwaway accounts made by the test itself


def _png(width: int = 8, height: int = 8) -> bytes:
    """A valid RGB PNG made here, so the scenario ships no binary fixture."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = b"".join(
        b"\x00" + b"".join(bytes((x * 30, y * 30, 128)) for x in range(width))
        for y in range(height)
    )
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


PNG = _png()


class ApiUser(HttpUser):
    wait_time = between(0.5, 2)

    def on_start(self) -> None:
        self.username = f"load-{uuid.uuid4().hex[:16]}"
        self.item_ids: list[int] = []
        with self.client.post(
            f"{API}/auth/register",
            json={
                "email": f"{self.username}@example.com",
                "username": self.username,
                "password": PASSWORD,
            },
            catch_response=True,
        ) as response:
            if response.status_code != 201:
                response.failure(f"register: {response.status_code}")
                raise StopUser()
        self.login()

    def login(self) -> None:
        with self.client.post(
            f"{API}/auth/token",
            data={"username": self.username, "password": PASSWORD},
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"login: {response.status_code}")
                raise StopUser()
            token = response.json()["access_token"]
        self.client.headers["Authorization"] = f"Bearer {token}"

    def relogin_if_expired(self, status: int) -> None:
        # Access tokens live 15 minutes by default; a long test outlives them.
        if status == 401:
            self.login()

    @task(10)
    def list_items(self) -> None:
        with self.client.get(
            f"{API}/items", params={"limit": 20}, name=f"{API}/items", catch_response=True
        ) as response:
            if response.status_code == 200:
                ids = [item["id"] for item in response.json()["items"]]
                if ids:
                    self.item_ids = ids
            else:
                response.failure(f"status {response.status_code}")

    @task(20)
    def read_item(self) -> None:
        if not self.item_ids:
            self.list_items()
            if not self.item_ids:
                return
        item_id = random.choice(self.item_ids)  # noqa: S311 - not security-relevant
        self.client.get(f"{API}/items/{item_id}", name=f"{API}/items/{{item_id}}")

    @task(3)
    def create_item(self) -> None:
        response = self.client.post(
            f"{API}/items",
            json={
                "title": f"item {uuid.uuid4().hex[:8]}",
                "description": "created by the load test",
                "price": round(random.uniform(1, 100), 2),  # noqa: S311
            },
        )
        if response.status_code == 201:
            self.item_ids.append(response.json()["id"])
        self.relogin_if_expired(response.status_code)

    @task(1)
    def upload_png(self) -> None:
        response = self.client.post(
            f"{API}/files",
            files={"file": ("pixel.png", PNG, "image/png")},
            data={"description": "load test upload"},
        )
        self.relogin_if_expired(response.status_code)
