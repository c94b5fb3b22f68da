"""Two oms members in one group on the in-memory bus, sharing one PostgreSQL schema: the timers
(GTD expiry, TWAP/VWAP slices) and CANCEL_ALL_ORDERS act once, in the member that owns the
order's account partition, including after the partition moved."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.base import Emit, partition_of
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.messages import (
    CommandType,
    ControlAction,
    ExecAlgo,
    ExecType,
    Order,
    OrderCommand,
    OrderStatus,
    TimeInForce,
)
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import deliver
from quantmesh_common.topics import Topic
from quantmesh_oms.service import CONTROL_GROUP_PREFIX, GROUP
from quantmesh_oms.store import PostgresOrderStore

from .conftest import OmsMember, new_oms

pytestmark = pytest.mark.integration

D = Decimal
S = stubs.SECOND_NS
NOW = stubs.TS + 10 * S
#: crc32("acc-1") % 6 = 5 and crc32("acc-4") % 6 = 0: with two members in join order, the
#: range assignor gives partitions 0-2 to the first and 3-5 to the second.
MOVES, STAYS = "acc-1", "acc-4"


def _commands(bus: InMemoryBus) -> list[OrderCommand]:
    return [e.payload for e in bus.messages(Topic.ORDERS_COMMANDS)]


def _updates(bus: InMemoryBus, client_order_id: str) -> list[Order]:
    return [
        e.payload
        for e in bus.messages(Topic.ORDERS_UPDATES)
        if e.payload.client_order_id == client_order_id
    ]


def _gtd(client_order_id: str, account_id: str, expire_time_ns: int) -> Any:
    intent = stubs.limit_order_intent(
        client_order_id=client_order_id,
        account_id=account_id,
        time_in_force=TimeInForce.GTD,
        expire_time_ns=expire_time_ns,
    )
    return stubs.risk_decision(decision_id=f"D-{client_order_id}", intent=intent)


def _sent(emits: list[Emit]) -> list[OrderCommand]:
    """The commands among a timer check's emits."""
    return [e.payload for e in emits if isinstance(e.payload, OrderCommand)]


def _report(command: OrderCommand, exec_type: ExecType, status: OrderStatus) -> Any:
    return stubs.order_accepted(
        report_id=f"R-{command.command_id}",
        client_order_id=command.client_order_id,
        venue_order_id=f"V-{command.client_order_id}",
        account_id=command.account_id,
        exec_type=exec_type,
        order_status=status,
    )


def test_accounts_when_mapped_to_partitions_land_on_either_side_of_the_split() -> None:
    assert (partition_of(MOVES, 6), partition_of(STAYS, 6)) == (5, 0)


async def test_gtd_orders_when_members_split_the_partitions_expire_once_each(
    oms_pool: Any,
) -> None:
    # Arrange: the first member alone opens a GTD order in each account (expiring at +5 s) and
    # sees both accepted; the second joins (loading both open orders at its start) and takes
    # partitions 3-5, so acc-1's order is its own and acc-4's stays with the first.
    clock = SimulatedClock(NOW)
    bus = InMemoryBus("test", clock=clock, retain=True)
    first = await OmsMember.join(new_oms(), bus, clock, oms_pool)
    await deliver(
        bus, Topic.ORDERS_APPROVED, _gtd("G-1", MOVES, NOW + 5 * S), _gtd("G-4", STAYS, NOW + 5 * S)
    )
    await deliver(
        bus,
        Topic.EXEC_REPORTS,
        *(_report(c, ExecType.ACCEPTED, OrderStatus.ACCEPTED) for c in _commands(bus)),
    )
    second = await OmsMember.join(new_oms(), bus, clock, oms_pool)
    assert second.service.orders.get("G-1") is not None  # a copy from its start

    # Act: both members check their timers at +6 s; the venue answers each CANCEL; both
    # check again at +7 s.
    clock.advance_to(NOW + 6 * S)
    by_first = await first.tick(bus)
    by_second = await second.tick(bus)
    cancels = [c for c in _commands(bus) if c.command_type is CommandType.CANCEL]
    await deliver(
        bus,
        Topic.EXEC_REPORTS,
        *(_report(c, ExecType.CANCELED, OrderStatus.CANCELED) for c in cancels),
    )
    clock.advance_to(NOW + 7 * S)
    later = [*await first.tick(bus), *await second.tick(bus)]

    # Assert: one CANCEL per order, each from its account's owner, and one EXPIRED each.
    assert sorted(c.command_id for c in cancels) == ["G-1:CANCEL:EXPIRE", "G-4:CANCEL:EXPIRE"]
    assert [c.command_id for c in _sent(by_first)] == ["G-4:CANCEL:EXPIRE"]
    assert [c.command_id for c in _sent(by_second)] == ["G-1:CANCEL:EXPIRE"]
    assert later == []
    for client_order_id in ("G-1", "G-4"):
        expired = [o for o in _updates(bus, client_order_id) if o.status is OrderStatus.EXPIRED]
        assert len(expired) == 1, client_order_id
    rows = await oms_pool.fetch("SELECT client_order_id, status FROM orders ORDER BY 1")
    assert [(r["client_order_id"], r["status"]) for r in rows] == [
        ("G-1", "EXPIRED"),
        ("G-4", "EXPIRED"),
    ]
    assert first.service.orders.get("G-1") is None  # dropped: its partition moved


async def test_twap_when_its_partition_moves_mid_schedule_sends_each_slice_once(
    oms_pool: Any,
) -> None:
    # Arrange: 1 BTC of acc-1 over 60 s in 4 slices of lot 0.001 -> 0.25 at +0, +15, +30 and
    # +45 s. The first member alone sends slices 1 (with the decision) and 2 (at +15 s);
    # then the second joins and takes acc-1's partition.
    clock = SimulatedClock(NOW)
    bus = InMemoryBus("test", clock=clock, retain=True)
    first = await OmsMember.join(new_oms(), bus, clock, oms_pool)
    intent = stubs.order_intent(
        client_order_id="P-1",
        account_id=MOVES,
        quantity=D("1"),
        algo=ExecAlgo.TWAP,
        algo_duration_s=60,
        algo_slices=4,
        algo_lot_size=D("0.001"),
    )
    await deliver(bus, Topic.ORDERS_APPROVED, stubs.risk_decision(intent=intent))
    clock.advance_to(NOW + 15 * S)
    before_move = await first.tick(bus)
    clock.advance_to(NOW + 20 * S)
    second = await OmsMember.join(new_oms(), bus, clock, oms_pool)

    # Act: both members check their timers at +30 and +45 s.
    sent_by: dict[str, list[str]] = {"first": [], "second": []}
    for seconds in (30, 45):
        clock.advance_to(NOW + seconds * S)
        for name, member in (("first", first), ("second", second)):
            sent_by[name] += [c.client_order_id for c in _sent(await member.tick(bus))]

    # Assert: each child once, 4 x 0.25 = 1 = the parent's quantity; slices 3 and 4 from the
    # new owner; the parent's progress stored as 4 of 4.
    submits = [
        (c.client_order_id, c.quantity)
        for c in _commands(bus)
        if c.command_type is CommandType.SUBMIT
    ]
    assert submits == [
        ("P-1:1", D("0.25")),
        ("P-1:2", D("0.25")),
        ("P-1:3", D("0.25")),
        ("P-1:4", D("0.25")),
    ]
    assert sum(q for _, q in submits if q is not None) == D("1")
    assert [c.client_order_id for c in _sent(before_move)] == ["P-1:2"]
    assert sent_by == {"first": [], "second": ["P-1:3", "P-1:4"]}
    assert _updates(bus, "P-1")[-1].algo_slices_sent == 4
    stored = await PostgresOrderStore(oms_pool).load("P-1")
    assert stored is not None
    assert stored.algo_sent == 4


async def test_cancel_all_when_its_accounts_owner_moved_cancels_each_order_once(
    oms_pool: Any,
) -> None:
    # Arrange: the first member alone opens O-1 in acc-1 and O-4 in acc-4 (both accepted);
    # the second joins and takes acc-1's partition.
    clock = SimulatedClock(NOW)
    bus = InMemoryBus("test", clock=clock, retain=True)
    first = await OmsMember.join(new_oms(), bus, clock, oms_pool)
    await deliver(
        bus,
        Topic.ORDERS_APPROVED,
        *(
            stubs.risk_decision(
                decision_id=f"D-{cid}",
                intent=stubs.limit_order_intent(client_order_id=cid, account_id=account),
            )
            for cid, account in (("O-1", MOVES), ("O-4", STAYS))
        ),
    )
    await deliver(
        bus,
        Topic.EXEC_REPORTS,
        *(_report(c, ExecType.ACCEPTED, OrderStatus.ACCEPTED) for c in _commands(bus)),
    )
    second = await OmsMember.join(new_oms(), bus, clock, oms_pool)
    await first.tick(bus)

    # Act: an operator cancels everything (read by every member).
    command = stubs.control_command(
        command_id="K-1", action=ControlAction.CANCEL_ALL_ORDERS, target="*", ts_event=NOW + S
    )
    await deliver(bus, Topic.CONTROL, command)
    await second.tick(bus)

    # Assert: one CANCEL per order.
    cancels = sorted(c.command_id for c in _commands(bus) if c.command_type is CommandType.CANCEL)
    assert cancels == ["O-1:CANCEL:K-1", "O-4:CANCEL:K-1"]


async def test_cancel_all_when_its_accounts_owner_missed_it_is_applied_by_the_next_owner(
    oms_pool: Any,
) -> None:
    # Arrange: two members split the partitions; O-1 (acc-1) opens in the second, which then
    # stops reading `control` (as one dying would), so only the first sees CANCEL_ALL_ORDERS
    # K-1, and it owns none of acc-1's orders.
    clock = SimulatedClock(NOW)
    bus = InMemoryBus("test", clock=clock, retain=True)
    first = await OmsMember.join(new_oms(), bus, clock, oms_pool)
    second = await OmsMember.join(new_oms(), bus, clock, oms_pool)
    decision = stubs.risk_decision(intent=stubs.limit_order_intent(account_id=MOVES))
    await deliver(bus, Topic.ORDERS_APPROVED, decision)
    await deliver(
        bus,
        Topic.EXEC_REPORTS,
        *(_report(c, ExecType.ACCEPTED, OrderStatus.ACCEPTED) for c in _commands(bus)),
    )
    flow, control = (
        [s for s in second.subscriptions if s.group == GROUP],
        [s for s in second.subscriptions if s.group.startswith(CONTROL_GROUP_PREFIX)],
    )
    for subscription in control:
        await subscription.stop()
    command = stubs.control_command(
        command_id="K-1", action=ControlAction.CANCEL_ALL_ORDERS, target="*", ts_event=NOW + S
    )
    await deliver(bus, Topic.CONTROL, command)
    missed = [c for c in _commands(bus) if c.command_type is CommandType.CANCEL]

    # Act: the second leaves the order flow; the first takes acc-1's partition and checks
    # its timers twice.
    for subscription in flow:
        await subscription.stop()
    clock.advance_to(NOW + 2 * S)
    await first.tick(bus)
    clock.advance_to(NOW + 3 * S)
    await first.tick(bus)

    # Assert: nobody canceled O-1 at first; then its new owner did, once.
    assert missed == []
    cancels = [c.command_id for c in _commands(bus) if c.command_type is CommandType.CANCEL]
    assert cancels == ["O-1:CANCEL:K-1"]
    order = first.service.orders.get("O-1")
    assert order is not None
    assert order.status is OrderStatus.CANCEL_PENDING


async def test_partition_when_moving_waits_for_the_timer_action_in_flight_then_leaves_its_orders(
    oms_pool: Any,
) -> None:
    # Arrange: the first member alone holds a GTD order in each account, and a timer action is
    # in flight (it holds the service's lock across its store write and publish).
    clock = SimulatedClock(NOW)
    bus = InMemoryBus("test", clock=clock, retain=True)
    first = await OmsMember.join(new_oms(), bus, clock, oms_pool)
    await deliver(
        bus, Topic.ORDERS_APPROVED, _gtd("G-1", MOVES, NOW + 5 * S), _gtd("G-4", STAYS, NOW + 5 * S)
    )
    await first.service._lock.acquire()

    # Act: a second member joins while the action runs, then the action ends.
    joining = asyncio.create_task(OmsMember.join(new_oms(), bus, clock, oms_pool))
    for _ in range(20):
        await asyncio.sleep(0)
    flow = first.subscriptions[0]
    held = (joining.done(), flow.assignment())
    first.service._lock.release()
    second = await joining

    # Assert: the group waited for the action (the first member still owned every partition
    # meanwhile); then the first dropped the order of the account that moved and kept the
    # other, and the second has the moved account's order.
    assert held[0] is False
    assert {p for _, p in held[1]} == set(range(6))
    assert first.service.orders.get("G-1") is None
    assert first.service.orders.get("G-4") is not None
    assert second.service.orders.get("G-1") is not None
