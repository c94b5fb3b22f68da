"""Backtests through the real stage handlers: fill timing, costs, figures, determinism."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from quantmesh_common.messages import Bar, Side
from quantmesh_embedded.backtest import BacktestConfig, run_backtest

DAY = 86_400 * 1_000_000_000
T0 = 1_672_531_200 * 1_000_000_000  # 2023-01-01T00:00:00Z
SYMBOL = "ASSET-USD.SIM"
# sma_cross fast=1 slow=2 is long while a close is above the one before: with these closes
# it goes long on bar 3's close and back to flat on bar 5's close.
OPENS = ["10", "10", "9", "8", "9.5", "10", "7.5"]
CLOSES = ["10", "9", "8", "9", "10", "8", "7"]


def _bars() -> list[Bar]:
    bars = []
    for i, (o, c) in enumerate(zip(OPENS, CLOSES, strict=True)):
        op, cl = Decimal(o), Decimal(c)
        bars.append(
            Bar(
                instrument_id=SYMBOL,
                interval="1d",
                open=op,
                high=max(op, cl) + 1,
                low=min(op, cl) - 1,
                close=cl,
                volume=Decimal(100),
                ts_open=T0 + i * DAY,
                ts_close=T0 + (i + 1) * DAY,
            )
        )
    return bars


def _config(fill_at: str) -> BacktestConfig:
    return BacktestConfig(
        instrument_id=SYMBOL,
        strategy="sma_cross",
        params={"fast": 1, "slow": 2, "quantity": "2"},
        cash=Decimal("100000"),
        commission=Decimal("0.001"),
        fill_at=fill_at,  # type: ignore[arg-type]
    )


async def test_next_open_fills_a_close_decision_at_the_following_bars_open() -> None:
    result = await run_backtest(_config("next_open"), _bars())

    buy, sell = result.fills
    # Bar 3 closes when bar 4 opens; the order waits at the venue for the next print, bar 4's
    # opening one, and fills at its price and time.
    assert (buy.side, buy.last_qty, buy.last_price, buy.ts_event) == (
        Side.BUY,
        Decimal(2),
        Decimal("9.5"),
        T0 + 4 * DAY,
    )
    assert (sell.side, sell.last_price, sell.ts_event) == (
        Side.SELL,
        Decimal("7.5"),
        T0 + 6 * DAY,
    )
    # 0.1 % of 19 and of 15.
    assert (buy.fee, sell.fee) == (Decimal("0.019"), Decimal("0.015"))
    [trip] = result.round_trips
    assert trip.pnl == Decimal("-4.034")  # (7.5 - 9.5) x 2 - 0.034
    assert result.equity[-1][1] == Decimal("99995.966")


def _gapped_bars() -> list[Bar]:
    """The bars of `_bars`, but the market is shut for two days before bars 4 and 6."""
    days = [0, 1, 2, 3, 6, 7, 10]
    return [
        bar.model_copy(update={"ts_open": T0 + day * DAY, "ts_close": T0 + (day + 1) * DAY})
        for bar, day in zip(_bars(), days, strict=True)
    ]


@pytest.mark.parametrize(
    ("mode", "engine"),
    [("per_bar", "auto"), ("columnar", "stages"), ("columnar", "columnar")],
)
async def test_next_open_when_a_gap_precedes_the_next_bar_fills_at_its_open_slipped(
    mode: str, engine: str
) -> None:
    # Arrange: long on bar 3's close (9, day 4), flat on bar 5's (8, day 8); bars 4 and 6
    # open two days after the bar before closes, at 9.5 and 7.5. Slippage 10 bps.
    config = BacktestConfig(
        instrument_id=SYMBOL,
        strategy="sma_cross",
        params={"fast": 1, "slow": 2, "quantity": "2"},
        commission=Decimal("0.001"),
        slippage_bps=Decimal(10),
        fill_at="next_open",
    )
    # Act
    result = await run_backtest(config, _gapped_bars(), mode=mode, engine=engine)  # type: ignore[arg-type]
    # Assert: buy 2 at 9.5 x 1.001 = 9.5095 when bar 4 opens (day 6), fee 0.1 % of 19.019;
    # sell 2 at 7.5 x 0.999 = 7.4925 when bar 6 opens (day 10), fee 0.1 % of 14.985.
    assert [(f.side, f.last_qty, f.last_price, f.fee, f.ts_event) for f in result.fills] == [
        (Side.BUY, Decimal(2), Decimal("9.5095"), Decimal("0.019019"), T0 + 6 * DAY),
        (Side.SELL, Decimal(2), Decimal("7.4925"), Decimal("0.014985"), T0 + 10 * DAY),
    ]
    # (7.4925 - 9.5095) x 2 - 0.034004 = -4.068004
    assert result.equity[-1][1] == Decimal("99995.931996")


async def test_close_fills_at_the_deciding_bars_close() -> None:
    result = await run_backtest(_config("close"), _bars())

    buy, sell = result.fills
    assert (buy.last_price, buy.ts_event) == (Decimal("9"), T0 + 4 * DAY)
    assert (sell.last_price, sell.ts_event) == (Decimal("8"), T0 + 6 * DAY)
    assert result.equity[-1][1] == Decimal("99997.966")  # (8 - 9) x 2 - 0.034


async def test_figures_follow_the_fills_and_the_curve() -> None:
    result = await run_backtest(_config("next_open"), _bars())

    figures = result.figures()

    assert figures["bars"] == 7
    assert figures["trades"] == 1
    assert figures["fills"] == 2
    assert Decimal(figures["final_equity"]) == Decimal("99995.966")
    assert figures["return_pct"] == pytest.approx(-4.034 / 100000 * 100)
    assert figures["win_rate_pct"] == 0.0
    assert figures["max_drawdown_pct"] > 0


async def test_same_inputs_give_identical_fills_and_curves() -> None:
    first = await run_backtest(_config("next_open"), _bars())
    second = await run_backtest(_config("next_open"), _bars())

    def strip(r: object) -> list[tuple[object, ...]]:
        return [(f.side, f.last_qty, f.last_price, f.fee, f.ts_event) for f in r.fills]  # type: ignore[attr-defined]

    assert strip(first) == strip(second)
    assert first.equity == second.equity


def test_cli_prints_one_json_object_and_refuses_a_bad_file(tmp_path: Path) -> None:
    data = tmp_path / "bars.csv"
    rows = ["Timestamp,Open,High,Low,Close,Volume"] + [
        f"{(T0 + i * DAY) // 1_000_000_000},{o},{max(Decimal(o), Decimal(c)) + 1},"
        f"{min(Decimal(o), Decimal(c)) - 1},{c},100"
        for i, (o, c) in enumerate(zip(OPENS, CLOSES, strict=True))
    ]
    data.write_text("\n".join(rows) + "\n")
    exe = Path(sys.executable).parent / "quantmesh"
    args = ["backtest", "--data", str(data), "--symbol", SYMBOL, "--strategy", "sma_cross"]
    params = ["--param", "fast=1", "--param", "slow=2", "--param", "quantity=2", "--json"]

    ok = subprocess.run([exe, *args, *params], capture_output=True, text=True, check=False)
    bad = subprocess.run(
        [exe, *args[:1], "--data", str(tmp_path / "missing.csv"), *args[3:]],
        capture_output=True,
        text=True,
        check=False,
    )

    assert ok.returncode == 0, ok.stderr
    figures = json.loads(ok.stdout)
    assert Decimal(figures["final_equity"]) == Decimal("99995.966")
    assert {"sharpe", "sortino", "calmar", "omega", "bars_per_s"} <= set(figures)
    assert bad.returncode != 0
    assert "missing.csv" in bad.stderr
