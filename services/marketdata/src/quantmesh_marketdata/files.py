"""Bars (OHLCV) and trades from CSV or Parquet files: header-driven, case-insensitive, exact."""

from __future__ import annotations

import csv
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, NoReturn

from pydantic import BaseModel

from quantmesh_common.clock import datetime_to_ns
from quantmesh_common.messages import (
    AggressorSide,
    Bar,
    InstrumentId,
    Tick,
    TickKind,
    bar_interval_ns,
)

TIME_COLUMNS = ("timestamp", "date", "time", "datetime", "open_time", "time_ms")
PRICE_COLUMNS = ("open", "high", "low", "close", "volume")
#: Trade files: the size column (first found) and the optional id and side columns.
SIZE_COLUMNS = ("amount", "size", "qty", "quantity", "volume")
TRADE_ID_COLUMNS = ("trade_id", "id", "tid")
SIDE_COLUMNS = ("side", "aggressor_side", "taker_side")
_SIDES = {
    "buy": AggressorSide.BUYER,
    "b": AggressorSide.BUYER,
    "buyer": AggressorSide.BUYER,
    "sell": AggressorSide.SELLER,
    "s": AggressorSide.SELLER,
    "seller": AggressorSide.SELLER,
}
#: Binance's `m` (buyer is the maker): then the seller was the aggressor.
_MAKER_BUYER = {"true": AggressorSide.SELLER, "false": AggressorSide.BUYER}
# Cells as files usually spell them, looked up before any strip() and lower().
_SIDE_CELLS = {**_SIDES, **{k.upper(): v for k, v in _SIDES.items()}}
_MAKER_CELLS = {**_MAKER_BUYER, "True": AggressorSide.SELLER, "False": AggressorSide.BUYER}
_MAKER_CELLS |= {k.upper(): v for k, v in _MAKER_BUYER.items()}


_new = object.__new__
_set = object.__setattr__
# BaseModel's slots, set through their descriptors (as quantmesh_common.envelope does).
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__
#: The fields a file trade sets (as `Tick(...)` with these keywords would record them).
_TRADE_FIELDS = frozenset(
    ("instrument_id", "venue", "price", "size", "aggressor_side", "trade_id", "ts_event", "ts_init")
)
# Module-level members: reading an enum member through its class costs a descriptor call.
_TRADE = TickKind.TRADE
_NO_AGGRESSOR = AggressorSide.NO_AGGRESSOR


_ZERO = Decimal(0)
_INFINITY = Decimal("Infinity")
#: Distinct cells a `_Decimals` keeps before it starts over.
_DECIMALS_KEPT = 4096


class _Decimals(dict[str, Decimal]):
    """`Decimal(text)` by cell text, remembered: trades repeat a few prices (a venue's tick
    grid; 14 prices in the bench's 100,000 trades), and a hit costs a third of the
    constructor, a miss twice it (so sizes, less often repeated, are not looked up here).
    Decimals are immutable, so ticks may share one; a cell that is no number raises as the
    constructor does, and is not kept."""

    def __missing__(self, text: str) -> Decimal:
        if len(self) >= _DECIMALS_KEPT:
            self.clear()
        value = self[text] = Decimal(text)
        return value


def _refuse_trade(price: Decimal, size: Decimal, ts: int) -> NoReturn:
    """Raise the ValueError naming what `trade_tick` refuses in these values."""
    if not (price.is_finite() and price > 0):
        raise ValueError(f"price {price} is not a finite number > 0")
    if not (size.is_finite() and size > 0):
        raise ValueError(f"size {size} is not a finite number > 0 (a TRADE tick needs size > 0)")
    raise ValueError(f"time {ts} is before the epoch")


def trade_tick(
    instrument_id: str,
    venue: str,
    price: Decimal,
    size: Decimal,
    side: AggressorSide,
    trade_id: str | None,
    ts: int,
) -> Tick:
    """A TRADE tick of a file row, checked as Tick's validation would check these values.

    The replay builds one per row, and pydantic's validation was a third of the stage's own
    cost per tick. The checks that depend on the row are made here (finite price > 0, finite
    size > 0, ts >= 0); `instrument_id` and `venue` must have been validated once for the file
    (`read_trades_csv` builds its first tick through the model). Equal to `Tick(...)` with the
    same values, fields set included (tests/test_files.py).
    """
    try:
        # One chained comparison each; a NaN refuses to compare (InvalidOperation).
        valid = _ZERO < price < _INFINITY and _ZERO < size < _INFINITY and ts >= 0
    except InvalidOperation:
        valid = False
    if not valid:
        _refuse_trade(price, size, ts)
    tick = _new(Tick)
    _set(
        tick,
        "__dict__",
        {
            "instrument_id": instrument_id,
            "venue": venue,
            "kind": _TRADE,
            "price": price,
            "size": size,
            "aggressor_side": side,
            "trade_id": trade_id,
            "bid": None,
            "ask": None,
            "bid_size": None,
            "ask_size": None,
            "ts_event": ts,
            "ts_init": ts,
        },
    )
    _set_fields_set(tick, set(_TRADE_FIELDS))
    _set_extra(tick, None)
    _set_private(tick, None)
    return tick


class DataFileError(ValueError):
    """A data file that cannot be read as bars; the message names the file, line and column."""


def parse_time_ns(value: str) -> int:
    """Parse a timestamp cell to UTC ns: epoch s/ms/us/ns by magnitude, or ISO-8601.

    Naive ISO times are taken as UTC, as exchanges publish them.
    """
    text = value.strip()
    if text.isdigit():
        # Integer epochs (the common case of trade files) without a Decimal.
        whole = int(text)
        if whole < 10**11:
            return whole * 1_000_000_000
        if whole < 10**14:
            return whole * 1_000_000
        if whole < 10**17:
            return whole * 1_000
        return whole
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


#: File names read as Parquet (through pyarrow, the optional extra `parquet`); others as CSV.
PARQUET_SUFFIXES = (".parquet", ".pq")
#: Rows converted from Parquet at a time.
_PARQUET_BATCH_ROWS = 65_536


def is_parquet(path: Path) -> bool:
    """Whether `path` is read as Parquet (by its suffix)."""
    return path.suffix.lower() in PARQUET_SUFFIXES


@contextmanager
def _rows(path: Path) -> Iterator[Iterator[list[str]]]:
    """The file's rows as lists of text cells, its header first: a CSV as it is, a Parquet
    file's columns as the text a CSV of them would hold, so one parser reads both."""
    if is_parquet(path):
        yield _parquet_rows(path)
        return
    with path.open(newline="") as handle:
        yield csv.reader(handle)


def _parquet_rows(path: Path) -> Iterator[list[str]]:
    try:
        parquet = importlib.import_module("pyarrow.parquet")
        arrow = importlib.import_module("pyarrow")
    except ImportError:
        raise DataFileError(
            f"{path}: reading Parquet needs the optional package pyarrow "
            "(quantmesh-marketdata[parquet], or pip install pyarrow)"
        ) from None
    try:
        source = parquet.ParquetFile(str(path))
        yield [str(name) for name in source.schema_arrow.names]
        for batch in source.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            columns = [_cells(batch.column(i), arrow) for i in range(batch.num_columns)]
            for row in zip(*columns, strict=True):
                yield list(row)
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise DataFileError(f"{path}: {exc}") from exc


def _cells(column: Any, arrow: Any) -> list[str]:
    """A Parquet column as CSV text: times as integer epoch nanoseconds, booleans as
    true/false, floats by their shortest repr (50000.12, not its binary expansion), decimals
    exactly, nulls empty."""
    kind = column.type
    if arrow.types.is_timestamp(kind) or arrow.types.is_date(kind):
        column = column.cast(arrow.timestamp("ns")).cast(arrow.int64())
    elif arrow.types.is_boolean(kind):
        return ["" if v is None else ("true" if v else "false") for v in column.to_pylist()]
    return ["" if v is None else str(v) for v in column.to_pylist()]


def read_header(reader: Iterator[list[str]], path: Path) -> tuple[list[str], int | None]:
    """A CSV's header (lower-cased names) and the index of its time column, if it has one."""
    try:
        header = [cell.strip().lower() for cell in next(reader)]
    except StopIteration:
        raise DataFileError(f"{path}: empty file") from None
    return header, next((header.index(c) for c in TIME_COLUMNS if c in header), None)


def read_ohlcv_csv(path: Path, instrument_id: str, interval: str) -> Iterator[Bar]:
    """Yield the bars of a file with a header naming a time column and open/high/low/close/volume.

    A CSV, or Parquet (`is_parquet`). Rows must be in time order; a bar's ts_close is its
    ts_open plus `interval`.
    """
    step = bar_interval_ns(interval)
    with _rows(path) as reader:
        header, time_col = read_header(reader, path)
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


def csv_header(path: Path) -> list[str]:
    """The lower-cased, stripped header cells of a CSV file (or a Parquet file's columns)."""
    with _rows(path) as reader:
        try:
            return [cell.strip().lower() for cell in next(reader)]
        except StopIteration:
            raise DataFileError(f"{path}: empty file") from None


def is_ohlcv_header(header: list[str]) -> bool:
    """True if the header names the OHLCV columns (a bar file rather than a trade file)."""
    return all(c in header for c in ("open", "high", "low", "close"))


def read_trades_csv(path: Path, instrument_id: str) -> Iterator[Tick]:
    """Yield the trades of a file with a header naming a time column, `price` and a size.

    A CSV, or Parquet (`is_parquet`: its columns read as the text a CSV of them would hold).

    Size: the first of amount, size, qty, quantity, volume. Optional: a trade id (trade_id,
    id, tid) and the aggressor side: a side column (buy/sell) or Binance's `buyer_is_maker`
    (true: the seller took the bid). The file has no receive time, so a tick's
    ts_init is its ts_event: replaying the file twice gives identical ticks. Rows must be in
    time order (trades may share a timestamp).
    """
    venue = InstrumentId.parse(instrument_id).venue
    with _rows(path) as reader:
        header, time_col = read_header(reader, path)
        size_col = next((header.index(c) for c in SIZE_COLUMNS if c in header), None)
        if time_col is None or size_col is None or "price" not in header:
            lacks = [
                f"one of {', '.join(TIME_COLUMNS)}" if time_col is None else "",
                "price" if "price" not in header else "",
                f"one of {', '.join(SIZE_COLUMNS)}" if size_col is None else "",
            ]
            raise DataFileError(
                f"{path}: header {header} lacks {' and '.join(filter(None, lacks))}"
            )
        price_col = header.index("price")
        id_col = next((header.index(c) for c in TRADE_ID_COLUMNS if c in header), None)
        side_col = next((header.index(c) for c in SIDE_COLUMNS if c in header), None)
        maker_col = header.index("buyer_is_maker") if "buyer_is_maker" in header else None
        last_ts: int | None = None
        checked = False  # the first tick goes through the model: it checks the id and venue
        prices = _Decimals()
        for line_no, row in enumerate(reader, start=2):
            # A blank line is skipped; the first cell settles it for any other line.
            if not row or (not row[0].strip() and all(not cell.strip() for cell in row)):
                continue
            try:
                cell = row[time_col]
                if cell.isdigit():
                    # parse_time_ns's integer epochs, inline: the common case of trade files.
                    whole = int(cell)
                    if whole < 10**11:
                        ts = whole * 1_000_000_000
                    elif whole < 10**14:
                        ts = whole * 1_000_000
                    elif whole < 10**17:
                        ts = whole * 1_000
                    else:
                        ts = whole
                else:
                    ts = parse_time_ns(cell)
                trade_id = row[id_col].strip() or None if id_col is not None else None
                side = _NO_AGGRESSOR
                if side_col is not None:
                    cell = row[side_col]
                    found = _SIDE_CELLS.get(cell)
                    side = found if found is not None else _SIDES.get(cell.strip().lower(), side)
                elif maker_col is not None:
                    cell = row[maker_col]
                    found = _MAKER_CELLS.get(cell)
                    side = (
                        found if found is not None else _MAKER_BUYER.get(cell.strip().lower(), side)
                    )
                # Decimal() ignores surrounding whitespace itself.
                price = prices[row[price_col]]
                size = Decimal(row[size_col])
                if checked:
                    tick = trade_tick(instrument_id, venue, price, size, side, trade_id, ts)
                else:
                    tick = Tick(
                        instrument_id=instrument_id,
                        venue=venue,
                        price=price,
                        size=size,
                        aggressor_side=side,
                        trade_id=trade_id,
                        ts_event=ts,
                        ts_init=ts,
                    )
                    checked = True
            except (IndexError, InvalidOperation, ValueError) as exc:
                raise DataFileError(f"{path}:{line_no}: {exc}") from exc
            if last_ts is not None and ts < last_ts:
                raise DataFileError(f"{path}:{line_no}: time {ts} is before {last_ts}")
            last_ts = ts
            yield tick
