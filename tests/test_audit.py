"""Security events are recorded off the request path, and a failing record never
reaches the client."""

import asyncio

import pytest
from sqlalchemy import select

from app.audit.models import AuditEvent
from app.db import create_engine, create_sessionmaker
from deploy.stack.process import wait_for
from tests.api import PASSWORD, Api
from tests.prom import parse, value


async def events(database_url: str) -> list[AuditEvent]:
    engine = create_engine(database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            return list(await session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
    finally:
        await engine.dispose()


def recorded(database_url: str, count: int) -> list[AuditEvent]:
    found: list[AuditEvent] = []

    def enough() -> bool:
        found[:] = asyncio.run(events(database_url))
        return len(found) >= count

    wait_for(enough, timeout=10, what=f"{count} audit events")
    return found


def test_security_events_are_recorded(api: Api, database_url: str) -> None:
    alice = api.account("alice")  # registered + login.success
    api.login("alice", "not the password")
    first = alice.tokens["refresh_token"]
    api.client.post("/api/v1/auth/refresh", json={"refresh_token": first})
    api.client.post("/api/v1/auth/refresh", json={"refresh_token": first})  # reuse
    admin = api.root()  # login.success (created by the CLI: no "registered")
    api.client.patch(f"/api/v1/users/{alice.id}", json={"role": "moderator"}, headers=admin.headers)
    api.client.delete(f"/api/v1/users/{alice.id}", headers=admin.headers)

    rows = recorded(database_url, 7)
    by_event = {row.event: row for row in rows}
    assert [row.event for row in rows] == [
        "user.registered",
        "login.success",
        "login.failure",
        "token.reuse_detected",
        "login.success",
        "user.updated",
        "user.deleted",
    ]
    assert by_event["login.failure"].details == {"login": "alice"}
    assert by_event["login.failure"].subject_id == alice.id
    assert by_event["token.reuse_detected"].subject_id == alice.id
    update = by_event["user.updated"]
    assert (update.actor_id, update.subject_id) == (admin.id, alice.id)
    assert update.details["fields"] == ["role"]
    assert update.details["role"] == "moderator"
    assert by_event["user.deleted"].subject_id == alice.id
    assert all(row.client_ip == "testclient" for row in rows)
    assert all(PASSWORD not in str(row.details) for row in rows)


def test_password_change_records_field_names_only(api: Api, database_url: str) -> None:
    alice = api.account("alice")
    response = api.client.patch(
        "/api/v1/users/me",
        json={"password": "a brand new password", "current_password": PASSWORD},
        headers=alice.headers,
    )
    assert response.status_code == 200
    change = recorded(database_url, 3)[-1]
    assert change.event == "user.updated"
    assert change.details == {"fields": ["password"]}
    assert "brand new" not in str(change.details)


def test_a_failed_login_keeps_no_name_that_matches_no_account(api: Api, database_url: str) -> None:
    # A password pasted into the username field, the commonest way one reaches a trail.
    pasted = "Correct-Horse-Battery-Staple"
    assert api.login(pasted, "anything").status_code == 401
    [failure] = recorded(database_url, 1)
    assert failure.event == "login.failure"
    assert failure.details == {"unknown_account": True}
    assert failure.subject_id is None
    assert pasted.lower() not in str(failure.details).lower()


def test_an_update_that_changes_nothing_is_not_recorded(api: Api, database_url: str) -> None:
    alice, admin = api.account("alice"), api.root()
    for path, headers in (
        ("/api/v1/users/me", alice.headers),
        (f"/api/v1/users/{alice.id}", admin.headers),
    ):
        response = api.client.patch(path, json={}, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["username"] == "alice"
    renamed = api.client.patch(
        "/api/v1/users/me", json={"username": "alicia"}, headers=alice.headers
    )
    assert renamed.status_code == 200
    found: list[AuditEvent] = []

    def renamed_recorded() -> bool:
        found[:] = asyncio.run(events(database_url))
        return any(
            row.event == "user.updated" and row.details == {"fields": ["username"]} for row in found
        )

    wait_for(renamed_recorded, timeout=10, what="the rename's audit event")
    assert [row.details for row in found if row.event == "user.updated"] == [
        {"fields": ["username"]}
    ]


def test_a_failing_record_does_not_fail_the_request(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database that refuses the audit write, simulated at the one call that writes it.
    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("audit table unavailable")

    monkeypatch.setattr("app.audit.deps.record", broken)
    before = value(
        parse(api.client.get("/metrics").text),
        "background_tasks_total",
        task="audit",
        outcome="failure",
    )
    assert api.register("alice").status_code == 201
    assert api.login("alice").status_code == 200

    def failures() -> float:
        samples = parse(api.client.get("/metrics").text)
        return value(samples, "background_tasks_total", task="audit", outcome="failure")

    wait_for(lambda: failures() - before == 2, timeout=10, what="two failed audit jobs")


def test_an_event_keeps_its_actor_after_the_actor_is_deleted(api: Api, database_url: str) -> None:
    """Who did something stays on record when their account goes: the actor of every
    event of a deleted admin was erased (set to null), so nobody could tell any more who
    had changed or deleted whom."""
    admin, alice = api.account("boss", role="admin"), api.account("alice")
    demoted = api.client.patch(
        f"/api/v1/users/{alice.id}", json={"role": "moderator"}, headers=admin.headers
    )
    assert demoted.status_code == 200
    root = api.root()  # made boss an admin: its login and that change are events too
    # The change's event first: background writes are not ordered between requests.
    recorded(database_url, 7)
    deleted = api.client.delete(f"/api/v1/users/{admin.id}", headers=root.headers)
    assert deleted.status_code == 204
    rows = recorded(database_url, 8)
    change = next(row for row in rows if row.event == "user.updated" and row.subject_id == alice.id)
    assert (change.actor_id, change.subject_id) == (admin.id, alice.id)
    deletion = rows[-1]
    assert (deletion.event, deletion.actor_id, deletion.subject_id) == (
        "user.deleted",
        root.id,
        admin.id,
    )
