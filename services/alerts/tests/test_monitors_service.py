"""The stage's timed checks, on the in-memory bus and against real local HTTP servers."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from quantmesh_alerts.config import AlertsSettings
from quantmesh_alerts.service import MARKET_DATA_GROUP, AlertsService
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.envelope import Envelope
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic

from .conftest import T0, Stage, WaitingChannel, running, settle

S = stubs.SECOND_NS


@pytest.fixture
async def stale_stage() -> AsyncIterator[Stage]:
    async with running(
        alert_check_interval_s=5,
        alert_rules="rules: [{name: md, kind: stale_market_data, max_age_s: 60, throttle_s: 0}]",
    ) as started:
        yield started


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


async def test_stage_when_it_reads_old_ticks_first_does_not_call_their_instruments_stale(
    stale_stage: Stage,
) -> None:
    # What a fresh consumer group reads first: the topic's history, published an hour ago.
    old = Envelope.wrap(
        stubs.tick(), source="marketdata", ts_event=T0 - 3600 * S, ts_init=T0 - 3600 * S
    )
    await stale_stage.bus.publish_envelope(Topic.MD_TICKS, old)
    await stale_stage.bus.run_until_idle()

    await advance(stale_stage, 120)

    assert stale_stage.channel.sent == []


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


# -- service unhealthy: real HTTP servers -----------------------------------------------------


class Readiness:
    """A local HTTP server whose /readyz answers `status`."""

    def __init__(self) -> None:
        self.status = 200
        self.probes = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def readyz(self, request: web.Request) -> web.Response:
        self.probes += 1
        return web.Response(status=self.status, text="ready" if self.status == 200 else "no")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/readyz", self.readyz)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/readyz"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_stage_when_a_readiness_url_fails_n_probes_alerts_then_on_recovery() -> None:
    # Arrange: risk answers 503, oms has nothing listening; probes every 50 ms, 2 in a row.
    server = Readiness()
    await server.start()
    server.status = 503
    oms_url = f"http://127.0.0.1:{closed_port()}/readyz"
    settings = AlertsSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        database_url=None,
        alert_health_urls=f"risk={server.url},oms={oms_url}",
        alert_health_interval_s=0.05,
        alert_health_timeout_s=5,
        alert_rules="rules: [{name: up, kind: service_unhealthy, failures: 2, throttle_s: 0}]",
    )
    channel = WaitingChannel()
    runner = ServiceRunner(
        AlertsService(settings, channels={"log": channel}), settings, bus=InMemoryBus("test")
    )
    await runner.start()
    try:
        # Act
        down = await channel.wait_for(2)
        server.status = 200
        everything = await channel.wait_for(3)
    finally:
        await runner.stop()
        await server.stop()

    # Assert
    assert sorted((n.code, n.details["service"]) for n in down) == [
        ("SERVICE_UNHEALTHY", "oms"),
        ("SERVICE_UNHEALTHY", "risk"),
    ]
    by_service = {n.details["service"]: n for n in down}
    assert by_service["risk"].details["error"] == "HTTP 503"
    assert by_service["oms"].details["error"].startswith("ClientConnectorError")
    assert by_service["risk"].details["failures"] == "2"
    assert [(n.code, n.details["service"]) for n in everything[2:]] == [
        ("SERVICE_RECOVERED", "risk")
    ]
    assert server.probes >= 3
