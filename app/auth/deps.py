"""Typed dependencies for authentication and authorisation.

Routes declare what they need (``CurrentUser``, ``UserManager``…) instead of checking
roles inline, so every permission decision goes through ``require``.
"""

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from starlette.requests import HTTPConnection

from app.auth import service
from app.db import IdPath, SessionDep
from app.errors import Forbidden
from app.observability.logging import user_id_var
from app.security import PasswordHasher, TokenCodec, TokenType
from app.users.models import Permission, User

oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token")
_CLAIMS = "access_claims"


# Accessors like these are ``async def`` although they only read app state: FastAPI runs a
# plain ``def`` dependency in its threadpool, a thread hop on every request that uses it.
async def get_hasher(request: Request) -> PasswordHasher:
    return request.app.state.hasher


async def get_token_codec(request: HTTPConnection) -> TokenCodec:
    return request.app.state.tokens


HasherDep = Annotated[PasswordHasher, Depends(get_hasher)]
TokenCodecDep = Annotated[TokenCodec, Depends(get_token_codec)]


def access_claims(connection: HTTPConnection, token: str) -> dict[str, Any]:
    """The verified claims of the request's access token; Unauthorized if it is not valid.

    Decoded once per request: the rate limit reads the user from them before
    get_current_user runs, and verifying the signature twice was measurable work."""
    state = connection.scope.setdefault("state", {})
    cached = state.get(_CLAIMS)
    if cached is not None and cached[0] == token:
        return cached[1]
    codec: TokenCodec = connection.app.state.tokens
    claims = codec.decode(token, TokenType.ACCESS)
    state[_CLAIMS] = (token, claims)
    return claims


async def get_current_user(
    request: Request, token: Annotated[str, Depends(oauth2_scheme)], session: SessionDep
) -> User:
    revocations = request.app.state.backends.revocations
    user = await service.user_from_access_claims(
        session, revocations, access_claims(request, token)
    )
    # For the access line and every later log line of this request.
    request.state.user_id = user.id
    user_id_var.set(user.id)
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def require(permission: Permission) -> Callable[[User], Awaitable[User]]:
    async def dependency(user: CurrentUser) -> User:
        if not user.has_permission(permission):
            raise Forbidden("You do not have permission to do this.")
        return user

    return dependency


UserManager = Annotated[User, Depends(require(Permission.MANAGE_USERS))]
NotificationSender = Annotated[User, Depends(require(Permission.SEND_NOTIFICATIONS))]


async def self_or_user_manager(user_id: IdPath, user: CurrentUser) -> User:
    """For ``/users/{user_id}`` reads: oneself, or anyone with the management permission."""
    if user_id != user.id and not user.has_permission(Permission.MANAGE_USERS):
        raise Forbidden("You do not have permission to do this.")
    return user


SelfOrUserManager = Annotated[User, Depends(self_or_user_manager)]
