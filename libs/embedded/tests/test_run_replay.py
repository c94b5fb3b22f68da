"""`quantmesh run --replay`: the embedded mode fed by a recorded file, not the synthetic feed."""

from __future__ import annotations

import io
import sqlite3
import time
from decimal import Decimal
from pathlib import Path

import pytest

from quantmesh_common.messages import Side
from quantmesh_embedded.cli import main
from quantmesh_embedded.run import RunConfig, run_live

DAY = 86_400 * 1_000_000_000
SECOND = 1_000_000_000
T0 = 1_672_531_200 * 1_000_000_000  # 2023-01-01T00:00:00Z
SYMBOL = "ASSET-USD.SIM"
# sma_cross fast=1 slow=2 is long while a close is above the one before: long on bar 3's
# close (9), flat on bar 5's (8). The paper venue fills a market order at the last trade.
OPENS = ["10", "10", "9", "8", "9.5", "10", "7.5"]
CLOSES = ["10", "9", "8", "9", "10", "8", "7"]
PARAMS = {"fast": 1, "slow": 2, "allow_short": False, "quantity": "2"}


def _ohlcv(path: Path) -> Path:
    rows = ["timestamp,open,high,low,close,volume"]
    for i, (o, c) in enumerate(zip(OPENS, CLOSES, strict=True)):
        high, low = max(Decimal(o), Decimal(c)) + 1, min(Decimal(o), Decimal(c)) - 1
        rows.append(f"{T0 + i * DAY},{o},{high},{low},{c},100")
    path.write_text("\n".join(rows) + "\n")
    return path


async def test_run_live_when_replaying_ohlcv_trades_on_each_bars_prints(tmp_path: Path) -> None:
    # Arrange
    out = io.StringIO()
    config = RunConfig(instruments=(SYMBOL,), replay=_ohlcv(tmp_path / "bars.csv"), params=PARAMS)
    # Act
    view = await run_live(config, out)
    # Assert: two prints and one bar per row; buy on bar 3's close, sell on bar 5's.
    assert (view.ticks, view.bars) == (14, 7)
    fills = [(f.side, f.last_qty, f.last_price, f.ts_event) for f in view.fills]
    assert fills == [
        (Side.BUY, Decimal(2), Decimal(9), T0 + 4 * DAY),
        (Side.SELL, Decimal(2), Decimal(8), T0 + 6 * DAY),
    ]
    assert "stopped after 604800.0 s: 14 ticks, 7 bars, 2 orders, 2 fills" in out.getvalue()


async def test_run_live_when_replaying_trades_aggregates_bars_of_the_interval(
    tmp_path: Path,
) -> None:
    # Arrange: one trade a second for 16 s; 2 s bars close at 103, 101, 101, 103, 105, 103,
    # 101, 99: down, a tie, up (buy on the 4th bar's close), up, down (sell on the 6th's).
    prices = [104, 103, 102, 101, 100, 101, 102, 103, 104, 105, 104, 103, 102, 101, 100, 99]
    rows = ["timestamp,price,amount"] + [f"{T0 + i * SECOND},{p},0.5" for i, p in enumerate(prices)]
    path = tmp_path / "trades.csv"
    path.write_text("\n".join(rows) + "\n")
    config = RunConfig(
        instruments=(SYMBOL,), replay=path, bar_interval="2s", params=PARAMS, duration_s=60
    )
    # Act
    view = await run_live(config, io.StringIO())
    # Assert: every trade a tick; eight 2 s bars (the last closed at the end of the file).
    assert view.ticks == 16
    assert view.bars == 8
    assert [f.side for f in view.fills] == [Side.BUY, Side.SELL]


async def test_run_live_when_replay_speed_is_set_paces_by_the_files_time(tmp_path: Path) -> None:
    # Arrange: 7 daily bars at a million times real time: 6 days of file take ~0.5 s.
    config = RunConfig(
        instruments=(SYMBOL,), replay=_ohlcv(tmp_path / "bars.csv"), params=PARAMS, speed=1e6
    )
    # Act
    started = time.monotonic()
    view = await run_live(config, io.StringIO())
    took = time.monotonic() - started
    # Assert: not faster than the pace asks (the upper bound is left to the machine).
    assert took >= (7 * DAY / 1e9) / 1e6 * 0.9
    assert len(view.fills) == 2


def test_run_config_when_replay_has_two_instruments_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one --symbol"):
        RunConfig(replay=tmp_path / "x.csv")


def test_cli_run_when_replaying_a_file_exits_0_and_keeps_its_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange
    data, db = _ohlcv(tmp_path / "bars.csv"), tmp_path / "run.sqlite"
    args = ["run", "--replay", str(data), "--symbol", SYMBOL, "--no-tui", "--db", str(db)]
    args += ["--param", "fast=1", "--param", "slow=2", "--param", "allow_short=false"]
    # Act
    code = main(args)
    # Assert
    assert code == 0
    assert "2 fills" in capsys.readouterr().out
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM fills").fetchone() == (2,)
        (config,) = conn.execute("SELECT config FROM runs").fetchone()
    assert str(data) in config


def test_cli_run_when_replay_file_is_missing_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", "--replay", str(tmp_path / "none.csv"), "--no-tui", "--no-history"])
    assert code == 2
    assert "none.csv" in capsys.readouterr().err
