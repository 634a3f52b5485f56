"""Registration, login, and refresh-token rotation with reuse detection.

Refresh tokens are rows as well as JWTs: marking one used is a single conditional
UPDATE, so two concurrent refreshes with the same token cannot both win, on any worker
or replica. A token presented after it was used is treated as stolen and its whole
family (every token descended from the same login) is revoked.
"""

import contextlib
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import bindparam, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.models import RefreshToken
from app.auth.schemas import TokenPair
from app.backends.revocation import Revocations
from app.db import roll_back_failed_commit, utcnow
from app.errors import Conflict, Unauthorized
from app.observability.logging import get_logger
from app.observability.metrics import LOGINS, TOKEN_REFRESHES
from app.security import PasswordHasher, TokenCodec, TokenType
from app.users.models import Role, User
from app.users.schemas import Email, UserCreate

logger = get_logger(__name__)

INVALID_CREDENTIALS = "Incorrect username or password."
INVALID_TOKEN = "Invalid or expired token."  # noqa: S105 - a message, not a secret
# An access token's claim binding it to the account: ``_account_stamp``.
ACCOUNT_CLAIM = "acct"
# Both tokens' claim binding them to the account's sessions as they were when issued:
# ``User.token_generation``, raised by a new password or role and by a deactivation.
GENERATION_CLAIM = "gen"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class TokenReuse(Unauthorized):
    """A spent refresh token was presented again; answered like any invalid token."""

    def __init__(self, user_id: int) -> None:
        super().__init__(INVALID_TOKEN)
        self.user_id = user_id


async def register(
    session: AsyncSession,
    hasher: PasswordHasher,
    data: UserCreate,
    *,
    role: Role = Role.USER,
    is_superuser: bool = False,
) -> User:
    await ensure_identity_free(session, email=data.email, username=data.username)
    user = User(
        email=data.email,
        username=data.username,
        hashed_password=await hasher.hash(data.password),
        role=role,
        is_superuser=is_superuser,
    )
    session.add(user)
    await commit_identity(session)
    return user


async def ensure_identity_free(
    session: AsyncSession, *, email: str | None, username: str | None, exclude_id: int | None = None
) -> None:
    """409 when another account already has this e-mail or username."""
    for column, value in ((User.email, email), (User.username, username)):
        if value is None:
            continue
        query = select(User.id).where(column == value)
        if exclude_id is not None:
            query = query.where(User.id != exclude_id)
        if await session.scalar(query) is not None:
            raise Conflict(f"An account with this {column.key} already exists.")


async def commit_identity(session: AsyncSession) -> None:
    """Commit, turning a lost race on the unique e-mail/username into a 409."""
    try:
        await session.commit()
    except IntegrityError as exc:
        await roll_back_failed_commit(session, exc)
        raise Conflict("An account with this email or username already exists.") from exc


_EMAIL = TypeAdapter(Email)


def login_name(given: str) -> str:
    """A login name as accounts store it: lower case, and an e-mail address normalised as
    registration normalises it (Unicode NFC, the domain's IDNA "xn--" form decoded), so
    any spelling that registration would call the same address logs in. A name that is
    not a valid address is only lowered: looked up like any other, it finds nobody, and
    the answer is the same 401."""
    login = given.strip().lower()
    if "@" in login:  # never in a username
        with contextlib.suppress(ValidationError):
            return _EMAIL.validate_python(login)
    return login


async def find_account(session: AsyncSession, login: str) -> User | None:
    """The user whose username or e-mail address ``login`` (a ``login_name``) is."""
    return await session.scalar(
        select(User).where(or_(User.username == login, User.email == login))
    )


async def authenticate(
    session: AsyncSession, hasher: PasswordHasher, user: User | None, password: str
) -> User:
    """``user`` (find_account's) if ``password`` is theirs and they are active. The hashing
    work is done for an unknown account too, so the time taken does not tell."""
    if user is None:
        await hasher.dummy_verify(password)
        LOGINS.labels("invalid_credentials").inc()
        raise Unauthorized(INVALID_CREDENTIALS)
    valid, new_hash = await hasher.verify_and_update(password, user.hashed_password)
    if not valid or not user.is_active:
        LOGINS.labels("invalid_credentials").inc()
        raise Unauthorized(INVALID_CREDENTIALS)
    LOGINS.labels("success").inc()
    if new_hash is not None:
        # Stored with older parameters: upgrade now that the plain password is at hand.
        user.hashed_password = new_hash
        await session.commit()
    return user


async def issue_pair(
    session: AsyncSession, codec: TokenCodec, user: User, family_id: str | None = None
) -> TokenPair:
    family_id = family_id or uuid.uuid4().hex
    # Expired rows are useless for reuse detection (the JWT itself is refused); dropping
    # them here keeps the table bounded by active sessions without a cron job.
    await session.execute(
        delete(RefreshToken).where(
            RefreshToken.user_id == user.id, RefreshToken.expires_at < utcnow()
        )
    )
    generation = user.token_generation
    access = codec.issue(
        str(user.id),
        TokenType.ACCESS,
        {ACCOUNT_CLAIM: _account_stamp(user), GENERATION_CLAIM: generation},
    )
    refresh = codec.issue(
        str(user.id), TokenType.REFRESH, {"fam": family_id, GENERATION_CLAIM: generation}
    )
    session.add(
        RefreshToken(
            jti=refresh.jti, family_id=family_id, user_id=user.id, expires_at=refresh.expires_at
        )
    )
    await session.commit()
    return TokenPair(
        access_token=access.token,
        refresh_token=refresh.token,
        expires_in=codec.ttl_seconds(TokenType.ACCESS),
    )


async def rotate(session: AsyncSession, codec: TokenCodec, refresh_token: str) -> TokenPair:
    try:
        pair = await _rotate(session, codec, refresh_token)
    except TokenReuse:
        TOKEN_REFRESHES.labels("reuse_detected").inc()
        raise
    except Unauthorized:
        TOKEN_REFRESHES.labels("invalid").inc()
        raise
    TOKEN_REFRESHES.labels("success").inc()
    return pair


async def _rotate(session: AsyncSession, codec: TokenCodec, refresh_token: str) -> TokenPair:
    claims = codec.decode(refresh_token, TokenType.REFRESH)
    now = utcnow()
    claimed = await session.execute(
        update(RefreshToken)
        .where(
            RefreshToken.jti == claims["jti"],
            RefreshToken.used_at.is_(None),
            RefreshToken.revoked_at.is_(None),
        )
        .values(used_at=now)
    )
    token = await session.get(RefreshToken, claims["jti"])
    if token is None:
        raise Unauthorized(INVALID_TOKEN)
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        if token.used_at is None:  # revoked unused (a logout, a new password): just stale
            raise Unauthorized(INVALID_TOKEN)
        # Spent already: whoever holds it now is not the legitimate client.
        await revoke_family(session, token.family_id)
        logger.warning("refresh token reuse: family revoked", user_id=token.user_id)
        raise TokenReuse(token.user_id)
    user = await session.get(User, token.user_id)
    # Revoking the user's refresh tokens misses one that a login or a refresh under way
    # adds after the revoking UPDATE; the generation it was issued at gives it away. A
    # refresh token without the claim (an earlier release's) counts as generation 0,
    # every account's then: it is good until the user's sessions next end, so a deploy
    # signs nobody out.
    if (
        user is None
        or not user.is_active
        or claims.get(GENERATION_CLAIM, 0) != user.token_generation
    ):
        await session.rollback()
        raise Unauthorized(INVALID_TOKEN)
    return await issue_pair(session, codec, user, family_id=token.family_id)


async def logout(
    session: AsyncSession,
    codec: TokenCodec,
    revocations: Revocations,
    user: User,
    access_token: str,
    refresh_token: str,
) -> None:
    """Revoke the refresh token's family, and the access token for the rest of its life."""
    claims = codec.decode(refresh_token, TokenType.REFRESH)
    token = await session.get(RefreshToken, claims["jti"])
    if token is None or token.user_id != user.id:
        raise Unauthorized(INVALID_TOKEN)
    await revoke_family(session, token.family_id)
    access = codec.decode(access_token, TokenType.ACCESS)
    await revocations.revoke(access["jti"], max(1, int(access["exp"] - time.time())))


async def revoke_family(session: AsyncSession, family_id: str) -> None:
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    await session.commit()


async def revoke_all_for_user(session: AsyncSession, user_id: int) -> None:
    """Revoke every refresh token of a user; the caller commits with its own change."""
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.user_id == user_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )


# Built once: Session.get builds its SELECT, and computes that statement's cache key,
# anew on each call (~0.1 ms here), and this lookup runs on every authenticated request.
_USER_BY_ID = select(User).where(User.id == bindparam("user_id"))


async def user_from_access_claims(
    session: AsyncSession, revocations: Revocations, claims: dict[str, Any]
) -> User:
    """The active user of a verified access token (``TokenCodec.decode``), unless revoked
    or issued before the user's sessions were last ended (``User.token_generation``).
    Access tokens without the generation (issued by an earlier release) are refused too:
    clients refresh."""
    if await revocations.is_revoked(claims["jti"]):
        raise Unauthorized(INVALID_TOKEN)
    try:
        user_id = int(claims["sub"])
    except ValueError as exc:
        raise Unauthorized(INVALID_TOKEN) from exc
    user = await session.scalar(_USER_BY_ID, {"user_id": user_id})
    if (
        user is None
        or not user.is_active
        or claims.get(ACCOUNT_CLAIM) != _account_stamp(user)
        or claims.get(GENERATION_CLAIM) != user.token_generation
    ):
        raise Unauthorized(INVALID_TOKEN)
    return user


def _account_stamp(user: User) -> int:
    """Which account an access token was issued to, beyond its id: SQLite gives the next
    account the highest row id again once its holder is deleted (PostgreSQL never reuses
    one), and the deleted user's unexpired token must not pass for the new account. The
    creation time to the microsecond, compared exactly rather than with the token's iat:
    a clock comparison cannot tell apart accounts created in the same second, and it
    refuses a new account's tokens issued by a replica whose clock is behind."""
    return (user.created_at - EPOCH) // timedelta(microseconds=1)
