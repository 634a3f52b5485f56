"""One accepted WebSocket: a receiver loop for client frames, a sender task per inbox.

Nothing a client does can hold up delivery to anyone else: the broker offers into bounded
inboxes without waiting (a full inbox drops, counted in ``Subscription.dropped``), and
only this connection's own tasks ever wait on its socket. Sends go through one lock
because an ASGI server does not promise that concurrent sends on one socket are safe.

A bad frame is answered with an error frame and the connection stays open; no frame
reaches a log line (the first-frame auth token would be in it).

Keep-alive is not re-implemented here: uvicorn (also under gunicorn's UvicornWorker) sends
protocol-level pings every ``--ws-ping-interval`` seconds (20 by default) and drops peers
that stop answering, which detects dead clients and keeps idle proxies from timing out.
``{"type": "ping"}`` is for clients that want an application-level round trip.
"""

import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress

import anyio
from fastapi import status
from pydantic import ValidationError
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from app.backends.broker import Subscription
from app.observability.logging import get_logger
from app.realtime.schemas import (
    MAX_FRAME_BYTES,
    ClientFrame,
    Error,
    MessageFrame,
    PingFrame,
    Pong,
    PrivateFrame,
    ServerFrame,
    client_frame,
)

logger = get_logger(__name__)

# The client went away (or was closed) while we were sending or receiving.
DISCONNECTED = (WebSocketDisconnect, WebSocketDisconnected)
CLOSE_TIMEOUT_SECONDS = 1.0
# Also when the user's sessions are ended (Realtime.end_sessions): reconnect with a valid token.
TOKEN_EXPIRED = status.WS_1008_POLICY_VIOLATION

FrameHandler = Callable[[MessageFrame | PrivateFrame], Awaitable[None]]


class FrameRejected(Exception):
    """Answered with ``{"type": "error", "detail": …}``; the socket stays open."""


class Connection:
    def __init__(self, websocket: WebSocket, expires_at: float) -> None:
        self.websocket = websocket
        self.expires_at = expires_at
        self.close_code: int | None = None
        self.finished = anyio.Event()
        self._send_lock = anyio.Lock()
        self._serving = anyio.CancelScope()

    async def send(self, frame: ServerFrame) -> None:
        await self._send_text(frame.to_json())

    async def serve(
        self, inboxes: Sequence[Subscription], handle: FrameHandler, ended: anyio.Event
    ) -> None:
        """Deliver the inboxes and answer client frames until the client leaves, its token
        expires or ``ended`` is set (its sessions were ended: both closed with 1008, to
        reconnect with a valid token), or ``shutdown`` is called."""
        with self._serving, anyio.move_on_after(self.expires_at - time.time()) as lifetime:
            async with anyio.create_task_group() as tasks:
                for inbox in inboxes:
                    tasks.start_soon(self._deliver, inbox)
                tasks.start_soon(self._end_when, ended)
                await self._receive(handle)
                tasks.cancel_scope.cancel()
        if lifetime.cancelled_caught and self.close_code is None:
            self.close_code = TOKEN_EXPIRED
        if dropped := sum(inbox.dropped for inbox in inboxes):
            logger.warning("realtime: slow client missed messages", dropped=dropped)

    def shutdown(self, code: int) -> None:
        self.close_code = code
        self._serving.cancel()

    async def _end_when(self, ended: anyio.Event) -> None:
        await ended.wait()
        self.shutdown(TOKEN_EXPIRED)

    async def close(self) -> None:
        """Send the close frame ``shutdown`` asked for; the client may be gone already."""
        if self.close_code is None:
            return
        with anyio.move_on_after(CLOSE_TIMEOUT_SECONDS, shield=True), suppress(*DISCONNECTED):
            await self.websocket.close(self.close_code)

    async def _send_text(self, text: str) -> None:
        async with self._send_lock:
            await self.websocket.send_text(text)

    async def _deliver(self, inbox: Subscription) -> None:
        try:
            async for message in inbox:
                await self._send_text(message.decode())
        except DISCONNECTED:
            self._serving.cancel()

    async def _receive(self, handle: FrameHandler) -> None:
        try:
            while (message := await self.websocket.receive())["type"] != "websocket.disconnect":
                if (reply := await self._answer(message, handle)) is not None:
                    await self.send(reply)
        except DISCONNECTED:
            return

    async def _answer(self, message: Message, handle: FrameHandler) -> ServerFrame | None:
        try:
            frame = parse_frame(message)
            if isinstance(frame, PingFrame):
                return Pong()
            await handle(frame)
        except FrameRejected as exc:
            return Error(detail=str(exc))
        except Exception:
            # A failing dependency (database, a bug) costs this frame, not the connection.
            logger.exception("realtime: frame handling failed")
            return Error(detail="Internal error.")
        return None


def parse_frame(message: Message) -> ClientFrame:
    text = message.get("text")
    if text is None:
        raise FrameRejected("Frames must be JSON text.")
    if len(text.encode()) > MAX_FRAME_BYTES:
        raise FrameRejected(f"Frames are limited to {MAX_FRAME_BYTES} bytes.")
    try:
        return client_frame.validate_json(text)
    except ValidationError as exc:
        raise FrameRejected(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    """What is wrong, in pydantic's words but without echoing the input back."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        kind, field = error["type"], ".".join(map(str, error["loc"][1:]))
        if kind == "json_invalid":
            return "Frame is not valid JSON."
        if kind == "union_tag_invalid":
            expected = error.get("ctx", {}).get("expected_tags", "")
            return f"Unknown frame type; expected one of {expected}."
        if kind == "union_tag_not_found":
            return 'Frame has no "type".'
        problems.append(f"{field}: {error['msg']}" if field else error["msg"])
    return "; ".join(problems)
