"""OHLCV bars from CSV files: header-driven, case-insensitive, exact decimals."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path

from quantmesh_common.clock import datetime_to_ns
from quantmesh_common.messages import Bar, bar_interval_ns

TIME_COLUMNS = ("timestamp", "date", "time", "datetime", "open_time")
PRICE_COLUMNS = ("open", "high", "low", "close", "volume")


class DataFileError(ValueError):
    """A data file that cannot be read as bars; the message names the file, line and column."""


def parse_time_ns(value: str) -> int:
    """Parse a timestamp cell to UTC ns: epoch s/ms/us/ns by magnitude, or ISO-8601.

    Naive ISO times are taken as UTC, as exchanges publish them.
    """
    text = value.strip()
    if text.lstrip("-").replace(".", "", 1).isdigit():
        number = Decimal(text)
        magnitude = abs(number)
        scale = (
            1_000_000_000
            if magnitude < Decimal(10) ** 11
            else 1_000_000
            if magnitude < Decimal(10) ** 14
            else 1_000
            if magnitude < Decimal(10) ** 17
            else 1
        )
        return int(number * scale)
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return datetime_to_ns(parsed)


def read_ohlcv_csv(path: Path, instrument_id: str, interval: str) -> Iterator[Bar]:
    """Yield the bars of a CSV with a header naming a time column and open/high/low/close/volume.

    Rows must be in time order; a bar's ts_close is its ts_open plus `interval`.
    """
    step = bar_interval_ns(interval)
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = [cell.strip().lower() for cell in next(reader)]
        except StopIteration:
            raise DataFileError(f"{path}: empty file") from None
        time_col = next((header.index(c) for c in TIME_COLUMNS if c in header), None)
        missing = [c for c in PRICE_COLUMNS if c not in header]
        if time_col is None or missing:
            wanted = f"one of {', '.join(TIME_COLUMNS)}" if time_col is None else ""
            raise DataFileError(
                f"{path}: header {header} lacks {' and '.join(filter(None, [wanted, *missing]))}"
            )
        cols = [header.index(c) for c in PRICE_COLUMNS]
        last_ts: int | None = None
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            try:
                ts = parse_time_ns(row[time_col])
                o, h, lo, c, v = (Decimal(row[i].strip()) for i in cols)
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
            except (IndexError, InvalidOperation, ValueError) as exc:
                raise DataFileError(f"{path}:{line_no}: {exc}") from exc
            if last_ts is not None and ts <= last_ts:
                raise DataFileError(f"{path}:{line_no}: time {ts} is not after {last_ts}")
            last_ts = ts
            yield bar
