"""Items: public to read (through the cache), changed only by their owner or a user with
MANAGE_ANY_ITEM; every committed change invalidates the cache before answering."""

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from app.db import roll_back_failed_commit
from app.errors import Forbidden, NotFound, Unauthorized
from app.items.cache import ItemCache
from app.items.models import Item
from app.items.schemas import ItemCreate, ItemRead, ItemUpdate
from app.pagination import Page, PageParams, fetch_page, matching
from app.users.models import Permission, User


async def item_json(session: AsyncSession, item_id: int) -> bytes | None:
    item = await session.get(Item, item_id)
    return None if item is None else ItemRead.model_validate(item).model_dump_json().encode()


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
    session: AsyncSession, cache: ItemCache, actor: User, item_id: int, data: ItemUpdate
) -> Item:
    item = await _modifiable(session, actor, item_id)
    for field, value in data.model_dump(exclude_unset=True).items():
        setattr(item, field, value)
    try:
        await session.commit()
    except StaleDataError as exc:
        # The UPDATE found no row: another request deleted the item since it was loaded.
        await roll_back_failed_commit(session, exc)
        raise NotFound("Item not found.") from exc
    await cache.invalidate(item.id)
    return item


async def delete_item(session: AsyncSession, cache: ItemCache, actor: User, item_id: int) -> None:
    await _modifiable(session, actor, item_id)
    # One statement whose row count says whether this request deleted the item: the ORM's
    # delete only warns when a concurrent request deleted it first.
    deleted = await session.execute(delete(Item).where(Item.id == item_id))
    await session.commit()
    if deleted.rowcount == 0:  # type: ignore[attr-defined]
        raise NotFound("Item not found.")
    await cache.invalidate(item_id)


async def owned_item_ids(session: AsyncSession, owner_id: int) -> list[int]:
    return list(await session.scalars(select(Item.id).where(Item.owner_id == owner_id)))


async def _modifiable(session: AsyncSession, actor: User, item_id: int) -> Item:
    item = await session.get(Item, item_id)
    if item is None:
        raise NotFound("Item not found.")
    if item.owner_id != actor.id and not actor.has_permission(Permission.MANAGE_ANY_ITEM):
        raise Forbidden("Only the owner or an admin can change this item.")
    return item
