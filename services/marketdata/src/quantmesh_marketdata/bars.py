"""Time bars aggregated from trade ticks, for venues that only stream trades."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from quantmesh_common.messages import Bar, Tick, TickKind, bar_interval_ns

# A module-level member: reading TickKind.TRADE goes through the enum's descriptor.
_TRADE = TickKind.TRADE


@dataclass(slots=True)
class _Open:
    ts_open: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    trades: int


class BarAggregator:
    """Builds `interval` bars for one instrument from its trade ticks, in event time.

    A bar covers [ts_open, ts_open + interval) on boundaries aligned to the Unix epoch, so
    every instance cuts the same bars. A bar is emitted when the first trade of a later bar
    arrives (or on `flush_until`); intervals without trades produce no bar. A trade older
    than the open bar is refused: bars are only correct over ordered input.
    """

    def __init__(self, instrument_id: str, interval: str) -> None:
        self.instrument_id = instrument_id
        self.interval = interval
        self._step = bar_interval_ns(interval)
        self._open: _Open | None = None

    def update(self, tick: Tick) -> list[Bar]:
        """Add a tick; return the bars it closed (zero or one). Quote ticks are ignored."""
        if tick.kind is not _TRADE:
            return []
        if tick.instrument_id != self.instrument_id:
            raise ValueError(f"tick for {tick.instrument_id} sent to {self.instrument_id} bars")
        bar = self.add_trade(tick.ts_event, tick.price, tick.size)
        return [] if bar is None else [bar]

    def add_trade(self, ts_event: int, price: Decimal, size: Decimal) -> Bar | None:
        """Add a trade of this instrument; return the bar it closed, if any.

        `update` without its checks, for callers whose ticks are this instrument's trades by
        construction (a trade file's replay): no list per trade on the hot path.
        """
        start = ts_event - ts_event % self._step
        current = self._open
        if current is not None and start == current.ts_open:
            if price > current.high:
                current.high = price
            elif price < current.low:
                current.low = price
            current.close = price
            current.volume += size
            current.trades += 1
            return None
        if current is not None and start < current.ts_open:
            raise ValueError(f"out-of-order trade at {ts_event} before open bar {current.ts_open}")
        self._open = _Open(start, price, price, price, price, size, 1)
        return None if current is None else self._bar(current)

    def flush_until(self, ts_ns: int) -> list[Bar]:
        """Close the open bar if `ts_ns` is at or past its end (a timer or end of data)."""
        current = self._open
        if current is None or ts_ns < current.ts_open + self._step:
            return []
        self._open = None
        return [self._bar(current)]

    def _bar(self, b: _Open) -> Bar:
        return Bar(
            instrument_id=self.instrument_id,
            interval=self.interval,
            open=b.open,
            high=b.high,
            low=b.low,
            close=b.close,
            volume=b.volume,
            trades=b.trades,
            ts_open=b.ts_open,
            ts_close=b.ts_open + self._step,
        )
