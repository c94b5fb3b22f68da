"""A VWAP parent on the real broker and PostgreSQL: profile from bars, slices across a restart."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.base import Emit
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import (
    ExecAlgo,
    Tick,
)
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic
from quantmesh_oms.profile import VolumeProfiles

from .conftest import KafkaExecution, KafkaNames, KafkaOms, MappedBus, eventually, kafka_names

pytestmark = pytest.mark.integration

D = Decimal
S = stubs.SECOND_NS
DAY = 86_400 * S
NOW = stubs.TS + 10 * S


@pytest.fixture
async def names() -> AsyncIterator[KafkaNames]:
    async with kafka_names("algo") as created:
        yield created


class Execution(KafkaExecution):
    """The execution stage on the simulated venue."""

    def __init__(self, names: KafkaNames) -> None:
        super().__init__(names, "SIMALGO")
        self.ticks = 0

    def handle(self, envelope: Envelope[Any]) -> list[Emit]:
        if isinstance(envelope.payload, Tick):
            self.ticks += 1
        return super().handle(envelope)


class Oms(KafkaOms):
    """One oms 'process' on a simulated clock: rebuilt from PostgreSQL, on its own Kafka bus."""

    def __init__(self, names: KafkaNames, pool: Any, now_ns: int) -> None:
        super().__init__(names, pool)
        self.service.profiles = VolumeProfiles(pool, lookback_days=2, bar_interval="1m")
        self.service.clock = self.clock = SimulatedClock(now_ns)


async def _orders(pool: Any) -> dict[str, tuple[str, Decimal, Decimal]]:
    rows = await pool.fetch("SELECT client_order_id, status, quantity, filled_quantity FROM orders")
    return {r["client_order_id"]: (r["status"], r["quantity"], r["filled_quantity"]) for r in rows}


async def _insert_bar(pool: Any, ts_open: int, volume: str) -> None:
    await pool.execute(
        "INSERT INTO bars (instrument_id, interval, ts_open, ts_close, open, high, low, close,"
        " volume) VALUES ($1, '1m', $2, $3, 50000, 50000, 50000, 50000, $4)",
        stubs.INSTRUMENT_ID,
        ts_open,
        ts_open + 60 * S,
        D(volume),
    )


async def test_vwap_parent_when_oms_restarts_between_slices_follows_bar_profile_and_fills(
    names: KafkaNames, oms_pool: Any
) -> None:
    # Arrange: yesterday's volume in the two 60 s windows of the slices is 3 and 1, so 1 BTC
    # splits 0.75 now and 0.25 at +60 s (lot 0.01).
    await _insert_bar(oms_pool, NOW - DAY, "3")
    await _insert_bar(oms_pool, NOW - DAY + 60 * S, "1")
    execution = Execution(names)
    await execution.start()
    first = Oms(names, oms_pool, NOW)
    await first.start()
    second: Oms | None = None
    try:
        await execution.bus.publish(
            names.topics[Topic.MD_TICKS], stubs.tick(price=D("50000"), size=D("5"))
        )
        await execution.bus.flush()

        async def venue_has_a_trade() -> bool:
            return execution.ticks == 1

        await eventually(venue_has_a_trade)
        intent = stubs.order_intent(
            quantity=D("1"),
            algo=ExecAlgo.VWAP,
            algo_duration_s=120,
            algo_slices=2,
            algo_lot_size=D("0.01"),
        )
        await first.bus.publish(
            names.topics[Topic.ORDERS_APPROVED], stubs.risk_decision(intent=intent)
        )
        await first.bus.flush()

        async def first_slice_filled() -> bool:
            found = await _orders(oms_pool)
            return found.get("O-1", ("", D(0), D(0)))[2] == D("0.75")

        await eventually(first_slice_filled, show=lambda: _orders(oms_pool))
        await first.bus.close()

        # Act: a new oms process rebuilds the parent and sends its second slice when due.
        second = Oms(names, oms_pool, NOW + 30 * S)
        await second.start()
        early = await second.service.publish_slices(MappedBus(second.bus, names))
        second.clock.advance_to(NOW + 60 * S)
        due = await second.service.publish_slices(MappedBus(second.bus, names))

        async def parent_filled() -> bool:
            return (await _orders(oms_pool)).get("O-1", ("",))[0] == "FILLED"

        await eventually(parent_filled, show=lambda: _orders(oms_pool))
    finally:
        await execution.bus.close()
        for oms in (first, second):
            if oms is not None:
                with contextlib.suppress(Exception):
                    await oms.bus.close()

    # Assert
    assert early == []
    assert len(due) == 3
    assert await _orders(oms_pool) == {
        "O-1": ("FILLED", D("1"), D("1")),
        "O-1:1": ("FILLED", D("0.75"), D("0.75")),
        "O-1:2": ("FILLED", D("0.25"), D("0.25")),
    }
    assert [(f.client_order_id, f.quantity) for f in execution.venue.ledger.fills] == [
        ("O-1:1", D("0.75")),
        ("O-1:2", D("0.25")),
    ]
    slices = await oms_pool.fetch(
        "SELECT event_id FROM order_events WHERE event_type = 'SLICE' ORDER BY event_id"
    )
    assert [r["event_id"] for r in slices] == ["O-1:SLICE:1", "O-1:SLICE:2"]
