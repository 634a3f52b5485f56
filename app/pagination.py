"""The list envelope every collection endpoint answers with, its query parameters, and
the one query helper that fills it (a page in a stable order, and the total)."""

from collections.abc import Sequence
from typing import Annotated, Any, Generic, Self, TypeVar

from fastapi import Depends, Query
from pydantic import BaseModel
from sqlalchemy import ColumnElement, Select, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from app.db import WithoutNul

MAX_PAGE_SIZE = 100

T = TypeVar("T")
M = TypeVar("M")


class PageParams(BaseModel):
    skip: int
    limit: int
    q: str | None


async def page_params(
    skip: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 20,
    q: Annotated[str | None, Query(min_length=1, max_length=100), WithoutNul] = None,
) -> PageParams:
    return PageParams(skip=skip, limit=limit, q=q)


PageParamsDep = Annotated[PageParams, Depends(page_params)]


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    skip: int
    limit: int

    @classmethod
    def build(cls, items: Sequence[Any], total: int, params: PageParams) -> Self:
        return cls.model_validate(
            {"items": items, "total": total, "skip": params.skip, "limit": params.limit},
            from_attributes=True,
        )


def matching(q: str | None, *columns: InstrumentedAttribute[Any]) -> ColumnElement[bool] | None:
    """Case-insensitive substring search; LIKE wildcards in ``q`` match literally."""
    if not q:
        return None
    return or_(*(column.icontains(q, autoescape=True) for column in columns))


async def fetch_page(
    session: AsyncSession,
    query: Select[tuple[M]],
    order_by: InstrumentedAttribute[Any],
    params: PageParams,
    search: ColumnElement[bool] | None = None,
) -> tuple[list[M], int]:
    """One page of ``query`` and the number of rows it has in all, from one statement: as
    two, a row written between them made a page hold more rows than its total said."""
    if search is not None:
        query = query.where(search)
    page = query.add_columns(func.count().over()).order_by(order_by)
    rows = (await session.execute(page.offset(params.skip).limit(params.limit))).all()
    if rows:
        return [row[0] for row in rows], rows[0][1]
    if params.skip == 0:
        return [], 0
    # Past the last page: no row to carry the count.
    total = await session.scalar(select(func.count()).select_from(query.subquery()))
    return [], total or 0
