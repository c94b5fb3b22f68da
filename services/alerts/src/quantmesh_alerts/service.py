"""The alerts stage service: rules over order, portfolio, alert and dead-letter events, notified."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
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
from quantmesh_alerts.probes import HealthProber, KafkaLagReader
from quantmesh_alerts.rules import DeadLetter, Notification, RuleEngine
from quantmesh_alerts.store import AlertHistory, PostgresAlertStore, StoredAlert
from quantmesh_common.bus.base import H_SCHEMA, H_SOURCE, RawMessage
from quantmesh_common.bus.base import DeadLetter as BusDeadLetter
from quantmesh_common.clock import Clock, WallClock
from quantmesh_common.envelope import DecodeError, Envelope, decode, peek_ts_init
from quantmesh_common.messages import ControlAction, ControlCommand
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

#: Where stale_market_data rules look for life: read raw, only the key (the instrument id).
MARKET_DATA_TOPIC: str = Topic.MD_TICKS

GROUP = "alerts"
DLQ_GROUP = "alerts.dlq"
MARKET_DATA_GROUP = "alerts.md"


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
            pass  # not an envelope after all: the identity headers are all there is
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
    consumes: ClassVar[tuple[str, ...]] = (*EVENT_TOPICS, MARKET_DATA_TOPIC, *DLQ_TOPICS)
    #: Output topics: none; notifications leave through the log, webhook, Telegram and e-mail.
    produces: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        settings: AlertsSettings,
        channels: Mapping[str, Channel] | None = None,
        *,
        lag_reader: KafkaLagReader | None = None,
    ) -> None:
        super().__init__(settings)
        self.engine = RuleEngine(settings.rules.rules, own_source=self.name)
        self.history = AlertHistory(settings.alert_history_size)
        self.dispatcher = Dispatcher(channels if channels is not None else build_channels(settings))
        self.clock: Clock = WallClock()
        self.prober = HealthProber(
            settings.alert_health_urls, timeout_s=settings.alert_health_timeout_s
        )
        #: Reads consumer lag on Kafka; None on the in-memory bus (there is no lag to read).
        self.lag_reader = lag_reader
        #: Every notification in PostgreSQL, when QM_DATABASE_URL is set (set up in `setup`).
        self.store: PostgresAlertStore | None = None
        #: Notifications sent but not stored because PostgreSQL failed.
        self.store_failures = 0
        #: What `setup` started beside the event subscriptions: what a reload may rely on.
        self.watchers: frozenset[str] = frozenset()

    async def setup(self, ctx: ServiceContext[AlertsSettings]) -> None:
        """Open the store; subscribe the rule inputs; start the timers the rules need.

        Always: the event topics, the dead-letter topics and the flush of throttled keys. With
        a stale_market_data rule: `md.ticks` and its check; with a service_unhealthy rule and
        URLs: the probes; with a consumer_lag rule on Kafka: the lag measurement.
        """
        self.clock = ctx.clock
        if ctx.pg is not None:
            store = PostgresAlertStore(ctx.pg)
            await store.check()
            self.store = store
        ctx.logger.info(
            "alerts: %d rules, channels %s, history %s",
            len(self.engine.rules),
            ", ".join(sorted(self.dispatcher.channels)),
            "in PostgreSQL" if self.store is not None else "in memory only",
        )
        ctx.subscribe(GROUP, list(EVENT_TOPICS), self.on_event)
        ctx.subscribe_raw(DLQ_GROUP, list(DLQ_TOPICS), self.on_dead_letter)
        ctx.add_task(self._flush_loop, "alerts-flush")
        if self.engine.watches_market_data():
            # Raw: a tick's key is its instrument id, so nothing is decoded at tick rate.
            ctx.subscribe_raw(MARKET_DATA_GROUP, [MARKET_DATA_TOPIC], self.on_market_data)
            ctx.add_task(self._market_data_loop, "alerts-stale-market-data")
        if self.engine.probes_services() and self.prober.targets:
            ctx.add_task(self._health_loop, "alerts-health-probes")
        elif self.engine.probes_services():
            ctx.logger.info("service_unhealthy rules idle: QM_ALERT_HEALTH_URLS is not set")
        if self.engine.lag_groups():
            bootstrap = ctx.settings.kafka_bootstrap
            if self.lag_reader is None and ctx.settings.bus == "kafka" and bootstrap:
                self.lag_reader = KafkaLagReader(bootstrap)
            if self.lag_reader is not None:
                ctx.add_task(self._lag_loop, "alerts-consumer-lag")
            else:
                ctx.logger.info("consumer_lag rules not evaluated: the bus is in memory")
        self.watchers = self._watchers_of(self.engine)

    def _watchers_of(self, engine: RuleEngine) -> frozenset[str]:
        """The watchers `engine`'s rules need, of those this stage can run."""
        needed = set()
        if engine.watches_market_data():
            needed.add("stale_market_data")
        if engine.probes_services() and self.prober.targets:
            needed.add("service_unhealthy")
        if engine.lag_groups() and self.lag_reader is not None:
            needed.add("consumer_lag")
        return frozenset(needed)

    def reload_rules(self) -> bool:
        """Read the rules again from their source and put them in force (control RELOAD_CONFIG).

        The rules in force stay when the new set is invalid (a bad file, a channel that is not
        configured) or needs a watcher this instance did not start at setup (market data,
        probes or lag, for a kind no rule had): that takes a restart. Logged either way.
        """
        try:
            rules = self.settings.read_rules().rules
        except ValueError as exc:
            log.error("alert rules not reloaded, the rules in force stay: %s", exc)
            return False
        missing = self._watchers_of(RuleEngine(rules)) - self.watchers
        if missing:
            log.error(
                "alert rules not reloaded: %s rules need a watcher this instance did not start; "
                "restart the stage to add them",
                ", ".join(sorted(missing)),
            )
            return False
        self.engine.replace_rules(rules)
        log.info("alert rules reloaded: %d rules", len(rules))
        return True

    async def teardown(self, ctx: ServiceContext[AlertsSettings]) -> None:
        """Close the channels' and the prober's connections."""
        await self.dispatcher.close()
        await self.prober.close()
        if self.lag_reader is not None:
            self.lag_reader.close()

    async def on_event(self, envelope: Envelope[Any]) -> None:
        """Apply the rules to an event and deliver what they produce before committing it;
        reload the rules on a RELOAD_CONFIG for this stage (after the control rules saw it)."""
        event = envelope.payload
        notifications = self.engine.evaluate(event, self.clock.now_ns(), event_id=envelope.event_id)
        await self._deliver(notifications)
        if (
            isinstance(event, ControlCommand)
            and event.action is ControlAction.RELOAD_CONFIG
            and event.applies_to(self.name)
        ):
            self.reload_rules()

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

    def on_market_data(self, message: RawMessage) -> None:
        """Note that the tick's instrument is alive, from its key and envelope time: O(1).

        md.ticks can carry 50,000 records a second, so the envelope is not decoded: the key is
        the instrument id and `ts_init` (when marketdata published it, on its clock) is read
        from the envelope's head. A record without either says nothing and is skipped.
        """
        if message.key is None or message.value is None:
            return
        ts_ns = peek_ts_init(message.value)
        if ts_ns is not None:
            self.engine.saw_market_data(message.key, ts_ns, self.clock.now_ns())

    async def check_market_data(self) -> None:
        """Notify instruments whose market data went stale or came back."""
        await self._deliver(self.engine.check_market_data(self.clock.now_ns()))

    async def probe_services(self) -> None:
        """Probe every configured readiness URL once and notify what the rules make of it."""
        for result in await self.prober.probe_all():
            if result.error is not None:
                log.warning("readiness probe of %s failed: %s", result.service, result.error)
            await self._deliver(
                self.engine.probe_result(
                    result.service, result.url, result.error, self.clock.now_ns()
                )
            )

    async def check_consumer_lag(self) -> None:
        """Measure the lag of the rules' consumer groups once and notify what it means."""
        if self.lag_reader is None:
            return
        try:
            lags = await asyncio.to_thread(self.lag_reader.measure, self.engine.lag_groups())
        except Exception:
            # A measurement that fails (the broker away) must not stop the stage's other rules.
            log.exception("cannot measure consumer lag; trying again next interval")
            return
        await self._deliver(self.engine.lag_measured(lags, self.clock.now_ns()))

    async def flush(self) -> None:
        """Send the held-back counts of throttle windows that are over."""
        await self._deliver(self.engine.flush(self.clock.now_ns()))

    async def _deliver(self, notifications: list[Notification]) -> None:
        """Send each notification not already stored, then store it with its outcome.

        A notification is stored after its sends, so one found stored was sent: an event
        redelivered after a restart (the engine's memory of event ids is gone) sends nothing.
        """
        for notification in notifications:
            if await self._already_stored(notification):
                log.info("notification %s was sent before; not again", notification.notification_id)
                continue
            outcome = await self.dispatcher.dispatch(notification)
            item = StoredAlert(notification, outcome)
            self.history.add(item)
            await self._store(item)

    async def _already_stored(self, notification: Notification) -> bool:
        if self.store is None:
            return False
        try:
            return await self.store.contains(notification.notification_id)
        except Exception:
            # Better a repeated notification than a lost one while PostgreSQL is away.
            log.exception("cannot look up notification %s", notification.notification_id)
            return False

    async def _store(self, item: StoredAlert) -> None:
        if self.store is None:
            return
        try:
            await self.store.add(item)
        except Exception:
            # The notification went out already; failing the event would only dead-letter it.
            self.store_failures += 1
            log.exception("notification %s sent but not stored", item.notification.notification_id)

    async def _flush_loop(self) -> None:
        while True:
            await self.clock.sleep(self.settings.alert_flush_interval_s)
            await self.flush()

    async def _health_loop(self) -> None:
        while True:
            await self.clock.sleep(self.settings.alert_health_interval_s)
            await self.probe_services()

    async def _lag_loop(self) -> None:
        while True:
            await self.clock.sleep(self.settings.alert_lag_interval_s)
            await self.check_consumer_lag()

    async def _market_data_loop(self) -> None:
        while True:
            await self.clock.sleep(self.settings.alert_check_interval_s)
            await self.check_market_data()
