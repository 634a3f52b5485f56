from datetime import datetime

from pydantic import BaseModel, ConfigDict

MAX_DESCRIPTION_CHARS = 500


class FileRead(BaseModel):
    """What clients see of a file: never the storage key."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    owner_id: int
    original_name: str
    content_type: str
    size: int
    sha256: str
    has_thumbnail: bool
    description: str | None
    created_at: datetime


class BatchItem(BaseModel):
    """One file of a batch: ``status`` is what its own upload would have answered."""

    filename: str
    status: int
    file: FileRead | None = None
    detail: str | None = None


class BatchRead(BaseModel):
    results: list[BatchItem]
