"""Risk's tick handler on Kafka lets the order flow run between ticks of one batch."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from quantmesh_common.envelope import Envelope
from quantmesh_common.testing import stubs
from quantmesh_risk.config import RiskSettings
from quantmesh_risk.service import TICKS_PER_YIELD, RiskService


async def test_ticks_when_handled_in_a_long_run_let_another_task_run_every_few_ticks() -> None:
    service = RiskService(RiskSettings(bus="memory", http_port=0))
    ticks = [
        Envelope.wrap(
            stubs.tick(price=Decimal(50000 + n), ts_event=stubs.TS + n),
            source="test",
            ts_event=stubs.TS + n,
            ts_init=stubs.TS + n,
        )
        for n in range(2 * TICKS_PER_YIELD)
    ]
    ran_after: list[int] = []
    handled = 0

    async def order_flow() -> None:
        ran_after.append(handled)

    other = asyncio.create_task(order_flow())
    for envelope in ticks:
        await service.on_tick_yielding(envelope)
        handled += 1
    await other

    # It ran at the first yield: inside the call for tick number TICKS_PER_YIELD (counted
    # here only once the call returns), not after all of them.
    assert ran_after == [TICKS_PER_YIELD - 1]
    assert service.engine.last_trade[stubs.INSTRUMENT_ID][1] == Decimal(
        50000 + 2 * TICKS_PER_YIELD - 1
    )
