import contextlib

from fastapi import APIRouter, Response, status
from pydantic import BaseModel

from app.audit.deps import AuditDep
from app.auth.deps import CurrentUser, HasherDep, SelfOrUserManager, UserManager
from app.db import IdPath, SessionDep
from app.files.deps import StorageDep
from app.items.deps import ItemCacheDep
from app.pagination import Page, PageParamsDep
from app.rate_limits import RatePolicyDep, account_budget
from app.realtime.deps import RealtimeDep
from app.users import service
from app.users.schemas import UserAdminUpdate, UserRead, UserSelfUpdate

router = APIRouter(prefix="/users", tags=["users"])


@router.get("/me", response_model=UserRead)
async def read_me(user: CurrentUser) -> object:
    return user


@router.patch("/me", response_model=UserRead)
async def update_me(
    data: UserSelfUpdate,
    user: CurrentUser,
    session: SessionDep,
    hasher: HasherDep,
    policy: RatePolicyDep,
    realtime: RealtimeDep,
    audit: AuditDep,
) -> object:
    # A password change checks the current one: a guess like a login's, from the same
    # budget, so a stolen access token cannot be used to guess the password.
    guess = (
        policy.password_guess(account_budget(user.id, user.username))
        if "password" in data.model_fields_set
        else contextlib.nullcontext()
    )
    async with guess:
        updated = await service.update_self(session, hasher, user, data)
    if updated.sessions_ended:
        await realtime.end_sessions(user.id)
    if fields := changed_fields(data):
        audit("user.updated", actor_id=user.id, subject_id=user.id, fields=fields)
    return updated.user


@router.get("", response_model=Page[UserRead])
async def list_users(_: UserManager, session: SessionDep, page: PageParamsDep) -> Page[UserRead]:
    users, total = await service.list_users(session, page)
    return Page[UserRead].build(users, total, page)


@router.get("/{user_id}", response_model=UserRead)
async def read_user(user_id: IdPath, _: SelfOrUserManager, session: SessionDep) -> object:
    return await service.get_user(session, user_id)


@router.patch("/{user_id}", response_model=UserRead)
async def update_user(
    user_id: IdPath,
    data: UserAdminUpdate,
    actor: UserManager,
    session: SessionDep,
    hasher: HasherDep,
    realtime: RealtimeDep,
    audit: AuditDep,
) -> object:
    updated = await service.admin_update(session, hasher, actor, user_id, data)
    if updated.sessions_ended:
        await realtime.end_sessions(user_id)
    if fields := changed_fields(data):
        audit(
            "user.updated",
            actor_id=actor.id,
            subject_id=user_id,
            fields=fields,
            role=updated.user.role.value,
            is_active=updated.user.is_active,
            is_superuser=updated.user.is_superuser,
        )
    return updated.user


@router.delete("/{user_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
async def delete_user(
    user_id: IdPath,
    actor: UserManager,
    session: SessionDep,
    item_cache: ItemCacheDep,
    storage: StorageDep,
    realtime: RealtimeDep,
    audit: AuditDep,
) -> None:
    await service.delete_user(session, item_cache, storage, actor, user_id)
    await realtime.end_sessions(user_id)
    audit("user.deleted", actor_id=actor.id, subject_id=user_id)


def changed_fields(data: BaseModel) -> list[str]:
    # Names only: the values may be a password. An empty body (or only current_password)
    # changes nothing, and an event for it would be noise in the trail.
    return sorted(data.model_dump(exclude_unset=True, exclude={"current_password"}))
