"""Items: public to read, changed only by their owner or a user with MANAGE_ANY_ITEM."""

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import Forbidden, NotFound
from app.items.models import Item
from app.items.schemas import ItemCreate, ItemUpdate
from app.pagination import PageParams, fetch_page, matching
from app.users.models import Permission, User


async def list_items(session: AsyncSession, page: PageParams) -> tuple[list[Item], int]:
    return await fetch_page(
        session, select(Item), Item.id, page, matching(page.q, Item.title, Item.description)
    )


async def get_item(session: AsyncSession, item_id: int) -> Item:
    item = await session.get(Item, item_id)
    if item is None:
        raise NotFound("Item not found.")
    return item


async def create_item(session: AsyncSession, owner: User, data: ItemCreate) -> Item:
    item = Item(**data.model_dump(), owner_id=owner.id)
    session.add(item)
    await session.commit()
    return item


async def update_item(session: AsyncSession, actor: User, item_id: int, data: ItemUpdate) -> Item:
    item = await _modifiable(session, actor, item_id)
    for field, value in data.model_dump(exclude_unset=True).items():
        setattr(item, field, value)
    await session.commit()
    return item


async def delete_item(session: AsyncSession, actor: User, item_id: int) -> None:
    item = await _modifiable(session, actor, item_id)
    await session.delete(item)
    await session.commit()


async def _modifiable(session: AsyncSession, actor: User, item_id: int) -> Item:
    item = await get_item(session, item_id)
    if item.owner_id != actor.id and not actor.has_permission(Permission.MANAGE_ANY_ITEM):
        raise Forbidden("Only the owner or an admin can change this item.")
    return item
