"""TWAP/VWAP parent orders: slicing on the oms clock, progress, cancel and restart."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from quantmesh_common.messages import (
    CommandType,
    ControlAction,
    ExecAlgo,
    ExecType,
    Order,
    OrderCommand,
    OrderStatus,
    OrderType,
)
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.topics import Topic
from quantmesh_execution.service import ExecutionHandler
from quantmesh_execution.simulated import SimulatedVenue
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.service import OmsService
from quantmesh_oms.store import InMemoryOrderStore

D = Decimal
S = stubs.SECOND_NS
#: 1_700_000_010 s since the epoch: 22:13:30 UTC.
NOW = stubs.TS + 10 * S


class Harness(StageHarness[OmsService]):
    """The oms service on a retaining in-memory bus with a simulated clock."""

    def __init__(self, store: InMemoryOrderStore | None = None, **settings: Any) -> None:
        service = OmsService(OmsSettings(bus="memory", http_port=0, **settings))
        if store is not None:
            service.store = store
        super().__init__(service, now_ns=NOW)

    def commands(self) -> list[OrderCommand]:
        return self.payloads(Topic.ORDERS_COMMANDS)

    def submits(self) -> list[tuple[str, Decimal | None]]:
        return [
            (c.client_order_id, c.quantity)
            for c in self.commands()
            if c.command_type is CommandType.SUBMIT
        ]

    def parent_updates(self) -> list[Order]:
        return [o for o in self.payloads(Topic.ORDERS_UPDATES) if o.client_order_id == "O-1"]

    def order(self, client_order_id: str) -> Order:
        found = self.service.orders.get(client_order_id)
        assert found is not None
        return found

    async def at(self, seconds: int) -> list[Any]:
        """Move the oms clock to NOW + `seconds` and run the slice check once."""
        self.clock.advance_to(NOW + seconds * S)
        emits = await self.service.publish_slices(self.bus)
        await self.bus.run_until_idle()
        return emits


def _parent(algo: ExecAlgo = ExecAlgo.TWAP, **intent: Any) -> Any:
    fields: dict[str, Any] = {
        "client_order_id": "O-1",
        "quantity": D("1"),
        "algo": algo,
        "algo_duration_s": 60,
        "algo_slices": 3,
        "algo_lot_size": D("0.001"),
    }
    return stubs.risk_decision(intent=stubs.order_intent(**{**fields, **intent}))


async def _with_venue(oms: Harness) -> SimulatedVenue:
    venue = SimulatedVenue(id_prefix="SIM")
    handler = ExecutionHandler(venue)
    await oms.bus.subscribe("exec", [Topic.ORDERS_COMMANDS, Topic.MD_TICKS], handler).start()
    return venue


async def _trade(oms: Harness, price: str) -> None:
    await oms.send(Topic.MD_TICKS, stubs.tick(price=D(price), size=D("5")))


async def test_twap_when_run_against_simulated_venue_sends_three_slices_and_fills_parent() -> None:
    # Arrange: 1 BTC over 60 s in 3 slices of lot 0.001 -> 0.333 at +0 s, +20 s, 0.334 at +40 s.
    oms = await Harness().start()
    venue = await _with_venue(oms)
    await _trade(oms, "50000")

    # Act
    await oms.send(Topic.ORDERS_APPROVED, _parent())
    after_first = oms.order("O-1")
    await _trade(oms, "50300")
    early = await oms.at(19)
    await oms.at(20)
    await _trade(oms, "50600")
    await oms.at(40)
    late = await oms.at(100)

    # Assert
    assert early == []
    assert late == []
    assert oms.submits() == [("O-1:1", D("0.333")), ("O-1:2", D("0.333")), ("O-1:3", D("0.334"))]
    assert [(f.client_order_id, f.quantity, f.price) for f in venue.ledger.fills] == [
        ("O-1:1", D("0.333"), D("50000")),
        ("O-1:2", D("0.333"), D("50300")),
        ("O-1:3", D("0.334"), D("50600")),
    ]
    assert (after_first.status, after_first.filled_quantity) == (
        OrderStatus.PARTIALLY_FILLED,
        D("0.333"),
    )
    assert (after_first.algo_slices_sent, after_first.algo_slices_total) == (1, 3)
    parent = oms.order("O-1")
    # (0.333 * 50000 + 0.333 * 50300 + 0.334 * 50600) / 1 = 50300.3
    assert (parent.status, parent.filled_quantity, parent.avg_fill_price) == (
        OrderStatus.FILLED,
        D("1"),
        D("50300.3"),
    )
    assert parent.algo_slices_sent == 3
    child = oms.order("O-1:2")
    assert (child.parent_order_id, child.tag, child.order_type) == (
        "O-1",
        "ALGO_TWAP",
        OrderType.MARKET,
    )
    # The parent itself never reaches the venue.
    assert all(c.client_order_id != "O-1" for c in oms.commands())


async def test_parent_cancel_when_child_working_cancels_child_and_stops_slicing() -> None:
    # Arrange: LIMIT children at 49000 rest under a last trade of 50000.
    oms = await Harness().start()
    venue = await _with_venue(oms)
    await _trade(oms, "50000")
    await oms.send(
        Topic.ORDERS_APPROVED, _parent(order_type=OrderType.LIMIT, limit_price=D("49000"))
    )
    assert oms.order("O-1:1").status is OrderStatus.ACCEPTED

    # Act
    await oms.send(Topic.ORDERS_REQUESTS, stubs.order_request(client_order_id="O-1"))
    later = await oms.at(60)

    # Assert
    cancels = [c.command_id for c in oms.commands() if c.command_type is CommandType.CANCEL]
    assert cancels == ["O-1:1:CANCEL:RQ-1"]
    assert venue.order("O-1:1").status is OrderStatus.CANCELED  # type: ignore[union-attr]
    assert later == []
    assert oms.submits() == [("O-1:1", D("0.333"))]
    statuses = [o.status for o in oms.parent_updates()]
    assert statuses[-2:] == [OrderStatus.CANCEL_PENDING, OrderStatus.CANCELED]
    assert oms.order("O-1").reason == (
        "ALGO_CANCELED: filled_quantity=0, quantity=1, slices_sent=1"
    )


async def test_twap_when_last_child_rejected_ends_parent_incomplete() -> None:
    oms = await Harness().start()
    await oms.send(Topic.ORDERS_APPROVED, _parent(algo_slices=1, quantity=D("0.5")))

    await oms.send(
        Topic.EXEC_REPORTS,
        stubs.order_accepted(
            client_order_id="O-1:1",
            report_id="R-rej",
            exec_type=ExecType.REJECTED,
            order_status=OrderStatus.REJECTED,
            reason="INSUFFICIENT_BALANCE",
        ),
    )

    parent = oms.order("O-1")
    assert parent.status is OrderStatus.CANCELED
    assert parent.reason == "ALGO_INCOMPLETE: filled_quantity=0, quantity=0.5, slices_sent=1"


async def test_restart_when_parent_half_done_rebuilds_schedule_and_sends_next_slice() -> None:
    # Arrange: slice 1 sent and filled by hand-made reports, then the oms restarts.
    store = InMemoryOrderStore()
    first = await Harness(store).start()
    await first.send(Topic.ORDERS_APPROVED, _parent())
    await first.send(
        Topic.EXEC_REPORTS,
        stubs.execution_report(
            client_order_id="O-1:1",
            report_id="R-f1",
            trade_id="T-f1",
            last_qty=D("0.333"),
            last_price=D("50000"),
            cum_qty=D("0.333"),
            leaves_qty=D("0"),
        ),
    )

    # Act
    second = await Harness(store).start()
    rebuilt = second.order("O-1")
    queries = await second.service.publish_reconciliation(second.bus, "START")
    due = await second.at(20)

    # Assert
    assert (rebuilt.algo_slices_sent, rebuilt.algo_slices_total, rebuilt.filled_quantity) == (
        1,
        3,
        D("0.333"),
    )
    assert queries == []  # the parent is at no venue; its only child is over
    assert second.submits() == [("O-1:2", D("0.333"))]
    assert len(due) == 3  # the child's SUBMIT and state, the parent's progress
    assert second.order("O-1").algo_slices_sent == 2


async def test_vwap_when_hourly_profile_configured_sizes_slices_by_it() -> None:
    # Slices of 1 h from 22:13:30 UTC start in hours 22, 23 and 0; weights 1, 2, 1.
    weights = ["1"] * 24
    weights[23] = "2"
    oms = await Harness(oms_vwap_profile=",".join(weights)).start()
    await oms.send(
        Topic.ORDERS_APPROVED,
        _parent(ExecAlgo.VWAP, algo_duration_s=3 * 3600, algo_lot_size=D("0.01")),
    )

    await oms.at(3600)
    await oms.at(7200)

    assert oms.submits() == [("O-1:1", D("0.25")), ("O-1:2", D("0.5")), ("O-1:3", D("0.25"))]
    assert oms.order("O-1:2").tag == "ALGO_VWAP"


async def test_vwap_when_no_profile_and_no_database_falls_back_to_twap_with_reason() -> None:
    oms = await Harness().start()

    await oms.send(Topic.ORDERS_APPROVED, _parent(ExecAlgo.VWAP))

    assert oms.submits() == [("O-1:1", D("0.333"))]
    assert oms.order("O-1").reason == (
        "VWAP_FALLBACK_TWAP: why=no database (QM_DATABASE_URL unset)"
    )


async def test_parent_decision_when_redelivered_sends_nothing_again() -> None:
    oms = await Harness().start()
    await oms.send(Topic.ORDERS_APPROVED, _parent())

    await oms.send(Topic.ORDERS_APPROVED, _parent())

    assert oms.submits() == [("O-1:1", D("0.333"))]


async def test_cancel_all_when_parent_slicing_cancels_parent_and_child_once() -> None:
    oms = await Harness().start()
    await _with_venue(oms)
    await _trade(oms, "50000")
    await oms.send(
        Topic.ORDERS_APPROVED, _parent(order_type=OrderType.LIMIT, limit_price=D("49000"))
    )
    command = stubs.control_command(
        command_id="K-9", action=ControlAction.CANCEL_ALL_ORDERS, ts_event=NOW
    )

    await oms.send(Topic.CONTROL, command)
    later = await oms.at(60)

    cancels = [c.command_id for c in oms.commands() if c.command_type is CommandType.CANCEL]
    assert cancels == ["O-1:1:CANCEL:K-9"]
    assert later == []
    assert oms.order("O-1").status is OrderStatus.CANCELED
