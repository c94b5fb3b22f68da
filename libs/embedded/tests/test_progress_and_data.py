"""The progress bar, and bars from Parquet files (pyarrow optional)."""

from __future__ import annotations

import io
import subprocess
import sys
import types
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from quantmesh_common.messages import Bar
from quantmesh_embedded.backtest import BacktestConfig, run_backtest
from quantmesh_embedded.data import read_bars
from quantmesh_embedded.progress import BAR_WIDTH, ProgressBar
from quantmesh_marketdata.files import DataFileError

DAY_NS = 86_400 * 1_000_000_000
T0 = 1_672_531_200 * 1_000_000_000  # 2023-01-01T00:00:00Z
SYMBOL = "ASSET-USD.SIM"
EXE = Path(sys.executable).parent / "quantmesh"


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_bar_when_enabled_redraws_at_most_every_fifth_of_a_second_and_ends() -> None:
    clock, out = _Clock(), io.StringIO()
    bar = ProgressBar(out, enabled=True, now=clock)

    bar(0, 100)
    clock.t = 0.1
    bar(10, 100)  # too soon: not drawn
    clock.t = 0.3
    bar(50, 100)
    clock.t = 1.0
    bar(100, 100)

    frames = out.getvalue().split("\r")[1:]
    assert len(frames) == 3
    assert frames[1].startswith("[" + "#" * (BAR_WIDTH // 2) + "." * (BAR_WIDTH // 2) + "]")
    assert "50/100 bars" in frames[1]
    assert frames[2] == f"[{'#' * BAR_WIDTH}] 100%  100/100 bars  100 bars/s\n"


def test_progress_bar_when_disabled_writes_nothing() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, enabled=False)

    bar(0, 10)
    bar(10, 10)

    assert out.getvalue() == ""


async def test_run_backtest_when_given_progress_reports_the_start_and_the_end() -> None:
    calls: list[tuple[int, int]] = []
    bars = _bars(["10", "11", "12"])
    config = BacktestConfig(SYMBOL, "sma_cross", {"fast": 1, "slow": 2})

    await run_backtest(config, bars, lambda done, total: calls.append((done, total)))

    assert calls[0] == (0, 3)
    assert calls[-1] == (3, 3)


def test_cli_when_stderr_is_not_a_terminal_draws_no_bar(tmp_path: Path) -> None:
    data = tmp_path / "bars.csv"
    data.write_text(
        "date,open,high,low,close,volume\n2023-01-01,1,2,0.5,1,1\n2023-01-02,1,2,0.5,1,1\n"
    )

    done = subprocess.run(
        [EXE, "backtest", "--data", str(data), "--strategy", "sma_cross", "--param", "fast=1"],
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    assert "#" not in done.stderr


def _bars(closes: list[str]) -> list[Bar]:
    return [
        Bar(
            instrument_id=SYMBOL,
            interval="1d",
            open=Decimal(c),
            high=Decimal(c) + 1,
            low=Decimal(c) - 1,
            close=Decimal(c),
            volume=Decimal(1),
            ts_open=T0 + i * DAY_NS,
            ts_close=T0 + (i + 1) * DAY_NS,
        )
        for i, c in enumerate(closes)
    ]


class _FakeTable:
    """What the reader uses of a pyarrow Table: its column names and its values by column."""

    def __init__(self, data: dict[str, list[Any]]) -> None:
        self.column_names = list(data)
        self._data = data

    def to_pydict(self) -> dict[str, list[Any]]:
        return self._data


def _fake_pyarrow(monkeypatch: pytest.MonkeyPatch, data: dict[str, list[Any]]) -> None:
    parquet = types.ModuleType("pyarrow.parquet")
    parquet.read_table = lambda path: _FakeTable(data)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pyarrow", types.ModuleType("pyarrow"))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", parquet)


def test_read_bars_when_parquet_columns_are_python_values_converts_them_exactly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_pyarrow(
        monkeypatch,
        {
            "Date": [datetime(2023, 1, 1), date(2023, 1, 2), 1_672_704_000_000],  # naive, date, ms
            "Open": [0.1, 2, Decimal("3.25")],
            "HIGH": [1.5, 3, Decimal("4")],
            "low": [0.05, 1, Decimal("3")],
            "close": [1.2, 2.5, "3.5"],
            "volume": [10, 20, 30],
        },
    )

    bars = read_bars(tmp_path / "x.parquet", SYMBOL)

    assert [b.ts_open for b in bars] == [T0, T0 + DAY_NS, T0 + 2 * DAY_NS]
    assert bars[0].interval == "1d"  # inferred from the first two rows
    assert bars[0].ts_close == T0 + DAY_NS
    assert (bars[0].open, bars[0].close) == (Decimal("0.1"), Decimal("1.2"))  # no float noise
    assert (bars[2].open, bars[2].close) == (Decimal("3.25"), Decimal("3.5"))


def test_read_bars_when_parquet_time_goes_back_names_the_row(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    one = datetime(2023, 1, 2, tzinfo=UTC)
    _fake_pyarrow(
        monkeypatch,
        {k: [one, datetime(2023, 1, 1, tzinfo=UTC)] if k == "timestamp" else [1, 1] for k in
         ("timestamp", "open", "high", "low", "close", "volume")},
    )  # fmt: skip

    with pytest.raises(DataFileError, match="row 1"):
        read_bars(tmp_path / "x.parquet", SYMBOL, "1d")


def test_read_bars_when_pyarrow_is_absent_names_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)

    with pytest.raises(DataFileError, match="pyarrow"):
        read_bars(tmp_path / "x.parquet", SYMBOL)


def test_cli_when_given_a_real_parquet_file_matches_the_same_csv(tmp_path: Path) -> None:
    pa = pytest.importorskip(
        "pyarrow", reason="pyarrow is an optional dependency (Parquet input); not installed"
    )
    pq = pytest.importorskip("pyarrow.parquet")
    closes = [10.0, 9.0, 8.0, 9.0, 10.0, 8.0, 7.0]
    stamps = [datetime(2023, 1, 1 + i) for i in range(len(closes))]
    table = pa.table(
        {
            "Timestamp": pa.array(stamps, type=pa.timestamp("s")),
            "Open": closes,
            "High": [c + 1 for c in closes],
            "Low": [c - 1 for c in closes],
            "Close": closes,
            "Volume": [100.0] * len(closes),
        }
    )
    parquet_path = tmp_path / "bars.parquet"
    pq.write_table(table, parquet_path)
    csv_path = tmp_path / "bars.csv"
    csv_path.write_text(
        "timestamp,open,high,low,close,volume\n"
        + "".join(
            f"{s.date()},{c},{c + 1},{c - 1},{c},100\n" for s, c in zip(stamps, closes, strict=True)
        )
    )
    args = ["--strategy", "sma_cross", "--param", "fast=1", "--param", "slow=2", "--json"]

    outputs = [
        subprocess.run(
            [EXE, "backtest", "--data", str(path), *args],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for path in (parquet_path, csv_path)
    ]

    def strip(text: str) -> str:
        import json

        figures = json.loads(text)
        figures.pop("elapsed_s")
        figures.pop("bars_per_s")
        return json.dumps(figures)

    assert strip(outputs[0]) == strip(outputs[1])
    assert '"trades": 1' in outputs[0]
