"""A thin client for tests: create accounts the way users and operators do (the API and
the ``create-superuser`` command), log in, and carry the tokens around."""

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fastapi.testclient import TestClient
from httpx2 import Response
from sqlalchemy import Connection, Executable, event, update

from app.cli import create_superuser
from app.db import create_engine, create_sessionmaker
from app.settings import Settings
from app.users.models import User

PASSWORD = "correct horse battery"


@dataclass
class Account:
    id: int
    username: str
    email: str
    password: str
    tokens: dict[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens['access_token']}"}


class Api:
    def __init__(self, client: TestClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    def register(self, username: str, password: str = PASSWORD) -> Response:
        return self.client.post(
            "/api/v1/auth/register",
            json={"email": f"{username}@example.com", "username": username, "password": password},
        )

    def login(self, login: str, password: str = PASSWORD) -> Response:
        return self.client.post(
            "/api/v1/auth/token", data={"username": login, "password": password}
        )

    def account(self, username: str, role: str | None = None) -> Account:
        """A registered, logged-in account; ``role`` set by the superuser through the API."""
        response = self.register(username)
        assert response.status_code == 201, response.text
        account = Account(response.json()["id"], username, f"{username}@example.com", PASSWORD)
        if role is not None:
            changed = self.client.patch(
                f"/api/v1/users/{account.id}", json={"role": role}, headers=self.root().headers
            )
            assert changed.status_code == 200, changed.text
        self.sign_in(account)
        return account

    def root(self) -> Account:
        """The superuser, created once per test with the operator's CLI command."""
        if not hasattr(self, "_root"):
            code = asyncio.run(
                create_superuser(self.settings, "root@example.com", "root", PASSWORD)
            )
            assert code == 0
            user = Account(0, "root", "root@example.com", PASSWORD)
            self.sign_in(user)
            user.id = self.client.get("/api/v1/users/me", headers=user.headers).json()["id"]
            self._root = user
        return self._root

    def set_created_at(self, account: Account, created_at: datetime) -> None:
        """Record the account as created at ``created_at``, as a replica whose clock is
        that far off would have."""

        async def store() -> None:
            engine = create_engine(self.settings.effective_database_url)
            try:
                async with create_sessionmaker(engine)() as session:
                    change = update(User).where(User.id == account.id)
                    await session.execute(change.values(created_at=created_at))
                    await session.commit()
            finally:
                await engine.dispose()

        asyncio.run(store())

    @contextmanager
    def meanwhile(self, before: str, write: Executable) -> Iterator[list[str]]:
        """``write`` runs just before the service's first statement that starts with
        ``before``, on the service's own connection: to that statement it is as if
        another client had committed it a moment earlier, so a race is reproduced every
        time. Yields the statements it ran before (one, once it has happened)."""
        engine = self.client.app.state.engine.sync_engine  # type: ignore[attr-defined]
        ran: list[str] = []

        def another_client_writes(
            connection: Connection, _: object, statement: str, *__: object
        ) -> None:
            if not ran and statement.startswith(before):
                ran.append(statement)
                connection.execute(write)

        event.listen(engine, "before_cursor_execute", another_client_writes)
        try:
            yield ran
        finally:
            event.remove(engine, "before_cursor_execute", another_client_writes)

    def sign_in(self, account: Account) -> None:
        response = self.login(account.username, account.password)
        assert response.status_code == 200, response.text
        account.tokens = response.json()

    def create_item(self, owner: Account, **fields: Any) -> dict[str, Any]:
        body = {"title": "Lamp", "description": "A desk lamp", "price": 19.5} | fields
        response = self.client.post("/api/v1/items", json=body, headers=owner.headers)
        assert response.status_code == 201, response.text
        return response.json()


def assert_problem(response: Response, status: int) -> dict[str, Any]:
    """The response is RFC 9457 problem+json with this status and the request's id."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    assert body["request_id"] == response.headers["x-request-id"]
    return body
