"""Who is limited how much: the rate-limit policy as FastAPI dependencies.

Identity is the authenticated user when the request carries a valid access token, else
the client address — which uvicorn/gunicorn already took from ``X-Forwarded-For`` only
when the peer is a trusted proxy (``APP_FORWARDED_ALLOW_IPS``); headers are never read
here, so a client cannot choose its own identity.

While Redis is unreachable, general traffic is limited per process with the normal
numbers (fail open, still bounded); login and registration use the stricter
``APP_RATE_LIMIT_AUTH_FALLBACK`` per process, because they are what an attacker would
aim at while the shared counters are gone.
"""

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

import limits
from fastapi import Depends
from limits import RateLimitItem
from starlette.requests import HTTPConnection

from app.auth.deps import access_claims
from app.backends.ratelimit import Decision, RateLimiter
from app.errors import AppError, Unauthorized
from app.observability.metrics import RATE_LIMIT_REJECTIONS
from app.settings import Settings


class RateLimited(AppError):
    status_code = 429

    def __init__(self, decision: Decision) -> None:
        reset = str(decision.reset_after_seconds)
        super().__init__(
            "Too many requests; retry later.",
            headers={
                "Retry-After": reset,
                "RateLimit-Limit": str(decision.limit),
                "RateLimit-Remaining": str(max(decision.remaining, 0)),
                "RateLimit-Reset": reset,
            },
        )


@dataclass(frozen=True)
class Limits:
    default: RateLimitItem
    login: RateLimitItem
    login_failures: RateLimitItem
    register: RateLimitItem
    uploads: RateLimitItem
    auth_fallback: RateLimitItem
    chat_messages: RateLimitItem

    @classmethod
    def from_settings(cls, settings: Settings) -> "Limits":
        return cls(
            default=limits.parse(settings.rate_limit_default),
            login=limits.parse(settings.rate_limit_login),
            login_failures=limits.parse(settings.rate_limit_login_failures),
            register=limits.parse(settings.rate_limit_register),
            uploads=limits.parse(settings.rate_limit_uploads),
            auth_fallback=limits.parse(settings.rate_limit_auth_fallback),
            chat_messages=limits.parse(settings.rate_limit_chat_messages),
        )


class RatePolicy:
    def __init__(self, limiter: RateLimiter, settings: Settings) -> None:
        self.limiter = limiter
        self.limits = Limits.from_settings(settings)

    async def enforce(
        self,
        name: str,
        item: RateLimitItem,
        identity: str,
        fallback: RateLimitItem | None = None,
    ) -> None:
        decision = await self.limiter.hit(item, name, identity, fallback=fallback)
        if not decision.allowed:
            RATE_LIMIT_REJECTIONS.labels(name).inc()
            raise RateLimited(decision)

    @contextlib.asynccontextmanager
    async def password_guess(self, account: str) -> AsyncIterator[None]:
        """One guess at an account's password (the block verifies it, and raises when it is
        not the password). Counted before it is checked, so that guesses sent together
        cannot all be checked before the first failure is counted: at most the budget's
        worth are ever checked, and once it is spent they are refused unchecked. A block
        that completes (the right password) clears the count, so an account's own logins
        never lock it out; any exception leaves the guess counted, as a request cancelled
        mid-check must not refund it. ``account``: ``account_budget``'s key."""
        budget = self.limits.login_failures
        decision = await self.limiter.hit(budget, "login-failures", account)
        if not decision.allowed:
            RATE_LIMIT_REJECTIONS.labels("login-failures").inc()
            raise RateLimited(decision)
        yield
        await self.limiter.clear(budget, "login-failures", account)


def account_budget(user_id: int | None, login: str) -> str:
    """Whose failure budget a password guess spends: the account's, whichever name or
    address it was given by, else (no such account) the name given."""
    return f"user:{user_id}" if user_id is not None else f"login:{login}"


async def get_rate_policy(request: HTTPConnection) -> RatePolicy:
    return request.app.state.rate_policy


RatePolicyDep = Annotated[RatePolicy, Depends(get_rate_policy)]


def client_address(request: HTTPConnection) -> str:
    return request.client.host if request.client else "unknown"


def caller_identity(request: HTTPConnection) -> str:
    """The user id from a valid access token, else the client address."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        try:
            claims = access_claims(request, token)
        except Unauthorized:
            pass
        else:
            return f"user:{claims['sub']}"
    return f"ip:{client_address(request)}"


async def default_limit(request: HTTPConnection, policy: RatePolicyDep) -> None:
    await policy.enforce("default", policy.limits.default, caller_identity(request))


async def login_limit(request: HTTPConnection, policy: RatePolicyDep) -> None:
    await policy.enforce(
        "login", policy.limits.login, client_address(request), policy.limits.auth_fallback
    )


async def register_limit(request: HTTPConnection, policy: RatePolicyDep) -> None:
    await policy.enforce(
        "register", policy.limits.register, client_address(request), policy.limits.auth_fallback
    )
