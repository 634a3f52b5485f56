from fastapi import APIRouter, Request, Response, status

from app.auth.deps import CurrentUser
from app.conditional import precondition
from app.db import IdPath, SessionDep
from app.errors import NotFound, PreconditionFailed
from app.items import service
from app.items.deps import ItemCacheDep, PreconditionsDep
from app.items.schemas import ItemCreate, ItemRead, ItemUpdate
from app.pagination import Page, PageParamsDep

router = APIRouter(prefix="/items", tags=["items"])

# The conditional answers (RFC 9110 section 13), for the OpenAPI document.
NOT_MODIFIED: dict[int | str, dict[str, object]] = {
    304: {"description": "If-None-Match names the item's current ETag: no body"}
}
STALE: dict[int | str, dict[str, object]] = {
    412: {
        "description": "If-Match names no current ETag of the item: nothing changed",
        "content": {"application/problem+json": {}},
    }
}
# Of a PATCH or DELETE, which also take If-None-Match (RFC 9110 section 13.1.2).
STALE_WRITE: dict[int | str, dict[str, object]] = {
    412: {
        "description": "If-Match names no current ETag of the item, or If-None-Match names "
        "it or is `*`: nothing changed",
        "content": {"application/problem+json": {}},
    }
}


def json_bytes(
    body: bytes, status_code: int = status.HTTP_200_OK, headers: dict[str, str] | None = None
) -> Response:
    # Cached reads are already-serialised JSON: returned as they are, not re-encoded.
    return Response(body, status_code, headers, media_type="application/json")


def item_response(
    body: bytes, status_code: int = status.HTTP_200_OK, headers: dict[str, str] | None = None
) -> Response:
    # The ETag is that of these bytes, so a client's If-Match names what it was sent.
    return json_bytes(body, status_code, {"ETag": service.etag(body)} | (headers or {}))


@router.get("", response_model=Page[ItemRead])
async def list_items(session: SessionDep, cache: ItemCacheDep, page: PageParamsDep) -> Response:
    return json_bytes(
        await cache.page(page.skip, page.limit, page.q, lambda: service.page_json(session, page))
    )


@router.get("/{item_id}", response_model=ItemRead, responses=NOT_MODIFIED | STALE)
async def read_item(
    item_id: IdPath, session: SessionDep, cache: ItemCacheDep, request: Request
) -> Response:
    body = await cache.item(item_id, lambda: service.item_json(session, item_id))
    if body is None:
        raise NotFound("Item not found.")
    # The ETag of the bytes this answer would send, cached or not: a 304 only ever says
    # the client holds exactly them. Items have no Last-Modified (a second's resolution
    # would hide changes), so only the ETag conditions apply.
    tag = service.etag(body)
    decision = precondition(request.headers, request.method, tag, None)
    if decision == status.HTTP_412_PRECONDITION_FAILED:
        raise PreconditionFailed("The item's current ETag is not one the If-Match names.")
    if decision == status.HTTP_304_NOT_MODIFIED:
        # No body; Cache-Control and Vary are added by the middleware as to the 200.
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": tag})
    return json_bytes(body, headers={"ETag": tag})


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ItemRead)
async def create_item(
    data: ItemCreate, user: CurrentUser, session: SessionDep, cache: ItemCacheDep, request: Request
) -> Response:
    item = await service.create_item(session, cache, user, data)
    # A path, not a URL built from the Host header the client chose. Content-Location
    # says the body is that item's representation, so the ETag is the one its GET gives.
    url = f"{request.url.path}/{item.id}"
    return item_response(
        service.item_body(item), status.HTTP_201_CREATED, {"Location": url, "Content-Location": url}
    )


@router.patch("/{item_id}", response_model=ItemRead, responses=STALE_WRITE)
async def update_item(
    item_id: IdPath,
    data: ItemUpdate,
    user: CurrentUser,
    session: SessionDep,
    cache: ItemCacheDep,
    conditions: PreconditionsDep,
) -> Response:
    return item_response(await service.update_item(session, cache, user, item_id, data, conditions))


@router.delete(
    "/{item_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=STALE_WRITE,
)
async def delete_item(
    item_id: IdPath,
    user: CurrentUser,
    session: SessionDep,
    cache: ItemCacheDep,
    conditions: PreconditionsDep,
) -> None:
    await service.delete_item(session, cache, user, item_id, conditions)
