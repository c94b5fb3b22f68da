"""OHLCV CSV files: case-insensitive headers, epoch or ISO times, clear errors."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from quantmesh_marketdata.files import DataFileError, parse_time_ns, read_ohlcv_csv

NS = 1_000_000_000


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bars.csv"
    path.write_text(text)
    return path


def test_read_when_header_is_capitalised_and_times_are_iso_gives_exact_bars(
    tmp_path: Path,
) -> None:
    path = _write(
        tmp_path,
        "Date,Open,High,Low,Close,Volume\n"
        "2024-01-02T00:00:00Z,100.10,101.5,99.9,101.0,12.5\n"
        "2024-01-03 00:00:00,101.0,103,100.5,102.25,8\n",
    )

    bars = list(read_ohlcv_csv(path, "BTC-USDT.SIM", "1d"))

    assert [b.close for b in bars] == [Decimal("101.0"), Decimal("102.25")]
    assert bars[0].open == Decimal("100.10")
    assert bars[0].ts_open == 1_704_153_600 * NS
    assert bars[1].ts_open - bars[0].ts_open == 86_400 * NS
    assert bars[0].ts_close == bars[1].ts_open


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("1704153600", 1_704_153_600 * NS),
        ("1704153600000", 1_704_153_600 * NS),
        ("1704153600000000", 1_704_153_600 * NS),
        ("1704153600000000000", 1_704_153_600 * NS),
        ("2024-01-02T00:00:00+00:00", 1_704_153_600 * NS),
        ("2024-01-02T01:00:00+01:00", 1_704_153_600 * NS),
    ],
)
def test_parse_time_accepts_epoch_units_and_iso(cell: str, expected: int) -> None:
    assert parse_time_ns(cell) == expected


def test_read_when_a_column_is_missing_names_it(tmp_path: Path) -> None:
    path = _write(tmp_path, "timestamp,open,high,low,close\n1,1,1,1,1\n")

    with pytest.raises(DataFileError, match="volume"):
        list(read_ohlcv_csv(path, "BTC-USDT.SIM", "1m"))


def test_read_when_a_row_is_bad_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "timestamp,open,high,low,close,volume\n60,1,2,1,1,1\n120,1,2,1,abc,1\n")

    with pytest.raises(DataFileError, match=r"bars\.csv:3"):
        list(read_ohlcv_csv(path, "BTC-USDT.SIM", "1m"))


def test_read_when_times_go_backwards_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "timestamp,open,high,low,close,volume\n120,1,2,1,1,1\n60,1,2,1,1,1\n")

    with pytest.raises(DataFileError, match="not after"):
        list(read_ohlcv_csv(path, "BTC-USDT.SIM", "1m"))
