"""Access tokens revoked before they expire (logout), shared through Redis.

Refresh tokens are revoked in the database (app/auth/service.py); an access token is a
self-contained JWT, so logout adds its ``jti`` here until its own expiry. Without Redis
the list lives in the process. If Redis cannot be asked, the token is accepted: access
tokens live minutes, and the refresh token, the long-lived credential, is revoked in the
database regardless.
"""

import time
from typing import Protocol

from app.backends.redis import RedisBackend, RedisUnavailable
from app.observability.logging import get_logger

logger = get_logger(__name__)
PREFIX = "revoked:"


class Revocations(Protocol):
    async def revoke(self, jti: str, ttl_seconds: int) -> None: ...

    async def is_revoked(self, jti: str) -> bool: ...


class MemoryRevocations:
    def __init__(self) -> None:
        self.expiry: dict[str, float] = {}

    async def revoke(self, jti: str, ttl_seconds: int) -> None:
        now = time.monotonic()
        # Forget what has expired anyway, so the dict is bounded by live tokens.
        self.expiry = {key: until for key, until in self.expiry.items() if until > now}
        self.expiry[jti] = now + ttl_seconds

    async def is_revoked(self, jti: str) -> bool:
        return self.expiry.get(jti, 0.0) > time.monotonic()


class RedisRevocations:
    def __init__(self, redis: RedisBackend) -> None:
        self.redis = redis

    async def revoke(self, jti: str, ttl_seconds: int) -> None:
        try:
            await self.redis.call(lambda client: client.set(PREFIX + jti, 1, ex=ttl_seconds))
        except RedisUnavailable:
            logger.warning("access token not revoked: redis unavailable", jti=jti)

    async def is_revoked(self, jti: str) -> bool:
        try:
            return bool(await self.redis.call(lambda client: client.exists(PREFIX + jti)))
        except RedisUnavailable:
            return False
