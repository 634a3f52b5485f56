"""E-mail goes to a real SMTP server (aiosmtpd on a free port) when one is configured."""

import asyncio
import contextlib
import io
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from pathlib import Path

import aiosmtplib
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from app.background import BackgroundJobs
from app.email import Mailer
from app.main import create_app
from app.settings import Settings
from deploy.stack.process import free_port, wait_for
from tests.api import Account, Api, assert_problem
from tests.conftest import make_settings
from tests.logs import attach, records
from tests.prom import parse, value


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


@contextlib.contextmanager
def mailing_service(
    database_url: str, tmp_path: Path, port: int, **overrides: object
) -> Iterator[tuple[TestClient, Account, Account]]:
    """The service mailing through the SMTP server on ``port``: its client, alice and an
    admin."""
    settings = make_settings(
        database_url,
        tmp_path,
        smtp_host="127.0.0.1",
        smtp_port=port,
        smtp_starttls=False,
        **overrides,
    )
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings)
        yield client, api.account("alice"), api.root()


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


def test_a_notification_to_one_user_is_also_emailed(
    smtp: tuple[Inbox, int], database_url: str, tmp_path: Path
) -> None:
    inbox, port = smtp
    with mailing_service(database_url, tmp_path, port) as (client, alice, admin):
        sent = client.post(
            "/api/v1/notifications",
            json={"title": "Maintenance", "body": "Tonight.", "user_id": alice.id},
            headers=admin.headers,
        )
        assert sent.status_code == 202
        broadcast = client.post(
            "/api/v1/notifications", json={"title": "To everyone"}, headers=admin.headers
        )
        assert broadcast.status_code == 202
        wait_for(lambda: len(inbox.messages) >= 1, timeout=10, what="the e-mail")
    [message] = inbox.messages  # the broadcast is not e-mailed
    assert (message["To"], message["Subject"]) == ("alice@example.com", "Maintenance")


@pytest.mark.parametrize(
    "title", ["Maintenance\r\nBcc: eve@example.com", "Maintenance\u2028Bcc: eve@example.com"]
)
def test_a_subject_that_would_break_the_header_is_refused_up_front(
    smtp: tuple[Inbox, int], database_url: str, tmp_path: Path, title: str
) -> None:
    """A line break in the title cannot become an e-mail header; it was refused only by
    the background job, after the admin had been told 202 (sent)."""
    inbox, port = smtp
    with mailing_service(database_url, tmp_path, port) as (client, alice, admin):
        refused = client.post(
            "/api/v1/notifications",
            json={"title": title, "user_id": alice.id},
            headers=admin.headers,
        )
        assert_problem(refused, 422)
        sent = client.post(
            "/api/v1/notifications",
            json={"title": "Maintenance", "user_id": alice.id},
            headers=admin.headers,
        )
        assert sent.status_code == 202
        wait_for(lambda: len(inbox.messages) >= 1, timeout=10, what="the e-mail")
    assert [message["Subject"] for message in inbox.messages] == ["Maintenance"]
    assert all(message["Bcc"] is None for message in inbox.messages)


class SlowInbox(Inbox):
    """A mail server that holds every message at DATA until released: down, for a client."""

    def __init__(self) -> None:
        super().__init__()
        self.released = asyncio.Event()  # on the server's own loop, waited for there only
        self.holding = self.most_held = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.holding += 1
        self.most_held = max(self.most_held, self.holding)
        try:
            await self.released.wait()
            return await super().handle_DATA(server, session, envelope)
        finally:
            self.holding -= 1


def test_a_stalled_mail_server_gets_few_connections_and_a_bounded_backlog(
    database_url: str, tmp_path: Path, log_lines: io.StringIO
) -> None:
    inbox, port = SlowInbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        with mailing_service(
            database_url, tmp_path, port, smtp_max_connections=2, background_max_jobs=3
        ) as (client, alice, admin):
            attach(log_lines)
            dropped = value(
                parse(client.get("/metrics").text),
                "background_tasks_total",
                task="email",
                outcome="dropped",
            )
            for number in range(5):
                response = client.post(
                    "/api/v1/notifications",
                    json={"title": f"Notice {number}", "user_id": alice.id},
                    headers=admin.headers,
                )
                assert response.status_code == 202  # never waits on the mail server
            wait_for(lambda: inbox.holding == 2, timeout=10, what="two mails at DATA")
            samples = parse(client.get("/metrics").text)
            assert (
                value(samples, "background_tasks_total", task="email", outcome="dropped")
                == dropped + 2
            )
            controller.loop.call_soon_threadsafe(inbox.released.set)
            wait_for(lambda: len(inbox.messages) == 3, timeout=10, what="the mails kept")
    finally:
        controller.stop()
    assert inbox.most_held == 2
    assert sorted(m["Subject"] for m in inbox.messages) == ["Notice 0", "Notice 1", "Notice 2"]
    drops = [r for r in records(log_lines) if r["event"].startswith("background job dropped")]
    assert [r["job"] for r in drops] == ["email", "email"]


def test_mail_that_was_only_logged_is_not_counted_as_sent(
    database_url: str, tmp_path: Path
) -> None:
    """Without SMTP nobody receives the mail: a dashboard of e-mail successes must not
    say otherwise."""
    settings = make_settings(database_url, tmp_path)
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings)
        alice, admin = api.account("alice"), api.root()

        def email(outcome: str) -> float:
            samples = parse(client.get("/metrics").text)
            return value(samples, "background_tasks_total", task="email", outcome=outcome)

        sent, skipped = email("success"), email("skipped")
        response = client.post(
            "/api/v1/notifications",
            json={"title": "Maintenance", "user_id": alice.id},
            headers=admin.headers,
        )
        assert response.status_code == 202
        wait_for(lambda: email("skipped") == skipped + 1, timeout=10, what="the mail's outcome")
        assert email("success") == sent


def test_jobs_cut_short_by_shutdown_are_counted_and_logged(log_lines: io.StringIO) -> None:
    """An e-mail or audit record that shutdown gives up on is not lost without a trace."""
    attach(log_lines)
    cancelled = {"task": "email", "outcome": "cancelled"}
    before = REGISTRY.get_sample_value("background_tasks_total", cancelled) or 0
    unwound: list[str] = []

    async def stuck() -> None:
        try:
            await asyncio.Event().wait()  # an SMTP server that never answers
        finally:
            unwound.append("email")

    async def shut_down() -> None:
        jobs = BackgroundJobs(max_jobs_per_task=10)
        jobs.spawn("email", stuck())
        jobs.spawn("email", stuck())
        await asyncio.sleep(0)
        await jobs.drain(timeout_seconds=0.05)

    asyncio.run(shut_down())
    assert REGISTRY.get_sample_value("background_tasks_total", cancelled) == before + 2
    assert unwound == ["email", "email"]
    [line] = [
        r for r in records(log_lines) if r["event"] == "background jobs cancelled at shutdown"
    ]
    assert line["jobs"] == {"email": 2}


class FlakyInbox(Inbox):
    """A mail server that answers DATA with ``refusals`` in turn, then accepts."""

    def __init__(self, *refusals: str) -> None:
        super().__init__()
        self.refusals = list(refusals)
        self.attempts = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.attempts += 1
        if self.refusals:
            return self.refusals.pop(0)
        return await super().handle_DATA(server, session, envelope)


@contextlib.contextmanager
def mail_server(inbox: Inbox) -> Iterator[Settings]:
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield Settings(
            _env_file=None,  # type: ignore[call-arg]
            smtp_host="127.0.0.1",
            smtp_port=port,
            smtp_starttls=False,
            smtp_send_attempts=3,
        )
    finally:
        controller.stop()


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("app.email.RETRY_WAIT_INITIAL_SECONDS", 0.01)
    monkeypatch.setattr("app.email.RETRY_WAIT_MAX_SECONDS", 0.01)
    monkeypatch.setattr("app.email.RETRY_WAIT_JITTER_SECONDS", 0)


def test_a_temporary_refusal_is_retried_until_the_mail_is_accepted(
    quick_retries: None, log_lines: io.StringIO
) -> None:
    """A mail server restarting or greylisting answers 4xx: the mail was lost for good."""
    inbox = FlakyInbox("451 4.3.0 Try again later", "421 4.3.2 Service shutting down")
    with mail_server(inbox) as settings:
        attach(log_lines)
        asyncio.run(Mailer(settings).send("alice@example.com", "Maintenance", "Tonight."))
    assert inbox.attempts == 3
    [message] = inbox.messages
    assert message["Subject"] == "Maintenance"
    retries = [r for r in records(log_lines) if r["event"] == "email not sent; retrying"]
    assert [r["attempt"] for r in retries] == [1, 2]
    assert "451" in retries[0]["error"]


def test_a_permanent_refusal_is_not_retried(quick_retries: None) -> None:
    inbox = FlakyInbox("554 5.7.1 Rejected")
    with mail_server(inbox) as settings, pytest.raises(aiosmtplib.SMTPDataError):
        asyncio.run(Mailer(settings).send("alice@example.com", "Maintenance", "Tonight."))
    assert inbox.attempts == 1
    assert inbox.messages == []


def test_retries_stop_after_the_attempts_configured(quick_retries: None) -> None:
    inbox = FlakyInbox(*["451 4.3.0 Try again later"] * 5)
    with mail_server(inbox) as settings, pytest.raises(aiosmtplib.SMTPDataError):
        asyncio.run(Mailer(settings).send("alice@example.com", "Maintenance", "Tonight."))
    assert inbox.attempts == 3
    assert inbox.messages == []


def test_a_mail_server_down_at_first_is_retried(quick_retries: None) -> None:
    """Connection refused, as while the mail server restarts, then up."""
    inbox = Inbox()
    port = free_port()
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        smtp_host="127.0.0.1",
        smtp_port=port,
        smtp_starttls=False,
        smtp_send_attempts=20,
    )
    controller = Controller(inbox, hostname="127.0.0.1", port=port)

    async def send_while_the_server_starts() -> None:
        mailer = Mailer(settings)
        sending = asyncio.create_task(mailer.send("alice@example.com", "Up again", "x"))
        await asyncio.sleep(0.05)  # a refused attempt or more
        await asyncio.to_thread(controller.start)
        await sending

    try:
        asyncio.run(send_while_the_server_starts())
    finally:
        controller.stop()
    assert [m["Subject"] for m in inbox.messages] == ["Up again"]
