"""Rolling 24 h statistics per instrument from 1-minute buckets, O(1) amortised per trade."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

from quantmesh_common.messages import Tick, TickKind

# A module-level member: reading TickKind.TRADE goes through the enum's descriptor.
_TRADE = TickKind.TRADE

MINUTE_NS = 60_000_000_000
#: The window: the minute of the latest trade and the 1,439 before it.
WINDOW_MINUTES = 24 * 60
#: change_pct_24h is rounded half-even to this many decimal places.
PCT_QUANTUM = Decimal("0.0001")


@dataclass(slots=True)
class _Bucket:
    minute: int  # ts_event // MINUTE_NS
    open: Decimal
    high: Decimal
    low: Decimal
    volume: Decimal


@dataclass(frozen=True, slots=True)
class Stats24h:
    """What the recorder writes to Redis for one instrument (all from trades, in event time)."""

    instrument_id: str
    price: Decimal  # the latest trade
    ts: int  # its ts_event, UTC ns
    open_24h: Decimal  # the first trade of the window
    change_24h: Decimal  # price - open_24h
    change_pct_24h: Decimal  # change_24h / open_24h * 100, PCT_QUANTUM places
    high_24h: Decimal
    low_24h: Decimal
    volume_24h: Decimal

    def as_fields(self) -> dict[str, str]:
        """The Redis hash fields, decimals as exact strings and ts as an integer string."""
        return {
            "price": str(self.price),
            "ts": str(self.ts),
            "open_24h": str(self.open_24h),
            "change_24h": str(self.change_24h),
            "change_pct_24h": str(self.change_pct_24h),
            "high_24h": str(self.high_24h),
            "low_24h": str(self.low_24h),
            "volume_24h": str(self.volume_24h),
        }


class RollingStats24h:
    """24 h price change, high, low and volume of one instrument, updated trade by trade.

    Trades fall into 1-minute buckets (epoch-aligned). The window is the latest trade's minute
    and the 1,439 minutes before it, so it slides in whole minutes. Closed buckets are kept in
    order with monotonic deques of their highs and lows (each bucket enters and leaves each deque
    once: O(1) amortised) and a running volume sum; the open bucket is folded in on read.

    Input is assumed ordered per instrument (the bus keys market data by instrument). A trade
    older than the latest one is ignored, and so is a repeat of a trade id already seen at the
    latest timestamp: a redelivered batch does not count twice. Quotes are ignored.
    """

    def __init__(self, instrument_id: str) -> None:
        self.instrument_id = instrument_id
        self._closed: deque[_Bucket] = deque()
        self._max: deque[_Bucket] = deque()  # highs, decreasing
        self._min: deque[_Bucket] = deque()  # lows, increasing
        self._closed_volume = Decimal(0)
        self._current: _Bucket | None = None
        self._last_price = Decimal(0)
        self._last_ts = -1
        self._ids_at_last_ts: set[str] = set()
        self.ignored = 0

    def update(self, tick: Tick) -> bool:
        """Fold a trade in; return False if it was ignored (quote, late or repeated)."""
        if tick.kind is not _TRADE:
            return False
        ts = tick.ts_event
        repeated = tick.trade_id is not None and tick.trade_id in self._ids_at_last_ts
        if ts < self._last_ts or (ts == self._last_ts and repeated):
            self.ignored += 1
            return False
        if ts > self._last_ts:
            self._last_ts = ts
            self._ids_at_last_ts.clear()
        if tick.trade_id is not None:
            self._ids_at_last_ts.add(tick.trade_id)
        self._last_price = tick.price
        minute = ts // MINUTE_NS
        current = self._current
        if current is not None and current.minute == minute:
            if tick.price > current.high:
                current.high = tick.price
            elif tick.price < current.low:
                current.low = tick.price
            current.volume += tick.size
            return True
        if current is not None:
            self._close(current)
        self._current = _Bucket(minute, tick.price, tick.price, tick.price, tick.size)
        self._expire(minute - WINDOW_MINUTES + 1)
        return True

    def _close(self, bucket: _Bucket) -> None:
        self._closed.append(bucket)
        self._closed_volume += bucket.volume
        while self._max and self._max[-1].high <= bucket.high:
            self._max.pop()
        self._max.append(bucket)
        while self._min and self._min[-1].low >= bucket.low:
            self._min.pop()
        self._min.append(bucket)

    def _expire(self, first_minute: int) -> None:
        closed = self._closed
        while closed and closed[0].minute < first_minute:
            old = closed.popleft()
            self._closed_volume -= old.volume
            if self._max and self._max[0] is old:
                self._max.popleft()
            if self._min and self._min[0] is old:
                self._min.popleft()

    def snapshot(self) -> Stats24h | None:
        """The statistics as of the latest trade; None before the first one."""
        current = self._current
        if current is None:
            return None
        high, low = current.high, current.low
        if self._max and self._max[0].high > high:
            high = self._max[0].high
        if self._min and self._min[0].low < low:
            low = self._min[0].low
        opening = self._closed[0].open if self._closed else current.open
        change = self._last_price - opening
        pct = (change / opening * 100).quantize(PCT_QUANTUM, rounding=ROUND_HALF_EVEN)
        return Stats24h(
            instrument_id=self.instrument_id,
            price=self._last_price,
            ts=self._last_ts,
            open_24h=opening,
            change_24h=change,
            change_pct_24h=pct,
            high_24h=high,
            low_24h=low,
            volume_24h=self._closed_volume + current.volume,
        )
