"""Handshake checks for the WebSockets, and the realtime service for a route.

The HTTP dependencies (``CurrentUser``) cannot serve sockets: browsers cannot put an
``Authorization`` header on a WebSocket, so they authenticate with a first frame, and the
wire format wants refusals as close code 1008. Closing before ``accept`` makes the server
answer the handshake itself with HTTP 403.
"""

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl

import anyio
from fastapi import Depends, WebSocketException, status
from pydantic import ValidationError
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket

from app.auth.deps import access_claims
from app.auth.service import user_from_access_claims
from app.backends.leases import Leases
from app.errors import Unauthorized
from app.observability.logging import user_id_var
from app.observability.metrics import WEBSOCKET_REFUSALS
from app.realtime.connection import DISCONNECTED
from app.realtime.schemas import MAX_FRAME_BYTES, AuthFrame
from app.realtime.service import Realtime, SocketUser, realtime_of

ROOM_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
AUTH_TIMEOUT_SECONDS = 5.0
POLICY_VIOLATION = status.WS_1008_POLICY_VIOLATION
RefusalReason = Literal["credentials_in_url", "authentication", "socket_cap"]
# URLs end up in proxy and server logs, so a credential there is refused even when the
# handshake also carries a valid header: the client must be fixed, not tolerated.
_CREDENTIAL_PARAMS = frozenset({"token", "access_token", "jwt", "auth", "authorization"})
_JWT_SHAPED = re.compile(r"eyJ[\w-]*\.[\w-]*\.")


async def get_realtime(connection: HTTPConnection) -> Realtime:
    return realtime_of(connection.app)


RealtimeDep = Annotated[Realtime, Depends(get_realtime)]


async def room_name(room: str) -> str:
    if ROOM_PATTERN.fullmatch(room) is None:
        raise WebSocketException(POLICY_VIOLATION, "Invalid room name.")
    return room


RoomName = Annotated[str, Depends(room_name)]


@asynccontextmanager
async def admitted(websocket: WebSocket) -> AsyncIterator[SocketUser | None]:
    """The socket's user while the socket is open, or None once it is closed (1008): it
    failed to authenticate, or its user already holds APP_WS_MAX_SOCKETS_PER_USER."""
    async with authenticated(websocket) as socket_user:
        if socket_user is None:
            yield None
            return
        limit = websocket.app.state.settings.ws_max_sockets_per_user
        leases: Leases = websocket.app.state.backends.leases
        async with leases.hold(f"user:{socket_user.user.id}", limit) as granted:
            if not granted:
                detail = f"Too many open sockets: at most {limit} per user."
                await _refuse(websocket, "socket_cap", detail)
            yield socket_user if granted else None


@asynccontextmanager
async def authenticated(websocket: WebSocket) -> AsyncIterator[SocketUser | None]:
    """Accept the socket and yield its user, or close it (1008) and yield None.

    The handshake's bearer header is checked before accepting; without one the socket is
    accepted and the first frame must be ``{"type": "auth", "token": …}`` within 5 s.
    """
    if _credential_in_url(websocket):
        await _refuse(websocket, "credentials_in_url", "Credentials are not accepted in the URL.")
        yield None
        return
    header = websocket.headers.get("authorization")
    if header is None:
        await websocket.accept()
        token = await _first_frame_token(websocket)
    else:
        token = _bearer_token(header)
    async with _checked(websocket, token) as found:
        if found is None:
            await _refuse(websocket, "authentication", "Authentication failed.")
        else:
            if header is not None:
                await websocket.accept()
            # Every later log line of this connection names the user, and so does its
            # access line (app/middleware.py), as for HTTP requests.
            user_id_var.set(found.user.id)
            websocket.state.user_id = found.user.id
        yield found


def _credential_in_url(websocket: WebSocket) -> bool:
    return any(
        name.lower() in _CREDENTIAL_PARAMS or _JWT_SHAPED.search(value)
        for name, value in parse_qsl(websocket.url.query, keep_blank_values=True)
    )


def _bearer_token(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def _first_frame_token(websocket: WebSocket) -> str | None:
    with anyio.move_on_after(AUTH_TIMEOUT_SECONDS):
        message = await websocket.receive()
        text = message.get("text")
        if text is None or len(text.encode()) > MAX_FRAME_BYTES:
            return None
        with suppress(ValidationError):
            return AuthFrame.model_validate_json(text).token
    return None


@asynccontextmanager
async def _checked(websocket: WebSocket, token: str | None) -> AsyncIterator[SocketUser | None]:
    """The user of a valid access token, or None. Its sessions channel is subscribed to
    before the token is checked and stays so while the block runs: whatever ends the
    sessions after the check (which read the user before the change was committed, so
    the token passed) reaches the socket however long it takes to be served."""
    claims = _claims(websocket, token)
    if claims is None:
        yield None
        return
    state = websocket.app.state
    async with realtime_of(websocket.app).sessions(int(claims["sub"])) as sessions:
        async with state.sessionmaker() as session:
            try:
                user = await user_from_access_claims(session, state.backends.revocations, claims)
            except Unauthorized:
                found = None
            else:
                found = SocketUser(user, float(claims["exp"]), claims["jti"], sessions)
        yield found


def _claims(websocket: WebSocket, token: str | None) -> dict[str, Any] | None:
    """The verified claims of an access token naming a user id, or None."""
    if token is None:
        return None
    try:
        claims = access_claims(websocket, token)
        int(claims["sub"])
    except (Unauthorized, ValueError):
        return None
    return claims


async def _refuse(websocket: WebSocket, reason: RefusalReason, detail: str) -> None:
    WEBSOCKET_REFUSALS.labels(reason).inc()
    # The client may already have gone (it disconnected instead of authenticating).
    with suppress(*DISCONNECTED):
        await websocket.close(POLICY_VIOLATION, detail)
