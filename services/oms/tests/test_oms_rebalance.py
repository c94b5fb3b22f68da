"""Two oms members in one group on the in-memory bus, sharing one PostgreSQL schema: a member
assigned an account's partition applies the venue's reports to the orders as the previous
owner stored them, not to the copies it loaded at its own start."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.messages import CommandType, ExecType, Order, OrderStatus
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import deliver
from quantmesh_common.topics import Topic

from .conftest import OmsMember, new_oms

pytestmark = pytest.mark.integration

D = Decimal
NOW = stubs.TS + 10 * stubs.SECOND_NS
CID = stubs.CLIENT_ORDER_ID


def _updates(bus: InMemoryBus) -> list[Order]:
    return [e.payload for e in bus.messages(Topic.ORDERS_UPDATES)]


async def test_fill_when_the_order_moves_to_a_member_without_its_latest_state_fills_it_whole(
    oms_pool: Any,
) -> None:
    # Arrange: the first member opens O-1 (0.1) and sees it accepted; the second starts and
    # loads it as accepted; a partial fill of 0.04 reaches whichever owns the account, and
    # that one leaves, so the other (whose copy has nothing filled) gets the account.
    clock = SimulatedClock(NOW)
    bus = InMemoryBus("test", clock=clock, retain=True)
    first = await OmsMember.join(new_oms(), bus, clock, oms_pool)
    await deliver(bus, Topic.ORDERS_APPROVED, stubs.risk_decision())
    await deliver(bus, Topic.EXEC_REPORTS, stubs.order_accepted())
    second = await OmsMember.join(new_oms(), bus, clock, oms_pool)
    partial = stubs.execution_report(
        report_id="R-1",
        trade_id="T-1",
        exec_type=ExecType.PARTIAL_FILL,
        order_status=OrderStatus.PARTIALLY_FILLED,
        last_qty=D("0.04"),
        cum_qty=D("0.04"),
        leaves_qty=D("0.06"),
    )
    await deliver(bus, Topic.EXEC_REPORTS, partial)
    owners = [m for m in (first, second) if m.filled(CID) == D("0.04")]
    assert len(owners) == 1
    owner = owners[0]
    heir = second if owner is first else first
    # The heir's copy, if any, has nothing filled: a member that gave the account away at the
    # second's join dropped it then (its on_revoke), one that never owned it loaded it at start.
    assert heir.filled(CID) in (D(0), None)
    await owner.leave()
    reloads_before = heir.service.reloads

    # Act: the venue fills the remaining 0.06.
    rest = stubs.execution_report(
        report_id="R-2", trade_id="T-2", last_qty=D("0.06"), cum_qty=D("0.1")
    )
    await deliver(bus, Topic.EXEC_REPORTS, rest)

    # Assert: 0.04 + 0.06 = 0.1, the whole order; stored so too.
    last = [o for o in _updates(bus) if o.client_order_id == CID][-1]
    assert (last.status, last.filled_quantity) == (OrderStatus.FILLED, D("0.1"))
    row = await oms_pool.fetchrow(
        "SELECT status, filled_quantity FROM orders WHERE client_order_id = $1", CID
    )
    assert (row["status"], row["filled_quantity"]) == ("FILLED", D("0.1"))
    assert heir.service.reloads == reloads_before + 1


async def test_decision_when_redelivered_to_a_member_started_before_its_order_is_not_sent_twice(
    oms_pool: Any,
) -> None:
    # Arrange: both members start on an empty store, so neither has an order time to tell a
    # redelivered decision from a new one; the decision reaches whichever owns the account,
    # which opens O-1 and sends it, and that one leaves.
    clock = SimulatedClock(NOW)
    bus = InMemoryBus("test", clock=clock, retain=True)
    first = await OmsMember.join(new_oms(), bus, clock, oms_pool)
    second = await OmsMember.join(new_oms(), bus, clock, oms_pool)
    decision = stubs.risk_decision()
    await deliver(bus, Topic.ORDERS_APPROVED, decision)
    owners = [m for m in (first, second) if m.service.orders.get(CID) is not None]
    assert len(owners) == 1
    owner = owners[0]
    heir = second if owner is first else first
    await owner.leave()

    # Act: the same decision again (a producer's retry, a redelivery upstream).
    await deliver(bus, Topic.ORDERS_APPROVED, decision)

    # Assert: one order, sent to the venue once.
    commands = [e.payload for e in bus.messages(Topic.ORDERS_COMMANDS)]
    assert [(c.client_order_id, c.command_type) for c in commands] == [(CID, CommandType.SUBMIT)]
    assert await oms_pool.fetchval("SELECT count(*) FROM orders") == 1
    assert heir.service.orders.get(CID) is not None
