"""Reconciliation on the real broker and PostgreSQL: an oms restart converges with the venue."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.base import Emit
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import (
    CommandType,
    ExecType,
    ExecutionReport,
    OrderCommand,
    RiskDecision,
)
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic

from .conftest import KafkaExecution, KafkaNames, KafkaOms, MappedBus, eventually, kafka_names

pytestmark = pytest.mark.integration


@pytest.fixture
async def names() -> AsyncIterator[KafkaNames]:
    async with kafka_names("rec") as created:
        yield created


class Execution(KafkaExecution):
    """The execution stage on the simulated venue; it can 'lose' chosen SUBMITs once."""

    def __init__(self, names: KafkaNames, lose_once: set[str]) -> None:
        super().__init__(names, "SIMREC")
        self.lose_once = set(lose_once)
        self.commands: list[OrderCommand] = []
        self.reports: list[ExecutionReport] = []

    def handle(self, envelope: Envelope[Any]) -> list[Emit]:
        payload = envelope.payload
        if isinstance(payload, OrderCommand):
            self.commands.append(payload)
            if payload.client_order_id in self.lose_once:
                self.lose_once.discard(payload.client_order_id)
                return []  # lost on the way: the venue never sees it
        emits = super().handle(envelope)
        self.reports += [e.payload for e in emits if isinstance(e.payload, ExecutionReport)]
        return emits


class Oms(KafkaOms):
    """One oms 'process': its service rebuilt from PostgreSQL, on its own Kafka bus."""

    async def start_reconciling(self) -> list[Emit]:
        """Start, then query the venue about every open order, as the process does."""
        await self.start()
        return await self.service.publish_reconciliation(MappedBus(self.bus, self.names), "S2")


async def _statuses(pool: Any) -> dict[str, str]:
    rows = await pool.fetch("SELECT client_order_id, status FROM orders")
    return {r["client_order_id"]: r["status"] for r in rows}


def _decision(client_order_id: str, limit_price: str) -> RiskDecision:
    intent = stubs.limit_order_intent(
        client_order_id=client_order_id,
        intent_id=f"I-{client_order_id}",
        limit_price=Decimal(limit_price),
    )
    return stubs.risk_decision(decision_id=f"D-{client_order_id}", intent=intent)


async def test_restart_when_order_filled_and_another_lost_while_down_converges_with_the_venue(
    names: KafkaNames, oms_pool: Any
) -> None:
    # Arrange: O-1 rests at the venue; O-2's SUBMIT is lost on the way (never reaches it);
    # both are limit buys below the market, so only the trade below sends a fill.
    execution = Execution(names, lose_once={"O-2"})
    await execution.start()
    first = Oms(names, oms_pool)
    await first.start_reconciling()
    approved = names.topics[Topic.ORDERS_APPROVED]
    try:
        await first.bus.publish(approved, _decision("O-1", "49000.00"))
        await first.bus.publish(approved, _decision("O-2", "48000.00"))
        await first.bus.flush()

        async def first_state_stored() -> bool:
            return await _statuses(oms_pool) == {"O-1": "ACCEPTED", "O-2": "SUBMITTED"}

        await eventually(first_state_stored, show=lambda: _statuses(oms_pool))
        await first.bus.close()
        # While the oms is down, a trade through O-1's limit (49000.00) fills it at the venue.
        await execution.bus.publish(
            names.topics[Topic.MD_TICKS],
            stubs.tick(price=Decimal("48900.00"), size=Decimal("1")),
        )
        await execution.bus.flush()

        async def filled_at_venue() -> bool:
            return len(execution.venue.ledger.fills) == 1

        await eventually(filled_at_venue)

        # Act: the oms restarts, rebuilds both open orders and queries the venue about them.
        second = Oms(names, oms_pool)
        queries = await second.start_reconciling()

        async def converged() -> bool:
            return await _statuses(oms_pool) == {"O-1": "FILLED", "O-2": "ACCEPTED"}

        await eventually(converged, show=lambda: _statuses(oms_pool))
        await asyncio.sleep(2)  # let any duplicate answer arrive before counting
        await second.bus.close()
    finally:
        await execution.bus.close()
        with contextlib.suppress(Exception):
            await first.bus.close()

    # Assert: one QUERY per open order; O-2 re-sent with its own command id, at the venue once.
    query_ids = [e.payload.command_id for e in queries if isinstance(e.payload, OrderCommand)]
    assert sorted(query_ids) == ["O-1:QUERY:S2", "O-2:QUERY:S2"]
    submits_of_o2 = [
        c.command_id
        for c in execution.commands
        if c.client_order_id == "O-2" and c.command_type is CommandType.SUBMIT
    ]
    assert submits_of_o2 == ["O-2:SUBMIT", "O-2:SUBMIT"]
    assert [o.client_order_id for o in execution.venue.ledger.orders] == ["O-1", "O-2"]
    # O-1's fill reached the oms twice (backlog and the QUERY's answer), applied once.
    [fill] = execution.venue.ledger.fills
    fill_reports = [r for r in execution.reports if r.trade_id == fill.trade_id]
    assert len(fill_reports) == 2
    assert len({r.report_id for r in fill_reports}) == 1
    events = await oms_pool.fetch(
        "SELECT event_id, event_type FROM order_events ORDER BY ts_init, event_id"
    )
    types = [(e["event_id"].split(":")[0], e["event_type"]) for e in events]
    assert types.count(("O-1", ExecType.FILL.value)) == 1
    assert ("O-2", "RESUBMIT") in types
    row = await oms_pool.fetchrow(
        "SELECT filled_quantity, avg_fill_price FROM orders WHERE client_order_id = 'O-1'"
    )
    assert (row["filled_quantity"], row["avg_fill_price"]) == (Decimal("0.1"), Decimal("49000"))
