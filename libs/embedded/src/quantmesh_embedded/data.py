"""Bars for a backtest from a data file: OHLCV CSV, or Parquet when pyarrow is installed.

Parquet support is optional: `pyarrow` is imported only when a `.parquet` / `.pq` file is read,
and its absence is a clear error naming the package, not an import failure at start.
The columns are those of the CSV reader (a time column — timestamp, date, time, datetime or
open_time — and open, high, low, close, volume; names case-insensitive). Times may be
timestamps (naive = UTC), dates, epoch numbers (s/ms/us/ns by magnitude) or ISO-8601 text;
prices are taken exactly: decimals as they are, floats by their shortest repr (what a CSV
of them would say).
"""

from __future__ import annotations

import csv
import importlib
from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from quantmesh_common.clock import datetime_to_ns
from quantmesh_common.messages import Bar, bar_interval_ns
from quantmesh_marketdata.files import (
    PRICE_COLUMNS,
    TIME_COLUMNS,
    DataFileError,
    parse_time_ns,
    read_ohlcv_csv,
)

PARQUET_SUFFIXES = (".parquet", ".pq")
_UNITS = (("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1))
_NS = 1_000_000_000


def interval_of(path: Path, first_ns: int, second_ns: int) -> str:
    """The bar interval (e.g. `1d`, `15m`) of rows starting `first_ns` and `second_ns`."""
    seconds = (second_ns - first_ns) // _NS
    for unit, size in _UNITS:
        if seconds > 0 and seconds % size == 0:
            return f"{seconds // size}{unit}"
    raise DataFileError(f"{path}: rows are {seconds} s apart; pass --interval")


def infer_csv_interval(path: Path) -> str:
    """The bar interval of an OHLCV CSV, from the spacing of its first two rows."""
    with path.open(newline="") as handle:
        rows = csv.reader(handle)
        header = [c.strip().lower() for c in next(rows, [])]
        col = next((header.index(c) for c in TIME_COLUMNS if c in header), 0)
        first, second = next(rows, None), next(rows, None)
    if first is None or second is None:
        raise DataFileError(f"{path}: needs at least two bars to infer the interval")
    return interval_of(path, parse_time_ns(first[col]), parse_time_ns(second[col]))


def is_parquet(path: Path) -> bool:
    """Whether `path` names a Parquet file (by its suffix)."""
    return path.suffix.lower() in PARQUET_SUFFIXES


def read_bars(path: Path, instrument_id: str, interval: str | None = None) -> list[Bar]:
    """Every bar of a CSV or Parquet file; the interval is inferred from the data if None."""
    if is_parquet(path):
        return read_ohlcv_parquet(path, instrument_id, interval)
    return list(read_ohlcv_csv(path, instrument_id, interval or infer_csv_interval(path)))


def _time_ns(value: Any) -> int:
    if isinstance(value, datetime):
        nanos = getattr(value, "value", None)  # a pandas Timestamp keeps its nanoseconds here
        if isinstance(nanos, int):
            return nanos
        return datetime_to_ns(value if value.tzinfo else value.replace(tzinfo=UTC))
    if isinstance(value, date):
        return datetime_to_ns(datetime(value.year, value.month, value.day, tzinfo=UTC))
    if isinstance(value, int | float | Decimal | str):
        return parse_time_ns(str(value))
    raise ValueError(f"cannot read {value!r} as a time")


def _price(value: Any) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int | float | str):
        # str() of a float is its shortest repr: 0.1 stays 0.1, not 0.1000000000000000055...
        return Decimal(str(value).strip())
    raise ValueError(f"cannot read {value!r} as a number")


def _columns(path: Path, names: Sequence[str]) -> tuple[str, list[str]]:
    by_lower = {name.strip().lower(): name for name in names}
    time_col = next((by_lower[c] for c in TIME_COLUMNS if c in by_lower), None)
    missing = [c for c in PRICE_COLUMNS if c not in by_lower]
    if time_col is None or missing:
        wanted = f"one of {', '.join(TIME_COLUMNS)}" if time_col is None else ""
        lacks = " and ".join(filter(None, [wanted, *missing]))
        raise DataFileError(f"{path}: columns {list(names)} lack {lacks}")
    return time_col, [by_lower[c] for c in PRICE_COLUMNS]


def read_ohlcv_parquet(path: Path, instrument_id: str, interval: str | None = None) -> list[Bar]:
    """Every bar of an OHLCV Parquet file (needs pyarrow); rows must be in time order."""
    try:
        parquet = importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise DataFileError(
            f"{path}: reading Parquet needs the optional package pyarrow (pip install pyarrow)"
        ) from None
    try:
        table = parquet.read_table(str(path))
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise DataFileError(f"{path}: {exc}") from exc
    time_col, price_cols = _columns(path, table.column_names)
    data = table.to_pydict()
    times = data[time_col]
    try:
        stamps = [_time_ns(t) for t in times]
    except ValueError as exc:
        raise DataFileError(f"{path}: column {time_col}: {exc}") from exc
    if interval is None:
        if len(stamps) < 2:
            raise DataFileError(f"{path}: needs at least two bars to infer the interval")
        interval = interval_of(path, stamps[0], stamps[1])
    step = bar_interval_ns(interval)
    bars: list[Bar] = []
    for row, ts in enumerate(stamps):
        try:
            o, h, lo, c, v = (_price(data[col][row]) for col in price_cols)
            bar = Bar(
                instrument_id=instrument_id,
                interval=interval,
                open=o,
                high=h,
                low=lo,
                close=c,
                volume=v,
                ts_open=ts,
                ts_close=ts + step,
            )
        except (InvalidOperation, ValueError) as exc:
            raise DataFileError(f"{path}: row {row}: {exc}") from exc
        if bars and ts <= bars[-1].ts_open:
            raise DataFileError(f"{path}: row {row}: time {ts} is not after {bars[-1].ts_open}")
        bars.append(bar)
    return bars
