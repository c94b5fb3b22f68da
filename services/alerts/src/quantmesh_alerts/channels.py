"""Notification channels: a JSON log line, an HMAC-signed webhook, Telegram and SMTP e-mail."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import smtplib
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from email.message import EmailMessage
from typing import Protocol

import aiohttp

from quantmesh_alerts.rules import Notification
from quantmesh_common.messages import AlertSeverity

log = logging.getLogger(__name__)

#: The header carrying `sha256=<hex HMAC-SHA256 of the body>` on every webhook POST.
SIGNATURE_HEADER = "X-Quantmesh-Signature"
#: The header carrying the notification id, so a receiver can drop a repeated delivery.
NOTIFICATION_ID_HEADER = "X-Quantmesh-Notification-Id"

_LOG_LEVELS = {
    AlertSeverity.INFO: logging.INFO,
    AlertSeverity.WARNING: logging.WARNING,
    AlertSeverity.CRITICAL: logging.CRITICAL,
}

Sleep = Callable[[float], Awaitable[None]]


class ChannelError(RuntimeError):
    """A notification could not be delivered (after the retries a channel allows)."""


class _TransientError(Exception):
    """A failure worth retrying: a 5xx, a 429, a refused or dropped connection, a timeout."""


class Channel(Protocol):
    """Somewhere a notification can go."""

    name: str

    async def send(self, notification: Notification) -> None:
        """Deliver `notification`; ChannelError if it could not be."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def sign(secret: bytes, body: bytes) -> str:
    """Return the signature header value of `body`: `sha256=<hex HMAC-SHA256>`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, header: str) -> bool:
    """Return True if `header` is the signature of `body` under `secret` (constant time)."""
    return hmac.compare_digest(sign(secret, body), header)


async def _with_retries(
    attempt: Callable[[], Awaitable[None]],
    *,
    what: str,
    retries: int,
    backoff_s: float,
    sleep: Sleep,
) -> None:
    """Run `attempt`, again after `backoff_s * 2**n` while it fails transiently."""
    for n in range(retries + 1):
        try:
            await attempt()
            return
        except _TransientError as exc:
            if n == retries:
                raise ChannelError(f"{what}: gave up after {retries + 1} attempts: {exc}") from None
            delay = backoff_s * (2**n)
            log.warning("%s failed (%s); retry %d in %.2fs", what, exc, n + 1, delay)
            await sleep(delay)


class LogChannel:
    """Writes each notification as one JSON log line, at the level of its severity."""

    name = "log"

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("quantmesh.alerts.notifications")

    async def send(self, notification: Notification) -> None:
        """Log the notification (the JSON formatter renders `alert` as a nested object)."""
        self.logger.log(
            _LOG_LEVELS[notification.severity],
            "%s: %s",
            notification.code,
            notification.message,
            extra={"alert": notification.to_dict()},
        )

    async def close(self) -> None:
        """Nothing to release."""


class _HttpChannel:
    """Shared by the webhook and Telegram: one aiohttp session, POST with retries."""

    name = "http"

    def __init__(self, *, timeout_s: float, retries: int, backoff_s: float, sleep: Sleep) -> None:
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.retries = retries
        self.backoff_s = backoff_s
        self.sleep = sleep
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def _post(
        self, url: str, body: bytes, headers: Mapping[str, str], shown_url: str
    ) -> bytes:
        """POST once; _TransientError on what a retry may fix, ChannelError on the rest.

        Messages name `shown_url`, never `url` (which may hold a secret).
        """
        try:
            async with self._client().post(url, data=body, headers=dict(headers)) as response:
                text = await response.read()
                status = response.status
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise _TransientError(f"POST {shown_url}: {type(exc).__name__}") from None
        except aiohttp.ClientError as exc:
            raise ChannelError(f"POST {shown_url}: {type(exc).__name__}") from None
        if status >= 500 or status == 429:
            raise _TransientError(f"POST {shown_url}: HTTP {status}")
        if status >= 300:
            snippet = text[:200].decode(errors="replace")
            raise ChannelError(f"POST {shown_url}: HTTP {status} {snippet}")
        return text

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None


class WebhookChannel(_HttpChannel):
    """POSTs the notification as JSON, signed with HMAC-SHA256 in X-Quantmesh-Signature."""

    name = "webhook"

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, sleep=sleep)
        self.url = url
        self._secret = secret.encode()

    def body(self, notification: Notification) -> bytes:
        """The exact bytes POSTed (and signed)."""
        return json.dumps(notification.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    async def send(self, notification: Notification) -> None:
        """POST the signed body; retried on 5xx, 429 and connection errors."""
        body = self.body(notification)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self._secret, body),
            NOTIFICATION_ID_HEADER: notification.notification_id,
        }

        async def attempt() -> None:
            await self._post(self.url, body, headers, self.url)

        await _with_retries(
            attempt,
            what="webhook",
            retries=self.retries,
            backoff_s=self.backoff_s,
            sleep=self.sleep,
        )


class TelegramChannel(_HttpChannel):
    """Sends the notification's text through the Telegram Bot API's sendMessage.

    The bot token is part of the URL; it never appears in a log line or an error message.
    """

    name = "telegram"

    def __init__(
        self,
        token: str,
        chat_id: str,
        *,
        base_url: str = "https://api.telegram.org",
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, sleep=sleep)
        self.base_url = base_url.rstrip("/")
        self.chat_id = chat_id
        self._token = token

    async def send(self, notification: Notification) -> None:
        """POST {base_url}/bot<token>/sendMessage with chat_id and text; expects `ok: true`."""
        url = f"{self.base_url}/bot{self._token}/sendMessage"
        shown = f"{self.base_url}/bot***/sendMessage"
        # Telegram caps a message at 4096 characters.
        payload = {"chat_id": self.chat_id, "text": notification.text()[:4096]}
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}

        async def attempt() -> None:
            answer = await self._post(url, body, headers, shown)
            try:
                ok = json.loads(answer).get("ok") is True
            except (ValueError, AttributeError):
                ok = False
            if not ok:
                raise ChannelError(f"POST {shown}: the Bot API did not answer ok")

        await _with_retries(
            attempt,
            what="telegram",
            retries=self.retries,
            backoff_s=self.backoff_s,
            sleep=self.sleep,
        )


class EmailChannel:
    """Sends the notification by SMTP (stdlib smtplib, in a worker thread).

    With `starttls` the connection is upgraded before anything else is sent, and a server that
    does not offer STARTTLS is an error: it never falls back to plain text.
    """

    name = "email"

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        recipients: Sequence[str],
        *,
        starttls: bool = True,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float = 10.0,
        retries: int = 2,
        backoff_s: float = 1.0,
        sleep: Sleep = asyncio.sleep,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.sender = sender
        self.recipients = list(recipients)
        self.starttls = starttls
        self.username = username
        self._password = password
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.sleep = sleep
        self.ssl_context = ssl_context

    def message(self, notification: Notification) -> EmailMessage:
        """The e-mail of `notification`."""
        msg = EmailMessage()
        msg["Subject"] = notification.title
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.recipients)
        msg["X-Quantmesh-Notification-Id"] = notification.notification_id
        msg.set_content(notification.text())
        return msg

    def _send_sync(self, msg: EmailMessage) -> None:
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout_s) as smtp:
                smtp.ehlo()
                if self.starttls:
                    smtp.starttls(context=self.ssl_context or ssl.create_default_context())
                    smtp.ehlo()
                if self.username:
                    smtp.login(self.username, self._password or "")
                smtp.send_message(msg)
        # smtplib's exceptions are OSErrors: the most specific ones must come first.
        except smtplib.SMTPResponseException as exc:
            if 400 <= exc.smtp_code < 500:  # 4xx: the server asks to try again later
                raise _TransientError(f"SMTP {self.host}:{self.port}: {exc.smtp_code}") from None
            raise ChannelError(f"SMTP {self.host}:{self.port}: {exc.smtp_code}") from None
        except smtplib.SMTPServerDisconnected:
            raise _TransientError(f"SMTP {self.host}:{self.port}: disconnected") from None
        except smtplib.SMTPException as exc:  # e.g. STARTTLS not offered, recipients refused
            raise ChannelError(f"SMTP {self.host}:{self.port}: {exc}") from None
        except ssl.SSLError as exc:
            raise ChannelError(f"SMTP {self.host}:{self.port}: TLS: {exc.reason}") from None
        except OSError as exc:  # refused, reset, timed out
            raise _TransientError(f"SMTP {self.host}:{self.port}: {type(exc).__name__}") from None

    async def send(self, notification: Notification) -> None:
        """Send the e-mail; retried on connection errors and 4xx answers."""
        msg = self.message(notification)

        async def attempt() -> None:
            await asyncio.to_thread(self._send_sync, msg)

        await _with_retries(
            attempt, what="email", retries=self.retries, backoff_s=self.backoff_s, sleep=self.sleep
        )

    async def close(self) -> None:
        """Nothing held between sends."""


class Dispatcher:
    """Sends a notification to each of its channels at once; one failing does not stop others."""

    def __init__(self, channels: Mapping[str, Channel]) -> None:
        self.channels = dict(channels)

    async def dispatch(self, notification: Notification) -> dict[str, str]:
        """Deliver to every channel the notification names; returns channel -> "sent" or error."""
        names = [name for name in notification.channels if name in self.channels]
        results = await asyncio.gather(
            *(self.channels[name].send(notification) for name in names), return_exceptions=True
        )
        outcome: dict[str, str] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                outcome[name] = f"{type(result).__name__}: {result}"
                log.error(
                    "notification %s not delivered by %s: %s",
                    notification.notification_id,
                    name,
                    result,
                    extra={"channel": name, "rule": notification.rule},
                )
            else:
                outcome[name] = "sent"
        for name in notification.channels:
            if name not in self.channels:
                outcome[name] = "not configured"
        return outcome

    async def close(self) -> None:
        """Close every channel."""
        for channel in self.channels.values():
            try:
                await channel.close()
            except Exception:
                log.exception("closing channel %s failed", channel.name)
