"""Bars as columns: numpy arrays for the columnar path, exact decimals kept for the stages.

A million `Bar` objects take about a gigabyte; the same bars as columns take ~90 MB. Each
price is kept twice: as a float64 (what indicators compute with, equal to `float(price)`)
and as an exact decimal (an int64 mantissa and an int8 exponent, so `Decimal("100.20")`
comes back as `Decimal("100.20")`, not `100.2`), from which the prints and fills the stages
see are made.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import cached_property
from typing import Literal, overload

import numpy as np
import numpy.typing as npt

from quantmesh_common.messages import Bar
from quantmesh_signals.columnar import BarSeries

Field = Literal["open", "high", "low", "close", "volume"]
FIELDS: tuple[Field, ...] = ("open", "high", "low", "close", "volume")
_INT64_MAX = 2**63 - 1

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]


def _split(value: Decimal) -> tuple[int, int]:
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        raise ValueError(f"not a finite price: {value}")
    mantissa = int("".join(map(str, digits)) or "0")
    if mantissa > _INT64_MAX or not -128 <= exponent <= 127:
        raise ValueError(f"price out of the columnar range: {value}")
    return (-mantissa if sign else mantissa), exponent


@dataclass(frozen=True)
class Exact:
    """Exact decimals of one column: value i is mantissa[i] x 10^exponent[i]."""

    mantissa: Ints
    exponent: npt.NDArray[np.int8]

    def __getitem__(self, i: int) -> Decimal:
        return Decimal(int(self.mantissa[i])).scaleb(int(self.exponent[i]))


@dataclass(frozen=True)
class BarColumns:
    """One instrument's bars, oldest first, as columns."""

    instrument_id: str
    interval: str
    ts_open: Ints
    ts_close: Ints
    open: Floats
    high: Floats
    low: Floats
    close: Floats
    volume: Floats
    exact: dict[str, Exact]

    def __len__(self) -> int:
        return len(self.ts_close)

    def price(self, field: Field, i: int) -> Decimal:
        """The exact decimal of `field` on bar `i`."""
        return self.exact[field][i]

    @cached_property
    def _first_bar(self) -> Bar:
        return Bar.model_construct(
            instrument_id=self.instrument_id,
            interval=self.interval,
            open=self.price("open", 0),
            high=self.price("high", 0),
            low=self.price("low", 0),
            close=self.price("close", 0),
            volume=self.price("volume", 0),
            ts_open=int(self.ts_open[0]),
            ts_close=int(self.ts_close[0]),
        )

    def bar(self, i: int) -> Bar:
        """Bar `i` as a message (built without validation: its fields were checked once)."""
        # A copy of the first bar with its prices and times replaced: the same message as
        # model_construct's, made in half the time (the per-bar path makes one a bar).
        return self._first_bar.model_copy(
            update={
                "open": self.price("open", i),
                "high": self.price("high", i),
                "low": self.price("low", i),
                "close": self.price("close", i),
                "volume": self.price("volume", i),
                "ts_open": int(self.ts_open[i]),
                "ts_close": int(self.ts_close[i]),
            }
        )

    def series(self) -> BarSeries:
        """The columns a columnar strategy decides on."""
        return BarSeries(
            self.instrument_id,
            self.ts_close,
            self.open,
            self.high,
            self.low,
            self.close,
            self.volume,
        )

    def bars(self) -> BarView:
        """The bars as a read-only sequence of messages, each made when it is read."""
        return BarView(self)

    @classmethod
    def from_bars(cls, bars: Sequence[Bar]) -> BarColumns:
        """Columns of `bars` (one instrument); ValueError for a price outside int64/int8."""
        if not bars:
            raise ValueError("no bars")
        first = bars[0]
        exact: dict[str, Exact] = {}
        floats: dict[str, Floats] = {}
        for name in FIELDS:
            values = [getattr(bar, name) for bar in bars]
            parts = [_split(v) for v in values]
            exact[name] = Exact(
                np.fromiter((m for m, _ in parts), dtype=np.int64, count=len(parts)),
                np.fromiter((e for _, e in parts), dtype=np.int8, count=len(parts)),
            )
            floats[name] = np.fromiter(map(float, values), dtype=np.float64, count=len(values))
        return cls(
            instrument_id=first.instrument_id,
            interval=first.interval,
            ts_open=np.fromiter((b.ts_open for b in bars), dtype=np.int64, count=len(bars)),
            ts_close=np.fromiter((b.ts_close for b in bars), dtype=np.int64, count=len(bars)),
            open=floats["open"],
            high=floats["high"],
            low=floats["low"],
            close=floats["close"],
            volume=floats["volume"],
            exact=exact,
        )

    @classmethod
    def from_grid(
        cls,
        instrument_id: str,
        interval: str,
        ts_open: Ints,
        ts_close: Ints,
        prices: dict[Field, Floats],
        decimals: int = 2,
    ) -> BarColumns:
        """Columns of prices on a decimal grid (`decimals` places), e.g. synthetic data.

        Each price is rounded to the grid; its float is then exactly `float(Decimal(price))`
        (an integer mantissa divided by a power of ten is correctly rounded).
        """
        if not 0 <= decimals <= 15:
            raise ValueError(f"decimals must be within 0..15, got {decimals}")
        scale = 10.0**decimals
        exact: dict[str, Exact] = {}
        floats: dict[str, Floats] = {}
        for name in FIELDS:
            mantissa = np.rint(np.asarray(prices[name], dtype=np.float64) * scale).astype(np.int64)
            exact[name] = Exact(mantissa, np.full(len(mantissa), -decimals, dtype=np.int8))
            floats[name] = mantissa / scale
        return cls(
            instrument_id,
            interval,
            np.asarray(ts_open, dtype=np.int64),
            np.asarray(ts_close, dtype=np.int64),
            floats["open"],
            floats["high"],
            floats["low"],
            floats["close"],
            floats["volume"],
            exact,
        )


class BarView(Sequence[Bar]):
    """BarColumns seen as a sequence of Bar messages, made on demand."""

    def __init__(self, columns: BarColumns) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns)

    @overload
    def __getitem__(self, i: int) -> Bar: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Bar]: ...

    def __getitem__(self, i: int | slice) -> Bar | Sequence[Bar]:
        if isinstance(i, slice):
            return [self.columns.bar(k) for k in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        return self.columns.bar(i % n)

    def __iter__(self) -> Iterator[Bar]:
        return (self.columns.bar(i) for i in range(len(self)))
