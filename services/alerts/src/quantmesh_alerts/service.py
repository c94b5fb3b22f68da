"""The alerts stage service: rules over order, portfolio, alert and dead-letter events, notified."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from quantmesh_alerts.channels import (
    Channel,
    Dispatcher,
    EmailChannel,
    LogChannel,
    TelegramChannel,
    WebhookChannel,
)
from quantmesh_alerts.config import AlertsSettings
from quantmesh_alerts.rules import DeadLetter, Notification, RuleEngine
from quantmesh_common.bus.base import H_SCHEMA, H_SOURCE, RawMessage
from quantmesh_common.bus.base import DeadLetter as BusDeadLetter
from quantmesh_common.clock import Clock, WallClock
from quantmesh_common.envelope import DecodeError, Envelope, decode
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import DLQ_SUFFIX, Topic, registry

log = logging.getLogger(__name__)

#: The issue that brings this stage's handlers; None: they exist.
HANDLERS_ISSUE: int | None = None

#: Topics whose events the rules look at.
EVENT_TOPICS: tuple[str, ...] = (
    Topic.ORDERS_REJECTED,
    Topic.EXEC_REPORTS,
    Topic.PORTFOLIO_SNAPSHOTS,
    Topic.ALERTS,
    Topic.CONTROL,
)
#: Every dead-letter twin of the registered topics.
DLQ_TOPICS: tuple[str, ...] = tuple(
    name for name in registry().all_topic_names() if name.endswith(DLQ_SUFFIX)
)

GROUP = "alerts"
DLQ_GROUP = "alerts.dlq"


#: The schema of a dead letter whose bytes are not an envelope.
UNDECODABLE = "undecodable"


def dead_letter_of(message: RawMessage) -> DeadLetter:
    """What the rules see of one record of a dead-letter topic."""
    failure = BusDeadLetter.from_headers(message.headers)
    payload = None
    schema = _text(message.header(H_SCHEMA))
    source = _text(message.header(H_SOURCE))
    if message.value is not None and (failure is None or failure.kind != "decode"):
        try:
            envelope = decode(message.value, schema)
        except DecodeError:
            pass
        else:
            payload = envelope.payload
            schema, source = envelope.schema_name, envelope.source
    return DeadLetter(
        topic=failure.topic if failure else message.topic.removesuffix(DLQ_SUFFIX),
        schema=schema or UNDECODABLE,
        source=source or "unknown",
        payload=payload,
        error=failure.error if failure else "",
        error_type=failure.kind if failure else "",
        dead_lettered_by=failure.service if failure else "",
    )


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode(errors="replace")


@dataclass(frozen=True, slots=True)
class StoredAlert:
    """A notification as kept in the history, with what each channel made of it."""

    notification: Notification
    outcome: Mapping[str, str]


class AlertHistory:
    """The last `capacity` notifications, newest last (in memory; PostgreSQL is not yet)."""

    def __init__(self, capacity: int) -> None:
        self._items: deque[StoredAlert] = deque(maxlen=capacity)
        #: Notifications stored since start (also those pushed out of the window).
        self.total = 0

    def add(self, item: StoredAlert) -> None:
        """Keep `item`, dropping the oldest when full."""
        self._items.append(item)
        self.total += 1

    def recent(self, limit: int | None = None) -> list[StoredAlert]:
        """The newest `limit` items (all if None), oldest first."""
        items = list(self._items)
        return items if limit is None else items[-limit:]

    def __len__(self) -> int:
        return len(self._items)


def build_channels(settings: AlertsSettings) -> dict[str, Channel]:
    """The channels the settings configure (the log always)."""
    channels: dict[str, Channel] = {"log": LogChannel()}
    if settings.alert_webhook_url and settings.alert_webhook_secret is not None:
        channels["webhook"] = WebhookChannel(
            settings.alert_webhook_url,
            settings.alert_webhook_secret.get_secret_value(),
            timeout_s=settings.alert_webhook_timeout_s,
            retries=settings.alert_webhook_retries,
            backoff_s=settings.alert_webhook_backoff_s,
        )
    if settings.telegram_bot_token is not None and settings.telegram_chat_id:
        channels["telegram"] = TelegramChannel(
            settings.telegram_bot_token.get_secret_value(),
            settings.telegram_chat_id,
            base_url=settings.telegram_api_url,
        )
    if settings.smtp_host and settings.smtp_from and settings.smtp_to:
        channels["email"] = EmailChannel(
            settings.smtp_host,
            settings.smtp_port,
            settings.smtp_from,
            settings.smtp_to,
            starttls=settings.smtp_starttls,
            username=settings.smtp_username,
            password=(
                settings.smtp_password.get_secret_value()
                if settings.smtp_password is not None
                else None
            ),
            timeout_s=settings.smtp_timeout_s,
        )
    return channels


class AlertsService(Service[AlertsSettings]):
    """The alerts stage: applies the rules to events and sends what they ask for.

    It publishes nothing on the bus, so it cannot feed on its own output; Alerts that name it
    as their source are ignored all the same.
    """

    name = "alerts"
    settings_class = AlertsSettings

    #: Input topics: the events the rules read, and every dead-letter topic.
    consumes: ClassVar[tuple[str, ...]] = (*EVENT_TOPICS, *DLQ_TOPICS)
    #: Output topics: none; notifications leave through the log, webhook, Telegram and e-mail.
    produces: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, settings: AlertsSettings, channels: Mapping[str, Channel] | None = None
    ) -> None:
        super().__init__(settings)
        self.engine = RuleEngine(settings.rules.rules, own_source=self.name)
        self.history = AlertHistory(settings.alert_history_size)
        self.dispatcher = Dispatcher(channels if channels is not None else build_channels(settings))
        self.clock: Clock = WallClock()

    async def setup(self, ctx: ServiceContext[AlertsSettings]) -> None:
        """Subscribe the rule inputs and the dead-letter topics; report quiet throttled keys."""
        self.clock = ctx.clock
        ctx.logger.info(
            "alerts: %d rules, channels %s",
            len(self.engine.rules),
            ", ".join(sorted(self.dispatcher.channels)),
        )
        ctx.subscribe(GROUP, list(EVENT_TOPICS), self.on_event)
        ctx.subscribe_raw(DLQ_GROUP, list(DLQ_TOPICS), self.on_dead_letter)
        ctx.add_task(self._flush_loop, "alerts-flush")

    async def teardown(self, ctx: ServiceContext[AlertsSettings]) -> None:
        """Close the channels' connections."""
        await self.dispatcher.close()

    async def on_event(self, envelope: Envelope[Any]) -> None:
        """Apply the rules to an event and deliver what they produce before committing it."""
        notifications = self.engine.evaluate(
            envelope.payload, self.clock.now_ns(), event_id=envelope.event_id
        )
        await self._deliver(notifications)

    async def on_dead_letter(self, message: RawMessage) -> None:
        """Apply the rules to a dead letter, read undecoded: malformed bytes are dead letters too.

        Where it failed and why come from the headers the bus wrote on it; its schema and
        producer from its identity headers, else from the envelope if it decodes.
        """
        letter = dead_letter_of(message)
        notifications = self.engine.evaluate(
            letter,
            self.clock.now_ns(),
            event_id=f"dlq:{message.topic}:{message.partition}:{message.offset}",
        )
        await self._deliver(notifications)

    async def flush(self) -> None:
        """Send the held-back counts of throttle windows that are over."""
        await self._deliver(self.engine.flush(self.clock.now_ns()))

    async def _deliver(self, notifications: list[Notification]) -> None:
        for notification in notifications:
            outcome = await self.dispatcher.dispatch(notification)
            self.history.add(StoredAlert(notification, outcome))

    async def _flush_loop(self) -> None:
        while True:
            await self.clock.sleep(self.settings.alert_flush_interval_s)
            await self.flush()
