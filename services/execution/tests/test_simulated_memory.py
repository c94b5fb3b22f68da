"""The simulated venue's memory: closed orders forgotten when bounded, working orders indexed."""

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
    TimeInForce,
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


def _gtd(price: str, expire: int, instrument: str = stubs.INSTRUMENT_ID) -> OrderCommand:
    n = next(_ids)
    return stubs.order_command(
        command_id=f"C-g{n}",
        client_order_id=f"O-g{n}",
        instrument_id=instrument,
        order_type=OrderType.LIMIT,
        limit_price=D(price),
        side=Side.BUY,
        quantity=D("1"),
        time_in_force=TimeInForce.GTD,
        expire_time_ns=expire,
        ts_event=TS,
    )


def test_gtd_orders_when_due_together_expire_by_time_then_arrival_and_filled_ones_not() -> None:
    venue = SimulatedVenue(id_prefix="SIM")
    venue.on_book(_book())
    late, early, same, crossed = (
        _gtd("1", TS + 30),
        _gtd("1", TS + 10),
        _gtd("1", TS + 30),
        _gtd("50000", TS + 20),  # fills at once against the ask: never expires
    )
    for command in (late, early, same, crossed):
        venue.submit(command, TS)

    expired = venue.advance(TS + 100)

    assert [(r.client_order_id, r.ts_event) for r in expired] == [
        (early.client_order_id, TS + 10),
        (late.client_order_id, TS + 30),
        (same.client_order_id, TS + 30),
    ]
    assert all(r.exec_type is ExecType.EXPIRED for r in expired)


def test_trade_when_on_another_instrument_leaves_a_resting_order_alone() -> None:
    venue = SimulatedVenue(id_prefix="SIM")
    resting = _gtd("100", TS + 10**12)
    other = stubs.INSTRUMENT_ID.replace("BTC", "ETH")
    venue.submit(resting, TS)

    reports = venue.on_tick(
        stubs.tick(instrument_id=other, price=D("50"), size=D("5"), ts_event=TS + 1)
    )

    assert reports == []
    assert [o.client_order_id for o in venue.open_orders()] == [resting.client_order_id]
