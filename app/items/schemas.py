from datetime import datetime
from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, StringConstraints

from app.users.schemas import StrictModel

Title = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Description = Annotated[str, Field(max_length=5000)]
# Stored exactly as a decimal; served as a JSON number, which is what clients compare.
Price = Annotated[
    Decimal,
    Field(gt=0, max_digits=12, decimal_places=2),
    PlainSerializer(float, return_type=float, when_used="json"),
]


class ItemCreate(StrictModel):
    title: Title
    description: Description | None = None
    price: Price
    is_available: bool = True


class ItemUpdate(StrictModel):
    # Same convention as the user update bodies: omitted = unchanged, null = 422 where
    # the column is required.
    title: Title = None  # type: ignore[assignment]
    description: Description | None = None
    price: Price = None  # type: ignore[assignment]
    is_available: bool = None  # type: ignore[assignment]


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
