from typing import Annotated, Any

from fastapi import Depends, Request

from app.audit.service import record
from app.background import BackgroundJobs


class Auditor:
    """Records an event of this request in the background (actor, subject, client ip)."""

    def __init__(self, request: Request) -> None:
        self.jobs: BackgroundJobs = request.app.state.jobs
        self.sessionmaker = request.app.state.sessionmaker
        self.client_ip = request.client.host if request.client else None

    def __call__(
        self,
        event: str,
        *,
        actor_id: int | None = None,
        subject_id: int | None = None,
        **details: Any,
    ) -> None:
        self.jobs.spawn(
            "audit",
            record(
                self.sessionmaker,
                event,
                actor_id=actor_id,
                subject_id=subject_id,
                client_ip=self.client_ip,
                details=details or None,
            ),
        )


AuditDep = Annotated[Auditor, Depends(Auditor)]
