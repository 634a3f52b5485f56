"""Items: public to read (through the cache), changed only by their owner or a user with
MANAGE_ANY_ITEM; every committed change invalidates the cache before answering."""

import hashlib

from sqlalchemy import ColumnElement, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.conditional import etag_listed
from app.db import roll_back_failed_commit
from app.errors import AppError, Forbidden, NotFound, PreconditionFailed, Unauthorized
from app.items.cache import ItemCache
from app.items.models import Item
from app.items.schemas import ItemCreate, ItemRead, ItemUpdate, Preconditions
from app.pagination import Page, PageParams, fetch_page, matching
from app.users.models import Permission, User


def item_body(item: Item) -> bytes:
    return ItemRead.model_validate(item).model_dump_json().encode()


def etag(body: bytes) -> str:
    """A strong ETag: a digest of the exact bytes served, so it changes whenever any
    field does (updated_at included), and an item recreated under a reused id has
    another (its created_at differs)."""
    return f'"{hashlib.sha256(body).hexdigest()[:32]}"'


async def item_json(session: AsyncSession, item_id: int) -> bytes | None:
    item = await session.get(Item, item_id)
    return None if item is None else item_body(item)


async def page_json(session: AsyncSession, page: PageParams) -> bytes:
    items, total = await fetch_page(
        session, select(Item), Item.id, page, matching(page.q, Item.title, Item.description)
    )
    return Page[ItemRead].build(items, total, page).model_dump_json().encode()


async def create_item(
    session: AsyncSession, cache: ItemCache, owner: User, data: ItemCreate
) -> Item:
    item = Item(**data.model_dump(), owner_id=owner.id)
    session.add(item)
    try:
        await session.commit()
    except IntegrityError as exc:
        # The one constraint a validated item can break is its owner's foreign key: the
        # account was deleted while the request ran, as an upload's owner can be.
        await roll_back_failed_commit(session, exc)
        raise Unauthorized("The account no longer exists.") from exc
    await cache.invalidate(item.id)
    return item


async def update_item(
    session: AsyncSession,
    cache: ItemCache,
    actor: User,
    item_id: int,
    data: ItemUpdate,
    conditions: Preconditions,
) -> bytes:
    """Apply ``data`` and return the item's new body. With an ``If-Match`` that does not
    name the item's current ETag, or an ``If-None-Match`` that does (or is ``*``), a 412
    and nothing changes; neither: no check."""
    item = await _modifiable(session, actor, item_id)
    version = _matched_version(item, conditions)
    changes = data.model_dump(exclude_unset=True)
    if not changes:
        return item_body(item)
    saved = await session.scalar(
        update(Item).where(*version).values(**changes).returning(Item),
        execution_options={"populate_existing": True},
    )
    if saved is None:
        raise await _write_missed(session, item_id, version)
    await session.commit()
    await cache.invalidate(item_id)
    return item_body(saved)


async def delete_item(
    session: AsyncSession,
    cache: ItemCache,
    actor: User,
    item_id: int,
    conditions: Preconditions,
) -> None:
    """Delete the item; with an ``If-Match`` that does not name its current ETag, or an
    ``If-None-Match`` that does (or is ``*``), a 412 and nothing is deleted."""
    item = await _modifiable(session, actor, item_id)
    version = _matched_version(item, conditions)
    # One statement whose row count says whether this request deleted the item: the ORM's
    # delete only warns when a concurrent request deleted it first.
    deleted = await session.execute(delete(Item).where(*version))
    if deleted.rowcount == 0:  # type: ignore[attr-defined]
        raise await _write_missed(session, item_id, version)
    await session.commit()
    await cache.invalidate(item_id)


def _matched_version(item: Item, conditions: Preconditions) -> list[ColumnElement[bool]]:
    """The WHERE clause of a write to ``item`` that honours ``if_match``: a 412 when it
    names no current ETag; when it names one (not ``*``), the write applies only to the
    version checked, so no other writer can slip between the check and the write. A 412
    too when ``if_none_match`` names the current ETag or is ``*`` (RFC 9110 section
    13.1.2: the item exists)."""
    # Compared with the row just read from the database, never with the cached copy,
    # which may be older than the last write (its invalidation not yet done).
    current = etag(item_body(item))
    if_match, if_none_match = conditions.if_match, conditions.if_none_match
    if if_match is not None and not etag_listed(if_match, current, weak=False):
        raise _changed_meanwhile()
    # Weak comparison, as for a GET's If-None-Match. No clause for the write: a change
    # committed after this check gets an ETag (a new updated_at) no client has seen.
    if if_none_match is not None and etag_listed(if_none_match, current, weak=True):
        raise PreconditionFailed(
            "The item's current ETag is one the If-None-Match names (or it is *): nothing changed."
        )
    where = [Item.id == item.id]
    if if_match is not None and if_match.strip() != "*":
        # A write committed since the check set another updated_at (every write sets
        # it), so this one finds no row.
        where.append(Item.updated_at == item.updated_at)
    return where


async def _write_missed(
    session: AsyncSession, item_id: int, version: list[ColumnElement[bool]]
) -> AppError:
    """Why a write under ``version`` found no row: another request deleted the item since
    it was loaded (404) or, when the write was conditional (more than the id's clause),
    changed it (412)."""
    if len(version) > 1 and await session.scalar(select(Item.id).where(Item.id == item_id)):
        return _changed_meanwhile()
    return NotFound("Item not found.")


def _changed_meanwhile() -> PreconditionFailed:
    return PreconditionFailed(
        "The item has changed since the ETag in If-Match was read: fetch it again."
    )


async def owned_item_ids(session: AsyncSession, owner_id: int) -> list[int]:
    return list(await session.scalars(select(Item.id).where(Item.owner_id == owner_id)))


async def _modifiable(session: AsyncSession, actor: User, item_id: int) -> Item:
    item = await session.get(Item, item_id)
    if item is None:
        raise NotFound("Item not found.")
    if item.owner_id != actor.id and not actor.has_permission(Permission.MANAGE_ANY_ITEM):
        raise Forbidden("Only the owner or an admin can change this item.")
    return item
