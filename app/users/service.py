"""User management: self-service profile changes and admin administration.

Guard rails that a role check alone does not give: only a superuser can create, change
or delete a superuser; an admin cannot lock themselves out through the admin routes,
nor change their own password there without the current one; the last active superuser
cannot be demoted, deactivated or deleted; a password change, a deactivation or a role
change ends the user's sessions: their refresh tokens are revoked and every token issued
before is refused from then on (``User.token_generation``).
"""

from dataclasses import dataclass
from typing import Any, NoReturn

from sqlalchemy import ColumnElement, delete, exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.exc import StaleDataError

from app.auth.service import (
    commit_identity,
    ensure_identity_free,
    revoke_all_for_user,
)
from app.backends.storage import Storage
from app.db import roll_back_failed_commit
from app.errors import AppError, Conflict, Forbidden, NotFound, Unauthorized
from app.files.service import delete_blobs, owned_files
from app.items.cache import ItemCache
from app.items.service import owned_item_ids
from app.pagination import PageParams, fetch_page, matching
from app.security import PasswordHasher
from app.users.models import Permission, User, grants
from app.users.schemas import UserAdminUpdate, UserSelfUpdate


async def list_users(session: AsyncSession, page: PageParams) -> tuple[list[User], int]:
    return await fetch_page(
        session, select(User), User.id, page, matching(page.q, User.username, User.email)
    )


async def get_user(session: AsyncSession, user_id: int) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise NotFound("User not found.")
    return user


@dataclass(frozen=True, slots=True)
class Updated:
    """An updated user, and whether the change ended their sessions (a new password or
    role, a deactivation): their tokens are no longer accepted, those of the request that
    made the change included, and their sockets must close."""

    user: User
    sessions_ended: bool


async def update_self(
    session: AsyncSession, hasher: PasswordHasher, user: User, data: UserSelfUpdate
) -> Updated:
    changes = data.model_dump(exclude_unset=True, exclude={"current_password"})
    if "password" in changes:
        valid, _ = await hasher.verify_and_update(data.current_password or "", user.hashed_password)
        if not valid:
            raise WrongCurrentPassword("The current password is not correct.")
    return await _apply(
        session, hasher, user, changes, gone=Unauthorized("The account no longer exists.")
    )


class WrongCurrentPassword(Forbidden):
    """403, not 401: the request is authenticated; what it lacks is the old password."""


async def admin_update(
    session: AsyncSession, hasher: PasswordHasher, actor: User, user_id: int, data: UserAdminUpdate
) -> Updated:
    user = await get_user(session, user_id)
    changes = data.model_dump(exclude_unset=True)
    if (user.is_superuser or "is_superuser" in changes) and not actor.is_superuser:
        raise Forbidden("Only a superuser can change superuser accounts.")
    if user.id == actor.id and not _would_keep_user_management(user, changes):
        raise Conflict("You cannot remove your own administrative access.")
    if user.id == actor.id and "password" in changes:
        # /users/me asks for the current password, so that a stolen access token cannot
        # take the account over; an admin's must not do it here without one.
        raise Conflict("Change your own password through /users/me, with the current one.")
    lost = {flag: False for flag in ("is_superuser", "is_active") if changes.get(flag) is False}
    if user.is_superuser and lost:
        # Written here, under the guard; left in ``changes`` so that a deactivation still
        # ends the user's sessions (setting the value already written writes nothing).
        await _strip_superuser(session, user, lost)
    return await _apply(session, hasher, user, changes, gone=NotFound("User not found."))


async def _another_superuser_remains(session: AsyncSession, user: User) -> ColumnElement[bool]:
    """A condition for the statement that demotes, deactivates or deletes the superuser
    ``user``: an active superuser other than them remains. Only a superuser can grant the
    flag, so without one only the ``create-superuser`` command could.

    Checked by that statement itself, not by a read before it: two superusers demoting,
    deactivating or deleting each other at once both read the other as an active
    superuser, and both succeeded. On PostgreSQL the active superusers are locked here
    first, in id order (no deadlock), so the second request waits for the first and then
    sees its outcome; SQLite runs one writer at a time (and ignores FOR UPDATE)."""
    superusers = select(User.id).where(User.is_superuser, User.is_active)
    await session.execute(superusers.order_by(User.id).with_for_update())
    other = aliased(User)
    return exists().where(other.is_superuser, other.is_active, other.id != user.id)


async def _refuse(session: AsyncSession, user: User) -> NoReturn:
    """Why the guarded statement changed no row: ``user`` is gone, or is the last one."""
    if await session.scalar(select(User.id).where(User.id == user.id)) is None:
        raise NotFound("User not found.")
    raise Conflict("The last active superuser cannot be demoted, deactivated or deleted.")


async def _strip_superuser(session: AsyncSession, user: User, lost: dict[str, bool]) -> None:
    """Write ``lost`` (the flag, ``is_active`` or both set to False) for the superuser
    ``user`` in this transaction; 409 if no other active superuser would remain."""
    another_remains = await _another_superuser_remains(session, user)
    stripped = await session.execute(
        update(User)
        .where(User.id == user.id, another_remains)
        .values(lost)
        .returning(User.updated_at),
        # The ORM would evaluate the WHERE in Python to update loaded objects, which it
        # cannot do for EXISTS; ``user`` is updated below instead.
        execution_options={"synchronize_session": False},
    )
    updated_at = stripped.scalar_one_or_none()
    if updated_at is None:
        await _refuse(session, user)
    # Already written: the ORM must not see it as a pending change.
    for flag, value in lost.items():
        set_committed_value(user, flag, value)
    set_committed_value(user, "updated_at", updated_at)


def _would_keep_user_management(user: User, changes: dict[str, Any]) -> bool:
    return changes.get("is_active", user.is_active) and grants(
        changes.get("role", user.role),
        changes.get("is_superuser", user.is_superuser),
        Permission.MANAGE_USERS,
    )


async def delete_user(
    session: AsyncSession, item_cache: ItemCache, storage: Storage, actor: User, user_id: int
) -> None:
    user = await get_user(session, user_id)
    if user.id == actor.id:
        raise Conflict("You cannot delete your own account through the admin API.")
    if user.is_superuser and not actor.is_superuser:
        raise Forbidden("Only a superuser can delete a superuser account.")
    # Their items and files go with them (ON DELETE CASCADE): cached copies and stored
    # bytes must go too, after the commit (a crash in between leaves orphan bytes, never
    # a row without its bytes).
    item_ids = await owned_item_ids(session, user.id)
    files = await owned_files(session, user.id)
    # One statement whose row count says whether this request deleted the account: the
    # ORM's delete only warns when a concurrent request deleted it first. A superuser's
    # goes only while another active superuser remains.
    guard = [await _another_superuser_remains(session, user)] if user.is_superuser else []
    deleted = await session.execute(delete(User).where(User.id == user.id, *guard))
    if deleted.rowcount == 0:  # type: ignore[attr-defined]
        await _refuse(session, user)
    await session.commit()
    await item_cache.invalidate(*item_ids)
    await delete_blobs(storage, files)


async def _apply(
    session: AsyncSession,
    hasher: PasswordHasher,
    user: User,
    changes: dict[str, Any],
    *,
    gone: AppError,
) -> Updated:
    """Save ``changes``; ``gone`` is the answer when the user was deleted meanwhile."""
    await ensure_identity_free(
        session, email=changes.get("email"), username=changes.get("username"), exclude_id=user.id
    )
    ends_sessions = (
        "password" in changes
        or changes.get("is_active") is False
        or changes.get("role", user.role) != user.role
    )
    if "password" in changes:
        user.hashed_password = await hasher.hash(changes.pop("password"))
    if ends_sessions:
        await revoke_all_for_user(session, user.id)
        # Raised by the UPDATE itself, not from the value loaded: of two changes at once,
        # each raises it, so the tokens a login got between them are refused too. (The
        # attribute is expired by the flush; nothing reads it before the next load.)
        user.token_generation = User.token_generation + 1
    for field, value in changes.items():
        setattr(user, field, value)
    try:
        await commit_identity(session)
    except StaleDataError as exc:
        # The UPDATE found no row: the account was deleted since it was loaded.
        await roll_back_failed_commit(session, exc)
        raise gone from exc
    return Updated(user, ends_sessions)
