"""The simulated venue's matching, fees, slippage, latency and ledger, with hand-computed values."""

from __future__ import annotations

import itertools
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.messages import (
    BookLevel,
    BookSnapshot,
    CommandType,
    ExecType,
    ExecutionReport,
    LiquiditySide,
    OrderCommand,
    OrderStatus,
    OrderType,
    Side,
    Tick,
    TimeInForce,
)
from quantmesh_common.testing import stubs
from quantmesh_common.testing.stubs import SECOND_NS, TS
from quantmesh_execution.simulated import (
    FixedBpsSlippage,
    LedgerAmendment,
    LedgerFill,
    SimulatedVenue,
    SimulatedVenueConfig,
    SquareRootImpact,
)
from quantmesh_execution.venue import VenueAdapter, dispatch

D = Decimal
MS = 1_000_000
_ids = itertools.count(1)


def venue(**config: Any) -> SimulatedVenue:
    return SimulatedVenue(SimulatedVenueConfig(**config), id_prefix="SIM")


def book(
    asks: list[tuple[str, str]] | None = None,
    bids: list[tuple[str, str]] | None = None,
    ts: int = TS,
) -> BookSnapshot:
    return stubs.book_snapshot(
        asks=[BookLevel(price=D(p), size=D(s)) for p, s in asks or []],
        bids=[BookLevel(price=D(p), size=D(s)) for p, s in bids or []],
        ts_event=ts,
        ts_init=ts,
    )


def trade(price: str, size: str = "1", ts: int = TS) -> Tick:
    return stubs.tick(price=D(price), size=D(size), ts_event=ts, ts_init=ts)


def command(**overrides: Any) -> OrderCommand:
    n = next(_ids)
    fields: dict[str, Any] = {"command_id": f"C-{n}", "client_order_id": f"O-{n}", "ts_event": TS}
    return stubs.order_command(**{**fields, **overrides})


def market(side: Side = Side.BUY, quantity: str = "1", **overrides: Any) -> OrderCommand:
    fields: dict[str, Any] = {
        "order_type": OrderType.MARKET,
        "limit_price": None,
        "side": side,
        "quantity": D(quantity),
    }
    return command(**{**fields, **overrides})


def limit(side: Side, quantity: str, price: str, **overrides: Any) -> OrderCommand:
    fields: dict[str, Any] = {"side": side, "quantity": D(quantity), "limit_price": D(price)}
    return command(**{**fields, **overrides})


def cancel(client_order_id: str, **overrides: Any) -> OrderCommand:
    n = next(_ids)
    fields: dict[str, Any] = {
        "command_id": f"C-{n}",
        "command_type": CommandType.CANCEL,
        "client_order_id": client_order_id,
        "side": None,
        "order_type": None,
        "quantity": None,
        "limit_price": None,
        "time_in_force": None,
        "ts_event": TS,
    }
    return stubs.order_command(**{**fields, **overrides})


def replace(client_order_id: str, **overrides: Any) -> OrderCommand:
    return cancel(client_order_id, command_type=CommandType.REPLACE, **overrides)


def query(client_order_id: str, **overrides: Any) -> OrderCommand:
    return cancel(client_order_id, command_type=CommandType.QUERY, **overrides)


def kinds(reports: list[ExecutionReport]) -> list[ExecType]:
    return [r.exec_type for r in reports]


def fills(reports: list[ExecutionReport]) -> list[tuple[Decimal, Decimal, Decimal]]:
    return [(r.last_qty, r.last_price or D(0), r.fee) for r in reports if r.is_fill]


# -- interface ---------------------------------------------------------------------------------


def test_simulated_venue_when_checked_against_protocol_is_a_venue_adapter() -> None:
    assert isinstance(venue(), VenueAdapter)


def test_dispatch_when_given_cancel_command_routes_to_cancel() -> None:
    sim = venue()
    sim.on_market_data(book(asks=[("50000.20", "1")]))
    order = limit(Side.BUY, "0.1", "49000.00")
    dispatch(sim, order, TS)

    reports = dispatch(sim, cancel(order.client_order_id), TS)

    assert kinds(reports) == [ExecType.CANCELED]


# -- market orders -----------------------------------------------------------------------------


def test_market_buy_when_book_has_three_levels_walks_them_at_exact_prices_and_fees() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "0.5"), ("50000.30", "1"), ("50000.50", "1")]))

    reports = sim.submit(market(Side.BUY, "2"), TS)

    assert kinds(reports) == [
        ExecType.ACCEPTED,
        ExecType.PARTIAL_FILL,
        ExecType.PARTIAL_FILL,
        ExecType.FILL,
    ]
    # 0.5 x 50000.20 = 25000.10, 1 x 50000.30 = 50000.30, 0.5 x 50000.50 = 25000.25; fee 0.1 %.
    assert fills(reports) == [
        (D("0.5"), D("50000.20"), D("25.00010000")),
        (D("1"), D("50000.30"), D("50.00030000")),
        (D("0.5"), D("50000.50"), D("25.00025000")),
    ]
    last = reports[-1]
    assert last.order_status is OrderStatus.FILLED
    assert (last.cum_qty, last.leaves_qty) == (D("2"), D("0"))
    assert last.avg_price == D("50000.325")  # 100000.65 / 2
    assert {r.liquidity_side for r in reports if r.is_fill} == {LiquiditySide.TAKER}
    assert [r.leaves_qty for r in reports] == [D("2"), D("1.5"), D("0.5"), D("0")]
    assert {r.fee_currency for r in reports if r.is_fill} == {"USDT"}


def test_market_buy_when_book_is_too_thin_fills_what_is_shown_and_cancels_the_rest() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "0.3")]))

    reports = sim.submit(market(Side.BUY, "1"), TS)

    assert kinds(reports) == [ExecType.ACCEPTED, ExecType.PARTIAL_FILL, ExecType.CANCELED]
    assert reports[-1].reason == "INSUFFICIENT_LIQUIDITY: unfilled=0.7"
    assert (reports[-1].cum_qty, reports[-1].leaves_qty) == (D("0.3"), D("0"))


def test_market_order_when_no_market_data_is_rejected_and_not_in_ledger() -> None:
    sim = venue()

    reports = sim.submit(market(), TS)

    assert kinds(reports) == [ExecType.REJECTED]
    assert reports[0].reason == "NO_MARKET_DATA: instrument_id=BTC-USDT.SIM"
    assert reports[0].venue_order_id is None
    assert sim.ledger.orders == []


def test_market_sell_when_no_book_fills_against_last_trade_up_to_its_size() -> None:
    sim = venue()
    sim.on_tick(trade("50000.10", "0.4"))

    reports = sim.submit(market(Side.SELL, "1"), TS)

    assert fills(reports) == [(D("0.4"), D("50000.10"), D("20.00004000"))]
    assert kinds(reports)[-1] is ExecType.CANCELED


def test_second_market_order_when_first_consumed_a_level_gets_the_next_level() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "0.5"), ("50000.40", "5")]))
    sim.submit(market(Side.BUY, "0.5"), TS)

    reports = sim.submit(market(Side.BUY, "0.1"), TS)

    assert fills(reports) == [(D("0.1"), D("50000.40"), D("5.00004000"))]


def test_fee_when_notional_has_more_than_8_decimals_rounds_half_up_to_8() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.30", "1")]))

    reports = sim.submit(market(Side.BUY, "0.00003"), TS)

    # 0.00003 x 50000.30 = 1.500009; x 0.001 = 0.001500009 -> 0.00150001
    assert fills(reports) == [(D("0.00003"), D("50000.30"), D("0.00150001"))]


# -- limit orders, time in force ---------------------------------------------------------------


def test_limit_buy_when_book_is_thin_fills_what_crosses_then_rests_the_remainder() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "0.25"), ("50000.30", "0.25"), ("50000.40", "5")]))
    order = limit(Side.BUY, "1", "50000.30")

    reports = sim.submit(order, TS)

    assert kinds(reports) == [ExecType.ACCEPTED, ExecType.PARTIAL_FILL, ExecType.PARTIAL_FILL]
    assert fills(reports) == [
        (D("0.25"), D("50000.20"), D("12.50005000")),
        (D("0.25"), D("50000.30"), D("12.50007500")),
    ]
    assert reports[-1].order_status is OrderStatus.PARTIALLY_FILLED
    assert reports[-1].leaves_qty == D("0.5")
    assert reports[-1].avg_price == D("50000.25")
    resting = sim.order(order.client_order_id)
    assert resting is not None
    assert [o.client_order_id for o in sim.open_orders()] == [order.client_order_id]


def test_limit_fok_when_book_cannot_fill_all_is_rejected_whole_and_consumes_nothing() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "1"), ("50000.30", "1.5"), ("50001.00", "9")]))
    order = limit(Side.BUY, "3", "50000.30", time_in_force=TimeInForce.FOK)

    reports = sim.submit(order, TS)
    after = sim.submit(market(Side.BUY, "2.5"), TS)

    assert kinds(reports) == [ExecType.REJECTED]
    assert reports[0].reason == "FOK_NOT_FILLABLE: quantity=3, available=2.5"
    assert reports[0].order_status is OrderStatus.REJECTED
    assert [o.client_order_id for o in sim.ledger.orders] == [after[0].client_order_id]
    assert sum(q for q, _, _ in fills(after)) == D("2.5")


def test_market_fok_when_book_covers_it_fills_completely() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "1"), ("50000.30", "1")]))

    reports = sim.submit(market(Side.BUY, "1.5", time_in_force=TimeInForce.FOK), TS)

    assert kinds(reports) == [ExecType.ACCEPTED, ExecType.PARTIAL_FILL, ExecType.FILL]


def test_limit_ioc_when_partly_fillable_fills_then_cancels_the_remainder() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "0.4"), ("50000.30", "5")]))
    order = limit(Side.BUY, "1", "50000.20", time_in_force=TimeInForce.IOC)

    reports = sim.submit(order, TS)

    assert kinds(reports) == [ExecType.ACCEPTED, ExecType.PARTIAL_FILL, ExecType.CANCELED]
    assert fills(reports) == [(D("0.4"), D("50000.20"), D("20.00008000"))]
    canceled = reports[-1]
    assert canceled.reason == "IOC_UNFILLED: unfilled=0.6"
    assert (canceled.order_status, canceled.cum_qty, canceled.leaves_qty) == (
        OrderStatus.CANCELED,
        D("0.4"),
        D("0"),
    )
    assert sim.open_orders() == []


def test_resting_limit_when_trade_prints_through_it_fills_as_maker_at_its_price() -> None:
    sim = venue(maker_fee=D("0.0002"))
    sim.on_book(book(asks=[("50000.20", "1")], bids=[("48000.00", "1")]))
    order = limit(Side.BUY, "0.1", "49000.00")
    accepted = sim.submit(order, TS)

    at_limit = sim.on_tick(trade("49000.00", "5", TS + 1))
    through = sim.on_tick(trade("48999.99", "0.04", TS + 2))
    rest = sim.on_tick(trade("48999.50", "1", TS + 3))

    assert kinds(accepted) == [ExecType.ACCEPTED]
    assert at_limit == []  # a trade at the limit does not prove the queue reached us
    # 0.04 x 49000 x 0.0002 = 0.392; 0.06 x 49000 x 0.0002 = 0.588
    assert fills(through) == [(D("0.04"), D("49000.00"), D("0.39200000"))]
    assert fills(rest) == [(D("0.06"), D("49000.00"), D("0.58800000"))]
    assert [r.liquidity_side for r in (*through, *rest)] == [LiquiditySide.MAKER] * 2
    assert rest[0].order_status is OrderStatus.FILLED
    assert (rest[0].ts_event, through[0].ts_event) == (TS + 3, TS + 2)


def test_resting_sell_when_new_book_crosses_it_fills_as_maker_limited_by_crossing_size() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50020.00", "1")], bids=[("50000.00", "1")]))
    order = limit(Side.SELL, "0.5", "50010.00")
    sim.submit(order, TS)

    reports = sim.on_book(
        book(
            asks=[("50011.00", "1")],
            bids=[("50010.50", "0.2"), ("50010.00", "0.1"), ("50009.00", "5")],
            ts=TS + SECOND_NS,
        )
    )

    # Bids at or above 50010.00 show 0.3; the order fills 0.3 at its own price; 0.3 x 50010 x 0.1 %
    assert fills(reports) == [(D("0.3"), D("50010.00"), D("15.00300000"))]
    assert reports[0].liquidity_side is LiquiditySide.MAKER
    assert reports[0].leaves_qty == D("0.2")


def test_gtd_limit_when_venue_time_reaches_expire_time_expires_at_that_time() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "1")]))
    expire = TS + 10 * SECOND_NS
    order = limit(Side.BUY, "0.1", "49000.00", time_in_force=TimeInForce.GTD, expire_time_ns=expire)
    sim.submit(order, TS)

    before = sim.on_tick(trade("50000.10", "1", TS + 5 * SECOND_NS))
    after = sim.advance(TS + 20 * SECOND_NS)

    assert before == []
    assert kinds(after) == [ExecType.EXPIRED]
    assert after[0].order_status is OrderStatus.EXPIRED
    assert after[0].ts_event == expire
    assert sim.open_orders() == []


def test_gtd_order_when_expire_time_already_passed_is_rejected() -> None:
    sim = venue()
    sim.advance(TS + SECOND_NS)
    order = limit(Side.BUY, "0.1", "49000.00", time_in_force=TimeInForce.GTD, expire_time_ns=TS)

    reports = sim.submit(order, TS + SECOND_NS)

    assert kinds(reports) == [ExecType.REJECTED]
    assert reports[0].reason == (
        f"EXPIRE_TIME_IN_PAST: expire_time_ns={TS}, venue_time_ns={TS + SECOND_NS}"
    )


def test_post_only_limit_when_it_would_cross_is_rejected() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "1")]))

    reports = sim.submit(limit(Side.BUY, "0.1", "50000.20", post_only=True), TS)

    assert kinds(reports) == [ExecType.REJECTED]
    assert reports[0].reason == "POST_ONLY_WOULD_TAKE: limit_price=50000.20"


# -- stops -------------------------------------------------------------------------------------


def test_buy_stop_when_trade_reaches_stop_triggers_and_takes_the_book() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50100.50", "1")], bids=[("50000.00", "1")]))
    sim.on_tick(trade("50000.00"))
    order = command(
        order_type=OrderType.STOP,
        limit_price=None,
        stop_price=D("50100.00"),
        side=Side.BUY,
        quantity=D("0.5"),
    )
    accepted = sim.submit(order, TS)

    below = sim.on_tick(trade("50099.99", "1", TS + 1))
    reached = sim.on_tick(trade("50100.00", "1", TS + 2))

    assert kinds(accepted) == [ExecType.ACCEPTED]
    assert below == []
    # 0.5 x 50100.50 = 25050.25; fee 25.05025
    assert fills(reached) == [(D("0.5"), D("50100.50"), D("25.05025000"))]
    assert reached[0].liquidity_side is LiquiditySide.TAKER
    assert reached[0].order_status is OrderStatus.FILLED


def test_sell_stop_limit_when_triggered_takes_to_its_limit_then_rests() -> None:
    sim = venue()
    sim.on_book(book(asks=[("49910.00", "1")], bids=[("49895.00", "0.1"), ("49880.00", "1")]))
    sim.on_tick(trade("49950.00"))
    order = command(
        order_type=OrderType.STOP_LIMIT,
        limit_price=D("49890.00"),
        stop_price=D("49900.00"),
        side=Side.SELL,
        quantity=D("0.5"),
    )
    sim.submit(order, TS)

    reports = sim.on_tick(trade("49900.00", "0.01", TS + 1))

    assert fills(reports) == [(D("0.1"), D("49895.00"), D("4.98950000"))]
    assert reports[-1].order_status is OrderStatus.PARTIALLY_FILLED
    assert reports[-1].leaves_qty == D("0.4")
    assert [o.client_order_id for o in sim.open_orders()] == [order.client_order_id]


# -- cancel and replace ------------------------------------------------------------------------


def test_cancel_when_order_rests_cancels_it_and_a_second_cancel_is_rejected() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "1")]))
    order = limit(Side.BUY, "0.1", "49000.00")
    sim.submit(order, TS)

    first = sim.cancel(cancel(order.client_order_id), TS + 1)
    second = sim.cancel(cancel(order.client_order_id), TS + 2)

    assert kinds(first) == [ExecType.CANCELED]
    assert (first[0].order_status, first[0].leaves_qty) == (OrderStatus.CANCELED, D("0"))
    assert kinds(second) == [ExecType.CANCEL_REJECTED]
    assert second[0].reason == "ORDER_NOT_OPEN: status=CANCELED"
    assert second[0].order_status is OrderStatus.CANCELED


def test_cancel_when_order_is_unknown_is_rejected_with_order_not_found() -> None:
    sim = venue()

    reports = sim.cancel(cancel("O-nope"), TS)

    assert kinds(reports) == [ExecType.CANCEL_REJECTED]
    assert reports[0].reason == "ORDER_NOT_FOUND: client_order_id=O-nope"
    assert reports[0].order_status is OrderStatus.REJECTED


def test_replace_when_order_rests_changes_size_and_price_and_records_an_amendment() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "1")]))
    order = limit(Side.BUY, "0.1", "49000.00")
    sim.submit(order, TS)

    reports = sim.replace(
        replace(order.client_order_id, new_quantity=D("0.2"), new_limit_price=D("49500.00")),
        TS + 1,
    )

    assert kinds(reports) == [ExecType.REPLACED]
    assert (reports[0].order_status, reports[0].leaves_qty) == (OrderStatus.ACCEPTED, D("0.2"))
    assert sim.ledger.amendments == [
        LedgerAmendment(order.client_order_id, D("0.2"), D("49500.00"), None, TS + 1)
    ]
    trade_reports = sim.on_tick(trade("49499.00", "1", TS + 2))
    assert fills(trade_reports) == [(D("0.2"), D("49500.00"), D("9.90000000"))]


def test_replace_when_new_price_crosses_the_book_fills_as_taker() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "1")]))
    order = limit(Side.BUY, "0.1", "49000.00")
    sim.submit(order, TS)

    reports = sim.replace(replace(order.client_order_id, new_limit_price=D("50001.00")), TS + 1)

    assert kinds(reports) == [ExecType.REPLACED, ExecType.FILL]
    assert fills(reports) == [(D("0.1"), D("50000.20"), D("5.00002000"))]
    assert reports[-1].liquidity_side is LiquiditySide.TAKER


def test_replace_when_new_quantity_not_above_filled_is_rejected() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "0.3")]))
    order = limit(Side.BUY, "1", "50000.20")
    sim.submit(order, TS)

    reports = sim.replace(replace(order.client_order_id, new_quantity=D("0.3")), TS + 1)

    assert kinds(reports) == [ExecType.CANCEL_REJECTED]
    assert reports[0].reason == "QUANTITY_NOT_ABOVE_FILLED: new_quantity=0.3, filled=0.3"
    assert reports[0].leaves_qty == D("0.7")


# -- slippage ----------------------------------------------------------------------------------


def test_fixed_bps_slippage_when_instrument_configured_rounds_against_the_taker() -> None:
    sim = venue(
        slippage=FixedBpsSlippage(D("5")),
        instruments={stubs.INSTRUMENT_ID: stubs.instrument()},
    )
    sim.on_book(book(asks=[("50000.20", "1")], bids=[("50000.00", "1")]))

    bought = sim.submit(market(Side.BUY, "0.1"), TS)
    sold = sim.submit(market(Side.SELL, "0.1"), TS)

    # 50000.20 x 1.0005 = 50025.2001 -> up to 50025.21; 50000.00 x 0.9995 = 49975.00
    assert fills(bought) == [(D("0.1"), D("50025.21"), D("5.00252100"))]
    assert fills(sold) == [(D("0.1"), D("49975.00"), D("4.99750000"))]


def test_fixed_bps_slippage_when_no_instrument_keeps_the_exact_price() -> None:
    sim = venue(slippage=FixedBpsSlippage(D("5")))
    sim.on_book(book(asks=[("50000.20", "1")]))

    reports = sim.submit(market(Side.BUY, "0.1"), TS)

    assert fills(reports)[0][1] == D("50025.2001")


def test_fixed_bps_slippage_when_limit_order_takes_never_exceeds_the_limit() -> None:
    sim = venue(slippage=FixedBpsSlippage(D("5")))
    sim.on_book(book(asks=[("50000.20", "1")]))

    reports = sim.submit(limit(Side.BUY, "0.1", "50010.00"), TS)

    assert fills(reports)[0][1] == D("50010.00")


def test_square_root_impact_when_order_is_one_percent_of_adv_moves_price_by_k_sigma_tenth() -> None:
    model = SquareRootImpact(k=D("1"), sigma=D("0.02"), adv=D("10"))
    sim = venue(slippage=model, instruments={stubs.INSTRUMENT_ID: stubs.instrument()})
    sim.on_book(book(asks=[("50000.20", "1")]))

    reports = sim.submit(market(Side.BUY, "0.1"), TS)

    # impact = 1 x 0.02 x sqrt(0.1 / 10) = 0.002; 50000.20 x 1.002 = 50100.2004 -> 50100.21
    assert model.impact(D("0.1")) == D("0.002")
    assert fills(reports) == [(D("0.1"), D("50100.21"), D("5.01002100"))]


def test_square_root_impact_when_adv_is_zero_refuses_the_model() -> None:
    with pytest.raises(ValueError, match="adv must be > 0"):
        SquareRootImpact(k=D("1"), sigma=D("0.02"), adv=D("0"))


# -- instrument rules --------------------------------------------------------------------------


def test_limit_when_price_is_off_tick_is_rejected_naming_the_tick() -> None:
    sim = venue(instruments={stubs.INSTRUMENT_ID: stubs.instrument()})

    reports = sim.submit(limit(Side.BUY, "0.1", "49000.005"), TS)

    assert kinds(reports) == [ExecType.REJECTED]
    assert reports[0].reason == "PRICE_NOT_ON_TICK: price=49000.005, tick_size=0.01"


def test_order_when_instrument_belongs_to_another_venue_is_rejected() -> None:
    sim = SimulatedVenue(SimulatedVenueConfig(venue="BINANCE"), id_prefix="SIM")

    reports = sim.submit(limit(Side.BUY, "0.1", "49000.00"), TS)

    assert reports[0].reason == "VENUE_MISMATCH: venue=SIM, expected=BINANCE"


# -- idempotency -------------------------------------------------------------------------------


def test_submit_when_client_order_id_repeats_creates_no_second_order() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "5")]))
    first = market(Side.BUY, "1")
    again = market(Side.BUY, "1", client_order_id=first.client_order_id)

    reports = sim.submit(first, TS)
    duplicate = sim.submit(again, TS + 1)
    redelivered = sim.submit(first, TS + 2)

    assert kinds(reports) == [ExecType.ACCEPTED, ExecType.FILL]
    assert duplicate == []
    assert redelivered == []
    assert len(sim.ledger.orders) == 1
    assert sim.ledger.filled_quantity(first.client_order_id) == D("1")


def test_cancel_when_command_id_is_redelivered_returns_nothing() -> None:
    sim = venue()
    order = limit(Side.BUY, "0.1", "49000.00")
    sim.submit(order, TS)
    command_ = cancel(order.client_order_id)
    sim.cancel(command_, TS)

    again = sim.cancel(command_, TS + 1)

    assert again == []


# -- latency -----------------------------------------------------------------------------------


def test_latency_when_set_activates_order_at_send_time_plus_latency_on_the_book_of_then() -> None:
    sim = venue(latency_ns=5 * MS)
    sim.on_book(book(asks=[("50000.20", "1")]))

    sent = sim.submit(market(Side.BUY, "0.5"), TS)
    in_flight = sim.on_book(book(asks=[("50001.00", "1")], ts=TS + 1 * MS))
    arrived = sim.on_book(book(asks=[("50002.00", "1")], ts=TS + 6 * MS))

    assert sent == []
    assert in_flight == []
    assert kinds(arrived) == [ExecType.ACCEPTED, ExecType.FILL]
    assert fills(arrived) == [(D("0.5"), D("50001.00"), D("25.00050000"))]
    assert {r.ts_event for r in arrived} == {TS + 5 * MS}


def test_latency_when_cancel_follows_submit_keeps_their_order() -> None:
    sim = venue(latency_ns=5 * MS)
    order = limit(Side.BUY, "0.1", "49000.00")
    sim.submit(order, TS)
    sim.cancel(cancel(order.client_order_id), TS + 1 * MS)

    reports = sim.advance(TS + 10 * MS)

    assert kinds(reports) == [ExecType.ACCEPTED, ExecType.CANCELED]
    assert [r.ts_event for r in reports] == [TS + 5 * MS, TS + 6 * MS]


# -- market orders waiting for the next trade (bar backtests) -----------------------------------


def test_market_when_waiting_for_trade_fills_at_the_next_print_not_the_last() -> None:
    # Arrange: a close at 100, then the order; the market reopens at 110 a minute later.
    sim = venue(market_waits_for_trade=True)
    sim.on_tick(trade("100", "5"))
    # Act
    arrived = sim.submit(market(Side.BUY, "2"), TS + 1 * SECOND_NS)
    reopened = sim.on_tick(trade("110", "5", ts=TS + 60 * SECOND_NS))
    # Assert: accepted on arrival, filled at 110 at the print's time; fee 0.1 % of 220.
    assert kinds(arrived) == [ExecType.ACCEPTED]
    assert arrived[0].ts_event == TS + 1 * SECOND_NS
    assert fills(reopened) == [(D(2), D(110), D("0.22"))]
    assert [r.ts_event for r in reopened] == [TS + 60 * SECOND_NS]


def test_market_when_waiting_orders_share_a_print_oldest_fills_first_rest_canceled() -> None:
    # Arrange
    sim = venue(market_waits_for_trade=True)
    sim.on_tick(trade("100", "5"))
    first = market(Side.BUY, "1")
    second = market(Side.SELL, "1")
    sim.submit(first, TS)
    sim.submit(second, TS)
    # Act: the next print shows 1.5
    reports = sim.on_tick(trade("90", "1.5", ts=TS + SECOND_NS))
    # Assert: the buy takes 1 at 90, the sell the 0.5 left; its other 0.5 is canceled.
    assert [(r.client_order_id, r.exec_type, r.last_qty) for r in reports] == [
        (first.client_order_id, ExecType.FILL, D(1)),
        (second.client_order_id, ExecType.PARTIAL_FILL, D("0.5")),
        (second.client_order_id, ExecType.CANCELED, D(0)),
    ]


def test_market_when_waiting_is_replaced_or_canceled_takes_no_stale_print() -> None:
    # Arrange
    sim = venue(market_waits_for_trade=True)
    sim.on_tick(trade("100", "5"))
    kept, dropped = market(Side.BUY, "2"), market(Side.BUY, "1")
    sim.submit(kept, TS)
    sim.submit(dropped, TS)
    # Act
    replaced = sim.replace(replace(kept.client_order_id, new_quantity=D(1)), TS)
    canceled = sim.cancel(cancel(dropped.client_order_id), TS)
    reopened = sim.on_tick(trade("105", "5", ts=TS + SECOND_NS))
    # Assert: neither matched the close at 100; the replaced one fills 1 at the next print.
    assert kinds(replaced) == [ExecType.REPLACED]
    assert kinds(canceled) == [ExecType.CANCELED]
    assert [(r.client_order_id, r.last_qty, r.last_price) for r in reopened] == [
        (kept.client_order_id, D(1), D(105))
    ]


def test_limit_when_market_orders_wait_for_trade_still_matches_on_arrival() -> None:
    sim = venue(market_waits_for_trade=True)
    sim.on_tick(trade("100", "5"))

    reports = sim.submit(limit(Side.BUY, "1", "101"), TS)

    assert fills(reports) == [(D(1), D(100), D("0.1"))]


# -- ledger ------------------------------------------------------------------------------------


def test_ledger_when_orders_fill_holds_each_fill_once_matching_the_reports() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "0.5"), ("50000.30", "1")]))
    order = market(Side.BUY, "1")

    reports = sim.submit(order, TS)

    assert sim.ledger.fills == [
        LedgerFill(
            trade_id="SIM-T1",
            client_order_id=order.client_order_id,
            venue_order_id="SIM-O1",
            account_id=stubs.ACCOUNT_ID,
            instrument_id=stubs.INSTRUMENT_ID,
            side=Side.BUY,
            quantity=D("0.5"),
            price=D("50000.20"),
            fee=D("25.00010000"),
            fee_currency="USDT",
            liquidity_side=LiquiditySide.TAKER,
            ts_event=TS,
        ),
        LedgerFill(
            trade_id="SIM-T2",
            client_order_id=order.client_order_id,
            venue_order_id="SIM-O1",
            account_id=stubs.ACCOUNT_ID,
            instrument_id=stubs.INSTRUMENT_ID,
            side=Side.BUY,
            quantity=D("0.5"),
            price=D("50000.30"),
            fee=D("25.00015000"),
            fee_currency="USDT",
            liquidity_side=LiquiditySide.TAKER,
            ts_event=TS,
        ),
    ]
    assert [r.trade_id for r in reports if r.is_fill] == ["SIM-T1", "SIM-T2"]


def test_config_when_fee_rate_is_not_a_fraction_is_refused() -> None:
    with pytest.raises(ValueError, match="taker_fee must be a fraction"):
        SimulatedVenueConfig(taker_fee=D("1.5"))


def test_sell_stop_when_last_trade_already_reached_it_triggers_on_arrival() -> None:
    sim = venue()
    sim.on_book(book(bids=[("49980.00", "1")], asks=[("49990.00", "1")]))
    sim.on_tick(trade("49985.00"))
    order = command(
        order_type=OrderType.STOP,
        limit_price=None,
        stop_price=D("50000.00"),
        side=Side.SELL,
        quantity=D("0.2"),
    )

    reports = sim.submit(order, TS)

    # 0.2 x 49980 = 9996; fee 9.996
    assert kinds(reports) == [ExecType.ACCEPTED, ExecType.FILL]
    assert fills(reports) == [(D("0.2"), D("49980.00"), D("9.99600000"))]


def test_quote_tick_when_no_book_snapshot_was_seen_acts_as_a_one_level_book() -> None:
    sim = venue()
    sim.on_tick(stubs.quote_tick())  # 50000.00 x 1.5 / 50000.20 x 2.25

    reports = sim.submit(market(Side.BUY, "3"), TS)

    assert fills(reports) == [(D("2.25"), D("50000.20"), D("112.50045000"))]
    assert reports[-1].reason == "INSUFFICIENT_LIQUIDITY: unfilled=0.75"


def test_quote_tick_when_a_book_snapshot_was_seen_leaves_the_deeper_book_alone() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "1"), ("50000.30", "2")]))
    sim.on_tick(stubs.quote_tick(ask_size=D("0.1")))

    reports = sim.submit(market(Side.BUY, "3"), TS)

    assert [q for q, _, _ in fills(reports)] == [D("1"), D("2")]


# -- history (what the venue says of one order) ----------------------------------------------


def test_history_when_order_filled_in_two_levels_replays_accept_and_fills_with_trade_ids() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "0.5"), ("50000.30", "1")]))
    order = market(Side.BUY, "1")
    sent = sim.submit(order, TS)

    replay = sim.history(order.client_order_id, order.account_id)

    assert kinds(replay) == [ExecType.ACCEPTED, ExecType.PARTIAL_FILL, ExecType.FILL]
    assert [r.trade_id for r in replay] == [r.trade_id for r in sent]
    assert fills(replay) == fills(sent)
    assert [(r.cum_qty, r.leaves_qty) for r in replay] == [
        (D("0"), D("1")),
        (D("0.5"), D("0.5")),
        (D("1"), D("0")),
    ]
    assert replay[-1].avg_price == D("50000.25")  # (25000.10 + 25000.15) / 1
    assert [r.report_id for r in replay] == ["SIM-R1", "SIM-R2", "SIM-R3"]
    assert replay == sent


def test_history_when_remainder_canceled_ends_with_canceled_and_its_reason() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "0.3")]))
    order = market(Side.BUY, "1")
    sim.submit(order, TS)

    replay = sim.history(order.client_order_id, order.account_id)

    assert kinds(replay) == [ExecType.ACCEPTED, ExecType.PARTIAL_FILL, ExecType.CANCELED]
    assert replay[-1].reason == "INSUFFICIENT_LIQUIDITY: unfilled=0.7"
    assert (replay[-1].order_status, replay[-1].cum_qty) == (OrderStatus.CANCELED, D("0.3"))


def test_history_when_order_was_rejected_is_the_rejection_with_its_reason() -> None:
    sim = venue()
    order = market()
    sim.submit(order, TS)

    replay = sim.history(order.client_order_id, order.account_id)

    assert kinds(replay) == [ExecType.REJECTED]
    assert replay[0].reason == "NO_MARKET_DATA: instrument_id=BTC-USDT.SIM"


def test_history_when_order_unknown_or_of_another_account_is_empty() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "1")]))
    order = limit(Side.BUY, "0.1", "49000.00")
    sim.submit(order, TS)

    assert sim.history("never-sent", order.account_id) == []
    assert sim.history(order.client_order_id, "someone-else") == []


def test_history_when_order_replaced_and_canceled_keeps_every_report_with_its_original_id() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "1")]))
    order = limit(Side.BUY, "0.1", "49000.00")
    sent = sim.submit(order, TS)
    sent += sim.replace(replace(order.client_order_id, new_quantity=D("0.2")), TS)
    sent += sim.cancel(cancel(order.client_order_id), TS)

    replay = sim.history(order.client_order_id, order.account_id)

    assert kinds(replay) == [ExecType.ACCEPTED, ExecType.REPLACED, ExecType.CANCELED]
    assert [r.report_id for r in replay] == ["SIM-R1", "SIM-R2", "SIM-R3"]
    assert replay == sent


# -- QUERY (reconciliation) -------------------------------------------------------------------


def test_query_when_order_partly_filled_republishes_its_reports_with_original_ids() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "0.4")]))
    order = limit(Side.BUY, "1", "50000.20")
    sent = sim.submit(order, TS)

    answer = dispatch(sim, query(order.client_order_id, command_id="O:QUERY:1"), TS + 5)

    assert kinds(answer) == [ExecType.ACCEPTED, ExecType.PARTIAL_FILL]
    assert [(r.report_id, r.trade_id) for r in answer] == [("SIM-R1", None), ("SIM-R2", "SIM-T1")]
    assert answer == sent
    assert sim.order(order.client_order_id).status is OrderStatus.PARTIALLY_FILLED  # type: ignore[union-attr]


def test_query_when_venue_has_no_such_order_is_one_unknown_order_rejection() -> None:
    sim = venue()

    [answer] = dispatch(sim, query("never-sent", command_id="never-sent:QUERY:1"), TS + 7)

    assert answer.exec_type is ExecType.REJECTED
    assert answer.order_status is OrderStatus.REJECTED
    assert answer.report_id == "never-sent:QUERY:1-R"
    assert answer.reason == "UNKNOWN_ORDER: client_order_id=never-sent, venue=SIM"
    assert answer.ts_event == TS + 7


def test_query_when_order_resting_is_never_taken_for_a_replace() -> None:
    sim = venue()
    sim.on_book(book(asks=[("50000.20", "1")]))
    order = limit(Side.BUY, "0.1", "49000.00")
    sim.submit(order, TS)

    dispatch(sim, query(order.client_order_id), TS)

    assert sim.ledger.amendments == []
    assert sim.order(order.client_order_id).quantity == D("0.1")  # type: ignore[union-attr]
