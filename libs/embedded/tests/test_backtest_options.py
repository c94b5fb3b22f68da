"""`quantmesh backtest` options end to end on a tiny dataset, against hand-computed results."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from quantmesh_embedded.cli import main

# sma_cross fast=1 slow=2 is up while a close is above the one before: its first regime (bar
# 1, down) only sets the state; it turns up on bar 3's close (9 > 8) and down on bar 5's
# (8 < 10). With next_open those decisions fill at bar 4's open (9.5) and bar 6's (7.5).
OPENS = ["10", "10", "9", "8", "9.5", "10", "7.5"]
CLOSES = ["10", "9", "8", "9", "10", "8", "7"]
#: The figures the issue requires of --json.
REQUIRED_KEYS = {
    "bars",
    "trades",
    "final_equity",
    "return_pct",
    "cagr_pct",
    "sharpe",
    "sortino",
    "calmar",
    "omega",
    "max_drawdown_pct",
    "win_rate_pct",
    "profit_factor",
    "exposure_pct",
    "elapsed_s",
    "bars_per_s",
}


def _write(path: Path, header: str, dates: bool) -> Path:
    rows = [header]
    for i, (o, c) in enumerate(zip(OPENS, CLOSES, strict=True)):
        when = f"2023-01-0{i + 1}" if dates else str(1_672_531_200 + i * 86_400)
        high, low = max(Decimal(o), Decimal(c)) + 1, min(Decimal(o), Decimal(c)) - 1
        rows.append(f"{when},{o},{high},{low},{c},100")
    path.write_text("\n".join(rows) + "\n")
    return path


def _backtest(
    capsys: pytest.CaptureFixture[str], data: Path, *options: str
) -> tuple[int, dict[str, Any]]:
    argv = ["backtest", "--data", str(data), "--strategy", "sma_cross", "--quiet", "--json"]
    argv += ["--param", "fast=1", "--param", "slow=2", *options]
    code = main(argv)
    out = capsys.readouterr().out
    return code, json.loads(out) if code == 0 else {}


def test_backtest_when_all_in_with_next_open_overspends_by_the_gap_as_documented(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange: a "Date" header in mixed case, ISO dates
    data = _write(tmp_path / "bars.csv", "Date,OPEN,High,low,Close,Volume", dates=True)

    # Act
    code, figures = _backtest(capsys, data, "--size", "all-in", "--lot-size", "1")

    # Assert: all-in at the deciding close 9: floor(100000 / (9 x 1.001)) = 11100 lots;
    # bought at the next open 9.5 (105450 + 105.45 fee), sold at 7.5 (83250 - 83.25 fee):
    # 100000 - 105555.45 + 83166.75 = 77611.30.
    assert code == 0
    assert Decimal(figures["final_equity"]) == Decimal("77611.30")
    assert (figures["bars"], figures["trades"], figures["fills"]) == (7, 1, 2)
    assert set(figures) >= REQUIRED_KEYS


def test_backtest_when_short_is_allowed_flips_at_the_next_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange: a "timestamp" header, epoch seconds
    data = _write(tmp_path / "bars.csv", "timestamp,open,high,low,close,volume", dates=False)

    # Act
    code, figures = _backtest(capsys, data, "--size", "2", "--allow-short")

    # Assert: buy 2 at 9.5 (fee 0.019); the down-cross sells 4 at 7.5 (fee 0.03): -4 on the
    # long, then short 2 from 7.5 marked at the last close 7: +1. 100000 - 4 + 1 - 0.049.
    assert code == 0
    assert Decimal(figures["final_equity"]) == Decimal("99996.951")
    assert (figures["trades"], figures["fills"]) == (1, 2)
    assert figures["win_rate_pct"] == 0.0


def test_backtest_when_slippage_and_close_fills_pays_both_ways(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange
    data = _write(tmp_path / "bars.csv", "timestamp,open,high,low,close,volume", dates=False)

    # Act
    code, figures = _backtest(
        capsys, data, "--size", "2", "--fill-at", "close", "--slippage-bps", "100"
    )

    # Assert: 100 bps against the order: bought at 9 x 1.01 = 9.09, sold at 8 x 0.99 = 7.92;
    # fees 0.1 % of 18.18 and of 15.84: 100000 - 2.34 - 0.03402 = 99997.62598.
    assert code == 0
    assert Decimal(figures["final_equity"]) == Decimal("99997.62598")


def test_backtest_when_commission_is_zero_and_fixed_size_loses_the_price_move_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange
    data = _write(tmp_path / "bars.csv", "timestamp,open,high,low,close,volume", dates=False)

    # Act
    code, figures = _backtest(capsys, data, "--size", "3", "--commission", "0", "--cash", "1000")

    # Assert: 3 x (7.5 - 9.5) = -6 on 1000: -0.6 %.
    assert code == 0
    assert Decimal(figures["final_equity"]) == Decimal("994")
    assert figures["return_pct"] == pytest.approx(-0.6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--size", "0"], "--size"),
        (["--fill-at", "tomorrow"], "--fill-at"),
        (["--lot-size", "-1"], "--lot-size"),
        (["--param", "nokey"], "--param"),
    ],
)
def test_backtest_when_an_option_is_invalid_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    # Arrange
    data = _write(tmp_path / "bars.csv", "timestamp,open,high,low,close,volume", dates=False)

    # Act
    with pytest.raises(SystemExit) as exited:
        main(["backtest", "--data", str(data), "--strategy", "sma_cross", *options])

    # Assert
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
