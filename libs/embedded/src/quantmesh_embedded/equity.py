"""Equity curves from CSV files, and the figures over them (`quantmesh report`)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from quantmesh_common.performance import summarize
from quantmesh_embedded.backtest import curve_figures
from quantmesh_marketdata.files import DataFileError, parse_time_ns, read_header


def read_equity_csv(path: Path) -> list[tuple[int, Decimal]]:
    """Read `timestamp,equity` rows (header required, case-insensitive, time non-decreasing).

    The time column may be any of the OHLCV reader's names (timestamp, date, time, ...) and
    takes the same formats (epoch s/ms/us/ns or ISO-8601, naive = UTC).
    """
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header, time_col = read_header(reader, path)
        if time_col is None or "equity" not in header:
            raise DataFileError(f"{path}: header {header} needs a time column and 'equity'")
        equity_col = header.index("equity")
        curve: list[tuple[int, Decimal]] = []
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            try:
                ts = parse_time_ns(row[time_col])
                value = Decimal(row[equity_col].strip())
            except (IndexError, InvalidOperation, ValueError) as exc:
                raise DataFileError(f"{path}:{line_no}: {exc}") from exc
            if curve and ts < curve[-1][0]:
                raise DataFileError(f"{path}:{line_no}: time {ts} is before {curve[-1][0]}")
            curve.append((ts, value))
    if len(curve) < 2:
        raise DataFileError(f"{path}: needs at least two points")
    return curve


def write_equity_csv(path: Path, curve: Sequence[tuple[int, Decimal]]) -> None:
    """Write a curve as `timestamp,equity` (epoch ns, exact decimals), as read_equity_csv reads."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["timestamp", "equity"])
        writer.writerows((ts, str(value)) for ts, value in curve)


def equity_figures(curve: list[tuple[int, Decimal]]) -> dict[str, Any]:
    """The backtest's curve figures over `curve` (periods per year inferred from its times)."""
    try:
        summary = summarize(curve, periods_per_year="infer")
    except ValueError as exc:  # e.g. a non-positive equity before the last point
        raise DataFileError(str(exc)) from exc
    return {"points": len(curve), **curve_figures(summary)}
