"""The chat and notification WebSockets, in-process (Starlette's TestClient), on both
databases: handshake authentication, the wire format of every frame, delivery to the
right connections, bad frames answered without dropping the socket, and shutdown."""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from app.main import create_app
from app.middleware import HttpMiddleware
from app.realtime import deps
from app.realtime.service import Realtime, close_connections
from tests.api import PASSWORD, Account, Api, assert_problem
from tests.conftest import make_settings
from tests.prom import parse, value

NOTIFICATIONS = "/api/v1/ws/notifications"
NOTIFY = "/api/v1/notifications"
POLICY_VIOLATION = 1008
SERVICE_RESTART = 1012


def chat_url(room: str) -> str:
    return f"/api/v1/ws/chat/{room}"


def receive(ws: WebSocketTestSession, timeout: float = 5.0) -> dict[str, Any]:
    """The next frame as JSON; a close raises WebSocketDisconnect.

    TestClient's own receive waits forever, which turns a missing frame into a hung suite;
    this reads the same stream with a deadline.
    """

    async def next_message() -> Any:
        with anyio.fail_after(timeout):
            return await ws._send_rx.receive()

    message = ws.portal.call(next_message)
    ws._raise_on_close(message)
    return json.loads(message["text"])


def close_code(ws: WebSocketTestSession) -> int:
    """Read until the server closes the socket; the code it closed with."""
    while True:
        try:
            receive(ws)
        except WebSocketDisconnect as closed:
            return closed.code


def assert_silent(ws: WebSocketTestSession) -> None:
    """Nothing is waiting for this client: a ping's pong is the next frame."""
    ws.send_json({"type": "ping"})
    assert receive(ws) == {"type": "pong"}


def assert_utc_timestamp(value: str) -> None:
    ts = datetime.fromisoformat(value)
    assert ts.utcoffset() == timedelta(0)


@contextmanager
def joined(api: Api, account: Account, room: str) -> Iterator[WebSocketTestSession]:
    """A chat member who has had the history and seen their own join."""
    with api.client.websocket_connect(chat_url(room), headers=account.headers) as ws:
        assert receive(ws)["type"] == "history"
        assert_presence(receive(ws), "join", room, account)
        yield ws


def assert_presence(frame: dict[str, Any], kind: str, room: str, account: Account) -> None:
    assert frame.keys() == {"type", "room", "user", "ts"}
    assert (frame["type"], frame["room"], frame["user"]) == (kind, room, account.username)
    assert_utc_timestamp(frame["ts"])


def say(ws: WebSocketTestSession, content: str) -> None:
    ws.send_json({"type": "message", "content": content})


def assert_message(frame: dict[str, Any], room: str, account: Account, content: str) -> None:
    assert frame.keys() == {"type", "room", "user", "content", "id", "ts"}
    assert (frame["type"], frame["room"], frame["user"], frame["content"]) == (
        "message",
        room,
        account.username,
        content,
    )
    assert isinstance(frame["id"], str)
    assert len(frame["id"]) == 32
    assert_utc_timestamp(frame["ts"])


# Authentication ----------------------------------------------------------------------


def test_bearer_header_authenticates_the_handshake(api: Api) -> None:
    alice = api.account("alice")
    with api.client.websocket_connect(chat_url("lobby"), headers=alice.headers) as ws:
        assert receive(ws) == {"type": "history", "messages": []}
        assert_presence(receive(ws), "join", "lobby", alice)


def test_first_frame_authenticates_browsers(api: Api) -> None:
    alice = api.account("alice")
    with api.client.websocket_connect(chat_url("lobby")) as ws:
        ws.send_json({"type": "auth", "token": alice.tokens["access_token"]})
        assert receive(ws) == {"type": "history", "messages": []}
        assert_presence(receive(ws), "join", "lobby", alice)
        say(ws, "hello")
        assert_message(receive(ws), "lobby", alice, "hello")


@pytest.mark.parametrize("path", [chat_url("lobby"), NOTIFICATIONS])
def test_a_bad_header_rejects_the_handshake(api: Api, path: str) -> None:
    alice = api.account("alice")
    for authorization in [
        "Bearer not-a-token",
        f"Bearer {alice.tokens['refresh_token']}",  # a refresh token is not an access token
        f"Basic {alice.tokens['access_token']}",
        "Bearer",
    ]:
        with (
            pytest.raises(WebSocketDisconnect) as refused,
            api.client.websocket_connect(path, headers={"Authorization": authorization}),
        ):
            pytest.fail("the handshake was accepted")
        assert refused.value.code == POLICY_VIOLATION


def test_a_deactivated_user_cannot_connect(api: Api) -> None:
    alice = api.account("alice")
    response = api.client.patch(
        f"/api/v1/users/{alice.id}", json={"is_active": False}, headers=api.root().headers
    )
    assert response.status_code == 200
    with (
        pytest.raises(WebSocketDisconnect) as refused,
        api.client.websocket_connect(chat_url("lobby"), headers=alice.headers),
    ):
        pytest.fail("the handshake was accepted")
    assert refused.value.code == POLICY_VIOLATION


@pytest.mark.parametrize("path", [chat_url("lobby"), NOTIFICATIONS])
def test_a_bad_first_frame_closes_with_1008(api: Api, path: str) -> None:
    alice = api.account("alice")
    token = alice.tokens["access_token"]
    for frame in [
        {"type": "auth", "token": "not-a-token"},
        {"type": "auth", "token": alice.tokens["refresh_token"]},
        {"type": "auth", "token": token, "extra": 1},
        {"type": "auth"},
        {"type": "message", "content": "hi"},
        "not json",
        {"type": "auth", "token": token + "x" * 9000},  # over the frame size limit
    ]:
        with api.client.websocket_connect(path) as ws:
            ws.send_text(frame if isinstance(frame, str) else json.dumps(frame))
            with pytest.raises(WebSocketDisconnect) as closed:
                receive(ws)
            assert closed.value.code == POLICY_VIOLATION


def test_a_binary_first_frame_closes_with_1008(api: Api) -> None:
    alice = api.account("alice")
    with api.client.websocket_connect(chat_url("lobby")) as ws:
        ws.send_bytes(json.dumps({"type": "auth", "token": alice.tokens["access_token"]}).encode())
        with pytest.raises(WebSocketDisconnect) as closed:
            receive(ws)
        assert closed.value.code == POLICY_VIOLATION


def test_no_first_frame_in_time_closes_with_1008(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deps, "AUTH_TIMEOUT_SECONDS", 0.2)  # the contract's 5 s, shortened
    with api.client.websocket_connect(chat_url("lobby")) as ws:
        with pytest.raises(WebSocketDisconnect) as closed:
            receive(ws)
        assert closed.value.code == POLICY_VIOLATION


@pytest.mark.parametrize("query", ["token={token}", "access_token={token}", "x={token}"])
def test_a_token_in_the_url_is_refused(api: Api, query: str) -> None:
    alice = api.account("alice")
    url = chat_url("lobby") + "?" + query.format(token=alice.tokens["access_token"])
    # Refused even with a valid header: the token has already leaked into logs.
    with (
        pytest.raises(WebSocketDisconnect) as refused,
        api.client.websocket_connect(url, headers=alice.headers),
    ):
        pytest.fail("the handshake was accepted")
    assert refused.value.code == POLICY_VIOLATION


def test_an_unrelated_query_parameter_is_harmless(api: Api) -> None:
    alice = api.account("alice")
    url = chat_url("lobby") + "?client=web"
    with api.client.websocket_connect(url, headers=alice.headers) as ws:
        assert receive(ws)["type"] == "history"


@pytest.mark.parametrize("room", ["bad.name", "x" * 65, "caf%C3%A9"])
def test_an_invalid_room_name_is_refused(api: Api, room: str) -> None:
    alice = api.account("alice")
    with (
        pytest.raises(WebSocketDisconnect) as refused,
        api.client.websocket_connect(chat_url(room), headers=alice.headers),
    ):
        pytest.fail("the handshake was accepted")
    assert refused.value.code == POLICY_VIOLATION


# Chat ----------------------------------------------------------------------------------


def test_a_new_member_gets_the_history_oldest_first(api: Api) -> None:
    alice, bob = api.account("alice"), api.account("bob")
    with joined(api, alice, "lobby") as ws:
        sent = []
        for content in ["one", "two", "three"]:
            say(ws, content)
            sent.append(receive(ws))
    with api.client.websocket_connect(chat_url("lobby"), headers=bob.headers) as ws:
        assert receive(ws) == {"type": "history", "messages": sent}
        assert [m["content"] for m in sent] == ["one", "two", "three"]
        # Join and leave events are not history; other rooms have their own.
    with api.client.websocket_connect(chat_url("other"), headers=bob.headers) as ws:
        assert receive(ws) == {"type": "history", "messages": []}


def test_the_history_keeps_the_last_50_messages(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, tmp_path, rate_limit_chat_messages="100/minute")
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings)
        alice = api.account("alice")
        with joined(api, alice, "lobby") as ws:
            for n in range(55):
                say(ws, f"message {n}")
                receive(ws)
        with client.websocket_connect(chat_url("lobby"), headers=alice.headers) as ws:
            history = receive(ws)["messages"]
    assert [m["content"] for m in history] == [f"message {n}" for n in range(5, 55)]


def test_messages_reach_every_member_of_the_room_only(api: Api) -> None:
    alice, bob, carol = api.account("alice"), api.account("bob"), api.account("carol")
    with (
        joined(api, carol, "elsewhere") as carol_ws,
        joined(api, alice, "lobby") as alice_ws,
        joined(api, bob, "lobby") as bob_ws,
    ):
        assert_presence(receive(alice_ws), "join", "lobby", bob)
        say(bob_ws, "hi all")
        to_alice, to_bob = receive(alice_ws), receive(bob_ws)
        assert_message(to_alice, "lobby", bob, "hi all")
        assert to_alice == to_bob
        say(alice_ws, "hi bob")
        assert receive(bob_ws) == receive(alice_ws)
        assert_silent(carol_ws)


def test_join_and_leave_are_announced(api: Api) -> None:
    alice, bob = api.account("alice"), api.account("bob")
    with joined(api, alice, "lobby") as alice_ws:
        with joined(api, bob, "lobby"):
            assert_presence(receive(alice_ws), "join", "lobby", bob)
        assert_presence(receive(alice_ws), "leave", "lobby", bob)


def test_private_messages_reach_every_connection_of_the_recipient(api: Api) -> None:
    alice, bob, carol = api.account("alice"), api.account("bob"), api.account("carol")
    with (
        joined(api, alice, "lobby") as alice_ws,
        joined(api, carol, "lobby") as carol_ws,
        joined(api, bob, "kitchen") as bob_kitchen,
        joined(api, bob, "garden") as bob_garden,
    ):
        assert_presence(receive(alice_ws), "join", "lobby", carol)
        alice_ws.send_json({"type": "private", "to": "BOB", "content": "psst"})
        echo = receive(alice_ws)
        assert echo.keys() == {"type", "from", "content", "id", "ts"}
        assert (echo["type"], echo["from"], echo["content"]) == ("private", "alice", "psst")
        assert_utc_timestamp(echo["ts"])
        assert receive(bob_kitchen) == echo
        assert receive(bob_garden) == echo
        assert_silent(carol_ws)


def test_a_private_message_to_an_unknown_user_is_an_error(api: Api) -> None:
    alice = api.account("alice")
    with joined(api, alice, "lobby") as ws:
        ws.send_json({"type": "private", "to": "nobody", "content": "hello?"})
        assert receive(ws) == {"type": "error", "detail": "Unknown recipient."}
        assert_silent(ws)


def test_ping_is_answered_with_pong(api: Api) -> None:
    alice = api.account("alice")
    with joined(api, alice, "lobby") as ws:
        ws.send_json({"type": "ping"})
        assert receive(ws) == {"type": "pong"}


INVALID_FRAMES: list[tuple[str | bytes, str]] = [
    ("{not json", "not valid JSON"),
    ("[]", "object"),
    ('"message"', "object"),
    ("{}", 'no "type"'),
    ('{"type": "shout", "content": "x"}', "Unknown frame type"),
    ('{"type": "auth", "token": "x"}', "Unknown frame type"),
    ('{"type": "message"}', "content: Field required"),
    ('{"type": "message", "content": "x", "room": "other"}', "room: Extra inputs"),
    ('{"type": "message", "content": ""}', "content"),
    ('{"type": "message", "content": "   "}', "content"),
    ('{"type": "message", "content": 5}', "content"),
    (json.dumps({"type": "message", "content": "x" * 2001}), "at most 2000"),
    (json.dumps({"type": "message", "content": "x" * 9000}), "8192 bytes"),
    ('{"type": "private", "content": "x"}', "to: Field required"),
    ('{"type": "private", "to": "no spaces allowed", "content": "x"}', "to:"),
    ('{"type": "ping", "extra": true}', "Extra inputs"),
    (b'{"type": "ping"}', "JSON text"),
]


def test_every_invalid_frame_is_answered_and_the_socket_stays_open(api: Api) -> None:
    alice, bob = api.account("alice"), api.account("bob")
    with joined(api, bob, "lobby") as bob_ws, joined(api, alice, "lobby") as alice_ws:
        assert_presence(receive(bob_ws), "join", "lobby", alice)
        for frame, detail in INVALID_FRAMES:
            if isinstance(frame, bytes):
                alice_ws.send_bytes(frame)
            else:
                alice_ws.send_text(frame)
            answer = receive(alice_ws)
            assert answer.keys() == {"type", "detail"}, frame
            assert answer["type"] == "error"
            assert detail in answer["detail"], (frame, answer)
        # Still a working member, and nothing of the above reached anyone else.
        assert_silent(bob_ws)
        say(alice_ws, "still here")
        assert_message(receive(bob_ws), "lobby", alice, "still here")
        assert_message(receive(alice_ws), "lobby", alice, "still here")


def test_error_details_do_not_echo_the_frame(api: Api) -> None:
    alice = api.account("alice")
    with joined(api, alice, "lobby") as ws:
        ws.send_json({"type": "s3cr3t-type"})
        assert "s3cr3t" not in receive(ws)["detail"]
        ws.send_json({"type": "message", "content": "s3cr3t" * 400})
        assert "s3cr3t" not in receive(ws)["detail"]


# Notifications ---------------------------------------------------------------------------


def notify(api: Api, sender: Account, **body: Any) -> dict[str, Any]:
    response = api.client.post(NOTIFY, json=body, headers=sender.headers)
    assert response.status_code == 202, response.text
    return response.json()


@contextmanager
def listening(api: Api, account: Account, *, first_frame: bool = False) -> Iterator[Any]:
    headers = {} if first_frame else account.headers
    with api.client.websocket_connect(NOTIFICATIONS, headers=headers) as ws:
        if first_frame:
            ws.send_json({"type": "auth", "token": account.tokens["access_token"]})
        # The pong proves the subscription is in place before anything is sent.
        assert_silent(ws)
        yield ws


def test_notifications_to_one_user_and_to_everyone(api: Api) -> None:
    admin = api.account("ada", role="admin")
    alice, bob = api.account("alice"), api.account("bob")
    with listening(api, alice) as alice_ws, listening(api, bob, first_frame=True) as bob_ws:
        targeted = notify(api, admin, title="Hello Alice", body="Just you", user_id=alice.id)
        assert targeted.keys() == {"type", "id", "title", "body", "user_id", "ts"}
        assert (targeted["type"], targeted["title"], targeted["body"]) == (
            "notification",
            "Hello Alice",
            "Just you",
        )
        assert targeted["user_id"] == alice.id
        assert isinstance(targeted["id"], str)
        assert_utc_timestamp(targeted["ts"])
        assert receive(alice_ws) == targeted

        everyone = notify(api, api.root(), title="Maintenance at noon")
        assert (everyone["user_id"], everyone["body"]) == (None, "")
        # Bob's first notification is the broadcast: the targeted one never reached him.
        assert receive(bob_ws) == everyone
        assert receive(alice_ws) == everyone
        assert_silent(bob_ws)


def test_a_user_with_two_notification_sockets_gets_it_on_both(api: Api) -> None:
    alice = api.account("alice")
    with listening(api, alice) as first, listening(api, alice, first_frame=True) as second:
        sent = notify(api, api.root(), title="Twice", user_id=alice.id)
        assert receive(first) == sent
        assert receive(second) == sent


def test_the_notification_socket_only_takes_pings(api: Api) -> None:
    alice = api.account("alice")
    with listening(api, alice) as ws:
        say(ws, "anyone?")
        assert receive(ws) == {"type": "error", "detail": "This socket only accepts ping frames."}
        ws.send_text("{oops")
        assert receive(ws)["type"] == "error"
        assert_silent(ws)


@pytest.mark.parametrize("role", [None, "moderator"])
def test_only_admins_send_notifications(api: Api, role: str | None) -> None:
    user = api.account("someone", role=role)
    body = {"title": "Hi"}
    assert_problem(api.client.post(NOTIFY, json=body, headers=user.headers), 403)
    assert_problem(api.client.post(NOTIFY, json=body), 401)
    bad_token = {"Authorization": "Bearer nope"}
    assert_problem(api.client.post(NOTIFY, json=body, headers=bad_token), 401)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"title": ""},
        {"title": "   "},
        {"title": "x" * 201},
        {"title": "Hi", "body": "x" * 2001},
        {"title": "Hi", "user_id": 0},
        {"title": "Hi", "user_id": "alice"},
        {"title": "Hi", "user_id": True},  # not user 1
        {"title": "Hi", "user_id": "1"},
        {"title": "Hi", "type": "private"},
        {"title": "Hi", "id": "mine"},
        {"title": None},
    ],
)
def test_notification_bodies_are_validated(api: Api, body: dict[str, Any]) -> None:
    problem = assert_problem(api.client.post(NOTIFY, json=body, headers=api.root().headers), 422)
    assert problem["errors"]


def test_a_notification_to_an_unknown_user_is_404(api: Api) -> None:
    body = {"title": "Hi", "user_id": 424242}
    assert_problem(api.client.post(NOTIFY, json=body, headers=api.root().headers), 404)


# Shutdown ------------------------------------------------------------------------------


def test_close_connections_closes_every_socket_with_1012(api: Api) -> None:
    alice, bob = api.account("alice"), api.account("bob")
    with joined(api, alice, "lobby") as chat_ws, listening(api, bob) as notify_ws:
        api.client.portal.call(close_connections, api.client.app)
        assert close_code(chat_ws) == SERVICE_RESTART
        assert close_code(notify_ws) == SERVICE_RESTART
    # The service keeps working for new connections (a restarted lifespan, a new replica).
    with joined(api, alice, "lobby") as ws:
        assert_silent(ws)


def test_ending_a_users_sessions_closes_their_sockets_at_once(api: Api) -> None:
    """A logout closes the sockets opened with its access token, and only those; a
    deactivation (like a new password or role, or deletion) closes all of the user's."""
    alice = api.account("alice")
    phone = Account(
        alice.id, alice.username, alice.email, alice.password, api.login("alice").json()
    )
    with joined(api, alice, "lobby") as laptop_ws, listening(api, phone) as phone_ws:
        logout = api.client.post(
            "/api/v1/auth/logout",
            json={"refresh_token": alice.tokens["refresh_token"]},
            headers=alice.headers,
        )
        assert logout.status_code == 204
        assert close_code(laptop_ws) == POLICY_VIOLATION
        assert_silent(phone_ws)
        deactivated = api.client.patch(
            f"/api/v1/users/{alice.id}", json={"is_active": False}, headers=api.root().headers
        )
        assert deactivated.status_code == 200
        assert close_code(phone_ws) == POLICY_VIOLATION


def test_a_new_password_closes_the_old_passwords_sockets_for_good(api: Api) -> None:
    """Someone who learnt the old password has a socket open: the owner's password change
    closes it, and the access token it was opened with, still unexpired, opened another
    at once."""
    alice = api.account("alice")
    thief = Account(
        alice.id, alice.username, alice.email, alice.password, api.login("alice").json()
    )
    with listening(api, thief) as ws:
        changed = api.client.patch(
            "/api/v1/users/me",
            json={"password": "a new passphrase", "current_password": PASSWORD},
            headers=alice.headers,
        )
        assert changed.status_code == 200
        assert close_code(ws) == POLICY_VIOLATION
    for path in (NOTIFICATIONS, chat_url("lobby")):
        with (
            pytest.raises(WebSocketDisconnect) as refused,
            api.client.websocket_connect(path, headers=thief.headers),
        ):
            pytest.fail("the handshake was accepted")
        assert refused.value.code == POLICY_VIOLATION
    with api.client.websocket_connect(NOTIFICATIONS) as ws:
        ws.send_json({"type": "auth", "token": thief.tokens["access_token"]})
        assert close_code(ws) == POLICY_VIOLATION
    alice.password = "a new passphrase"
    api.sign_in(alice)
    with listening(api, alice) as ws:
        assert_silent(ws)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/users/me", {"password": "a new passphrase", "current_password": PASSWORD}),
        ("/api/v1/auth/logout", None),
    ],
    ids=["new password", "logout"],
)
def test_sessions_ended_while_a_socket_is_admitted_close_it(
    api: Api, monkeypatch: pytest.MonkeyPatch, path: str, body: dict[str, str] | None
) -> None:
    """Between a socket's token check and its being served comes the socket cap's lease
    (a round trip to Redis). Sessions ended then were missed: the token had passed its
    check, and a socket once subscribed never heard of the end, so it stayed open until
    its token expired. Here the sessions end from inside that gap, every time."""
    alice = api.account("alice")
    body = body or {"refresh_token": alice.tokens["refresh_token"]}
    app = api.client.app
    leases = app.state.backends.leases  # type: ignore[attr-defined]
    hold = leases.hold

    @asynccontextmanager
    async def sessions_ended_first(holder: str, limit: int) -> AsyncIterator[bool]:
        transport = httpx2.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as c:
            method = "PATCH" if path == "/api/v1/users/me" else "POST"
            ended = await c.request(method, path, json=body, headers=alice.headers)
            assert ended.status_code in (200, 204), ended.text
        async with hold(holder, limit) as granted:
            yield granted

    monkeypatch.setattr(leases, "hold", sessions_ended_first)
    with api.client.websocket_connect(NOTIFICATIONS, headers=alice.headers) as ws:
        assert close_code(ws) == POLICY_VIOLATION


def test_a_user_flooding_a_room_is_slowed_down(database_url: str, tmp_path: Path) -> None:
    """Per user across their sockets: the excess is refused with an error frame, never
    delivered, never in the history; the connections stay open."""
    settings = make_settings(database_url, tmp_path, rate_limit_chat_messages="3/minute")
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings)
        alice, bob = api.account("alice"), api.account("bob")
        with joined(api, alice, "lobby") as first, joined(api, alice, "lobby") as second:
            receive(first)  # her second socket's join
            for n, ws in enumerate((first, first, second)):
                say(ws, f"message {n}")
                for listener in (first, second):
                    assert receive(listener)["content"] == f"message {n}"
            say(second, "one too many")
            error = receive(second)
            assert error["type"] == "error"
            assert error["detail"].startswith("Too many messages; wait ")
            assert_silent(first)
        with client.websocket_connect(chat_url("lobby"), headers=bob.headers) as ws:
            history = receive(ws)["messages"]
            assert [frame["content"] for frame in history] == [
                "message 0",
                "message 1",
                "message 2",
            ]


def test_a_user_holds_at_most_the_socket_cap(database_url: str, tmp_path: Path) -> None:
    """Chat and notification sockets together; one more is closed with 1008 and a reason,
    a closed one frees its place at once, and other users are not affected."""
    settings = make_settings(database_url, tmp_path, ws_max_sockets_per_user=2)
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings)
        alice, bob = api.account("alice"), api.account("bob")

        def refusals() -> float:
            samples = parse(client.get("/metrics").text)
            return value(samples, "websocket_refusals_total", reason="socket_cap")

        before = refusals()
        with joined(api, alice, "lobby"), listening(api, alice):
            for first_frame in (False, True):
                headers = {} if first_frame else alice.headers
                with client.websocket_connect(NOTIFICATIONS, headers=headers) as third:
                    if first_frame:
                        third.send_json({"type": "auth", "token": alice.tokens["access_token"]})
                    with pytest.raises(WebSocketDisconnect) as refused:
                        receive(third)
                    assert refused.value.code == 1008
                    assert refused.value.reason == "Too many open sockets: at most 2 per user."
            with listening(api, bob), listening(api, bob):
                pass
        with listening(api, alice), listening(api, alice):
            pass
        assert refusals() == before + 2  # SREs see it: only the two over the cap


def test_a_socket_is_closed_when_its_token_expires(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, tmp_path, access_token_ttl_seconds=2)
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings)
        alice = api.account("alice")
        with joined(api, alice, "lobby") as ws:
            # Nothing is sent: the server closes it when the token runs out.
            assert close_code(ws) == 1008
        # A fresh token connects again.
        api.sign_in(alice)
        with joined(api, alice, "lobby") as ws:
            assert_silent(ws)


def test_a_client_gone_while_its_first_frame_is_sent_is_no_error() -> None:
    """A chat client that closes right after its handshake: the history frame's send fails
    inside the task group that watches for ended sessions, which wraps the disconnect in
    an exception group; it was an `unhandled error` at ERROR, paging for a client's exit."""
    realtime = Realtime(broker=None, history=None, sessionmaker=None, policy=None)  # type: ignore[arg-type]

    async def client_leaves_mid_send() -> None:
        async with realtime._open(None, time.time() + 60), anyio.create_task_group():  # type: ignore[arg-type]
            raise WebSocketDisconnect(1006)

    anyio.run(client_leaves_mid_send)
    assert realtime.connections == set()


def test_a_socket_cancelled_by_the_servers_shutdown_closes_as_a_restart() -> None:
    """The server cancels the handlers still running when its shutdown's window ends (a
    quick shutdown after a second): a socket so cut is closed with 1012, as the graceful
    path closes it, and no error escapes to be logged with a traceback. One not yet
    accepted is the server's to refuse."""

    async def handler(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/accepted":
            await send({"type": "websocket.accept"})
        await asyncio.Event().wait()  # a socket that would stay open

    middleware = HttpMiddleware(handler, ["*"], traced=False, max_body_bytes=1024)

    async def cancelled(path: str) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()
            return {}

        scope = {"type": "websocket", "path": path, "headers": [(b"host", b"x")], "root_path": ""}
        task = asyncio.create_task(middleware(scope, receive, send))
        await asyncio.sleep(0.05)
        task.cancel()
        await task  # ends as any socket does: nothing raised
        return sent

    assert asyncio.run(cancelled("/accepted"))[-1] == {"type": "websocket.close", "code": 1012}
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(cancelled("/handshake"))
