from enum import StrEnum

from sqlalchemy import Enum, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, TimestampMixin


class Role(StrEnum):
    USER = "user"
    # Reserved for moderation features; in API v1 a moderator has a user's rights.
    MODERATOR = "moderator"
    ADMIN = "admin"


class Permission(StrEnum):
    MANAGE_USERS = "users:manage"
    MANAGE_ANY_ITEM = "items:manage-any"
    MANAGE_ANY_FILE = "files:manage-any"
    SEND_NOTIFICATIONS = "notifications:send"


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.USER: frozenset(),
    Role.MODERATOR: frozenset(),
    Role.ADMIN: frozenset(Permission),
}


def grants(role: Role, is_superuser: bool, permission: Permission) -> bool:
    return is_superuser or permission in ROLE_PERMISSIONS[role]


class User(TimestampMixin, Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    username: Mapped[str] = mapped_column(String(50), unique=True)
    hashed_password: Mapped[str] = mapped_column(String(255))
    role: Mapped[Role] = mapped_column(
        Enum(Role, native_enum=False, length=20, values_callable=lambda e: [m.value for m in e]),
        default=Role.USER,
    )
    is_superuser: Mapped[bool] = mapped_column(default=False)
    is_active: Mapped[bool] = mapped_column(default=True)
    # Raised by one whenever the user's sessions end (a new password or role, a
    # deactivation): every token carries the value it was issued at, and one that differs
    # is refused, so tokens issued before stop working at once, not when they expire. The
    # server default lets a release that does not know the column still add accounts.
    token_generation: Mapped[int] = mapped_column(default=0, server_default="0")

    def has_permission(self, permission: Permission) -> bool:
        return grants(self.role, self.is_superuser, permission)
