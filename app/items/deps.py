from typing import Annotated

from fastapi import Depends, Request

from app.items.cache import ItemCache


async def get_item_cache(request: Request) -> ItemCache:
    return request.app.state.item_cache


ItemCacheDep = Annotated[ItemCache, Depends(get_item_cache)]
