"""Self-service profile, admin user management, RBAC and the admin guard rails."""

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx2
import jwt
import pytest
from sqlalchemy import delete, update

from app.users.models import User
from tests.api import PASSWORD, Api, assert_problem


def test_me_returns_the_caller(api: Api) -> None:
    alice = api.account("alice")
    response = api.client.get("/api/v1/users/me", headers=alice.headers)
    assert response.status_code == 200
    assert response.json()["id"] == alice.id
    assert response.headers["cache-control"] == "no-store"


def test_patch_me_changes_email_and_username(api: Api) -> None:
    alice = api.account("alice")
    response = api.client.patch(
        "/api/v1/users/me",
        json={"email": "ALICE2@example.com", "username": "alice2"},
        headers=alice.headers,
    )
    assert response.status_code == 200
    assert response.json()["email"] == "alice2@example.com"
    assert api.login("alice2").status_code == 200
    assert api.login("alice").status_code == 401


def test_patch_me_to_a_taken_name_is_a_conflict(api: Api) -> None:
    alice, _ = api.account("alice"), api.account("bob")
    assert_problem(
        api.client.patch("/api/v1/users/me", json={"username": "bob"}, headers=alice.headers),
        409,
    )


@pytest.mark.parametrize(
    "body",
    [
        {"role": "admin"},
        {"is_superuser": True},
        {"is_active": False},
        {"id": 999},
        {"hashed_password": "x"},
        {"email": None},
    ],
)
def test_patch_me_cannot_touch_privileged_fields(api: Api, body: dict) -> None:
    alice = api.account("alice")
    assert_problem(api.client.patch("/api/v1/users/me", json=body, headers=alice.headers), 422)
    me = api.client.get("/api/v1/users/me", headers=alice.headers).json()
    assert (me["role"], me["is_superuser"], me["is_active"], me["id"]) == (
        "user",
        False,
        True,
        alice.id,
    )


def test_password_change_needs_the_current_password(api: Api) -> None:
    alice = api.account("alice")
    no_current = api.client.patch(
        "/api/v1/users/me", json={"password": "a new password"}, headers=alice.headers
    )
    assert_problem(no_current, 422)
    wrong = api.client.patch(
        "/api/v1/users/me",
        json={"password": "a new password", "current_password": "not it at all"},
        headers=alice.headers,
    )
    # 403, not 401: the request is authenticated (no Bearer challenge to answer).
    assert_problem(wrong, 403)
    assert "www-authenticate" not in wrong.headers
    assert api.login("alice").status_code == 200


def test_wrong_current_passwords_sent_together_are_checked_at_most_the_budget(
    api: Api,
) -> None:
    """The account's five failures, whoever sends ten password changes at once (with a
    stolen access token, say): the rest are refused unchecked."""
    alice = api.account("alice")

    def change(n: int) -> int:
        body = {"password": "a new password", "current_password": f"wrong {n}"}
        return api.client.patch("/api/v1/users/me", json=body, headers=alice.headers).status_code

    with ThreadPoolExecutor(10) as pool:
        statuses = Counter(pool.map(change, range(10)))
    assert statuses == Counter({403: 5, 429: 5})


def test_password_change_revokes_every_refresh_token(api: Api) -> None:
    alice = api.account("alice")
    other_session = api.login("alice").json()
    response = api.client.patch(
        "/api/v1/users/me",
        json={"password": "a new password", "current_password": PASSWORD},
        headers=alice.headers,
    )
    assert response.status_code == 200
    for tokens in (alice.tokens, other_session):
        refreshed = api.client.post(
            "/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
        )
        assert_problem(refreshed, 401)
    assert api.login("alice", "a new password").status_code == 200
    assert api.login("alice").status_code == 401


NEW_PASSWORD = {"password": "a new password", "current_password": PASSWORD}


def bearer(tokens: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


def test_a_new_password_refuses_every_access_token_issued_before_it(api: Api) -> None:
    """Changing the password is how a user shuts out someone who learnt the old one: the
    access tokens signed in with it went on working for up to 15 minutes. The session
    that made the change is signed out as well, and signs in with the new password."""
    alice = api.account("alice")
    thief = api.login("alice").json()
    changed = api.client.patch("/api/v1/users/me", json=NEW_PASSWORD, headers=alice.headers)
    assert changed.status_code == 200
    for tokens in (thief, alice.tokens):
        assert_problem(api.client.get("/api/v1/users/me", headers=bearer(tokens)), 401)
        item = {"title": "Lamp", "price": 1}
        assert_problem(api.client.post("/api/v1/items", json=item, headers=bearer(tokens)), 401)
    alice.password = NEW_PASSWORD["password"]
    api.sign_in(alice)
    assert api.client.get("/api/v1/users/me", headers=alice.headers).status_code == 200
    # Tokens issued after the change refresh as before.
    refreshed = api.client.post(
        "/api/v1/auth/refresh", json={"refresh_token": alice.tokens["refresh_token"]}
    )
    assert refreshed.status_code == 200
    assert api.client.get("/api/v1/users/me", headers=bearer(refreshed.json())).status_code == 200


@pytest.mark.parametrize(
    "body", [{"password": "set by an admin"}, {"role": "moderator"}], ids=["password", "role"]
)
def test_an_admin_setting_a_password_or_role_refuses_the_users_tokens(
    api: Api, body: dict[str, str]
) -> None:
    admin, alice = api.account("boss", role="admin"), api.account("alice")
    changed = api.client.patch(f"/api/v1/users/{alice.id}", json=body, headers=admin.headers)
    assert changed.status_code == 200
    assert_problem(api.client.get("/api/v1/users/me", headers=alice.headers), 401)
    alice.password = body.get("password", PASSWORD)
    api.sign_in(alice)
    assert api.client.get("/api/v1/users/me", headers=alice.headers).json()["id"] == alice.id


def test_a_reactivated_users_tokens_from_before_stay_refused(api: Api) -> None:
    """Deactivating an account ends its sessions: reactivating it a minute later brought
    its unexpired access tokens back to life."""
    admin, alice = api.account("boss", role="admin"), api.account("alice")
    for active in (False, True):
        changed = api.client.patch(
            f"/api/v1/users/{alice.id}", json={"is_active": active}, headers=admin.headers
        )
        assert changed.status_code == 200
    assert_problem(api.client.get("/api/v1/users/me", headers=alice.headers), 401)
    api.sign_in(alice)
    assert api.client.get("/api/v1/users/me", headers=alice.headers).status_code == 200


def test_a_login_under_way_as_the_password_changes_keeps_no_session(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone with the old password signs in just as its owner changes it: the login
    checked the old password before the change, and saved its refresh token after the
    change had revoked the others, so that session outlived the password by 14 days.
    Here the change is made while the login's password is being checked, every time."""
    alice = api.account("alice")
    app = api.client.app
    hasher = app.state.hasher  # type: ignore[attr-defined]
    verify = hasher.verify_and_update
    changes: list[int] = []

    async def changed_meanwhile(password: str, hashed: str) -> tuple[bool, str | None]:
        checked = await verify(password, hashed)
        if not changes:  # the login's check; the change checks the current password too
            changes.append(0)
            transport = httpx2.ASGITransport(app=app)  # type: ignore[arg-type]
            async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as c:
                change = await c.patch("/api/v1/users/me", json=NEW_PASSWORD, headers=alice.headers)
            changes[0] = change.status_code
        return checked

    monkeypatch.setattr(hasher, "verify_and_update", changed_meanwhile)
    login = api.login("alice")
    assert changes == [200]
    assert login.status_code == 200  # the password was right when it was checked
    assert_problem(api.client.get("/api/v1/users/me", headers=bearer(login.json())), 401)
    refreshed = api.client.post(
        "/api/v1/auth/refresh", json={"refresh_token": login.json()["refresh_token"]}
    )
    assert_problem(refreshed, 401)


def admin_routes(target_id: int) -> list[tuple[str, str, dict | None]]:
    return [
        ("GET", "/api/v1/users", None),
        ("GET", f"/api/v1/users/{target_id}", None),
        ("PATCH", f"/api/v1/users/{target_id}", {"role": "admin"}),
        ("DELETE", f"/api/v1/users/{target_id}", None),
    ]


@pytest.mark.parametrize("role", [None, "moderator"])
def test_admin_routes_are_forbidden_to_users_and_moderators(api: Api, role: str | None) -> None:
    caller, target = api.account("caller", role=role), api.account("target")
    for method, url, body in admin_routes(target.id):
        response = api.client.request(method, url, json=body, headers=caller.headers)
        assert_problem(response, 403)
    after = api.client.get(f"/api/v1/users/{target.id}", headers=api.root().headers).json()
    assert after["role"] == "user"
    # The caller was not promoted either.
    assert api.client.get("/api/v1/users/me", headers=caller.headers).json()["role"] == (
        role or "user"
    )


def test_admin_routes_need_a_token(api: Api) -> None:
    target = api.account("target")
    for method, url, body in admin_routes(target.id):
        assert_problem(api.client.request(method, url, json=body), 401)


def test_a_user_may_read_their_own_record_by_id(api: Api) -> None:
    alice = api.account("alice")
    response = api.client.get(f"/api/v1/users/{alice.id}", headers=alice.headers)
    assert response.status_code == 200
    assert response.json()["username"] == "alice"


def test_admin_lists_searches_and_pages_users(api: Api) -> None:
    admin = api.account("boss", role="admin")
    for name in ("carol", "dave", "erin"):
        api.register(name)
    page = api.client.get("/api/v1/users?limit=2&skip=1", headers=admin.headers).json()
    assert set(page) == {"items", "total", "skip", "limit"}
    assert (page["total"], page["skip"], page["limit"]) == (5, 1, 2)
    assert [user["username"] for user in page["items"]] == ["root", "carol"]
    found = api.client.get("/api/v1/users?q=DAV", headers=admin.headers).json()
    assert [user["username"] for user in found["items"]] == ["dave"]


def test_admin_changes_role_and_deactivates(api: Api) -> None:
    admin, alice = api.account("boss", role="admin"), api.account("alice")
    response = api.client.patch(
        f"/api/v1/users/{alice.id}",
        json={"role": "moderator", "is_active": False},
        headers=admin.headers,
    )
    assert response.status_code == 200
    assert (response.json()["role"], response.json()["is_active"]) == ("moderator", False)
    refreshed = api.client.post(
        "/api/v1/auth/refresh", json={"refresh_token": alice.tokens["refresh_token"]}
    )
    assert_problem(refreshed, 401)
    # Her access token, still unexpired, no longer authenticates her either.
    assert_problem(api.client.get("/api/v1/users/me", headers=alice.headers), 401)


def test_admin_deletes_a_user_and_their_items(api: Api) -> None:
    admin, alice = api.account("boss", role="admin"), api.account("alice")
    item = api.create_item(alice)
    assert api.client.delete(f"/api/v1/users/{alice.id}", headers=admin.headers).status_code == 204
    assert_problem(api.client.get(f"/api/v1/users/{alice.id}", headers=admin.headers), 404)
    assert_problem(api.client.get(f"/api/v1/items/{item['id']}"), 404)
    assert_problem(api.client.get("/api/v1/users/me", headers=alice.headers), 401)


@pytest.mark.parametrize("body", [{"role": "moderator"}, {"email": "new@example.com"}])
def test_a_user_deleted_while_an_admin_changes_them_is_a_404(api: Api, body: dict) -> None:
    """Another admin deletes an account while a change to it is under way: the change
    found no row to update, and the admin got a 500."""
    admin, alice = api.account("boss", role="admin"), api.account("alice")
    with api.meanwhile("UPDATE users", delete(User).where(User.id == alice.id)) as raced:
        response = api.client.patch(f"/api/v1/users/{alice.id}", json=body, headers=admin.headers)
    assert raced
    assert_problem(response, 404)


def test_an_account_deleted_while_it_changes_itself_is_a_401(api: Api) -> None:
    alice = api.account("alice")
    with api.meanwhile("UPDATE users", delete(User).where(User.id == alice.id)) as raced:
        response = api.client.patch(
            "/api/v1/users/me", json={"username": "alicia"}, headers=alice.headers
        )
    assert raced
    assert_problem(response, 401)


def test_of_two_admins_deleting_one_user_only_one_succeeds(api: Api) -> None:
    """Two admins delete one account at once: both were told 204 (and both deletions
    went to the audit trail), though the second deleted nothing."""
    admin, alice = api.account("boss", role="admin"), api.account("alice")
    with api.meanwhile("DELETE FROM users", delete(User).where(User.id == alice.id)) as raced:
        response = api.client.delete(f"/api/v1/users/{alice.id}", headers=admin.headers)
    assert raced
    assert_problem(response, 404)


def test_a_deleted_users_token_never_passes_for_the_account_given_its_id(api: Api) -> None:
    """SQLite gives the next account the highest row id again once its holder is deleted:
    the deleted user's access token, still unexpired, must not authenticate the new one,
    even when that account is created in the same second as the token was issued."""
    admin, alice = api.account("boss", role="admin"), api.account("alice")
    issued = jwt.decode(alice.tokens["access_token"], options={"verify_signature": False})
    assert api.client.delete(f"/api/v1/users/{alice.id}", headers=admin.headers).status_code == 204
    mallory = api.account("mallory")
    if api.settings.is_sqlite:
        assert mallory.id == alice.id  # the case at hand; PostgreSQL never reuses an id
    api.set_created_at(mallory, datetime.fromtimestamp(issued["iat"] + 0.5, UTC))
    api.sign_in(mallory)
    assert_problem(api.client.get("/api/v1/users/me", headers=alice.headers), 401)
    me = api.client.get("/api/v1/users/me", headers=mallory.headers)
    assert me.json()["username"] == "mallory"


def test_flags_are_json_booleans_and_ids_plain_digits(api: Api) -> None:
    admin, alice = api.account("boss", role="admin"), api.account("alice")
    for flag in ("no", "off", 0, "false"):
        response = api.client.patch(
            f"/api/v1/users/{alice.id}", json={"is_active": flag}, headers=admin.headers
        )
        assert_problem(response, 422)
    for spelling in (f"{alice.id}.0", f"0{alice.id}", f"+{alice.id}"):
        assert_problem(api.client.get(f"/api/v1/users/{spelling}", headers=admin.headers), 422)
    assert api.client.get("/api/v1/users/me", headers=alice.headers).json()["is_active"] is True


def test_admin_cannot_lock_themselves_out(api: Api) -> None:
    admin = api.account("boss", role="admin")
    for body in ({"role": "user"}, {"is_active": False}):
        response = api.client.patch(f"/api/v1/users/{admin.id}", json=body, headers=admin.headers)
        assert_problem(response, 409)
    assert_problem(api.client.delete(f"/api/v1/users/{admin.id}", headers=admin.headers), 409)
    assert api.client.get("/api/v1/users", headers=admin.headers).status_code == 200


def test_an_admin_changes_their_own_password_only_with_the_current_one(api: Api) -> None:
    """As /users/me asks: a stolen admin access token cannot take the account over."""
    admin = api.account("boss", role="admin")
    response = api.client.patch(
        f"/api/v1/users/{admin.id}", json={"password": "taken over"}, headers=admin.headers
    )
    assert_problem(response, 409)
    assert_problem(api.login("boss", "taken over"), 401)
    assert api.login("boss").status_code == 200


def test_only_a_superuser_manages_superusers(api: Api) -> None:
    admin, alice = api.account("boss", role="admin"), api.account("alice")
    root = api.root()
    forbidden = [
        ("PATCH", f"/api/v1/users/{alice.id}", {"is_superuser": True}),
        ("PATCH", f"/api/v1/users/{root.id}", {"role": "user"}),
        ("DELETE", f"/api/v1/users/{root.id}", None),
    ]
    for method, url, body in forbidden:
        assert_problem(api.client.request(method, url, json=body, headers=admin.headers), 403)
    granted = api.client.patch(
        f"/api/v1/users/{alice.id}", json={"is_superuser": True}, headers=root.headers
    )
    assert granted.status_code == 200
    assert granted.json()["is_superuser"] is True


def test_the_last_superuser_cannot_give_up_the_flag(api: Api) -> None:
    """Only a superuser can grant it: without one, nobody could through the API."""
    root, alice = api.root(), api.account("alice")
    demote = {"is_superuser": False}
    refused = api.client.patch(f"/api/v1/users/{root.id}", json=demote, headers=root.headers)
    assert_problem(refused, 409)
    assert api.client.get("/api/v1/users/me", headers=root.headers).json()["is_superuser"]
    # An inactive superuser cannot grant it either.
    for body in ({"is_superuser": True}, {"is_active": False}):
        changed = api.client.patch(f"/api/v1/users/{alice.id}", json=body, headers=root.headers)
        assert changed.status_code == 200
    refused = api.client.patch(f"/api/v1/users/{root.id}", json=demote, headers=root.headers)
    assert_problem(refused, 409)
    # With another active superuser, it can be given up.
    reactivated = {"is_active": True}
    api.client.patch(f"/api/v1/users/{alice.id}", json=reactivated, headers=root.headers)
    demoted = api.client.patch(f"/api/v1/users/{root.id}", json=demote, headers=root.headers)
    assert demoted.status_code == 200
    assert demoted.json()["is_superuser"] is False


def test_unknown_user_ids(api: Api) -> None:
    root = api.root()
    assert_problem(api.client.get("/api/v1/users/424242", headers=root.headers), 404)
    assert_problem(api.client.get("/api/v1/users/0", headers=root.headers), 422)
    assert_problem(api.client.get(f"/api/v1/users/{2**40}", headers=root.headers), 422)
    assert_problem(api.client.get("/api/v1/users/abc", headers=root.headers), 422)


def test_two_superusers_demoting_each_other_at_once_leave_one_superuser(api: Api) -> None:
    """Root takes the flag from Bob while Bob takes it from root: each request saw the
    other still a superuser, both succeeded, and nobody was left to grant the flag."""
    root, bob = api.root(), api.account("bob")
    demote = {"is_superuser": False}
    granted = api.client.patch(
        f"/api/v1/users/{bob.id}", json={"is_superuser": True}, headers=root.headers
    )
    assert granted.status_code == 200
    bob_demotes_root = update(User).where(User.id == root.id).values(is_superuser=False)
    with api.meanwhile("UPDATE users", bob_demotes_root) as raced:
        response = api.client.patch(f"/api/v1/users/{bob.id}", json=demote, headers=root.headers)
    assert raced
    assert_problem(response, 409)
    bob_now = api.client.get("/api/v1/users/me", headers=bob.headers).json()
    assert bob_now["is_superuser"] is True


def test_two_superusers_deactivating_each_other_at_once_leave_one_active(api: Api) -> None:
    """Root deactivates Bob while Bob deactivates root: both were told 200, and no active
    superuser was left to grant the flag or reactivate anyone."""
    root, bob = api.root(), api.account("bob")
    granted = api.client.patch(
        f"/api/v1/users/{bob.id}", json={"is_superuser": True}, headers=root.headers
    )
    assert granted.status_code == 200
    bob_deactivates_root = update(User).where(User.id == root.id).values(is_active=False)
    with api.meanwhile("UPDATE users", bob_deactivates_root) as raced:
        response = api.client.patch(
            f"/api/v1/users/{bob.id}", json={"is_active": False}, headers=root.headers
        )
    assert raced
    assert_problem(response, 409)
    bob_now = api.client.get("/api/v1/users/me", headers=bob.headers).json()
    assert (bob_now["is_active"], bob_now["is_superuser"]) == (True, True)
    assert api.login("bob").status_code == 200


def test_two_superusers_deleting_each_other_at_once_leave_one(api: Api) -> None:
    """Root deletes Bob while Bob deletes root: both were told 204, and the accounts
    left had nobody to manage them but the create-superuser command."""
    root, bob = api.root(), api.account("bob")
    granted = api.client.patch(
        f"/api/v1/users/{bob.id}", json={"is_superuser": True}, headers=root.headers
    )
    assert granted.status_code == 200
    bob_deletes_root = delete(User).where(User.id == root.id)
    with api.meanwhile("DELETE FROM users", bob_deletes_root) as raced:
        response = api.client.delete(f"/api/v1/users/{bob.id}", headers=root.headers)
    assert raced
    assert_problem(response, 409)
    bob_now = api.client.get("/api/v1/users/me", headers=bob.headers).json()
    assert (bob_now["is_active"], bob_now["is_superuser"]) == (True, True)
    assert api.client.get("/api/v1/users", headers=bob.headers).status_code == 200
