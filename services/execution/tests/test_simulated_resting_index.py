"""The simulated venue's resting-order index: the same reports as matching every working order."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from quantmesh_common.messages import (
    BookLevel,
    CommandType,
    ExecutionReport,
    LiquiditySide,
    OrderType,
    Side,
    TimeInForce,
)
from quantmesh_common.testing import stubs
from quantmesh_common.testing.stubs import TS
from quantmesh_execution.simulated import (
    SimOrder,
    SimulatedVenue,
    _consume,
    _Market,
    _reached,
)

INSTRUMENT = stubs.INSTRUMENT_ID


class ScanningVenue(SimulatedVenue):
    """The venue as it matched before the index: every working order of the instrument is
    looked at, sorted in price-time priority, on every trade, quote and book."""

    def _resting_limits(self, instrument_id: str) -> list[SimOrder]:
        found = [
            o
            for o in self._open_of.get(instrument_id, {}).values()
            if o.working_limit is not None and not o.waiting_for_trigger
        ]
        return sorted(
            found, key=lambda o: (-o.side.sign * (o.working_limit or Decimal(0)), o.priority)
        )

    def _match_resting_on_book(
        self, instrument_id: str, market: _Market, reports: list[ExecutionReport]
    ) -> None:
        for order in self._resting_limits(instrument_id):
            limit = order.working_limit
            assert limit is not None
            quantity = Decimal(0)
            for level in market.liquidity(order.side, limit):
                take = min(order.leaves_quantity - quantity, level.size)
                if take <= 0:
                    break
                _consume(level, take)
                quantity += take
            if quantity > 0:
                self._fill(order, quantity, limit, LiquiditySide.MAKER, reports)

    def _match_resting_on_trade(
        self, instrument_id: str, market: _Market, price: Decimal, reports: list[ExecutionReport]
    ) -> None:
        for order in self._resting_limits(instrument_id):
            limit = order.working_limit
            assert limit is not None
            through = price < limit if order.side is Side.BUY else price > limit
            if not through or market.trade_left <= 0:
                continue
            quantity = min(order.leaves_quantity, market.trade_left)
            market.trade_left -= quantity
            self._fill(order, quantity, limit, LiquiditySide.MAKER, reports)

    def _trigger_stops(
        self, instrument_id: str, price: Decimal, reports: list[ExecutionReport]
    ) -> None:
        stops = sorted(
            (o for o in self._open_of.get(instrument_id, {}).values() if o.waiting_for_trigger),
            key=lambda o: o.priority,
        )
        for order in stops:
            if order.client_order_id in self._open and _reached(order, price):
                self._work(order, reports)


# Few prices, so that orders share levels and ties of price are decided by time priority.
prices = st.sampled_from([Decimal(p) for p in ("99", "99.5", "100", "100.0", "100.5", "101")])
sizes = st.sampled_from([Decimal(q) for q in ("0.5", "1", "2", "3.25")])
submit = st.tuples(
    st.just("submit"),
    st.sampled_from([OrderType.LIMIT, OrderType.STOP, OrderType.STOP_LIMIT, OrderType.MARKET]),
    st.sampled_from([Side.BUY, Side.SELL]),
    sizes,
    prices,
    prices,
    st.sampled_from([TimeInForce.GTC, TimeInForce.IOC]),
)
cancel = st.tuples(st.just("cancel"), st.integers(0, 30))
replace = st.tuples(st.just("replace"), st.integers(0, 30), st.none() | sizes, st.none() | prices)
trade = st.tuples(st.just("trade"), prices, sizes)
quote = st.tuples(st.just("quote"), prices, prices, sizes, sizes)
# Levels below the split are bids, the others asks: a book is never crossed.
book = st.tuples(st.just("book"), st.lists(st.tuples(prices, sizes), max_size=5), prices)
# Mostly orders, so that many rest (on both sides, crossing each other) when market data comes.
steps = st.lists(
    st.one_of(submit, submit, submit, cancel, replace, trade, trade, quote, book), max_size=60
)


def _submit(n: int, step: tuple[Any, ...]) -> Any:
    _, order_type, side, quantity, limit, stop, tif = step
    terms: dict[str, Any] = {"order_type": order_type, "side": side, "quantity": quantity}
    if order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT):
        terms["limit_price"] = limit
    else:
        terms["limit_price"] = None
    if order_type in (OrderType.STOP, OrderType.STOP_LIMIT):
        terms["stop_price"] = stop
    terms["time_in_force"] = TimeInForce.GTC if order_type is OrderType.MARKET else tif
    return stubs.order_command(command_id=f"C{n}", client_order_id=f"O{n}", **terms)


def _run(venue: SimulatedVenue, plan: list[tuple[Any, ...]]) -> list[str]:
    reports: list[ExecutionReport] = []
    for n, step in enumerate(plan):
        now = TS + n * 1_000
        kind = step[0]
        if kind == "submit":
            reports += venue.submit(_submit(n, step), now)
        elif kind in ("cancel", "replace"):
            command: dict[str, Any] = {
                "command_id": f"C{n}",
                "client_order_id": f"O{step[1]}",
                "command_type": CommandType.CANCEL if kind == "cancel" else CommandType.REPLACE,
                "side": None,
                "order_type": None,
                "quantity": None,
                "limit_price": None,
                "time_in_force": None,
            }
            if kind == "replace":
                if step[2] is None and step[3] is None:
                    continue  # a REPLACE must change something
                command["new_quantity"] = step[2]
                command["new_limit_price"] = step[3]
                reports += venue.replace(stubs.order_command(**command), now)
            else:
                reports += venue.cancel(stubs.order_command(**command), now)
        elif kind == "trade":
            reports += venue.on_tick(stubs.tick(price=step[1], size=step[2], ts_event=now))
        elif kind == "quote":
            bid, ask = sorted((step[1], step[2]))
            reports += venue.on_tick(
                stubs.quote_tick(
                    price=(bid + ask) / 2,
                    bid=bid,
                    ask=ask,
                    bid_size=step[3],
                    ask_size=step[4],
                    ts_event=now,
                )
            )
        else:
            levels = {p: q for p, q in step[1]}
            bids = sorted(((p, q) for p, q in levels.items() if p < step[2]), reverse=True)
            asks = sorted((p, q) for p, q in levels.items() if p >= step[2])
            reports += venue.on_book(
                stubs.book_snapshot(
                    bids=[BookLevel(price=p, size=q) for p, q in bids],
                    asks=[BookLevel(price=p, size=q) for p, q in asks],
                    ts_event=now,
                )
            )
    return [r.model_dump_json() for r in reports]


@settings(max_examples=400, deadline=None)
@given(steps)
def test_matching_when_orders_rest_reports_what_scanning_every_order_would(
    plan: list[tuple[Any, ...]],
) -> None:
    # Arrange
    indexed, scanning = SimulatedVenue(id_prefix="SIM"), ScanningVenue(id_prefix="SIM")

    # Act
    got, expected = _run(indexed, plan), _run(scanning, plan)

    # Assert
    assert got == expected
    assert indexed.ledger == scanning.ledger


def test_trade_when_a_buy_and_a_sell_both_rest_through_it_fills_the_buy_first() -> None:
    # Arrange: no market yet, so a buy at 101 and a sell at 99 both rest (crossing each other)
    venue = SimulatedVenue(id_prefix="SIM")
    venue.submit(
        stubs.order_command(
            command_id="CS", client_order_id="OS", side=Side.SELL, limit_price=Decimal("99")
        ),
        TS,
    )
    venue.submit(stubs.order_command(command_id="CB", limit_price=Decimal("101")), TS)

    # Act: a print of 0.06 at 100 is through both limits
    reports = venue.on_tick(stubs.tick(price=Decimal("100"), size=Decimal("0.06"), ts_event=TS))

    # Assert: price priority across sides (the buy's key -101 sorts before the sell's 99), so
    # the buy takes all 0.06 as maker at its limit and nothing is left for the sell
    assert [(r.client_order_id, r.last_qty, r.last_price) for r in reports] == [
        (stubs.CLIENT_ORDER_ID, Decimal("0.06"), Decimal("101"))
    ]


def test_trade_when_at_a_resting_limit_fills_nothing() -> None:
    # Arrange
    venue = SimulatedVenue(id_prefix="SIM")
    venue.submit(
        stubs.order_command(
            command_id="CS", client_order_id="OS", side=Side.SELL, limit_price=Decimal("99")
        ),
        TS,
    )
    venue.submit(stubs.order_command(command_id="CB", limit_price=Decimal("98")), TS)

    # Act: prints at either limit are not through it (the queue position is unknown)
    at_sell = venue.on_tick(stubs.tick(price=Decimal("99"), size=Decimal("1"), ts_event=TS))
    at_buy = venue.on_tick(stubs.tick(price=Decimal("98.0"), size=Decimal("1"), ts_event=TS))

    # Assert
    assert (at_sell, at_buy) == ([], [])
