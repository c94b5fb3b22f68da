"""The stage's timed checks on the in-memory bus and real local servers: stale market data."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from quantmesh_alerts.config import AlertsSettings
from quantmesh_alerts.rules import Notification
from quantmesh_alerts.service import MARKET_DATA_GROUP, AlertsService
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic

T0 = stubs.TS


@dataclass
class RecordingChannel:
    name: str = "log"
    sent: list[Notification] = field(default_factory=list)

    async def send(self, notification: Notification) -> None:
        self.sent.append(notification)

    async def close(self) -> None:
        return None


@dataclass
class Stage:
    bus: InMemoryBus
    clock: SimulatedClock
    service: AlertsService
    channel: RecordingChannel


async def settle() -> None:
    """Let background tasks run what the clock made due."""
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.fixture
async def stale_stage() -> AsyncIterator[Stage]:
    clock = SimulatedClock(T0)
    bus = InMemoryBus("test", clock=clock)
    settings = AlertsSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        database_url=None,
        alert_check_interval_s=5,
        alert_rules="rules: [{name: md, kind: stale_market_data, max_age_s: 60, throttle_s: 0}]",
    )
    channel = RecordingChannel()
    service = AlertsService(settings, channels={"log": channel})
    runner = ServiceRunner(service, settings, bus=bus, clock=clock, pump=False)
    await runner.start()
    try:
        yield Stage(bus, clock, service, channel)
    finally:
        await runner.stop()


async def advance(stage: Stage, seconds: int) -> None:
    """Move the clock one check interval (5 s) at a time, letting each check run."""
    for _ in range(seconds // 5):
        stage.clock.advance(5)
        await settle()


async def test_stage_when_ticks_stop_for_longer_than_max_age_alerts_once_then_on_recovery(
    stale_stage: Stage,
) -> None:
    await stale_stage.bus.publish(Topic.MD_TICKS, stubs.tick())
    await stale_stage.bus.run_until_idle()

    await advance(stale_stage, 60)
    quiet_for_60 = list(stale_stage.channel.sent)
    await advance(stale_stage, 30)
    await stale_stage.bus.publish(Topic.MD_TICKS, stubs.tick(trade_id="T-2"))
    await stale_stage.bus.run_until_idle()
    await advance(stale_stage, 5)

    assert quiet_for_60 == []
    assert [(n.code, n.instrument_id) for n in stale_stage.channel.sent] == [
        ("STALE_MARKET_DATA", stubs.INSTRUMENT_ID),
        ("MARKET_DATA_RESUMED", stubs.INSTRUMENT_ID),
    ]
    assert stale_stage.channel.sent[0].details["age_s"] == "65.0"


async def test_stage_when_no_stale_rule_is_configured_does_not_read_ticks() -> None:
    settings = AlertsSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        database_url=None,
        alert_rules="rules: [{name: d, kind: dlq}]",
    )
    bus = InMemoryBus("test", clock=SimulatedClock(T0))
    runner = ServiceRunner(AlertsService(settings), settings, bus=bus, clock=bus.clock, pump=False)
    await runner.start()
    try:
        groups = [s.group for s in runner.ctx.subscriptions] if runner.ctx else []
    finally:
        await runner.stop()

    assert MARKET_DATA_GROUP not in groups
    assert groups == ["alerts", "alerts.dlq"]
