"""Round trips, excursions, equity curves and reports of the portfolio's performance tracker."""

from __future__ import annotations

import dataclasses
import math
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantmesh_common import envelope as env
from quantmesh_common import performance as perf
from quantmesh_common.messages import ExecutionReport, PerformanceReport, PositionSide, Side
from quantmesh_common.testing import stubs
from quantmesh_portfolio.performance import PerformanceTracker, TripBook, _returns, report_id_of

D = Decimal
S = stubs.SECOND_NS
MINUTE = 60 * S
T0 = stubs.TS
BTC = stubs.INSTRUMENT_ID
ACC = stubs.ACCOUNT_ID


def _fill(
    trade_id: str,
    side: Side,
    qty: str,
    price: str,
    second: int,
    *,
    fee: str = "0",
    strategy_id: str | None = "strat-1",
) -> ExecutionReport:
    return stubs.execution_report(
        report_id=f"R-{trade_id}",
        trade_id=trade_id,
        strategy_id=strategy_id,
        side=side,
        last_qty=D(qty),
        last_price=D(price),
        cum_qty=D(qty),
        avg_price=D(price),
        fee=D(fee),
        ts_event=T0 + second * S,
    )


def _no_rate(currency: str, to: str) -> Decimal | None:
    return Decimal(1) if currency == to else None


def test_trip_when_two_entries_close_together_weights_prices_and_excursions() -> None:
    # Arrange
    book = TripBook(ACC, None, BTC, "USDT")
    book.apply_fill(1, D(1), D(100), D("0.1"), T0 + S, "T1")
    book.see(D(90))
    book.see(D(115))
    book.apply_fill(1, D(1), D(110), D("0.11"), T0 + 2 * S, "T2")
    book.see(D(105))

    # Act
    closed = book.apply_fill(-1, D(2), D(120), D("0.24"), T0 + 3 * S, "T3")

    # Assert
    assert closed is not None
    trip = closed.trip
    assert (trip.side, trip.quantity, trip.entry_price, trip.exit_price) == (
        PositionSide.LONG,
        D(2),
        D(105),
        D(120),
    )
    assert (trip.entry_ts_ns, trip.exit_ts_ns, trip.fees) == (T0 + S, T0 + 3 * S, D("0.45"))
    # (120 - 100) + (120 - 110) = 30, minus fees 0.45
    assert closed.pnl == D("29.55")
    # lot @100 saw 90..120: adverse 10, favourable 20; lot @110 saw 105..120: 5 and 10
    assert closed.mae == D("7.5")
    assert closed.mfe == D(15)
    assert closed.close_fill_id == "T3"
    assert book.trip is None
    assert book.realized == D("29.55")


def test_trip_when_a_fill_flips_the_position_splits_its_fee_pro_rata() -> None:
    # Arrange
    book = TripBook(ACC, None, BTC, "USDT")
    book.apply_fill(1, D(1), D(100), D(0), T0 + S, "T1")

    # Act
    long_trip = book.apply_fill(-1, D(3), D(90), D("0.3"), T0 + 2 * S, "T2")
    short_trip = book.apply_fill(1, D(2), D(80), D(0), T0 + 3 * S, "T3")

    # Assert
    assert long_trip is not None
    assert short_trip is not None
    # long 1 @100 -> 90 with a third of the fee: -10 - 0.1
    assert long_trip.pnl == D("-10.1")
    assert (long_trip.mae, long_trip.mfe) == (D(10), D(0))
    # short 2 @90 -> 80 with the other two thirds: +20 - 0.2
    assert short_trip.trip.side is PositionSide.SHORT
    assert short_trip.trip.quantity == D(2)
    assert short_trip.trip.fees == D("0.2")
    assert short_trip.pnl == D("19.8")
    assert (short_trip.mae, short_trip.mfe) == (D(0), D(10))
    assert book.realized == D("9.7")


def test_trip_when_only_partly_closed_stays_open_with_its_lots() -> None:
    # Arrange
    book = TripBook(ACC, None, BTC, "USDT")
    book.apply_fill(1, D(2), D(100), D(0), T0 + S, "T1")

    # Act
    closed = book.apply_fill(-1, D("0.5"), D(104), D(0), T0 + 2 * S, "T2")
    book.see(D(110))

    # Assert
    assert closed is None
    assert book.trip is not None
    assert book.trip.open_quantity() == D("1.5")
    assert book.realized == D(2)
    assert book.unrealized == D(15)  # (110 - 100) * 1.5


def test_fills_when_two_strategies_trade_against_each_other_keep_separate_trips() -> None:
    # Arrange
    tracker = PerformanceTracker(MINUTE)

    # Act
    tracker.on_fill(_fill("T1", Side.BUY, "1", "100", 1, strategy_id="A"))
    tracker.on_fill(_fill("T2", Side.SELL, "1", "100", 2, strategy_id="B"))
    tracker.on_fill(_fill("T3", Side.SELL, "1", "110", 3, strategy_id="A"))
    tracker.on_fill(_fill("T4", Side.BUY, "1", "110", 4, strategy_id="B"))

    # Assert
    account = [t.pnl for t in tracker.trips[(ACC, None)]]
    assert account == [D(0), D(0)]  # long 100 -> 100, then short 110 -> 110
    assert [t.pnl for t in tracker.trips[(ACC, "A")]] == [D(10)]
    assert [t.pnl for t in tracker.trips[(ACC, "B")]] == [D(-10)]
    assert tracker.strategies(ACC) == ["A", "B"]


def test_fill_when_fee_is_in_the_base_currency_counts_at_the_fill_price() -> None:
    # Arrange
    tracker = PerformanceTracker(MINUTE)
    buy = _fill("T1", Side.BUY, "1", "100", 1).model_copy(
        update={"fee": D("0.001"), "fee_currency": "BTC"}
    )

    # Act
    tracker.on_fill(buy)
    [closed] = tracker.on_fill(_fill("T2", Side.SELL, "1", "100", 2, strategy_id=None))

    # Assert
    assert closed.trip.fees == D("0.1")
    assert closed.pnl == D("-0.1")


def test_snapshot_when_a_strategy_traded_puts_capital_plus_its_pnl_on_its_curve() -> None:
    # Arrange
    tracker = PerformanceTracker(MINUTE)
    tracker.on_fill(_fill("T1", Side.BUY, "2", "100", 1, fee="0.2"))
    tracker.mark(BTC, D(105))

    # Act
    points = tracker.on_snapshot(
        ACC, T0 + MINUTE, D("1009.8"), base="USDT", capital=D(1000), rate=_no_rate
    )

    # Assert
    # 1000 + unrealised (105 - 100) * 2 - fee 0.2
    assert points == [("strat-1", (T0 + MINUTE, D("1009.8")))]
    assert tracker.curves[(ACC, None)] == [(T0 + MINUTE, D("1009.8"))]


def test_report_when_curve_and_trips_are_known_gives_hand_computed_figures() -> None:
    # Arrange
    tracker = PerformanceTracker(MINUTE)
    for i, equity in enumerate(("1000", "1100", "990", "1089")):
        tracker.on_snapshot(
            ACC, T0 + i * MINUTE, D(equity), base="USDT", capital=D(0), rate=_no_rate
        )
    tracker.on_fill(_fill("T1", Side.BUY, "1", "100", 1, strategy_id=None))
    tracker.mark(BTC, D(95))
    tracker.on_fill(_fill("T2", Side.SELL, "1", "110", 2, strategy_id=None))  # +10
    tracker.on_fill(_fill("T3", Side.BUY, "1", "100", 3, strategy_id=None))
    tracker.on_fill(_fill("T4", Side.SELL, "1", "96", 4, strategy_id=None))  # -4

    # Act
    report = tracker.report((ACC, None), "USDT", T0 + 3 * MINUTE)

    # Assert
    periods = 31_557_600 / 60  # a year of 365.25 days in minutes: 525,960
    assert report.periods_per_year == pytest.approx(periods)
    assert report.points == 4
    assert report.total_return == pytest.approx(0.089)
    # returns 0.1, -0.1, 0.1: mean 1/30, sample variance (2 * (1/15)^2 + (2/15)^2) / 2 = 1/75
    assert report.sharpe == pytest.approx((1 / 30) / math.sqrt(1 / 75) * math.sqrt(periods))
    # downside deviation over all three periods: sqrt(0.01 / 3)
    assert report.sortino == pytest.approx((1 / 30) / math.sqrt(0.01 / 3) * math.sqrt(periods))
    assert report.volatility == pytest.approx(math.sqrt(1 / 75) * math.sqrt(periods))
    assert report.omega == pytest.approx(2.0)  # (0.1 + 0.1) / 0.1
    assert report.max_drawdown == pytest.approx(0.1)  # 1100 -> 990
    assert report.max_drawdown_duration_ns == 2 * MINUTE  # peak at 1 min, unrecovered at 3
    assert report.max_drawdown_duration_periods == 2
    # type-7 5 % quantile of (-0.1, 0.1, 0.1): -0.1 + 0.1 * 0.2 = -0.08
    assert report.historical_var == pytest.approx(0.08)
    assert report.historical_cvar == pytest.approx(0.1)
    assert (report.trades, report.wins, report.losses) == (2, 1, 1)
    assert report.win_rate == pytest.approx(0.5)
    assert report.profit_factor == pytest.approx(2.5)  # 10 / 4
    assert report.expectancy == D(3)
    assert report.net_pnl == D(6)
    # trip 1: long @100 saw 95 -> MAE 5 (5 %), MFE 10 (10 %); trip 2: @100 saw 96: 4 %, 0 %
    assert [(t.mae, t.mfe) for t in report.round_trips] == [(D(5), D(10)), (D(4), D(0))]
    assert report.mean_mae_fraction == pytest.approx(0.045)
    assert report.mean_mfe_fraction == pytest.approx(0.05)
    assert report.report_id == f"PERF:{ACC}:{T0 + 3 * MINUTE}"


def test_report_when_no_period_lost_carries_infinite_ratios_through_the_wire() -> None:
    # Arrange
    tracker = PerformanceTracker(MINUTE)
    for i, equity in enumerate(("1000", "1010", "1030")):
        tracker.on_snapshot(
            ACC, T0 + i * MINUTE, D(equity), base="USDT", capital=D(0), rate=_no_rate
        )
    report = tracker.report((ACC, None), "USDT", T0 + 2 * MINUTE)

    # Act
    decoded = env.decode(
        env.encode(env.Envelope.wrap(report, source="test", ts_event=T0, ts_init=T0))
    )

    # Assert
    payload = decoded.payload
    assert isinstance(payload, PerformanceReport)
    assert payload.omega == math.inf
    assert payload.sortino == math.inf
    assert payload.max_drawdown == 0.0
    assert payload.profit_factor is None  # no trades
    assert payload == report


def test_report_when_equity_went_to_zero_keeps_the_trade_figures() -> None:
    # Arrange
    tracker = PerformanceTracker(MINUTE)
    for i, equity in enumerate(("1000", "0", "10")):
        tracker.on_snapshot(
            ACC, T0 + i * MINUTE, D(equity), base="USDT", capital=D(0), rate=_no_rate
        )
    tracker.on_fill(_fill("T1", Side.BUY, "1", "100", 1, strategy_id=None))
    tracker.on_fill(_fill("T2", Side.SELL, "1", "90", 2, strategy_id=None))

    # Act
    report = tracker.report((ACC, None), "USDT", T0 + 2 * MINUTE)

    # Assert
    assert report.sharpe is None
    assert report.total_return is None
    assert report.trades == 1
    assert report.net_pnl == D(-10)


def test_book_state_when_restored_closes_like_the_original() -> None:
    # Arrange
    book = TripBook(ACC, "A", BTC, "USDT")
    book.apply_fill(1, D(1), D(100), D("0.1"), T0 + S, "T1")
    book.see(D(80))
    copy = TripBook(ACC, "A", BTC, "USDT")

    # Act: the state, then its lots as stored apart (one row each)
    copy.restore(book.state())
    assert book.trip is not None
    for lot in book.trip.lots:
        copy.restore_lot(dataclasses.replace(lot))

    # Assert
    original = book.apply_fill(-1, D(1), D(120), D(0), T0 + 2 * S, "T2")
    restored = copy.apply_fill(-1, D(1), D(120), D(0), T0 + 2 * S, "T2")
    assert restored == original
    assert copy.realized == book.realized == D("19.9")


def test_book_state_when_stored_with_its_lots_before_v0031_restores_them_unstored() -> None:
    # Arrange: a state as stored before the lots had their own rows
    book = TripBook(ACC, None, BTC, "USDT")
    book.apply_fill(1, D(1), D(100), D(0), T0 + S, "T1")
    book.apply_fill(1, D(2), D(110), D(0), T0 + 2 * S, "T2")
    book.see(D(90))
    old = book.state()
    old["trip"]["lots"] = [["1", "100", "90", "110"], ["2", "110", "90", "110"]]
    copy = TripBook(ACC, None, BTC, "USDT")

    # Act
    copy.restore(old)

    # Assert: the same lots, numbered in order, all to be written; the next lot after them
    assert copy.trip is not None
    assert [(lot.quantity, lot.price, lot.low, lot.high, lot.seq) for lot in copy.trip.lots] == [
        (D(1), D(100), D(90), D(110), 0),
        (D(2), D(110), D(90), D(110), 1),
    ]
    assert [lot.seq for lot in copy.changed_lots()] == [1, 0]
    copy.apply_fill(1, D(1), D(95), D(0), T0 + 3 * S, "T3")
    assert copy.trip.lots[-1].seq == 2


def test_lots_when_a_price_widens_the_newest_ranges_are_the_changed_suffix_and_the_front() -> None:
    # Arrange: four lots stored (as after a write); prices nest their ranges
    book = TripBook(ACC, None, BTC, "USDT")
    for i, price in enumerate(("100", "110", "106", "108")):
        book.apply_fill(1, D(1), D(price), D(0), T0 + i * S, f"T{i}")
    book.dirty_seq = book.next_seq

    # Act: 109 is inside lot 0's range (100..110) and lot 1's (106..110), not lot 2's
    # (106..108) nor lot 3's (108..108)
    book.see(D(109))
    changed = [lot.seq for lot in book.changed_lots()]

    # Assert: the widened suffix (newest first), then the front lot
    assert changed == [3, 2, 0]
    assert book.dirty_seq == 2
    book.dirty_seq = book.next_seq
    assert [lot.seq for lot in book.changed_lots()] == [0]


@pytest.mark.parametrize(
    ("account_id", "strategy_id"),
    [("backtest", None), ("backtest", "sma_cross"), ("a" * 100, "s" * 100)],
)
def test_report_id_when_built_for_any_scope_is_a_valid_repeatable_identifier(
    account_id: str, strategy_id: str | None
) -> None:
    # Arrange
    ts = T0 + 10_000 * MINUTE

    # Act
    first = report_id_of(account_id, strategy_id, ts)
    again = report_id_of(account_id, strategy_id, ts)

    # Assert: the report it names validates (a bad id would send it to the dead letters)
    assert first == again
    assert len(first) <= 128
    report = stubs.performance_report(
        account_id=account_id, strategy_id=strategy_id, report_id=first, ts_event=ts
    )
    assert report.report_id == first


def test_report_id_when_short_names_its_scope_and_time() -> None:
    assert report_id_of("backtest", "sma_cross", 5) == "PERF:backtest:sma_cross:5"


def test_lots_when_a_price_is_inside_older_ranges_widen_only_the_newer_ones() -> None:
    # Arrange: lots @100 (sees 90..112), @110 (sees 105..112), @108 (sees only 108)
    book = TripBook(ACC, None, BTC, "USDT")
    book.apply_fill(1, D(1), D(100), D(0), T0 + S, "T1")
    book.see(D(90))
    book.apply_fill(1, D(1), D(110), D(0), T0 + 2 * S, "T2")
    book.see(D(105))
    book.see(D(112))
    book.apply_fill(1, D(1), D(108), D(0), T0 + 3 * S, "T3")

    # Act: 104 is below the two newer lots' lows, inside the oldest lot's range
    book.see(D(104))

    # Assert
    assert book.trip is not None
    ranges = [(lot.low, lot.high) for lot in book.trip.lots]
    assert ranges == [(D(90), D(112)), (D(104), D(112)), (D(104), D(108))]
    assert book.last_price == D(104)


@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["buy", "sell", "mark"]), st.integers(50, 150)),
        max_size=60,
    )
)
def test_lots_when_prices_and_fills_come_in_any_order_keep_each_lots_own_range(
    steps: list[tuple[str, int]],
) -> None:
    # Arrange: each lot's expected range is the min and max of every price since it opened
    book = TripBook(ACC, None, BTC, "USDT")
    seen_since: list[list[int]] = []  # per open lot (FIFO), the prices it lived through

    # Act
    for n, (kind, price) in enumerate(steps):
        for prices in seen_since:
            prices.append(price)
        if kind == "mark":
            book.see(D(price))
            continue
        sign = 1 if kind == "buy" else -1
        direction = book.trip.direction if book.trip is not None else sign
        book.apply_fill(sign, D(1), D(price), D(0), T0 + n, f"T{n}")
        if sign == direction:
            seen_since.append([price])
        else:
            seen_since.pop(0)

    # Assert
    lots = list(book.trip.lots) if book.trip is not None else []
    assert [(lot.low, lot.high) for lot in lots] == [
        (D(min(prices)), D(max(prices))) for prices in seen_since
    ]


def test_returns_when_taken_from_a_checked_curve_are_period_returns_float_for_float() -> None:
    # Equities of 28 significant digits, as a curve of Decimal sums has them.
    curve = [
        (0, D("100000")),
        (60, D("99999.99999999999999999999999")),
        (120, D("100312.3333333333333333333333")),
        (180, D("0.000000000000000000000000001")),
        (240, D("7")),
    ]

    got = _returns(curve)

    assert got == perf.period_returns(curve)
    assert got[0] == float(D("99999.99999999999999999999999")) / 100000.0 - 1.0
    assert _returns(curve[:1]) == []
