"""`quantmesh report --equity`: the backtest's figures from an equity curve in a CSV file."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from quantmesh_common.messages import Bar
from quantmesh_embedded.backtest import BacktestConfig, run_backtest
from quantmesh_embedded.equity import equity_figures, read_equity_csv, write_equity_csv
from quantmesh_marketdata.files import DataFileError

T0_S = 1_672_531_200  # 2023-01-01T00:00:00Z
YEAR_S = 31_557_600  # 365.25 days: the year CAGR is measured in
EXE = Path(sys.executable).parent / "quantmesh"


def _curve_csv(tmp_path: Path) -> Path:
    # Four points a third of a year apart, spanning exactly one year: 3 periods per year.
    path = tmp_path / "equity.csv"
    rows = [(0, "100"), (1, "110"), (2, "99"), (3, "121")]
    lines = ["Timestamp,Equity"] + [f"{T0_S + k * YEAR_S // 3},{e}" for k, e in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_report_when_given_a_hand_computed_curve_prints_its_figures(tmp_path: Path) -> None:
    path = _curve_csv(tmp_path)

    done = subprocess.run(
        [EXE, "report", "--equity", str(path), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    # Returns +10 %, -10 %, +22.2 % (2/9); mean 2/27; deviations 7/270, -47/270, 40/270.
    mean = 2 / 27
    stdev = math.sqrt((49 + 2209 + 1600) / 72900 / 2)
    assert figures["points"] == 4
    assert Decimal(figures["final_equity"]) == Decimal(121)
    assert figures["return_pct"] == pytest.approx(21.0)
    assert figures["cagr_pct"] == pytest.approx(21.0)  # one year exactly
    assert figures["sharpe"] == pytest.approx(mean / stdev * math.sqrt(3), rel=1e-6)
    # Downside deviation sqrt(0.01 / 3): Sortino = (2/27) / (0.1 / sqrt 3) * sqrt 3 = 20/9.
    assert figures["sortino"] == pytest.approx(20 / 9, rel=1e-6)
    assert figures["omega"] == pytest.approx((0.1 + 2 / 9) / 0.1, rel=1e-6)
    assert figures["max_drawdown_pct"] == pytest.approx(10.0)  # 110 -> 99
    assert figures["calmar"] == pytest.approx(2.1)  # 21 % / 10 %


def test_report_when_the_file_lacks_an_equity_column_exits_2_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("timestamp,value\n1,2\n3,4\n")

    done = subprocess.run(
        [EXE, "report", "--equity", str(path)], capture_output=True, text=True, check=False
    )

    assert done.returncode == 2
    assert "bad.csv" in done.stderr
    assert "equity" in done.stderr


def test_read_equity_csv_when_time_goes_back_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "back.csv"
    path.write_text("date,equity\n2023-01-02,100\n2023-01-01,101\n")

    with pytest.raises(DataFileError, match=r"back\.csv:3"):
        read_equity_csv(path)


async def test_report_when_given_a_backtests_curve_repeats_the_backtests_figures(
    tmp_path: Path,
) -> None:
    day = 86_400 * 1_000_000_000
    closes = ["10", "9", "8", "9", "10", "8", "7", "9", "11", "10"]
    bars = [
        Bar(
            instrument_id="ASSET-USD.SIM",
            interval="1d",
            open=Decimal(c),
            high=Decimal(c) + 1,
            low=Decimal(c) - 1,
            close=Decimal(c),
            volume=Decimal(1),
            ts_open=T0_S * 1_000_000_000 + i * day,
            ts_close=T0_S * 1_000_000_000 + (i + 1) * day,
        )
        for i, c in enumerate(closes)
    ]
    config = BacktestConfig("ASSET-USD.SIM", "sma_cross", {"fast": 1, "slow": 2, "quantity": 50})
    result = await run_backtest(config, bars)
    path = tmp_path / "curve.csv"

    write_equity_csv(path, result.equity)
    again = equity_figures(read_equity_csv(path))

    ran = result.figures()
    assert ran["trades"] >= 2  # the curve moves: the comparison is not of flat lines
    keys = ["final_equity", "return_pct", "cagr_pct", "sharpe", "sortino", "calmar", "omega"]
    keys.append("max_drawdown_pct")
    assert {k: again[k] for k in keys} == {k: ran[k] for k in keys}
