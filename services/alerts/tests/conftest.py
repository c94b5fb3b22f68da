"""Alerts test harness: recording channels and the stage on the in-memory bus and a test clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from quantmesh_alerts.channels import ChannelError
from quantmesh_alerts.config import AlertsSettings
from quantmesh_alerts.rules import Notification
from quantmesh_alerts.service import AlertsService
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.envelope import Envelope
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.testing import stubs

T0 = stubs.TS


@dataclass
class RecordingChannel:
    """A channel that keeps every notification it is sent; with `fail`, then raises as a
    webhook that gave up does."""

    name: str = "log"
    fail: bool = False
    sent: list[Notification] = field(default_factory=list)

    async def send(self, notification: Notification) -> None:
        self.sent.append(notification)
        if self.fail:
            raise ChannelError("hook: gave up after 4 attempts: 503")

    async def close(self) -> None:
        return None


@dataclass
class WaitingChannel(RecordingChannel):
    """A recording channel whose test can await the n-th notification."""

    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, notification: Notification) -> None:
        await super().send(notification)
        self.arrived.set()

    async def wait_for(self, count: int, timeout_s: float = 60.0) -> list[Notification]:
        async with asyncio.timeout(timeout_s):
            while len(self.sent) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return list(self.sent)


@dataclass
class Stage:
    bus: InMemoryBus
    clock: SimulatedClock
    service: AlertsService
    channel: RecordingChannel

    async def send(self, topic: str, payload: Any) -> Envelope[Any]:
        envelope = await self.bus.publish(topic, payload)
        await self.bus.run_until_idle()
        return envelope


@asynccontextmanager
async def running(
    channels: dict[str, RecordingChannel] | None = None, **settings: Any
) -> AsyncIterator[Stage]:
    """The stage configured by `settings` on an in-memory bus and a simulated clock at T0;
    `channels` (a recording `log` channel by default) stand in for the real ones."""
    clock = SimulatedClock(T0)
    bus = InMemoryBus("test", clock=clock)
    # No database unless a test names one: the stack's QM_DATABASE_URL in the environment must
    # not reach this stage.
    defaults: dict[str, Any] = {
        "bus": "memory",
        "http_host": "127.0.0.1",
        "http_port": 0,
        "database_url": None,
    }
    configured = AlertsSettings(**defaults | settings)
    channels = channels or {"log": RecordingChannel()}
    service = AlertsService(configured, channels=channels)
    runner = ServiceRunner(service, configured, bus=bus, clock=clock, pump=False)
    await runner.start()
    try:
        yield Stage(bus, clock, service, channels["log"])
    finally:
        await runner.stop()


async def settle() -> None:
    """Let the stage's background tasks (its timers, the flush loop) run what became due."""
    for _ in range(20):
        await asyncio.sleep(0)
