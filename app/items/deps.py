from typing import Annotated

from fastapi import Depends, Header, Request

from app.conditional import joined
from app.items.cache import ItemCache
from app.items.schemas import Preconditions


async def get_item_cache(request: Request) -> ItemCache:
    return request.app.state.item_cache


ItemCacheDep = Annotated[ItemCache, Depends(get_item_cache)]


def write_preconditions(
    # Lists: each header may come on several lines (app.conditional.joined).
    if_match: Annotated[list[str] | None, Header()] = None,
    if_none_match: Annotated[list[str] | None, Header()] = None,
) -> Preconditions:
    return Preconditions(joined(if_match), joined(if_none_match))


PreconditionsDep = Annotated[Preconditions, Depends(write_preconditions)]
