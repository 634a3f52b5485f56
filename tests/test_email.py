"""E-mail goes to a real SMTP server (aiosmtpd on a free port) when one is configured."""

import asyncio
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from app.email import Mailer
from app.settings import Settings
from tests.services import free_port


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages.append(message_from_bytes(envelope.content))  # type: ignore[arg-type]
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def test_mail_is_delivered_over_smtp(smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        smtp_host="127.0.0.1",
        smtp_port=port,
        smtp_starttls=False,
        smtp_from="ops@example.com",
    )
    asyncio.run(Mailer(settings).send("alice@example.com", "Maintenance", "Tonight at 22:00."))
    [message] = inbox.messages
    assert message["To"] == "alice@example.com"
    assert message["From"] == "ops@example.com"
    assert message["Subject"] == "Maintenance"
    assert message.get_payload(decode=True).decode().strip() == "Tonight at 22:00."


def test_without_smtp_the_mail_is_only_logged(smtp: tuple[Inbox, int]) -> None:
    inbox, _ = smtp
    asyncio.run(Mailer(Settings(_env_file=None)).send("a@example.com", "Hi", "x"))  # type: ignore[call-arg]
    assert inbox.messages == []
