"""Outgoing e-mail: SMTP when ``APP_SMTP_HOST`` is set, otherwise a log line.

Always sent from a background job (app/background.py): a slow or failing mail server
must not slow down or fail the request that caused the mail. A failure the server says is
temporary (a 4xx reply: greylisting, a full queue, a restart) or a connection that could
not be made or broke is retried with exponential backoff (stamina), up to
``APP_SMTP_SEND_ATTEMPTS`` attempts in all: otherwise one mail server restart lost every
mail sent meanwhile. A permanent refusal (5xx: unknown recipient, bad credentials) is not
retried.
"""

import asyncio
from email.message import EmailMessage
from typing import Annotated

import aiosmtplib
import stamina
from aiosmtplib import SMTPRecipientsRefused, SMTPResponseException
from fastapi import Depends, Request
from stamina.instrumentation import RetryDetails, set_on_retry_hooks

from app.observability.logging import get_logger
from app.settings import Settings

logger = get_logger(__name__)

# The first retry after about this long, then twice as long each time, at most
# RETRY_WAIT_MAX_SECONDS; plus up to RETRY_WAIT_JITTER_SECONDS at random, so that the
# workers that failed together do not all retry at the same instant.
RETRY_WAIT_INITIAL_SECONDS = 1.0
RETRY_WAIT_MAX_SECONDS = 30.0
RETRY_WAIT_JITTER_SECONDS = 1.0


def _temporary(exc: Exception) -> bool:
    """Whether a failed send may succeed later (RFC 5321: 4xx replies are transient)."""
    if isinstance(exc, SMTPRecipientsRefused):
        return all(400 <= refusal.code < 500 for refusal in exc.recipients)
    if isinstance(exc, SMTPResponseException):
        return 400 <= exc.code < 500
    # Refused, reset, timed out: SMTPConnectError, SMTPServerDisconnected, SMTPTimeoutError.
    return isinstance(exc, OSError)


def _log_retry(details: RetryDetails) -> None:
    # Rather than stamina's default hooks: they would add a metric of their own and log
    # the retried callable's arguments.
    logger.warning(
        "email not sent; retrying",
        attempt=details.retry_num,
        retry_in_seconds=round(details.wait_for, 1),
        error=f"{type(details.caused_by).__name__}: {details.caused_by}",
    )


set_on_retry_hooks([_log_retry])


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
        attempts = stamina.retry_context(
            on=_temporary,
            attempts=settings.smtp_send_attempts,
            timeout=None,  # the attempts bound it, each within APP_SMTP_TIMEOUT_SECONDS
            wait_initial=RETRY_WAIT_INITIAL_SECONDS,
            wait_max=RETRY_WAIT_MAX_SECONDS,
            wait_jitter=RETRY_WAIT_JITTER_SECONDS,
        )
        async for attempt in attempts:
            with attempt:
                # A connection slot per attempt, not held through the wait between two.
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
