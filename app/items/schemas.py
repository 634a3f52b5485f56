import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    StringConstraints,
)

from app.db import WithoutNul
from app.text import Visible
from app.users.schemas import StrictModel

Title = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    WithoutNul,
    Visible,
]
Description = Annotated[str, Field(max_length=5000), WithoutNul]


def _price_input(value: object) -> object:
    # A JSON number, or a plain decimal string ("19.99", as money is often sent): pydantic
    # would also read "1_000", " 5 " or other scripts' digits, and True, as numbers.
    if isinstance(value, bool) or (isinstance(value, str) and not _DECIMAL.fullmatch(value)):
        raise ValueError('Input should be a number or a decimal string such as "19.99"')
    return value


_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")


# Stored exactly as a decimal; served as a JSON number, which is what clients compare.
Price = Annotated[
    Decimal,
    BeforeValidator(_price_input),
    Field(gt=0, max_digits=12, decimal_places=2),
    PlainSerializer(float, return_type=float, when_used="json"),
]


class ItemCreate(StrictModel):
    title: Title
    description: Description | None = None
    price: Price
    is_available: StrictBool = True


class ItemUpdate(StrictModel):
    # Same convention as the user update bodies: omitted = unchanged, null = 422 where
    # the column is required.
    title: Title = None  # type: ignore[assignment]
    description: Description | None = None
    price: Price = None  # type: ignore[assignment]
    is_available: StrictBool = None  # type: ignore[assignment]


class ItemRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str
    description: str | None
    price: Price
    is_available: bool
    owner_id: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Preconditions:
    """A write's conditional headers (RFC 9110 section 13.1), as the client sent them."""

    if_match: str | None = None
    if_none_match: str | None = None
