from typing import Literal

from pydantic import BaseModel, Field

from app.users.schemas import StrictModel

JwtString = Field(min_length=1, max_length=4096)


class TokenPair(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth2 token type
    expires_in: int


class RefreshRequest(StrictModel):
    refresh_token: str = JwtString


class LogoutRequest(StrictModel):
    refresh_token: str = JwtString
