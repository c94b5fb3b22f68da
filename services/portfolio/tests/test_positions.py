"""FIFO positions, cash, fees and equity from fills, with expected values worked out by hand."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.messages import ExecType, ExecutionReport, OrderStatus, PositionSide, Side
from quantmesh_common.testing import stubs
from quantmesh_portfolio.positions import Portfolio

D = Decimal
BTC = "BTC-USDT.SIM"
ACC = stubs.ACCOUNT_ID


def fill(
    side: Side, qty: str, price: str, trade_id: str, fee: str = "0", **extra: Any
) -> ExecutionReport:
    """A complete fill of `qty` at `price`, fee in USDT unless told otherwise."""
    fields: dict[str, Any] = {
        "report_id": f"R-{trade_id}",
        "instrument_id": BTC,
        "exec_type": ExecType.FILL,
        "order_status": OrderStatus.FILLED,
        "side": side,
        "last_qty": D(qty),
        "last_price": D(price),
        "cum_qty": D(qty),
        "avg_price": D(price),
        "fee": D(fee),
        "fee_currency": "USDT",
        "trade_id": trade_id,
        "ts_event": stubs.TS + int(trade_id.removeprefix("T")),
    }
    return stubs.execution_report(**{**fields, **extra})


@pytest.fixture
def portfolio() -> Portfolio:
    return Portfolio("USDT", {"USDT": D(1000)})


def test_fills_when_selling_across_two_lots_realise_fifo_pnl_minus_fees(
    portfolio: Portfolio,
) -> None:
    portfolio.apply_fill(fill(Side.BUY, "1", "100", "T1", fee="0.1"))
    portfolio.apply_fill(fill(Side.BUY, "1", "110", "T2", fee="0.1"))

    position = portfolio.apply_fill(fill(Side.SELL, "1.5", "120", "T3", fee="0.18"))

    # FIFO: (120 - 100) * 1 + (120 - 110) * 0.5 = 25; fees 0.1 + 0.1 + 0.18 = 0.38
    assert position is not None
    assert position.realized_pnl == D("24.62")
    assert position.fees == D("0.38")
    assert position.quantity == D("0.5")
    assert position.side is PositionSide.LONG
    assert position.avg_entry_price == D(110)  # what is left is half of the 110 lot
    # no market price yet: marked at the last fill, (120 - 110) * 0.5
    assert position.unrealized_pnl == D(5)
    assert position.last_price == D(120)


def test_fills_when_selling_across_two_lots_move_cash_and_equity(portfolio: Portfolio) -> None:
    portfolio.apply_fill(fill(Side.BUY, "1", "100", "T1", fee="0.1"))
    portfolio.apply_fill(fill(Side.BUY, "1", "110", "T2", fee="0.1"))
    portfolio.apply_fill(fill(Side.SELL, "1.5", "120", "T3", fee="0.18"))

    balances = portfolio.accounts[ACC].balances
    value = portfolio.valuation(ACC)

    # USDT: 1000 - 100 - 110 + 180 - 0.38 = 969.62; BTC: 1 + 1 - 1.5 = 0.5
    assert balances == {"USDT": D("969.62"), "BTC": D("0.5")}
    # 969.62 + 0.5 * 120 = 1029.62 = 1000 + realised 24.62 + unrealised 5
    assert value.equity == D("1029.62")
    assert value.unvalued == ()


def test_fill_when_it_crosses_zero_flips_long_to_short(portfolio: Portfolio) -> None:
    portfolio.apply_fill(fill(Side.BUY, "2", "100", "T1"))

    position = portfolio.apply_fill(fill(Side.SELL, "3", "90", "T2"))

    # closes 2 at (90 - 100) * 2 = -20, opens a 1 short at 90
    assert position is not None
    assert position.side is PositionSide.SHORT
    assert position.quantity == D(-1)
    assert position.avg_entry_price == D(90)
    assert position.realized_pnl == D(-20)


def test_fill_when_short_is_bought_back_realises_and_goes_flat(portfolio: Portfolio) -> None:
    portfolio.apply_fill(fill(Side.BUY, "2", "100", "T1"))
    portfolio.apply_fill(fill(Side.SELL, "3", "90", "T2"))

    position = portfolio.apply_fill(fill(Side.BUY, "1", "80", "T3"))

    # the short 1 at 90 bought back at 80: +10, on top of -20
    assert position is not None
    assert position.side is PositionSide.FLAT
    assert position.quantity == 0
    assert position.avg_entry_price == 0
    assert position.unrealized_pnl == 0
    assert position.realized_pnl == D(-10)


def test_fill_when_applied_twice_is_ignored_the_second_time(portfolio: Portfolio) -> None:
    report = fill(Side.BUY, "1", "100", "T1", fee="0.1")
    portfolio.apply_fill(report)

    again = portfolio.apply_fill(report)
    same_trade_other_report = portfolio.apply_fill(report.model_copy(update={"report_id": "R-x"}))

    assert again is None
    assert same_trade_other_report is None
    assert portfolio.accounts[ACC].balances == {"USDT": D("899.9"), "BTC": D(1)}
    assert portfolio.book(ACC, BTC).quantity == D(1)


def test_fill_when_same_trade_id_on_another_instrument_is_applied(portfolio: Portfolio) -> None:
    portfolio.apply_fill(fill(Side.BUY, "1", "100", "T1"))

    other = portfolio.apply_fill(
        fill(Side.BUY, "2", "10", "T1", instrument_id="ETH-USDT.SIM", fee_currency=None)
    )

    # venues such as Binance number trades per symbol: trade T1 of ETH is not trade T1 of BTC
    assert other is not None
    assert other.quantity == D(2)
    assert portfolio.accounts[ACC].balances["USDT"] == D(1000 - 100 - 20)


def test_report_when_not_a_fill_changes_nothing(portfolio: Portfolio) -> None:
    result = portfolio.apply_fill(stubs.order_accepted())

    assert result is None
    assert portfolio.accounts == {}
    assert portfolio.seen_fills == set()


def test_marks_when_price_moves_change_unrealised_pnl(portfolio: Portfolio) -> None:
    portfolio.apply_fill(fill(Side.BUY, "2", "100", "T1"))
    book = portfolio.book(ACC, BTC)

    portfolio.mark(BTC, D(105), stubs.TS + 10)
    up = book.unrealized_pnl
    portfolio.mark(BTC, D(95), stubs.TS + 20)
    down = book.unrealized_pnl

    assert up == D(10)  # (105 - 100) * 2
    assert down == D(-10)  # (95 - 100) * 2
    assert portfolio.valuation(ACC).equity == D(990)  # 1000 - 200 + 2 * 95


def test_mark_when_older_than_the_last_is_ignored(portfolio: Portfolio) -> None:
    portfolio.apply_fill(fill(Side.BUY, "1", "100", "T1"))
    portfolio.mark(BTC, D(105), stubs.TS + 20)

    accepted = portfolio.mark(BTC, D(50), stubs.TS + 10)

    assert not accepted
    assert portfolio.book(ACC, BTC).last_price == D(105)


def test_mark_when_market_price_exists_fills_no_longer_move_it(portfolio: Portfolio) -> None:
    portfolio.mark(BTC, D(100), stubs.TS)

    position = portfolio.apply_fill(fill(Side.BUY, "1", "102", "T5"))

    # a fill with slippage is not the market: the mark stays at the last market price
    assert position is not None
    assert position.last_price == D(100)
    assert position.unrealized_pnl == D(-2)


def test_short_when_price_falls_gains_and_holds_negative_base(portfolio: Portfolio) -> None:
    portfolio.apply_fill(fill(Side.SELL, "1", "100", "T1"))

    portfolio.mark(BTC, D(90), stubs.TS + 10)

    assert portfolio.book(ACC, BTC).unrealized_pnl == D(10)
    assert portfolio.accounts[ACC].balances == {"USDT": D(1100), "BTC": D(-1)}
    assert portfolio.valuation(ACC).equity == D(1010)  # 1100 - 90


def test_fee_when_in_base_currency_is_taken_from_base_and_valued_at_the_fill_price(
    portfolio: Portfolio,
) -> None:
    position = portfolio.apply_fill(
        fill(Side.BUY, "1", "100", "T1", fee="0.001", fee_currency="BTC")
    )

    assert position is not None
    assert position.fees == D("0.1")  # 0.001 BTC at 100
    assert position.realized_pnl == D("-0.1")
    assert portfolio.accounts[ACC].balances == {"USDT": D(900), "BTC": D("0.999")}


def test_fee_when_in_a_third_currency_is_charged_to_that_balance_only(
    portfolio: Portfolio,
) -> None:
    position = portfolio.apply_fill(
        fill(Side.BUY, "1", "100", "T1", fee="0.01", fee_currency="BNB")
    )

    assert position is not None
    assert position.fees == 0
    assert portfolio.accounts[ACC].balances["BNB"] == D("-0.01")


def test_valuation_when_a_balance_has_no_price_leaves_it_out_and_says_so() -> None:
    portfolio = Portfolio("USDT", {"USDT": D(1000), "ETH": D(1)})
    portfolio.account(ACC)

    before = portfolio.valuation(ACC)
    portfolio.mark("ETH-USDT.SIM", D(2000), stubs.TS)
    after = portfolio.valuation(ACC)

    assert before.equity == D(1000)
    assert before.unvalued == ("ETH",)
    assert after.equity == D(3000)
    assert after.unvalued == ()


def test_valuation_when_only_the_inverse_pair_is_priced_uses_its_inverse() -> None:
    portfolio = Portfolio("USDT", {"EUR": D(100)})
    portfolio.account(ACC)

    portfolio.mark("USDT-EUR.SIM", D("0.8"), stubs.TS)  # 1 USDT = 0.8 EUR, so 1 EUR = 1.25 USDT

    assert portfolio.valuation(ACC).equity == D(125)


def test_snapshot_when_equity_falls_from_its_peak_reports_drawdown(portfolio: Portfolio) -> None:
    portfolio.apply_fill(fill(Side.BUY, "1", "100", "T1", fee="1"))
    portfolio.mark(BTC, D(200), stubs.TS + 10)
    first = portfolio.snapshot(ACC, stubs.TS + 10)
    portfolio.mark(BTC, D(99), stubs.TS + 20)

    second = portfolio.snapshot(ACC, stubs.TS + 20)

    # equity: 899 + 200 = 1099 (the peak), then 899 + 99 = 998 -> drawdown 101 / 1099
    assert first.equity == D(1099)
    assert second.equity == D(998)
    assert second.peak_equity == D(1099)
    assert second.drawdown == D(101) / D(1099)
    assert second.realized_pnl == D(-1)
    assert second.unrealized_pnl == D(-1)  # (99 - 100) * 1
    assert second.fees == D(1)
    assert second.balances == {"BTC": D(1), "USDT": D(899)}
    assert [p.quantity for p in second.positions] == [D(1)]
    assert second.ts_event == stubs.TS + 20


def test_snapshot_when_position_is_flat_lists_no_position(portfolio: Portfolio) -> None:
    portfolio.apply_fill(fill(Side.BUY, "1", "100", "T1"))
    portfolio.apply_fill(fill(Side.SELL, "1", "110", "T2"))

    snapshot = portfolio.snapshot(ACC, stubs.TS + 10)

    assert snapshot.positions == []
    assert snapshot.realized_pnl == D(10)
    assert snapshot.equity == D(1010)
    assert snapshot.drawdown == 0


def test_partial_fills_when_summed_equal_one_fill_of_the_total(portfolio: Portfolio) -> None:
    partial: dict[str, Any] = {"exec_type": ExecType.PARTIAL_FILL}
    portfolio.apply_fill(fill(Side.BUY, "0.3", "100", "T1", **partial))
    portfolio.apply_fill(fill(Side.BUY, "0.7", "100", "T2"))

    book = portfolio.book(ACC, BTC)

    assert book.quantity == D(1)
    assert book.avg_entry_price == D(100)
    assert [lot.quantity for lot in book.lots] == [D("0.3"), D("0.7")]


def test_open_account_when_new_seeds_its_own_cash_and_capital(portfolio: Portfolio) -> None:
    opened = stubs.account_opened(base_currency="EUR", starting_cash={"EUR": D("2500")})

    account = portfolio.open_account(opened)

    assert account is not None
    assert account.balances == {"EUR": D(2500)}
    assert account.capital == D(2500)
    assert account.base_currency == "EUR"
    assert account.opened


def test_open_account_when_delivered_again_after_a_fill_is_not_applied_twice(
    portfolio: Portfolio,
) -> None:
    opened = stubs.account_opened(starting_cash={"USDT": D("50000")})
    portfolio.open_account(opened)
    portfolio.apply_fill(fill(Side.BUY, "1", "100", "T1", fee="0.1"))

    again = portfolio.open_account(opened)

    assert again is None
    # 50000 - 100 - 0.1
    assert portfolio.accounts[ACC].balances == {"USDT": D("49899.9"), "BTC": D(1)}


def test_open_account_when_a_fill_came_first_replaces_the_default_cash(
    portfolio: Portfolio,
) -> None:
    portfolio.apply_fill(fill(Side.BUY, "2", "100", "T1", fee="0.2"))  # USDT 1000 - 200.2

    account = portfolio.open_account(stubs.account_opened(starting_cash={"USDT": D("50000")}))

    assert account is not None
    # As if opened first: 50000 - 200 - 0.2
    assert account.balances == {"USDT": D("49799.8"), "BTC": D(2)}
    assert account.capital == D(50000)
    assert account.peak_equity is None


def test_carry_prices_when_the_replaced_portfolio_saw_a_later_tick_marks_the_reloaded_one() -> None:
    # Arrange: the stored state knows the position and its 100 mark; the portfolio it replaces
    # saw a tick at 130 since, and a fill price of an ETH pair no market price was seen for.
    reloaded = Portfolio("USDT", {"USDT": D(1000)})
    reloaded.apply_fill(fill(Side.BUY, "2", "100", "T1"))
    reloaded.mark(BTC, D(100), stubs.TS + 1)
    previous = Portfolio("USDT", {"USDT": D(1000)})
    previous.mark(BTC, D(130), stubs.TS + 5)
    previous.apply_fill(fill(Side.BUY, "1", "2000", "T2", instrument_id="ETH-USDT.SIM"))
    reloaded.account(ACC).balances["ETH"] = D(1)  # as if the store had the ETH fill's cash

    # Act
    applied = reloaded.carry_prices(previous)

    # Assert: unrealised (130 - 100) x 2 = 60; the ETH balance of 1 is worth 2000 USDT:
    # equity 1000 - 200 (BTC bought) + 2 x 130 + 2000 = 3060.
    assert applied == [(BTC, D(130))]
    book = reloaded.accounts[ACC].positions[BTC]
    assert book.unrealized_pnl == D(60)
    assert reloaded.valuation(ACC).equity == D(3060)


def test_carry_prices_when_the_replaced_portfolio_holds_an_older_mark_keeps_the_stored_one() -> (
    None
):
    # Arrange: the store's mark (120, at +9) is newer than the replaced portfolio's (130, at +5).
    reloaded = Portfolio("USDT", {"USDT": D(1000)})
    reloaded.apply_fill(fill(Side.BUY, "2", "100", "T1"))
    reloaded.mark(BTC, D(120), stubs.TS + 9)
    previous = Portfolio("USDT", {"USDT": D(1000)})
    previous.mark(BTC, D(130), stubs.TS + 5)

    # Act
    applied = reloaded.carry_prices(previous)

    # Assert: (120 - 100) x 2 = 40
    assert applied == []
    assert reloaded.accounts[ACC].positions[BTC].unrealized_pnl == D(40)
