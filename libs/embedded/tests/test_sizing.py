"""Position sizing: --size parsing, the sizer's arithmetic, and sized backtests end to end."""

from __future__ import annotations

from decimal import Decimal

import pytest

from quantmesh_common.bus.base import Emit
from quantmesh_common.messages import Bar, PositionSide, Side
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic
from quantmesh_embedded.backtest import BacktestConfig, run_backtest
from quantmesh_embedded.sizing import Sizer, SizeSpec, floor_to_lot

BTC = stubs.INSTRUMENT_ID
SYMBOL = "ASSET-USD.SIM"
DAY = 86_400 * 1_000_000_000
T0 = 1_672_531_200 * 1_000_000_000
# The series of test_backtest: sma_cross fast=1 slow=2 goes long on bar 3's close (9) and
# flat on bar 5's close (8); next_open fills at bar 4's open (9.5) and bar 6's (7.5).
OPENS = ["10", "10", "9", "8", "9.5", "10", "7.5"]
CLOSES = ["10", "9", "8", "9", "10", "8", "7"]


def _bars() -> list[Bar]:
    return [
        Bar(
            instrument_id=SYMBOL,
            interval="1d",
            open=Decimal(o),
            high=max(Decimal(o), Decimal(c)) + 1,
            low=min(Decimal(o), Decimal(c)) - 1,
            close=Decimal(c),
            volume=Decimal(100),
            ts_open=T0 + i * DAY,
            ts_close=T0 + (i + 1) * DAY,
        )
        for i, (o, c) in enumerate(zip(OPENS, CLOSES, strict=True))
    ]


def _sizer(spec: str, cash: str = "1000", lot: str = "1") -> Sizer:
    return Sizer(
        SizeSpec.parse(spec),
        BTC,
        cash=Decimal(cash),
        commission=Decimal("0.001"),
        lot_size=Decimal(lot),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2.5", SizeSpec("fixed", Decimal("2.5"))),
        ("25%", SizeSpec("percent", Decimal(25))),
        ("ALL-IN", SizeSpec("all_in")),
    ],
)
def test_size_spec_when_each_form_is_given_parses_it(text: str, expected: SizeSpec) -> None:
    assert SizeSpec.parse(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "abc%", "half", "nan"])
def test_size_spec_when_not_a_positive_size_refuses_it(text: str) -> None:
    with pytest.raises(ValueError, match="--size"):
        SizeSpec.parse(text)


def test_floor_to_lot_when_between_lots_rounds_down() -> None:
    assert floor_to_lot(Decimal("5555.5555"), Decimal("0.01")) == Decimal("5555.55")
    assert floor_to_lot(Decimal("0.004"), Decimal("0.01")) == 0


def test_all_in_when_flat_buys_the_most_lots_cash_covers_after_commission() -> None:
    sizer = _sizer("all-in")
    sizer.on_tick(stubs.tick(price=Decimal(9)))

    # 111 x 9 x 1.001 = 999.999 <= 1000 < 112 x 9.009 = 1009.008
    assert sizer.quantity() == Decimal(111)


def test_all_in_when_already_long_counts_the_cash_the_position_releases() -> None:
    sizer = _sizer("all-in")
    sizer.on_report(
        stubs.execution_report(
            side=Side.BUY,
            last_qty=Decimal(111),
            cum_qty=Decimal(111),
            last_price=Decimal(9),
            fee=Decimal("0.999"),
        )
    )
    sizer.on_tick(stubs.tick(price=Decimal(10)))

    # cash 1000 - 999 - 0.999 = 0.001; budget = 0.001 + 1110 - 1.11 = 1108.891;
    # 1108.891 / 10.01 = 110.78 -> 110 lots.
    assert sizer.cash == Decimal("0.001")
    assert sizer.quantity() == Decimal(110)


def test_percent_when_flat_sizes_a_fraction_of_equity_at_the_last_price() -> None:
    sizer = _sizer("50%")
    sizer.on_tick(stubs.tick(price=Decimal(9)))

    assert sizer.quantity() == Decimal(55)  # 500 / 9 = 55.5


def test_sizer_when_a_fill_is_redelivered_applies_it_once() -> None:
    sizer = _sizer("50%")
    fill = stubs.execution_report(
        side=Side.SELL, last_qty=Decimal(2), cum_qty=Decimal(2), last_price=Decimal(10)
    )

    sizer.on_report(fill)
    sizer.on_report(fill)

    assert (sizer.position, sizer.cash) == (Decimal(-2), Decimal("1015.1"))  # 1000 + 20 - 4.9


def test_sizer_when_no_price_yet_sizes_zero() -> None:
    assert _sizer("all-in").quantity() == 0


def test_rewrite_when_short_target_keeps_the_sign_and_resizes_intent_and_signal() -> None:
    sizer = _sizer("50%")
    sizer.on_tick(stubs.tick(price=Decimal(9)))
    target = stubs.order_intent(side=None, quantity=None, target_position=Decimal(-1))
    flat = stubs.order_intent(side=None, quantity=None, target_position=Decimal(0))
    plain = stubs.order_intent()
    signal = stubs.signal(direction=PositionSide.SHORT, target_position=Decimal(-1))
    emits = [
        Emit(Topic.ORDERS_INTENTS, target),
        Emit(Topic.SIGNALS, signal),
        Emit(Topic.ORDERS_INTENTS, flat),
        Emit(Topic.ORDERS_INTENTS, plain),
    ]

    out = sizer.rewrite(emits)

    assert out[0].payload.target_position == Decimal(-55)  # type: ignore[attr-defined]
    assert out[1].payload.target_position == Decimal(-55)  # type: ignore[attr-defined]
    assert out[1].payload.direction is PositionSide.SHORT  # type: ignore[attr-defined]
    assert out[2].payload is flat
    assert out[3].payload is plain


def _config(size: str, fill_at: str, lot: str = "1e-8") -> BacktestConfig:
    return BacktestConfig(
        instrument_id=SYMBOL,
        strategy="sma_cross",
        params={"fast": 1, "slow": 2},
        cash=Decimal("100000"),
        commission=Decimal("0.001"),
        fill_at=fill_at,  # type: ignore[arg-type]
        size=SizeSpec.parse(size),
        lot_size=Decimal(lot),
    )


async def test_all_in_backtest_when_filled_at_close_spends_all_but_a_dime() -> None:
    result = await run_backtest(_config("all-in", "close", lot="1"), _bars())

    buy, sell = result.fills
    # Long on bar 3's close at 9: 100000 / 9.009 = 11100.01 -> 11100 (costs 99999.90).
    assert (buy.last_qty, buy.last_price, sell.last_qty) == (
        Decimal(11100),
        Decimal(9),
        Decimal(11100),
    )
    # Cash 0.10, then 11100 sold at 8 less 88.80 of commission.
    assert result.equity[-1][1] == Decimal("88711.3")


async def test_percent_backtest_when_next_open_sizes_at_the_deciding_close() -> None:
    result = await run_backtest(_config("50%", "next_open", lot="0.01"), _bars())

    buy, sell = result.fills
    # 50000 / 9 (bar 3's close) = 5555.55; filled at bar 4's open 9.5, out at bar 6's 7.5.
    assert (buy.last_qty, buy.last_price) == (Decimal("5555.55"), Decimal("9.5"))
    assert (sell.last_qty, sell.last_price) == (Decimal("5555.55"), Decimal("7.5"))
    # -2 x 5555.55 - (52.777725 + 41.666625) of commission.
    assert result.equity[-1][1] == Decimal("88794.45565")


async def test_fixed_size_backtest_when_given_trades_that_quantity() -> None:
    result = await run_backtest(_config("3", "close"), _bars())

    assert [f.last_qty for f in result.fills] == [Decimal(3), Decimal(3)]
    assert result.equity[-1][1] == Decimal("99996.949")  # (8 - 9) x 3 - 0.027 - 0.024


async def test_fixed_lot_size_when_quantity_is_off_the_lot_rounds_down() -> None:
    result = await run_backtest(_config("2.7", "close", lot="1"), _bars())

    assert [f.last_qty for f in result.fills] == [Decimal(2), Decimal(2)]


def test_config_when_size_and_quantity_param_are_both_given_refuses() -> None:
    with pytest.raises(ValueError, match="not both"):
        BacktestConfig(SYMBOL, "sma_cross", {"quantity": 1}, size=SizeSpec.parse("1"))
