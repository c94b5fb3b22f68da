"""Each channel against a real local server the test starts: HTTP (aiohttp) and SMTP (asyncio).

The SMTP server is a minimal one written here on asyncio streams (EHLO, AUTH PLAIN, MAIL, RCPT,
DATA, QUIT), so the tests need no extra dependency; it records what the client really sent.
"""

from __future__ import annotations

import asyncio
import base64
import email
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import Message

import pytest
from aiohttp import web

from quantmesh_alerts.channels import (
    NOTIFICATION_ID_HEADER,
    SIGNATURE_HEADER,
    ChannelError,
    Dispatcher,
    EmailChannel,
    LogChannel,
    TelegramChannel,
    WebhookChannel,
    sign,
    verify,
)
from quantmesh_alerts.rules import Notification
from quantmesh_common.messages import AlertSeverity

SECRET = "s3cr3t-webhook-key"
TOKEN = "123456:ABC-very-secret-token"


def notification(**overrides: object) -> Notification:
    fields: dict[str, object] = {
        "notification_id": "e1:order-denied",
        "rule": "order-denied",
        "kind": "order_denied",
        "severity": AlertSeverity.WARNING,
        "code": "ORDER_DENIED",
        "message": "order O-1 of acc-1 (BTC-USDT.SIM) denied by risk: KILL_SWITCH_ENGAGED",
        "dedupe_key": "order-denied:acc-1:KILL_SWITCH_ENGAGED",
        "channels": ("log",),
        "ts_ns": 1_700_000_000_000_000_000,
        "suppressed": 2,
        "event_id": "e1",
        "account_id": "acc-1",
        "details": {"reason": "KILL_SWITCH_ENGAGED"},
    }
    fields.update(overrides)
    return Notification(**fields)  # type: ignore[arg-type]


async def no_sleep(_seconds: float) -> None:
    """Backoff without waiting; the delays asked for are recorded by `RecordingSleep`."""


@dataclass
class RecordingSleep:
    delays: list[float] = field(default_factory=list)

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


# -- an HTTP server ---------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HttpServer:
    base_url: str
    received: list[Received]
    #: Statuses to answer in turn; the last one repeats.
    statuses: list[int]
    reply: dict[str, object]


@pytest.fixture
async def http_server() -> AsyncIterator[HttpServer]:
    received: list[Received] = []
    server = HttpServer("", received, [200], {"ok": True})

    async def handle(request: web.Request) -> web.Response:
        received.append(Received(request.path, dict(request.headers), await request.read()))
        status = server.statuses.pop(0) if len(server.statuses) > 1 else server.statuses[0]
        return web.json_response(server.reply, status=status)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    # No access log: it is the fake server's, and would print the bot token of the URL.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.base_url = f"http://{host}:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


# -- a minimal SMTP server --------------------------------------------------------------------


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    data: bytes

    def parsed(self) -> Message:
        return email.message_from_bytes(self.data)


@dataclass
class SmtpServer:
    host: str
    port: int
    mails: list[Mail]
    logins: list[tuple[str, str]]
    #: What EHLO advertises besides the greeting line.
    extensions: list[str]


@pytest.fixture
async def smtp_server() -> AsyncIterator[SmtpServer]:
    mails: list[Mail] = []
    logins: list[tuple[str, str]] = []
    state = SmtpServer("127.0.0.1", 0, mails, logins, ["8BITMIME", "AUTH PLAIN"])

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")

        sender, recipients = "", list[str]()
        say("220 localhost test ESMTP")
        while line := await reader.readline():
            verb, _, arg = line.decode().rstrip("\r\n").partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                lines = ["localhost", *state.extensions]
                for i, text in enumerate(lines):
                    say(("250 " if i == len(lines) - 1 else "250-") + text)
            elif verb == "AUTH" and arg.upper().startswith("PLAIN "):
                _, user, password = base64.b64decode(arg.split(" ", 1)[1]).split(b"\0")
                logins.append((user.decode(), password.decode()))
                say("235 2.7.0 Authentication successful")
            elif verb == "MAIL":
                sender, recipients = arg.split(":", 1)[1].split()[0].strip("<>"), []
                say("250 OK")
            elif verb == "RCPT":
                recipients.append(arg.split(":", 1)[1].strip().strip("<>"))
                say("250 OK")
            elif verb == "DATA":
                say("354 End data with <CR><LF>.<CR><LF>")
                await writer.drain()
                body = bytearray()
                while (data := await reader.readline()) not in (b".\r\n", b""):
                    body += data[1:] if data.startswith(b"..") else data
                mails.append(Mail(sender, recipients, bytes(body)))
                say("250 OK queued")
            elif verb == "QUIT":
                say("221 Bye")
                await writer.drain()
                break
            else:
                say("250 OK")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


# -- log --------------------------------------------------------------------------------------


async def test_log_channel_when_sending_logs_one_record_carrying_the_whole_alert(
    caplog: pytest.LogCaptureFixture,
) -> None:
    channel = LogChannel()
    caplog.set_level(logging.INFO, logger="quantmesh.alerts.notifications")

    await channel.send(notification(severity=AlertSeverity.CRITICAL))

    [record] = caplog.records
    assert record.levelno == logging.CRITICAL
    assert record.getMessage().startswith("ORDER_DENIED: order O-1 of acc-1")
    alert = record.__dict__["alert"]
    assert json.loads(json.dumps(alert))["dedupe_key"] == "order-denied:acc-1:KILL_SWITCH_ENGAGED"
    assert alert["suppressed"] == 2


# -- webhook ----------------------------------------------------------------------------------


async def test_webhook_when_server_accepts_posts_json_with_a_valid_hmac_signature(
    http_server: HttpServer,
) -> None:
    channel = WebhookChannel(f"{http_server.base_url}/hook", SECRET, sleep=no_sleep)

    try:
        await channel.send(notification())
    finally:
        await channel.close()

    [request] = http_server.received
    assert request.path == "/hook"
    signature = request.headers[SIGNATURE_HEADER]
    assert verify(SECRET.encode(), request.body, signature)
    assert not verify(b"another-secret", request.body, signature)
    assert request.headers[NOTIFICATION_ID_HEADER] == "e1:order-denied"
    body = json.loads(request.body)
    assert (body["code"], body["severity"], body["suppressed"]) == ("ORDER_DENIED", "WARNING", 2)


def test_sign_when_given_a_known_vector_matches_rfc4231_case_2() -> None:
    # RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
    expected = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"

    assert sign(b"Jefe", b"what do ya want for nothing?") == f"sha256={expected}"


async def test_webhook_when_server_fails_with_5xx_retries_with_backoff_until_accepted(
    http_server: HttpServer,
) -> None:
    http_server.statuses = [503, 500, 200]
    sleep = RecordingSleep()
    channel = WebhookChannel(
        f"{http_server.base_url}/hook", SECRET, retries=3, backoff_s=0.5, sleep=sleep
    )

    try:
        await channel.send(notification())
    finally:
        await channel.close()

    assert len(http_server.received) == 3
    assert sleep.delays == [0.5, 1.0]
    # The same signed body each time, so the receiver can drop repeats by notification id.
    assert len({r.body for r in http_server.received}) == 1


async def test_webhook_when_server_keeps_failing_gives_up_after_the_retries(
    http_server: HttpServer,
) -> None:
    http_server.statuses = [502]
    channel = WebhookChannel(f"{http_server.base_url}/hook", SECRET, retries=2, sleep=no_sleep)

    try:
        with pytest.raises(ChannelError, match=r"gave up after 3 attempts: .*HTTP 502"):
            await channel.send(notification())
    finally:
        await channel.close()

    assert len(http_server.received) == 3


async def test_webhook_when_server_answers_4xx_does_not_retry(http_server: HttpServer) -> None:
    http_server.statuses = [401]
    channel = WebhookChannel(f"{http_server.base_url}/hook", SECRET, retries=3, sleep=no_sleep)

    try:
        with pytest.raises(ChannelError, match="HTTP 401"):
            await channel.send(notification())
    finally:
        await channel.close()

    assert len(http_server.received) == 1


async def test_webhook_when_nothing_listens_retries_connection_errors_then_fails() -> None:
    # Bind then close a socket to get a port nobody listens on.
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    sleep = RecordingSleep()
    channel = WebhookChannel(f"http://127.0.0.1:{port}/hook", SECRET, retries=2, sleep=sleep)

    try:
        with pytest.raises(ChannelError, match="gave up after 3 attempts"):
            await channel.send(notification())
    finally:
        await channel.close()

    assert sleep.delays == [0.5, 1.0]


# -- Telegram ---------------------------------------------------------------------------------


async def test_telegram_when_sending_posts_chat_id_and_text_to_the_bot_api(
    http_server: HttpServer,
) -> None:
    channel = TelegramChannel(TOKEN, "-100200300", base_url=http_server.base_url, sleep=no_sleep)

    try:
        await channel.send(notification())
    finally:
        await channel.close()

    [request] = http_server.received
    assert request.path == f"/bot{TOKEN}/sendMessage"
    body = json.loads(request.body)
    assert body["chat_id"] == "-100200300"
    assert body["text"].startswith("[quantmesh] WARNING ORDER_DENIED acc-1\norder O-1 of acc-1")
    assert "(2 similar suppressed since the previous notification)" in body["text"]


async def test_telegram_when_api_fails_never_shows_the_token(
    http_server: HttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    http_server.statuses = [500]
    caplog.set_level(logging.DEBUG)
    channel = TelegramChannel(TOKEN, "42", base_url=http_server.base_url, retries=1, sleep=no_sleep)

    try:
        with pytest.raises(ChannelError) as raised:
            await channel.send(notification())
    finally:
        await channel.close()

    assert len(http_server.received) == 2
    assert "bot***/sendMessage" in str(raised.value)
    assert TOKEN not in str(raised.value)
    assert TOKEN not in caplog.text
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__


async def test_telegram_when_api_answers_not_ok_raises(http_server: HttpServer) -> None:
    http_server.reply = {"ok": False, "description": "Bad Request: chat not found"}
    channel = TelegramChannel(TOKEN, "42", base_url=http_server.base_url, sleep=no_sleep)

    try:
        with pytest.raises(ChannelError, match="did not answer ok"):
            await channel.send(notification())
    finally:
        await channel.close()

    assert len(http_server.received) == 1


# -- e-mail -----------------------------------------------------------------------------------


async def test_email_when_sending_delivers_subject_body_and_recipients(
    smtp_server: SmtpServer,
) -> None:
    channel = EmailChannel(
        smtp_server.host,
        smtp_server.port,
        "alerts@quantmesh.test",
        ["ops@quantmesh.test", "risk@quantmesh.test"],
        starttls=False,
        username="alerts",
        password="pw-123",
        sleep=no_sleep,
    )

    await channel.send(notification())

    [mail] = smtp_server.mails
    assert mail.sender == "alerts@quantmesh.test"
    assert mail.recipients == ["ops@quantmesh.test", "risk@quantmesh.test"]
    message = mail.parsed()
    assert message["Subject"] == "[quantmesh] WARNING ORDER_DENIED acc-1"
    assert message["X-Quantmesh-Notification-Id"] == "e1:order-denied"
    assert "denied by risk: KILL_SWITCH_ENGAGED" in message.get_payload()
    assert smtp_server.logins == [("alerts", "pw-123")]


async def test_email_when_starttls_is_required_but_not_offered_refuses_plain_text(
    smtp_server: SmtpServer,
) -> None:
    channel = EmailChannel(
        smtp_server.host,
        smtp_server.port,
        "alerts@quantmesh.test",
        ["ops@quantmesh.test"],
        starttls=True,
        sleep=no_sleep,
    )

    with pytest.raises(ChannelError, match="STARTTLS"):
        await channel.send(notification())

    assert smtp_server.mails == []


async def test_email_when_server_is_down_retries_then_fails() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    sleep = RecordingSleep()
    channel = EmailChannel(
        "127.0.0.1", port, "a@quantmesh.test", ["b@quantmesh.test"], starttls=False, sleep=sleep
    )

    with pytest.raises(ChannelError, match="gave up after 3 attempts"):
        await channel.send(notification())

    assert sleep.delays == [1.0, 2.0]


# -- dispatch ---------------------------------------------------------------------------------


@dataclass
class FailingChannel:
    name: str = "webhook"

    async def send(self, notification: Notification) -> None:
        raise ChannelError("webhook: gave up")

    async def close(self) -> None:
        return None


async def test_dispatcher_when_one_channel_fails_still_delivers_to_the_others(
    http_server: HttpServer,
) -> None:
    telegram = TelegramChannel(TOKEN, "42", base_url=http_server.base_url, sleep=no_sleep)
    dispatcher = Dispatcher({"telegram": telegram, "webhook": FailingChannel()})

    try:
        outcome = await dispatcher.dispatch(notification(channels=("webhook", "telegram", "email")))
    finally:
        await dispatcher.close()

    assert outcome == {
        "webhook": "ChannelError: webhook: gave up",
        "telegram": "sent",
        "email": "not configured",
    }
    assert len(http_server.received) == 1
