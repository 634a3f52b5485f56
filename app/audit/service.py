"""Recording audit events, in their own session: they run after the request's session
has been closed (see app/background.py), and a failed write must not undo the request."""

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.audit.models import AuditEvent


async def record(
    sessionmaker: async_sessionmaker[AsyncSession],
    event: str,
    *,
    actor_id: int | None = None,
    subject_id: int | None = None,
    client_ip: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    async with sessionmaker() as session:
        session.add(
            AuditEvent(
                event=event,
                actor_id=actor_id,
                subject_id=subject_id,
                client_ip=client_ip,
                details=details,
            )
        )
        await session.commit()
