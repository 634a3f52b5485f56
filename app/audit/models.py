from datetime import datetime
from typing import Any

from sqlalchemy import JSON, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, utcnow


class AuditEvent(Base):
    """A security-relevant event: who did what to whom, from where, and when."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(50), index=True)
    # Ids, not foreign keys: the record of who did what to whom outlives both accounts. A
    # key would have to forget a deleted actor (SET NULL) or their events (CASCADE), and
    # would refuse the event of an actor deleted before its background write.
    actor_id: Mapped[int | None]
    subject_id: Mapped[int | None]
    client_ip: Mapped[str | None] = mapped_column(String(45))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
