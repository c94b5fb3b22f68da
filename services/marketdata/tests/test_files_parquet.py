"""Parquet data files: read as the CSV of the same data would be, from typed columns."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from quantmesh_common.messages import AggressorSide, Bar
from quantmesh_marketdata.files import DataFileError, read_ohlcv_csv, read_trades_csv
from quantmesh_marketdata.replay import file_events


def _trades_parquet(path: Path) -> Path:
    # Typed as exchanges' dumps are: epoch ms ints, float prices, a bool maker flag, a null id.
    table = pa.table(
        {
            "Time_MS": pa.array([1675329600138, 1675329600214, 1675329660001], pa.int64()),
            "id": pa.array(["1206419187", None, "1206419189"], pa.string()),
            "price": pa.array([1666.8, 1666.79, 1667.1], pa.float64()),
            "qty": pa.array(
                [Decimal("26.062"), Decimal("0.152"), Decimal("1.5")], pa.decimal128(10, 3)
            ),
            "buyer_is_maker": pa.array([False, True, False], pa.bool_()),
        }
    )
    pq.write_table(table, path)
    return path


def test_read_trades_when_parquet_gives_the_ticks_its_csv_would(tmp_path: Path) -> None:
    # Arrange: the same trades as Parquet and as CSV.
    parquet = _trades_parquet(tmp_path / "trades.parquet")
    csv = tmp_path / "trades.csv"
    csv.write_text(
        "time_ms,id,price,qty,buyer_is_maker\n"
        "1675329600138,1206419187,1666.8,26.062,false\n"
        "1675329600214,,1666.79,0.152,true\n"
        "1675329660001,1206419189,1667.1,1.500,false\n"
    )

    # Act
    from_parquet = list(read_trades_csv(parquet, "ETH-USDT.SIM"))
    from_csv = list(read_trades_csv(csv, "ETH-USDT.SIM"))

    # Assert: floats by their shortest repr (1666.8, not its binary expansion), decimals exact.
    assert from_parquet == from_csv
    assert [t.price for t in from_parquet] == [
        Decimal("1666.8"),
        Decimal("1666.79"),
        Decimal("1667.1"),
    ]
    assert [t.size for t in from_parquet] == [Decimal("26.062"), Decimal("0.152"), Decimal("1.500")]
    assert [t.trade_id for t in from_parquet] == ["1206419187", None, "1206419189"]
    assert [t.aggressor_side for t in from_parquet] == [
        AggressorSide.BUYER,
        AggressorSide.SELLER,
        AggressorSide.BUYER,
    ]
    assert from_parquet[0].ts_event == 1_675_329_600_138_000_000


def test_replay_when_parquet_trades_aggregates_the_same_bars_as_csv(tmp_path: Path) -> None:
    # Arrange
    parquet = _trades_parquet(tmp_path / "trades.pq")

    # Act
    events = list(file_events(parquet, "ETH-USDT.SIM", "1m"))

    # Assert: three ticks; the first two trades' minute closed by the third, the last at the end.
    bars = [e for e in events if isinstance(e, Bar)]
    assert len(events) - len(bars) == 3
    assert [(b.open, b.high, b.low, b.close, b.volume) for b in bars] == [
        (
            Decimal("1666.8"),
            Decimal("1666.8"),
            Decimal("1666.79"),
            Decimal("1666.79"),
            Decimal("26.214"),
        ),
        (
            Decimal("1667.1"),
            Decimal("1667.1"),
            Decimal("1667.1"),
            Decimal("1667.1"),
            Decimal("1.500"),
        ),
    ]


def test_read_ohlcv_when_parquet_with_timestamps_gives_the_bars(tmp_path: Path) -> None:
    # Arrange: a timestamp column (timezone-aware, microseconds) and float prices.
    times = [datetime(2024, 8, 8, 0, 0, tzinfo=UTC), datetime(2024, 8, 8, 0, 1, tzinfo=UTC)]
    table = pa.table(
        {
            "Date": pa.array(times, pa.timestamp("us", tz="UTC")),
            "Open": [56000.5, 56010.0],
            "High": [56020.25, 56030.0],
            "Low": [55990.0, 56000.0],
            "Close": [56010.0, 56025.5],
            "Volume": [1.25, 0.5],
        }
    )
    path = tmp_path / "bars.parquet"
    pq.write_table(table, path)

    # Act
    bars = list(read_ohlcv_csv(path, "BTC-USDT.SIM", "1m"))

    # Assert
    assert [b.ts_open for b in bars] == [1_723_075_200_000_000_000, 1_723_075_260_000_000_000]
    assert [(b.open, b.close, b.volume) for b in bars] == [
        (Decimal("56000.5"), Decimal("56010.0"), Decimal("1.25")),
        (Decimal("56010.0"), Decimal("56025.5"), Decimal("0.5")),
    ]


def test_read_when_parquet_file_is_corrupt_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")

    with pytest.raises(DataFileError, match=r"broken\.parquet"):
        list(read_trades_csv(path, "ETH-USDT.SIM"))
