from datetime import datetime
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StrictBool,
    StringConstraints,
    model_validator,
)

from app.users.models import Role


def _lower(value: str) -> str:
    return value.lower()


# Usernames and e-mails are case-insensitive identities: stored lower-case, so "Alice"
# and "alice" cannot be two accounts and login matches either spelling.
Username = Annotated[
    str,
    StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z0-9_.-]{3,50}$"),
    AfterValidator(_lower),
]
MAX_EMAIL_CHARS = 320
Email = Annotated[EmailStr, Field(max_length=MAX_EMAIL_CHARS), AfterValidator(_lower)]
# The upper bound keeps a megabyte "password" from becoming a hashing DoS.
Password = Annotated[str, Field(min_length=8, max_length=128)]


class StrictModel(BaseModel):
    """Request bodies reject unknown fields: nothing can be mass-assigned by accident.

    Not pydantic's strict mode: bodies are validated as parsed JSON, where it would refuse
    every enum and decimal; instead booleans and integers are StrictBool and StrictInt,
    which pydantic would otherwise read from "no", "off", 0 or "1_0"."""

    model_config = ConfigDict(extra="forbid")


class UserCreate(StrictModel):
    email: Email
    username: Username
    password: Password


class UserRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    username: str
    role: Role
    is_superuser: bool
    is_active: bool
    created_at: datetime
    updated_at: datetime


# Update bodies: an omitted field is left alone (model_dump(exclude_unset=True)); an
# explicit null is a 422 because the field types do not admit None.
class UserSelfUpdate(StrictModel):
    email: Email = None  # type: ignore[assignment]
    username: Username = None  # type: ignore[assignment]
    password: Password = None  # type: ignore[assignment]
    current_password: str | None = Field(default=None, max_length=128)

    @model_validator(mode="after")
    def _password_change_needs_current(self) -> "UserSelfUpdate":
        if self.password is not None and not self.current_password:
            raise ValueError("current_password is required to change the password")
        return self


class UserAdminUpdate(StrictModel):
    email: Email = None  # type: ignore[assignment]
    username: Username = None  # type: ignore[assignment]
    password: Password = None  # type: ignore[assignment]
    role: Role = None  # type: ignore[assignment]
    is_superuser: StrictBool = None  # type: ignore[assignment]
    is_active: StrictBool = None  # type: ignore[assignment]
