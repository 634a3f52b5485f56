"""WebSocket frames and notification bodies (DESIGN.md, "WebSocket wire format").

Client frames are a discriminated union on ``type`` with unknown fields forbidden, so a
typo is answered with an error frame instead of being silently ignored. Server frames are
models too: every replica serialises them the same way, and ``ts``/``id`` always have the
contract's shape (ISO 8601 UTC string, uuid4 hex string).
"""

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    TypeAdapter,
)

from app.db import MAX_ID
from app.text import SingleLine, Visible
from app.users.schemas import StrictModel, Username

MAX_FRAME_BYTES = 8 * 1024
# What the server buffers of one frame at most before it closes the socket with 1009
# (uvicorn's ws_max_size; its default, 16 MiB, is buffered whole before the app can
# refuse it, on sockets not yet authenticated too). Frames between the two limits get
# the app's own error frame.
SERVER_MAX_FRAME_BYTES = 2 * MAX_FRAME_BYTES
MAX_CONTENT_CHARS = 2000


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


# Not stripped: leading spaces may matter (code, poems); only all-blank content is refused.
Content = Annotated[
    str, Field(min_length=1, max_length=MAX_CONTENT_CHARS), AfterValidator(_not_blank)
]


class AuthFrame(StrictModel):
    """The browser's way to authenticate: browsers cannot set headers on a WebSocket."""

    type: Literal["auth"]
    token: str = Field(min_length=1)


class MessageFrame(StrictModel):
    type: Literal["message"]
    content: Content


class PrivateFrame(StrictModel):
    type: Literal["private"]
    to: Username
    content: Content


class PingFrame(StrictModel):
    type: Literal["ping"]


ClientFrame = MessageFrame | PrivateFrame | PingFrame
client_frame = TypeAdapter[ClientFrame](Annotated[ClientFrame, Field(discriminator="type")])


def new_id() -> str:
    return uuid.uuid4().hex


def now() -> datetime:
    return datetime.now(UTC)


class ServerFrame(BaseModel):
    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    def encode(self) -> bytes:
        """The form the broker and the history carry."""
        return self.to_json().encode()


class ChatMessage(ServerFrame):
    type: Literal["message"] = "message"
    room: str
    user: str
    content: str
    id: str = Field(default_factory=new_id)
    ts: datetime = Field(default_factory=now)


class PrivateMessage(ServerFrame):
    # "from" is a Python keyword: the attribute is sender, the wire name "from".
    model_config = ConfigDict(populate_by_name=True)

    type: Literal["private"] = "private"
    sender: str = Field(alias="from")
    content: str
    id: str = Field(default_factory=new_id)
    ts: datetime = Field(default_factory=now)


PresenceKind = Literal["join", "leave"]


class Presence(ServerFrame):
    type: PresenceKind
    room: str
    user: str
    ts: datetime = Field(default_factory=now)


class HistoryFrame(ServerFrame):
    type: Literal["history"] = "history"
    # Stored frames as decoded JSON: history written by any replica (or an older
    # release) is passed through as it was broadcast.
    messages: list[dict[str, Any]]


class Pong(ServerFrame):
    type: Literal["pong"] = "pong"


class Error(ServerFrame):
    type: Literal["error"] = "error"
    detail: str


class NotificationCreate(StrictModel):
    # Also an e-mail's subject: a line break in it would fail the mail after the 202.
    title: Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
        SingleLine,
        Visible,
    ]
    body: str = Field(default="", max_length=MAX_CONTENT_CHARS)
    # Absent: everyone connected to /ws/notifications receives it.
    user_id: Annotated[StrictInt, Field(ge=1, le=MAX_ID)] | None = None


class Notification(ServerFrame):
    type: Literal["notification"] = "notification"
    id: str = Field(default_factory=new_id)
    title: str
    body: str
    user_id: int | None
    ts: datetime = Field(default_factory=now)
