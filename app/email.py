"""Outgoing e-mail: SMTP when ``APP_SMTP_HOST`` is set, otherwise a log line.

Always sent from a background job (app/background.py): a slow or failing mail server
must not slow down or fail the request that caused the mail.
"""

import asyncio
from email.message import EmailMessage
from typing import Annotated

import aiosmtplib
from fastapi import Depends, Request

from app.observability.logging import get_logger
from app.settings import Settings

logger = get_logger(__name__)


class Mailer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connections = asyncio.Semaphore(settings.smtp_max_connections)

    async def send(self, to: str, subject: str, body: str) -> str | None:
        """Deliver the mail; the outcome ``skipped`` when there is no server to send to."""
        settings = self.settings
        if settings.smtp_host is None:
            logger.info("email not sent: SMTP is not configured", to=to, subject=subject)
            return "skipped"
        message = EmailMessage()
        message["From"] = settings.smtp_from
        message["To"] = to
        message["Subject"] = subject
        message.set_content(body)
        async with self.connections:
            await aiosmtplib.send(
                message,
                hostname=settings.smtp_host,
                port=settings.smtp_port,
                start_tls=settings.smtp_starttls,
                username=settings.smtp_username,
                password=settings.smtp_password.get_secret_value()
                if settings.smtp_password
                else None,
                timeout=settings.smtp_timeout_seconds,
            )
        return None


async def get_mailer(request: Request) -> Mailer:
    return request.app.state.mailer


MailerDep = Annotated[Mailer, Depends(get_mailer)]
