"""Registration, login, token rotation and reuse detection, logout, and hostile tokens."""

import asyncio
import base64
import json
import os
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx2
import jwt
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.auth.service import ACCOUNT_CLAIM, GENERATION_CLAIM
from app.db import create_engine, create_sessionmaker
from app.main import create_app
from app.security import TokenCodec, TokenType
from app.users.models import User
from tests.api import PASSWORD, Account, Api, assert_problem
from tests.app_server import app_server
from tests.conftest import make_settings


def test_register_returns_the_user_without_secrets(api: Api) -> None:
    response = api.register("Alice")
    assert response.status_code == 201
    body = response.json()
    assert body["username"] == "alice"
    assert body["email"] == "alice@example.com"
    assert isinstance(body["id"], int)
    assert body["role"] == "user"
    assert body["is_superuser"] is False
    assert "password" not in json.dumps(body)


@pytest.mark.parametrize(
    "duplicate",
    [
        {"email": "ALICE@example.com", "username": "someone"},
        {"email": "other@example.com", "username": "ALICE"},
    ],
)
def test_duplicate_email_or_username_is_a_conflict(api: Api, duplicate: dict) -> None:
    assert api.register("alice").status_code == 201
    response = api.client.post("/api/v1/auth/register", json={**duplicate, "password": PASSWORD})
    assert_problem(response, 409)


def test_register_validation_error_does_not_echo_the_password(api: Api) -> None:
    response = api.client.post(
        "/api/v1/auth/register",
        json={"email": "not-an-email", "username": "x", "password": "s3cr3t!"},
    )
    body = assert_problem(response, 422)
    fields = {tuple(error["loc"]) for error in body["errors"]}
    assert fields == {("body", "email"), ("body", "username"), ("body", "password")}
    assert "s3cr3t!" not in response.text


def test_register_cannot_assign_role_or_superuser(api: Api) -> None:
    for extra in ({"role": "admin"}, {"is_superuser": True}, {"id": 1}, {"is_active": False}):
        response = api.client.post(
            "/api/v1/auth/register",
            json={"email": "m@example.com", "username": "mallory", "password": PASSWORD} | extra,
        )
        assert_problem(response, 422)
    assert api.login("mallory").status_code == 401


def test_login_by_username_or_email(api: Api) -> None:
    api.register("alice")
    for login in ("alice", "ALICE", "alice@example.com"):
        response = api.login(login)
        assert response.status_code == 200, login
        tokens = response.json()
        assert tokens["token_type"] == "bearer"
        assert tokens["expires_in"] == 15 * 60
        assert response.headers["cache-control"] == "no-store"


def test_login_by_any_spelling_registration_calls_the_same_address(api: Api) -> None:
    """Registration normalises an address (Unicode NFC, an "xn--" domain decoded): the
    spellings it would refuse as taken log in to the account."""
    body = {"email": "Zoë@Exämple.com", "username": "zoe", "password": PASSWORD}
    assert api.client.post("/api/v1/auth/register", json=body).status_code == 201
    for login in (
        "zoë@xn--exmple-cua.com",
        unicodedata.normalize("NFD", "zoë@exämple.com"),
        " ZOË@EXÄMPLE.COM ",
    ):
        assert api.login(login).status_code == 200, login
    # Not an address at all: no account, and the same answer as any unknown name.
    assert_problem(api.login("zoë@@exämple.com"), 401)


def test_wrong_password_and_unknown_user_look_the_same(api: Api) -> None:
    api.register("alice")
    wrong = assert_problem(api.login("alice", "wrong password"), 401)
    unknown = assert_problem(api.login("nobody", "wrong password"), 401)
    assert wrong["detail"] == unknown["detail"]


def test_wrong_passwords_sent_together_spend_the_budget_before_they_are_checked(
    api: Api,
) -> None:
    """Five failures per account: ten guesses sent at once used to be checked all ten, as
    each was counted only once its hashing had found it wrong."""
    api.register("alice")
    with ThreadPoolExecutor(10) as pool:
        statuses = Counter(
            pool.map(lambda n: api.login("alice", f"wrong guess {n}").status_code, range(10))
        )
    assert statuses == Counter({401: 5, 429: 5})


def test_an_accounts_own_logins_never_spend_its_failure_budget(
    database_url: str, tmp_path: Path
) -> None:
    """A right password clears the account's failures: a user who mistypes before each
    login is never locked out, however often they log in."""
    settings = make_settings(database_url, tmp_path / "data", rate_limit_login="100/minute")
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings)
        api.register("alice")
        for _ in range(10):
            assert api.login("alice", "a typo").status_code == 401
            assert api.login("alice").status_code == 200


def test_a_login_name_no_account_can_have_is_a_422(api: Api) -> None:
    """Refused before it is looked up, counted or audited: a NUL (PostgreSQL cannot even
    compare one) or more characters than an e-mail address may have."""
    api.register("alice")
    for login in ("ali\x00ce", "alice@example.com\x00", "a" * 321):
        problem = assert_problem(api.login(login), 422)
        assert problem["errors"][0]["loc"] == ["body", "username"]
    assert api.login("alice").status_code == 200


def test_inactive_user_cannot_log_in(api: Api) -> None:
    alice = api.account("alice")
    response = api.client.patch(
        f"/api/v1/users/{alice.id}", json={"is_active": False}, headers=api.root().headers
    )
    assert response.status_code == 200
    assert_problem(api.login("alice"), 401)
    assert_problem(api.client.get("/api/v1/users/me", headers=alice.headers), 401)


def refresh(client: TestClient, token: str):
    return client.post("/api/v1/auth/refresh", json={"refresh_token": token})


def test_refresh_rotates_and_reuse_revokes_the_family(api: Api) -> None:
    alice = api.account("alice")
    first = alice.tokens["refresh_token"]
    rotated = refresh(api.client, first)
    assert rotated.status_code == 200
    second = rotated.json()["refresh_token"]
    assert second != first
    assert (
        api.client.get(
            "/api/v1/users/me",
            headers={"Authorization": f"Bearer {rotated.json()['access_token']}"},
        ).status_code
        == 200
    )

    # The old token again: stolen. It fails, and so does the legitimate newer one.
    assert_problem(refresh(api.client, first), 401)
    assert_problem(refresh(api.client, second), 401)
    # Another login (another family) is unaffected.
    api.sign_in(alice)
    assert refresh(api.client, alice.tokens["refresh_token"]).status_code == 200


def test_logout_revokes_the_refresh_family(api: Api) -> None:
    alice = api.account("alice")
    response = api.client.post(
        "/api/v1/auth/logout",
        json={"refresh_token": alice.tokens["refresh_token"]},
        headers=alice.headers,
    )
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(refresh(api.client, alice.tokens["refresh_token"]), 401)


def test_logout_needs_the_access_token_and_own_refresh_token(api: Api) -> None:
    alice, bob = api.account("alice"), api.account("bob")
    body = {"refresh_token": alice.tokens["refresh_token"]}
    assert_problem(api.client.post("/api/v1/auth/logout", json=body), 401)
    assert_problem(api.client.post("/api/v1/auth/logout", json=body, headers=bob.headers), 401)
    assert refresh(api.client, alice.tokens["refresh_token"]).status_code == 200


def test_token_types_are_not_interchangeable(api: Api) -> None:
    alice = api.account("alice")
    as_access = {"Authorization": f"Bearer {alice.tokens['refresh_token']}"}
    assert_problem(api.client.get("/api/v1/users/me", headers=as_access), 401)
    assert_problem(refresh(api.client, alice.tokens["access_token"]), 401)


def forge(api: Api, account: Account, **changes: object) -> str:
    """An access token like the service's, with some claims changed, signed with its key."""
    now = datetime.now(UTC)
    claims = {
        "sub": str(account.id),
        "iss": api.settings.jwt_issuer,
        "aud": api.settings.jwt_audience,
        "iat": now,
        "exp": now + timedelta(minutes=5),
        "jti": "f" * 32,
        "type": "access",
        ACCOUNT_CLAIM: issued_claims(account)[ACCOUNT_CLAIM],
        GENERATION_CLAIM: issued_claims(account)[GENERATION_CLAIM],
    }
    claims.update(changes)
    claims = {key: value for key, value in claims.items() if value is not None}
    return jwt.encode(claims, api.settings.signing_key(), algorithm="HS256")


def issued_claims(account: Account) -> dict[str, Any]:
    """The claims of the access token the service issued to ``account``."""
    return jwt.decode(account.tokens["access_token"], options={"verify_signature": False})


def unsigned(token: str) -> str:
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    return f"{header}.{token.split('.')[1]}."


def tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "999"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


HOSTILE_TOKENS = {
    "tampered": lambda api, a: tampered(a.tokens["access_token"]),
    "alg-none": lambda api, a: unsigned(a.tokens["access_token"]),
    "expired": lambda api, a: forge(api, a, exp=datetime.now(UTC) - timedelta(minutes=1)),
    "issued-in-the-future": lambda api, a: forge(
        api, a, iat=datetime.now(UTC) + timedelta(minutes=1)
    ),
    "another-account": lambda api, a: forge(api, a, acct=issued_claims(a)[ACCOUNT_CLAIM] + 1),
    "no-account": lambda api, a: forge(api, a, acct=None),
    "another-generation": lambda api, a: forge(api, a, gen=issued_claims(a)[GENERATION_CLAIM] + 1),
    "no-generation": lambda api, a: forge(api, a, gen=None),
    "wrong-audience": lambda api, a: forge(api, a, aud="someone-else"),
    "wrong-issuer": lambda api, a: forge(api, a, iss="someone-else"),
    "no-jti": lambda api, a: forge(api, a, jti=None),
    "no-type": lambda api, a: forge(api, a, type=None),
    "bad-subject": lambda api, a: forge(api, a, sub="not-a-number"),
    "other-key": lambda api, a: jwt.encode(
        jwt.decode(a.tokens["access_token"], options={"verify_signature": False}),
        "another-secret-that-is-long-enough-0123456789",
        algorithm="HS256",
    ),
    "garbage": lambda api, a: "not.a.jwt",
}


def test_forged_token_with_the_right_key_is_accepted(api: Api) -> None:
    # The control for the cases below: forge() itself makes tokens the service accepts.
    alice = api.account("alice")
    token = forge(api, alice)
    response = api.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert response.json()["username"] == "alice"


@pytest.mark.parametrize("kind", HOSTILE_TOKENS)
def test_hostile_access_tokens_are_rejected(api: Api, kind: str) -> None:
    alice = api.account("alice")
    token = HOSTILE_TOKENS[kind](api, alice)
    response = api.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"})
    assert_problem(response, 401)


def test_a_token_from_a_replica_whose_clock_is_ahead_is_accepted(api: Api) -> None:
    """Replicas' clocks differ by a second or two: a token issued by one ahead of this one
    is not yet valid by this clock (its iat in the future), within the leeway it allows."""
    alice = api.account("alice")
    token = forge(api, alice, iat=datetime.now(UTC) + timedelta(seconds=2))
    response = api.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200


def test_an_account_created_by_a_replica_whose_clock_is_ahead_can_sign_in(api: Api) -> None:
    """Its creation time is later than the time its first tokens are issued by a replica
    whose clock is behind: they are its tokens all the same."""
    alice = api.account("alice")
    api.set_created_at(alice, datetime.now(UTC) + timedelta(seconds=2))
    api.sign_in(alice)
    assert api.client.get("/api/v1/users/me", headers=alice.headers).status_code == 200


def test_missing_token_is_401_with_bearer_challenge(api: Api) -> None:
    response = api.client.get("/api/v1/users/me")
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"


def test_outdated_password_hash_is_upgraded_on_login(database_url: str, tmp_path, settings) -> None:
    with TestClient(create_app(settings)) as client:
        Api(client, settings).register("alice")
    old_hash = asyncio.run(stored_hash(database_url))
    assert "m=19456,t=2,p=1" in old_hash

    stronger = make_settings(database_url, tmp_path / "data", argon2_memory_kib=24 * 1024)
    with TestClient(create_app(stronger)) as client:
        assert Api(client, stronger).login("alice").status_code == 200
    new_hash = asyncio.run(stored_hash(database_url))
    assert "m=24576,t=2,p=1" in new_hash
    with TestClient(create_app(stronger)) as client:
        assert Api(client, stronger).login("alice").status_code == 200


async def stored_hash(database_url: str) -> str:
    engine = create_engine(database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            return await session.scalar(select(User.hashed_password))
    finally:
        await engine.dispose()


def test_unknown_user_login_still_does_the_hashing_work(api: Api, monkeypatch) -> None:
    hasher = api.client.app.state.hasher
    verified: list[str] = []
    original = hasher.verify_and_update

    async def recording(password: str, hashed: str):
        verified.append(hashed)
        return await original(password, hashed)

    monkeypatch.setattr(hasher, "verify_and_update", recording)
    assert api.login("nobody", "whatever password").status_code == 401
    assert len(verified) == 1
    assert verified[0].startswith("$argon2id$v=19$m=19456,t=2,p=1$")


def test_logout_revokes_the_access_token_too(api: Api) -> None:
    alice = api.account("alice")
    other_session = api.login("alice").json()
    response = api.client.post(
        "/api/v1/auth/logout",
        json={"refresh_token": alice.tokens["refresh_token"]},
        headers=alice.headers,
    )
    assert response.status_code == 204
    assert_problem(api.client.get("/api/v1/users/me", headers=alice.headers), 401)
    # Only that login: another session of the same user goes on.
    other = {"Authorization": f"Bearer {other_session['access_token']}"}
    assert api.client.get("/api/v1/users/me", headers=other).status_code == 200


def test_an_access_token_is_verified_once_per_request(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rate limit and get_current_user both need the token's claims: one decode."""
    alice = api.account("alice")
    decoded: list[TokenType] = []
    decode = TokenCodec.decode

    def counting(self: TokenCodec, token: str, expected: TokenType) -> dict[str, Any]:
        decoded.append(expected)
        return decode(self, token, expected)

    monkeypatch.setattr(TokenCodec, "decode", counting)
    assert api.client.get("/api/v1/users/me", headers=alice.headers).status_code == 200
    assert decoded == [TokenType.ACCESS]


def test_lost_registration_races_do_not_stall_the_server(tmp_path: Path) -> None:
    """On a real server with the embedded SQLite: each lost race for a username (a 409)
    used to leave its failed statement's cursor to the garbage collector, which could then
    stop the event loop until the database's 30 s busy timeout, and the refreshes waiting
    meanwhile failed with 500 "database is locked"."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APP_", "OTEL_"))}
    env |= {
        "APP_ENV": "test",
        "APP_DATA_DIR": str(tmp_path / "data"),
        **{f"APP_RATE_LIMIT_{name}": "100000/minute" for name in ("DEFAULT", "LOGIN", "REGISTER")},
    }
    statuses: Counter[int] = Counter()
    with (
        app_server(tmp_path, env, tmp_path / "serve.log") as (base, _),
        ThreadPoolExecutor(8) as pool,
    ):

        def post(path: str, body: dict[str, str]) -> int:
            return httpx2.post(f"{base}/api/v1{path}", json=body, timeout=60).status_code

        def eight_at_once(path: str, body: dict[str, str]) -> None:
            statuses.update(pool.map(post, [path] * 8, [body] * 8))

        for round_ in range(4):
            racer = {"email": f"r{round_}@example.com", "username": f"racer{round_}"}
            eight_at_once("/auth/register", racer | {"password": PASSWORD})
            user = {"email": f"u{round_}@example.com", "username": f"user{round_}"}
            assert post("/auth/register", user | {"password": PASSWORD}) == 201
            tokens = httpx2.post(
                f"{base}/api/v1/auth/token",
                data={"username": user["username"], "password": PASSWORD},
                timeout=60,
            ).json()
            eight_at_once("/auth/refresh", {"refresh_token": tokens["refresh_token"]})
    # Per round: one registration wins, seven lose; one refresh wins, seven are reuse.
    assert statuses == Counter({201: 4, 409: 28, 200: 4, 401: 28})
