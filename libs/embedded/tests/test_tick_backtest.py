"""Backtests over a CSV of trades: every print through the stages, bars aggregated from them."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from quantmesh_common.messages import Side
from quantmesh_embedded.backtest import BacktestConfig
from quantmesh_embedded.cli import main
from quantmesh_embedded.ticks import is_trades_file, run_tick_backtest

SYMBOL = "ASSET-USD.SIM"
T0_MS = 1_700_000_000_000
#: (second, price) of each trade, size 10 each. The 1 s bars close at 100, 100, 90, 110, 120,
#: 60, 59: with sma_cross 2/3 the regime is set down at bar 2 (no trade: the first regime),
#: a tie at bar 3, up at bar 4 (buy, at bar 5's first print, 121) and down at bar 5 (sell to
#: short, at bar 6's first print, 59).
TRADES = [
    (0, "100"),
    (1, "100"),
    (2, "95"),
    (2.5, "90"),
    (3, "110"),
    (4, "120"),
    (5, "121"),
    (5.5, "60"),
    (6, "59"),
]


def _trades_csv(tmp_path: Path, size: str = "10") -> Path:
    path = tmp_path / "trades.csv"
    rows = [
        f"{T0_MS + int(sec * 1000)},{price},{size},{n}" for n, (sec, price) in enumerate(TRADES)
    ]
    path.write_text("timestamp,price,size,trade_id\n" + "\n".join(rows) + "\n")
    return path


def _config(quantity: str = "1") -> BacktestConfig:
    return BacktestConfig(
        instrument_id=SYMBOL,
        strategy="sma_cross",
        params={"fast": 2, "slow": 3, "quantity": quantity, "allow_short": True},
        commission=Decimal("0.001"),
    )


async def test_tick_backtest_when_the_averages_cross_fills_at_the_next_print(
    tmp_path: Path,
) -> None:
    # Act
    result, bars = await run_tick_backtest(_config(), _trades_csv(tmp_path), "1s")

    # Assert: the bars the strategy saw, aggregated from the trades
    assert [str(b.close) for b in bars] == ["100", "100", "90", "110", "120", "60", "59"]
    assert (bars[2].open, bars[2].high, bars[2].low) == (Decimal(95), Decimal(95), Decimal(90))
    # buy 1 at 121 (fee 0.121), then sell 2 at 59 (fee 0.118): long 121 -> 59, short 1 at 59
    fills = [(f.side, f.last_qty, f.last_price, f.fee) for f in result.fills]
    assert fills == [
        (Side.BUY, Decimal(1), Decimal(121), Decimal("0.121")),
        (Side.SELL, Decimal(2), Decimal(59), Decimal("0.118")),
    ]
    # cash 100000 - 121.121 + 117.882 = 99996.761; short 1 marked at 59
    assert result.equity[-1][1] == Decimal("99937.761")
    assert result.equity[0] == (bars[0].ts_open, Decimal(100000))
    figures = result.figures()
    assert (figures["bars"], figures["trades"], figures["fills"]) == (7, 1, 2)
    assert Decimal(figures["final_equity"]) == Decimal("99937.761")


async def test_tick_backtest_when_an_order_exceeds_the_print_fills_what_the_print_shows(
    tmp_path: Path,
) -> None:
    # Arrange: orders of 25 against prints of 10
    # Act
    result, _ = await run_tick_backtest(_config("25"), _trades_csv(tmp_path), "1s")

    # Assert: each market order took the print's 10, the rest was canceled (no liquidity)
    assert [(f.side, f.last_qty, f.last_price) for f in result.fills] == [
        (Side.BUY, Decimal(10), Decimal(121)),
        (Side.SELL, Decimal(10), Decimal(59)),
    ]


def test_is_trades_file_when_given_trades_or_bars_tells_them_apart(tmp_path: Path) -> None:
    bars = tmp_path / "bars.csv"
    bars.write_text("timestamp,open,high,low,close,volume\n1,1,1,1,1,1\n")

    assert is_trades_file(_trades_csv(tmp_path))
    assert not is_trades_file(bars)


def test_cli_backtest_when_data_is_trades_runs_every_print_and_prints_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["backtest", "--data", str(_trades_csv(tmp_path)), "--symbol", SYMBOL]
    args += ["--strategy", "sma_cross", "--param", "fast=2", "--param", "slow=3"]
    args += ["--param", "quantity=1", "--allow-short", "--interval", "1s", "--json"]
    args += ["--report", str(tmp_path / "run.html")]

    code = main(args)

    assert code == 0
    figures = json.loads(capsys.readouterr().out)
    assert (figures["bars"], figures["fills"]) == (7, 2)
    assert Decimal(figures["final_equity"]) == Decimal("99937.761")
    assert "ASSET-USD.SIM" in (tmp_path / "run.html").read_text()


def test_cli_backtest_when_a_trades_file_lacks_a_price_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("timestamp,size\n1700000000000,1\n")

    code = main(["backtest", "--data", str(path), "--symbol", SYMBOL, "--strategy", "sma_cross"])

    assert code == 2
    assert "lacks price" in capsys.readouterr().err


def _trades_parquet(tmp_path: Path) -> Path:
    # The CSV's trades with the types a dump has: epoch ms, float prices, integer ids.
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "trades.parquet"
    table = pa.table(
        {
            "timestamp": pa.array([T0_MS + int(sec * 1000) for sec, _ in TRADES], pa.int64()),
            "price": pa.array([float(price) for _, price in TRADES], pa.float64()),
            "size": pa.array([10.0] * len(TRADES), pa.float64()),
            "trade_id": pa.array(list(range(len(TRADES))), pa.int64()),
        }
    )
    pq.write_table(table, path)
    return path


async def test_tick_backtest_when_trades_are_parquet_equals_the_csv_run(tmp_path: Path) -> None:
    # Arrange
    parquet = _trades_parquet(tmp_path)

    # Act
    from_parquet, bars = await run_tick_backtest(_config(), parquet, "1s")
    from_csv, _ = await run_tick_backtest(_config(), _trades_csv(tmp_path), "1s")

    # Assert: a Parquet file of trades is told from bars, and runs as its CSV does.
    assert is_trades_file(parquet)
    assert [str(b.close) for b in bars] == [
        "100.0",
        "100.0",
        "90.0",
        "110.0",
        "120.0",
        "60.0",
        "59.0",
    ]
    fills = [(f.side, f.last_qty, f.last_price, f.fee) for f in from_parquet.fills]
    assert fills == [(f.side, f.last_qty, f.last_price, f.fee) for f in from_csv.fills]
    assert from_parquet.equity[-1][1] == from_csv.equity[-1][1] == Decimal("99937.761")
