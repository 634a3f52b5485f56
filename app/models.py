"""Every domain's tables, imported in one place so ``Base.metadata`` is complete for
Alembic and for the schema-drift test."""

from app.audit.models import AuditEvent
from app.auth.models import RefreshToken
from app.backends.models import CacheEpoch
from app.db import Base
from app.files.models import StoredFile
from app.items.models import Item
from app.users.models import Role, User

__all__ = ["AuditEvent", "Base", "CacheEpoch", "Item", "RefreshToken", "Role", "StoredFile", "User"]
