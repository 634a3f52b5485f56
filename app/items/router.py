from fastapi import APIRouter, status

from app.auth.deps import CurrentUser
from app.db import IdPath, SessionDep
from app.items import service
from app.items.schemas import ItemCreate, ItemRead, ItemUpdate
from app.pagination import Page, PageParamsDep

router = APIRouter(prefix="/items", tags=["items"])


@router.get("", response_model=Page[ItemRead])
async def list_items(session: SessionDep, page: PageParamsDep) -> Page[ItemRead]:
    items, total = await service.list_items(session, page)
    return Page[ItemRead].build(items, total, page)


@router.get("/{item_id}", response_model=ItemRead)
async def read_item(item_id: IdPath, session: SessionDep) -> object:
    return await service.get_item(session, item_id)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ItemRead)
async def create_item(data: ItemCreate, user: CurrentUser, session: SessionDep) -> object:
    return await service.create_item(session, user, data)


@router.patch("/{item_id}", response_model=ItemRead)
async def update_item(
    item_id: IdPath, data: ItemUpdate, user: CurrentUser, session: SessionDep
) -> object:
    return await service.update_item(session, user, item_id, data)


@router.delete("/{item_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_item(item_id: IdPath, user: CurrentUser, session: SessionDep) -> None:
    await service.delete_item(session, user, item_id)
