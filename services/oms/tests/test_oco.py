"""OCO stop-loss / take-profit legs attached to the position an entry order opens."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from quantmesh_common.messages import (
    CommandType,
    ExecType,
    Order,
    OrderStatus,
    OrderType,
    Side,
)
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic
from quantmesh_execution.service import ExecutionHandler
from quantmesh_execution.simulated import SimulatedVenue
from quantmesh_oms.store import InMemoryOrderStore

from .conftest import OmsHarness

D = Decimal


class Harness(OmsHarness):
    """The oms service on a retaining in-memory bus with a simulated clock."""

    def order(self, client_order_id: str) -> Order:
        found = self.service.orders.get(client_order_id)
        assert found is not None
        return found


def _entry(**intent: Any) -> Any:
    fields: dict[str, Any] = {
        "quantity": D("0.1"),
        "limit_price": D("50000.00"),
        "stop_loss_price": D("45000.00"),
        "take_profit_price": D("55000.00"),
    }
    return stubs.risk_decision(intent=stubs.limit_order_intent(**{**fields, **intent}))


def _fill(client_order_id: str, n: int, qty: str, cum: str, total: str, price: str) -> Any:
    done = D(cum) >= D(total)
    side = Side.BUY if client_order_id == "O-1" else Side.SELL
    return stubs.execution_report(
        report_id=f"R-{client_order_id}-{n}",
        trade_id=f"T-{client_order_id}-{n}",
        client_order_id=client_order_id,
        side=side,
        exec_type=ExecType.FILL if done else ExecType.PARTIAL_FILL,
        order_status=OrderStatus.FILLED if done else OrderStatus.PARTIALLY_FILLED,
        last_qty=D(qty),
        last_price=D(price),
        cum_qty=D(cum),
        leaves_qty=D(total) - D(cum),
    )


def _replaced(client_order_id: str, n: int) -> Any:
    return stubs.order_accepted(
        report_id=f"R-{client_order_id}-rep{n}",
        client_order_id=client_order_id,
        side=Side.SELL,
        exec_type=ExecType.REPLACED,
    )


async def test_entry_partial_fill_when_oco_asked_submits_both_legs_sized_to_the_position() -> None:
    oms = await Harness().start()
    await oms.send(Topic.ORDERS_APPROVED, _entry())

    await oms.send(Topic.EXEC_REPORTS, _fill("O-1", 1, "0.04", "0.04", "0.1", "50000"))

    submits = [c for c in oms.commands() if c.command_type is CommandType.SUBMIT]
    assert [c.command_id for c in submits] == ["O-1:SUBMIT", "O-1:SL:SUBMIT", "O-1:TP:SUBMIT"]
    stop, take = submits[1], submits[2]
    assert (stop.side, stop.order_type, stop.stop_price, stop.quantity) == (
        Side.SELL,
        OrderType.STOP,
        D("45000.00"),
        D("0.04"),
    )
    assert (take.side, take.order_type, take.limit_price, take.quantity) == (
        Side.SELL,
        OrderType.LIMIT,
        D("55000.00"),
        D("0.04"),
    )
    assert stop.reduce_only
    assert take.reduce_only
    leg = oms.order("O-1:SL")
    assert (leg.parent_order_id, leg.tag, leg.status) == ("O-1", "OCO_SL", OrderStatus.SUBMITTED)


async def test_entry_filling_further_when_legs_working_replaces_both_to_the_new_position() -> None:
    oms = await Harness().start()
    await oms.send(Topic.ORDERS_APPROVED, _entry())
    await oms.send(Topic.EXEC_REPORTS, _fill("O-1", 1, "0.04", "0.04", "0.1", "50000"))

    await oms.send(Topic.EXEC_REPORTS, _fill("O-1", 2, "0.06", "0.1", "0.1", "50000"))

    replaces = [c for c in oms.commands() if c.command_type is CommandType.REPLACE]
    assert [(c.client_order_id, c.new_quantity) for c in replaces] == [
        ("O-1:SL", D("0.1")),
        ("O-1:TP", D("0.1")),
    ]
    await oms.send(Topic.EXEC_REPORTS, _replaced("O-1:SL", 1), _replaced("O-1:TP", 1))
    assert (oms.order("O-1:SL").quantity, oms.order("O-1:TP").quantity) == (D("0.1"), D("0.1"))
    assert len([c for c in oms.commands() if c.command_type is CommandType.REPLACE]) == 2


async def test_take_profit_filling_when_position_closed_cancels_the_stop_loss() -> None:
    oms = await Harness().start()
    await oms.send(Topic.ORDERS_APPROVED, _entry())
    await oms.send(Topic.EXEC_REPORTS, _fill("O-1", 1, "0.1", "0.1", "0.1", "50000"))

    await oms.send(Topic.EXEC_REPORTS, _fill("O-1:TP", 1, "0.1", "0.1", "0.1", "55000.00"))

    [cancel] = [c for c in oms.commands() if c.command_type is CommandType.CANCEL]
    assert cancel.client_order_id == "O-1:SL"
    assert oms.order("O-1:SL").status is OrderStatus.CANCEL_PENDING
    assert oms.order("O-1:TP").status is OrderStatus.FILLED


async def test_stop_loss_partly_filled_when_position_shrinks_take_profit_follows_it() -> None:
    oms = await Harness().start()
    await oms.send(Topic.ORDERS_APPROVED, _entry())
    await oms.send(Topic.EXEC_REPORTS, _fill("O-1", 1, "0.1", "0.1", "0.1", "50000"))

    await oms.send(Topic.EXEC_REPORTS, _fill("O-1:SL", 1, "0.03", "0.03", "0.1", "45000.00"))

    replaces = [c for c in oms.commands() if c.command_type is CommandType.REPLACE]
    # Position 0.1 - 0.03 = 0.07: the take-profit leaves 0.07; the stop-loss already does.
    assert [(c.client_order_id, c.new_quantity) for c in replaces] == [("O-1:TP", D("0.07"))]
    assert [c for c in oms.commands() if c.command_type is CommandType.CANCEL] == []


async def test_restart_when_entry_not_filled_yet_keeps_its_oco_terms() -> None:
    store = InMemoryOrderStore()
    first = await Harness(store).start()
    await first.send(Topic.ORDERS_APPROVED, _entry())

    second = await Harness(store).start()
    await second.send(Topic.EXEC_REPORTS, _fill("O-1", 1, "0.1", "0.1", "0.1", "50000"))

    submits = [c for c in second.commands() if c.command_type is CommandType.SUBMIT]
    assert [(c.command_id, c.quantity) for c in submits] == [
        ("O-1:SL:SUBMIT", D("0.1")),
        ("O-1:TP:SUBMIT", D("0.1")),
    ]


async def test_oco_with_simulated_venue_when_price_reaches_take_profit_stop_loss_is_canceled() -> (
    None
):
    # Arrange: oms and the simulated venue's handler on one bus; a market entry with exits.
    oms = await Harness().start()
    venue = SimulatedVenue(id_prefix="SIM")
    handler = ExecutionHandler(venue)
    await oms.bus.subscribe("exec", [Topic.ORDERS_COMMANDS, Topic.MD_TICKS], handler).start()
    await oms.send(Topic.MD_TICKS, stubs.tick(price=D("50000.00"), size=D("1")))
    entry = _entry(order_type=OrderType.MARKET, limit_price=None)
    await oms.send(Topic.ORDERS_APPROVED, entry)
    assert oms.order("O-1").status is OrderStatus.FILLED
    assert venue.order("O-1:TP").status is OrderStatus.ACCEPTED  # type: ignore[union-attr]

    # Act: a trade through the take-profit (55000.00).
    await oms.send(Topic.MD_TICKS, stubs.tick(price=D("55000.10"), size=D("1")))

    # Assert: the take-profit filled at its limit; the stop-loss canceled at the venue too.
    assert oms.order("O-1:TP").status is OrderStatus.FILLED
    assert oms.order("O-1:SL").status is OrderStatus.CANCELED
    assert venue.order("O-1:SL").status is OrderStatus.CANCELED  # type: ignore[union-attr]
    assert [(f.client_order_id, f.quantity, f.price) for f in venue.ledger.fills] == [
        ("O-1", D("0.1"), D("50000.00")),
        ("O-1:TP", D("0.1"), D("55000.00")),
    ]
