"""Chat rooms, private messages and notifications, built on the broker and the history.

Everything a client should see is published through the broker, never sent to sockets
directly, because only the broker knows every replica: with Redis each process pumps all
channels into its local inboxes. Channels: ``chat:<room>`` (a room's messages and
presence), ``user:<id>`` (private messages, to all of a user's chat connections in any
room), ``notify:<id>`` and ``notify:all`` (the notifications socket), ``sessions:<id>``
(the user's sessions ended: their sockets close, on every replica).

Open connections are registered here so that ``close_connections`` can close them when
the application shuts down.
"""

import json
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial

import anyio
from fastapi import status
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.websockets import WebSocket

from app.backends.broker import Broker, History, Subscription
from app.rate_limits import RateLimited, RatePolicy
from app.realtime.connection import DISCONNECTED, Connection, FrameRejected
from app.realtime.schemas import (
    ChatMessage,
    HistoryFrame,
    MessageFrame,
    Notification,
    NotificationCreate,
    Presence,
    PresenceKind,
    PrivateFrame,
    PrivateMessage,
    new_id,
)
from app.users import service as users_service
from app.users.models import User

INBOX_SIZE = 256
# 1012 "service restart" tells clients to reconnect (to another replica); it is also the
# code uvicorn itself uses for the sockets it closes on shutdown.
SHUTDOWN_CODE = status.WS_1012_SERVICE_RESTART
SHUTDOWN_GRACE_SECONDS = 5.0
# A leave event is still worth a short wait when the handler is being cancelled.
LEAVE_PUBLISH_SECONDS = 1.0
NOTIFY_ALL = "notify:all"


@dataclass(frozen=True, slots=True)
class SocketUser:
    """An authenticated socket's user, and when its access token expires (epoch seconds):
    the connection is closed then, so a socket cannot outlive its credential."""

    user: User
    expires_at: float
    token_id: str  # the access token's jti: a logout ends the sockets opened with it
    # The user's sessions channel, subscribed to before the token was checked: an end of
    # their sessions at any moment after that check is in it (see Realtime.sessions).
    sessions: Subscription


def sessions_channel(user_id: int) -> str:
    return f"sessions:{user_id}"


def room_channel(room: str) -> str:
    return f"chat:{room}"


def user_channel(user_id: int) -> str:
    return f"user:{user_id}"


def notify_channel(user_id: int) -> str:
    return f"notify:{user_id}"


class Realtime:
    def __init__(
        self,
        broker: Broker,
        history: History,
        sessionmaker: async_sessionmaker[AsyncSession],
        policy: RatePolicy,
    ) -> None:
        self.broker = broker
        self.history = history
        self.sessionmaker = sessionmaker
        self.policy = policy
        self.connections: set[Connection] = set()

    async def chat(self, websocket: WebSocket, socket_user: SocketUser, room: str) -> None:
        user, channel = socket_user.user, room_channel(room)
        async with (
            self._open(websocket, socket_user.expires_at) as connection,
            # Subscribed before the history is read: a message sent in between may arrive
            # twice (same id), but none can fall between the two.
            self.broker.subscribe(channel, INBOX_SIZE) as room_inbox,
            self.broker.subscribe(user_channel(user.id), INBOX_SIZE) as private_inbox,
            self._sessions_ended(socket_user) as ended,
        ):
            recent = await self.history.recent(room)
            await connection.send(HistoryFrame(messages=[json.loads(item) for item in recent]))
            await self._presence("join", room, user)
            try:
                handle = partial(self._chat_frame, user, room)
                await connection.serve([room_inbox, private_inbox], handle, ended)
            finally:
                with anyio.move_on_after(LEAVE_PUBLISH_SECONDS, shield=True):
                    await self._presence("leave", room, user)

    async def notifications(self, websocket: WebSocket, socket_user: SocketUser) -> None:
        async with (
            self._open(websocket, socket_user.expires_at) as connection,
            self.broker.subscribe(notify_channel(socket_user.user.id), INBOX_SIZE) as own_inbox,
            self.broker.subscribe(NOTIFY_ALL, INBOX_SIZE) as broadcast_inbox,
            self._sessions_ended(socket_user) as ended,
        ):
            await connection.serve([own_inbox, broadcast_inbox], _push_only, ended)

    async def notify(self, session: AsyncSession, data: NotificationCreate) -> Notification:
        if data.user_id is not None:
            await users_service.get_user(session, data.user_id)  # 404 for an unknown id
        notification = Notification(title=data.title, body=data.body, user_id=data.user_id)
        channel = NOTIFY_ALL if data.user_id is None else notify_channel(data.user_id)
        await self.broker.publish(channel, notification.encode())
        return notification

    async def end_sessions(self, user_id: int, token_id: str | None = None) -> None:
        """Close the user's sockets on every replica (1008, as when a token expires): all of
        them, or those opened with the access token ``token_id`` (a logout). Called once
        their tokens are revoked, so a reconnecting client is refused. Each its own id:
        replicas of earlier releases, still running during a rolling deploy, tell their own
        messages by their bytes (see the broker's module), and skipped one such message
        taken for another."""
        message = {"jti": token_id, "id": new_id()}
        await self.broker.publish(sessions_channel(user_id), json.dumps(message).encode())

    def sessions(self, user_id: int) -> AbstractAsyncContextManager[Subscription]:
        """What ends the user's sessions from now on, for a socket to subscribe to before
        its token is checked (app/realtime/deps.py). Subscribed after the check, a socket
        missed an end that came in between (the lease's round trip to Redis is there): its
        token had passed the check, and it stayed open until the token expired."""
        return self.broker.subscribe(sessions_channel(user_id), 4)

    @asynccontextmanager
    async def _sessions_ended(self, socket_user: SocketUser) -> AsyncIterator[anyio.Event]:
        """Set when ``end_sessions`` reaches this socket, for ``Connection.serve`` to close it."""
        ended = anyio.Event()

        async def watch() -> None:
            async for message in socket_user.sessions:
                if json.loads(message)["jti"] in (None, socket_user.token_id):
                    ended.set()
                    return

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch)
            yield ended
            tasks.cancel_scope.cancel()

    async def close_all(self) -> None:
        """Close every open socket with SHUTDOWN_CODE and wait (briefly) for the handlers."""
        connections = list(self.connections)
        for connection in connections:
            connection.shutdown(SHUTDOWN_CODE)
        with anyio.move_on_after(SHUTDOWN_GRACE_SECONDS):
            for connection in connections:
                await connection.finished.wait()

    @asynccontextmanager
    async def _open(self, websocket: WebSocket, expires_at: float) -> AsyncIterator[Connection]:
        connection = Connection(websocket, expires_at)
        self.connections.add(connection)
        try:
            yield connection
        # The client left while something was being sent to it: nothing is owed. Also when
        # a task group on the way wrapped the error (the sessions watch does).
        except* DISCONNECTED:
            pass
        finally:
            self.connections.discard(connection)
            await connection.close()
            connection.finished.set()

    async def _chat_frame(self, user: User, room: str, frame: MessageFrame | PrivateFrame) -> None:
        # Per user, not per socket: a flood would push everyone else's messages out of
        # the room's history and past slow readers' bounded inboxes.
        try:
            limit = self.policy.limits.chat_messages
            await self.policy.enforce("chat-messages", limit, f"user:{user.id}")
        except RateLimited as limited:
            wait = limited.headers["Retry-After"]
            raise FrameRejected(f"Too many messages; wait {wait} s.") from None
        if isinstance(frame, PrivateFrame):
            await self._private(user, frame)
            return
        message = ChatMessage(room=room, user=user.username, content=frame.content).encode()
        await self.history.append(room, message)
        await self.broker.publish(room_channel(room), message)

    async def _private(self, sender: User, frame: PrivateFrame) -> None:
        async with self.sessionmaker() as session:
            recipient_id = await session.scalar(
                select(User.id).where(User.username == frame.to, User.is_active.is_(True))
            )
        if recipient_id is None:
            raise FrameRejected("Unknown recipient.")
        message = PrivateMessage(sender=sender.username, content=frame.content).encode()
        # The sender's own channel too: the echo reaches all of the sender's connections,
        # so every open tab shows the conversation.
        for user_id in {recipient_id, sender.id}:
            await self.broker.publish(user_channel(user_id), message)

    async def _presence(self, kind: PresenceKind, room: str, user: User) -> None:
        event = Presence(type=kind, room=room, user=user.username)
        await self.broker.publish(room_channel(room), event.encode())


async def _push_only(frame: MessageFrame | PrivateFrame) -> None:
    raise FrameRejected("This socket only accepts ping frames.")


def realtime_of(app: Starlette) -> Realtime:
    # Made on first use rather than in the lifespan: the backends exist by then, and the
    # lifespan only has to call close_connections.
    realtime: Realtime | None = getattr(app.state, "realtime", None)
    if realtime is None:
        backends = app.state.backends
        realtime = Realtime(
            backends.broker, backends.history, app.state.sessionmaker, app.state.rate_policy
        )
        app.state.realtime = realtime
    return realtime


async def close_connections(app: Starlette) -> None:
    """Close every open WebSocket with 1012 (service restart).

    Call from the lifespan's shutdown before the backends close, so that leave events are
    still published. Under uvicorn the server has already closed the sockets by then; this
    covers other servers and in-process clients.
    """
    realtime: Realtime | None = getattr(app.state, "realtime", None)
    if realtime is not None:
        await realtime.close_all()
        del app.state.realtime
