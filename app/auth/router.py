from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request, Response, status
from fastapi.security import OAuth2PasswordRequestForm

from app.audit.deps import AuditDep
from app.auth import service
from app.auth.deps import CurrentUser, HasherDep, TokenCodecDep, access_claims, oauth2_scheme
from app.auth.schemas import LogoutRequest, RefreshRequest, TokenPair
from app.db import SessionDep, WithoutNul
from app.errors import Unauthorized
from app.observability.metrics import LOGINS
from app.rate_limits import (
    RateLimited,
    RatePolicyDep,
    account_budget,
    login_limit,
    register_limit,
)
from app.realtime.deps import RealtimeDep
from app.users.schemas import MAX_EMAIL_CHARS, UserCreate, UserRead

router = APIRouter(prefix="/auth", tags=["auth"])


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    response_model=UserRead,
    dependencies=[Depends(register_limit)],
)
async def register(
    data: UserCreate, session: SessionDep, hasher: HasherDep, audit: AuditDep
) -> object:
    user = await service.register(session, hasher, data)
    audit("user.registered", actor_id=user.id, subject_id=user.id)
    return user


async def checked_login_name(
    username: Annotated[str, Form(max_length=MAX_EMAIL_CHARS), WithoutNul],
) -> None:
    """The login name is looked up, counted against its account's failure budget and
    audited: no longer than an e-mail address can be, and without NUL (PostgreSQL cannot
    even compare one). Validated beside the OAuth2 form, which reads the same field."""


@router.post(
    "/token",
    response_model=TokenPair,
    dependencies=[Depends(login_limit), Depends(checked_login_name)],
)
async def login(
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    session: SessionDep,
    hasher: HasherDep,
    codec: TokenCodecDep,
    policy: RatePolicyDep,
    audit: AuditDep,
) -> TokenPair:
    """OAuth2 password flow; ``username`` may be the username or the e-mail address."""
    login = service.login_name(form.username)
    user = await service.find_account(session, login)
    try:
        async with policy.password_guess(account_budget(user and user.id, login)):
            user = await service.authenticate(session, hasher, user, form.password)
    except Unauthorized:
        # The name as typed is kept only when it names an account: otherwise it is often a
        # password typed into the wrong field, which the trail must not hold.
        if user is None:
            audit("login.failure", unknown_account=True)
        else:
            audit("login.failure", subject_id=user.id, login=login)
        raise
    except RateLimited:  # the account's failure budget is spent: no guess was checked
        LOGINS.labels("locked").inc()
        raise
    audit("login.success", actor_id=user.id, subject_id=user.id)
    return await service.issue_pair(session, codec, user)


@router.post("/refresh", response_model=TokenPair)
async def refresh(
    data: RefreshRequest, session: SessionDep, codec: TokenCodecDep, audit: AuditDep
) -> TokenPair:
    try:
        return await service.rotate(session, codec, data.refresh_token)
    except service.TokenReuse as reuse:
        audit("token.reuse_detected", subject_id=reuse.user_id)
        raise


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
async def logout(
    request: Request,
    token: Annotated[str, Depends(oauth2_scheme)],
    data: LogoutRequest,
    user: CurrentUser,
    session: SessionDep,
    codec: TokenCodecDep,
    realtime: RealtimeDep,
    audit: AuditDep,
) -> None:
    revocations = request.app.state.backends.revocations
    await service.logout(session, codec, revocations, user, token, data.refresh_token)
    # The sockets opened with this access token close too; the user's others stay.
    await realtime.end_sessions(user.id, access_claims(request, token)["jti"])
    audit("logout", actor_id=user.id, subject_id=user.id)
