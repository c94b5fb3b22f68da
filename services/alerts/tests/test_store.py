"""Notifications stored in PostgreSQL (real server, a fresh migrated schema per test)."""

from __future__ import annotations

from typing import Any

import pytest

from quantmesh_alerts.rules import Notification
from quantmesh_alerts.service import AlertsService
from quantmesh_alerts.store import PostgresAlertStore, StoredAlert
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.messages import AlertSeverity
from quantmesh_common.testing import stubs
from quantmesh_common.testing.postgres import (
    fresh_schema,
    migrated_schema_fixtures,
    pool_on,
    server_dsn_or_skip,
)
from quantmesh_common.topics import Topic

from .conftest import T0, RecordingChannel, running

pytestmark = pytest.mark.integration


dsn, pool = migrated_schema_fixtures("qm_test_alerts", dsn="dsn", pool="pool", max_size=2)


def notification(notification_id: str = "E-1:denied", **overrides: Any) -> Notification:
    values: dict[str, Any] = {
        "notification_id": notification_id,
        "rule": "denied",
        "kind": "order_denied",
        "severity": AlertSeverity.WARNING,
        "code": "ORDER_DENIED",
        "message": "order C-1 of acc-1 denied",
        "dedupe_key": "denied:acc-1:KILL_SWITCH_ENGAGED",
        "channels": ("log", "webhook"),
        "ts_ns": T0,
        "suppressed": 2,
        "event_id": "E-1",
        "account_id": "acc-1",
        "instrument_id": "BTC-USDT.BINANCE",
        "details": {"reason": "KILL_SWITCH_ENGAGED"},
    }
    values.update(overrides)
    return Notification(**values)


# -- the store --------------------------------------------------------------------------------


async def test_store_when_notification_added_reads_back_every_field_and_outcome(pool: Any) -> None:
    store = PostgresAlertStore(pool)
    item = StoredAlert(notification(), {"log": "sent", "webhook": "503 after 4 attempts"})

    added = await store.add(item)

    assert added is True
    assert await store.recent() == [item]
    assert await store.contains("E-1:denied") is True
    assert await store.contains("E-2:denied") is False


async def test_store_when_same_notification_id_added_twice_keeps_the_first_row(
    pool: Any,
) -> None:
    store = PostgresAlertStore(pool)
    first = StoredAlert(notification(), {"log": "sent"})
    again = StoredAlert(notification(message="changed"), {"log": "boom"})
    await store.add(first)

    added = await store.add(again)

    assert added is False
    assert await store.recent() == [first]


async def test_store_when_many_are_added_lists_the_newest_oldest_first(pool: Any) -> None:
    store = PostgresAlertStore(pool)
    for i in range(3):
        await store.add(StoredAlert(notification(f"E-{i}:denied", ts_ns=T0 + i), {"log": "sent"}))

    recent = await store.recent(limit=2)

    assert [s.notification.notification_id for s in recent] == ["E-1:denied", "E-2:denied"]


async def test_store_check_when_table_is_missing_names_the_migration() -> None:
    with fresh_schema(server_dsn_or_skip(), "qm_test_alerts_bare") as bare:
        async with pool_on(bare, 1) as bare_pool:
            with pytest.raises(RuntimeError, match=r"alert_notifications is missing.*V0024"):
                await PostgresAlertStore(bare_pool).check()


# -- the service with QM_DATABASE_URL ---------------------------------------------------------


async def run_stage(dsn: str, channels: dict[str, RecordingChannel], action: Any) -> AlertsService:
    async with running(
        channels,
        database_url=dsn,
        alert_rules="rules: [{name: denied, kind: order_denied, channels: [log, webhook]}]",
        # The webhook is configured only so the rule may name it; the test's channel stands in.
        alert_webhook_url="http://127.0.0.1:9/hook",
        alert_webhook_secret="whsec-test",
    ) as stage:
        await action(stage.bus)
        await stage.bus.run_until_idle()
    return stage.service


async def test_service_with_database_when_denial_arrives_stores_it_with_each_channel_outcome(
    dsn: str, pool: Any
) -> None:
    channels = {"log": RecordingChannel("log"), "webhook": RecordingChannel("webhook", fail=True)}

    async def publish(bus: InMemoryBus) -> None:
        await bus.publish(Topic.ORDERS_REJECTED, stubs.risk_rejection())

    service = await run_stage(dsn, channels, publish)

    [stored] = await PostgresAlertStore(pool).recent()
    assert stored.notification.code == "ORDER_DENIED"
    assert stored.notification.account_id == "acc-1"
    assert stored.outcome == {
        "log": "sent",
        "webhook": "ChannelError: hook: gave up after 4 attempts: 503",
    }
    assert service.history.recent() == [stored]
    assert service.store_failures == 0


async def test_service_when_restarted_and_event_redelivered_neither_sends_nor_stores_it_again(
    dsn: str, pool: Any
) -> None:
    log_channel = RecordingChannel("log")
    channels = {"log": log_channel, "webhook": RecordingChannel("webhook")}
    envelope_holder: list[Any] = []

    async def publish(bus: InMemoryBus) -> None:
        envelope_holder.append(await bus.publish(Topic.ORDERS_REJECTED, stubs.risk_rejection()))

    async def redeliver(bus: InMemoryBus) -> None:
        await bus.publish_envelope(Topic.ORDERS_REJECTED, envelope_holder[0])

    await run_stage(dsn, channels, publish)

    restarted = await run_stage(dsn, channels, redeliver)

    assert len(log_channel.sent) == 1
    assert len(await PostgresAlertStore(pool).recent()) == 1
    assert restarted.history.recent() == []
