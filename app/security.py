"""Password hashing (pwdlib, Argon2id) and JWT issue/verify (PyJWT).

Hashing costs tens of milliseconds of CPU and ~19 MiB of memory each, so it runs in
worker threads behind a limiter sized to the CPU count: the event loop keeps serving,
and a login storm cannot allocate unbounded memory.
"""

import os
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import anyio
import jwt
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from app.errors import Unauthorized
from app.settings import Settings

# A fixed allow-list: the algorithm in a token's header is never trusted, which rules
# out "alg: none" and key-confusion attacks.
JWT_ALGORITHMS = ["HS256"]
REQUIRED_CLAIMS = ["exp", "iat", "sub", "jti", "iss", "aud", "type"]
# How far the clocks of the replicas (and workers) that issue and check a token may
# differ: a token issued by a replica whose clock is ahead is otherwise "not yet valid"
# (its iat in the future) wherever the clock is behind. Expiry gets the same margin.
CLOCK_SKEW_LEEWAY = timedelta(seconds=5)


class PasswordHasher:
    def __init__(self, settings: Settings) -> None:
        self._hash = PasswordHash(
            [
                Argon2Hasher(
                    memory_cost=settings.argon2_memory_kib,
                    time_cost=settings.argon2_time_cost,
                    parallelism=settings.argon2_parallelism,
                )
            ]
        )
        self._limiter = anyio.CapacityLimiter(os.cpu_count() or 1)
        self._dummy_hash: str | None = None

    async def hash(self, password: str) -> str:
        return await anyio.to_thread.run_sync(self._hash.hash, password, limiter=self._limiter)

    async def verify_and_update(self, password: str, hashed: str) -> tuple[bool, str | None]:
        """Check a password; the second value is a new hash when the stored one is outdated."""
        return await anyio.to_thread.run_sync(
            self._hash.verify_and_update, password, hashed, limiter=self._limiter
        )

    async def dummy_verify(self, password: str) -> None:
        """Spend the same work as a real check, so unknown accounts are not revealed by timing."""
        if self._dummy_hash is None:
            self._dummy_hash = await self.hash(secrets.token_urlsafe(16))
        await self.verify_and_update(password, self._dummy_hash)


class TokenType(StrEnum):
    ACCESS = "access"
    REFRESH = "refresh"


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    jti: str
    expires_at: datetime


class TokenCodec:
    def __init__(self, settings: Settings) -> None:
        self._key = settings.signing_key()
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._ttl = {
            TokenType.ACCESS: timedelta(seconds=settings.access_token_ttl_seconds),
            TokenType.REFRESH: timedelta(seconds=settings.refresh_token_ttl_seconds),
        }

    def ttl_seconds(self, token_type: TokenType) -> int:
        return int(self._ttl[token_type].total_seconds())

    def issue(
        self, subject: str, token_type: TokenType, extra: dict[str, Any] | None = None
    ) -> IssuedToken:
        now = datetime.now(UTC)
        expires_at = now + self._ttl[token_type]
        jti = uuid.uuid4().hex
        claims = {
            **(extra or {}),
            "sub": subject,
            "iss": self._issuer,
            "aud": self._audience,
            "iat": now,
            "exp": expires_at,
            "jti": jti,
            "type": token_type.value,
        }
        token = jwt.encode(claims, self._key, algorithm=JWT_ALGORITHMS[0])
        return IssuedToken(token=token, jti=jti, expires_at=expires_at)

    def decode(self, token: str, expected: TokenType) -> dict[str, Any]:
        """Verify signature, expiry, issuer, audience and type; Unauthorized otherwise."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=JWT_ALGORITHMS,
                audience=self._audience,
                issuer=self._issuer,
                leeway=CLOCK_SKEW_LEEWAY,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized("Invalid or expired token.") from exc
        if claims.get("type") != expected.value:
            raise Unauthorized("Invalid or expired token.")
        return claims
