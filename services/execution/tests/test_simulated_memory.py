"""The simulated venue's memory when bounded: closed orders forgotten, working ones kept."""

from __future__ import annotations

import itertools
from decimal import Decimal

from quantmesh_common.messages import (
    BookLevel,
    BookSnapshot,
    ExecType,
    OrderCommand,
    OrderType,
    Side,
)
from quantmesh_common.testing import stubs
from quantmesh_common.testing.stubs import TS
from quantmesh_execution.simulated import SimulatedVenue

D = Decimal
_ids = itertools.count(1)


def _book() -> BookSnapshot:
    return stubs.book_snapshot(
        asks=[BookLevel(price=D("50000"), size=D("100"))],
        bids=[BookLevel(price=D("49990"), size=D("100"))],
        ts_event=TS,
        ts_init=TS,
    )


def _order(order_type: OrderType, price: str | None = None) -> OrderCommand:
    n = next(_ids)
    return stubs.order_command(
        command_id=f"C-m{n}",
        client_order_id=f"O-m{n}",
        order_type=order_type,
        limit_price=D(price) if price is not None else None,
        side=Side.BUY,
        quantity=D("1"),
        ts_event=TS + n,
    )


def _run(venue: SimulatedVenue) -> tuple[OrderCommand, list[OrderCommand]]:
    venue.on_book(_book())
    resting = _order(OrderType.LIMIT, "1")
    venue.submit(resting, resting.ts_event)
    filled = [_order(OrderType.MARKET) for _ in range(5)]
    for command in filled:
        venue.submit(command, command.ts_event)
    venue.advance(TS + 100)
    return resting, filled


def test_closed_orders_when_past_keep_closed_are_forgotten_with_their_history() -> None:
    venue = SimulatedVenue(id_prefix="SIM", keep_closed=2)

    resting, filled = _run(venue)

    kept = [c.client_order_id for c in filled if venue.order(c.client_order_id) is not None]
    assert kept == [filled[3].client_order_id, filled[4].client_order_id]
    assert venue.history(filled[0].client_order_id, filled[0].account_id) == []
    assert [
        r.exec_type for r in venue.history(filled[4].client_order_id, filled[4].account_id)
    ] == [
        ExecType.ACCEPTED,
        ExecType.FILL,
    ]
    assert [o.client_order_id for o in venue.open_orders()] == [resting.client_order_id]


def test_closed_orders_when_unbounded_are_all_kept() -> None:
    venue = SimulatedVenue(id_prefix="SIM")

    _, filled = _run(venue)

    assert all(venue.order(c.client_order_id) is not None for c in filled)
    assert len(venue.ledger.fills) == 5
