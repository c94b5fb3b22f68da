"""Incremental technical indicators: each update is O(1) (running sums, deques, recursions).

Indicator math is done in binary floats on purpose. Indicators are statistics that feed a
decision (a crossing, a z-score), never amounts that are booked: a 1e-15 relative error in a
moving average cannot move money, while Decimal would make every update ~20x slower on the
hot path (ticks). Prices enter as Decimal and are converted once at the boundary (`float(x)`,
which every `update` does); quantities and prices that go into orders stay Decimal.

Every indicator exposes `update(...)`, `value` (None until warm) and `ready`.

Running sums drift by float rounding like a random walk; over 10^9 updates that is ~1e-12
relative, far below any decision threshold. Variances use Welford-style add/remove updates of
the centred second moment rather than sum-of-squares, which would lose digits when the mean
dwarfs the spread (BTC at 50,000 with a spread of 5).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable
from typing import NamedTuple, SupportsFloat

import numpy as np
import numpy.typing as npt


def _check_period(period: int, name: str = "period") -> int:
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {period!r}")
    return period


def _negligible(second_moment: float, mean: float, n: int) -> bool:
    # A constant series leaves rounding dust (~1e-32 * mean^2 per value) in its moment.
    return second_moment <= n * mean * mean * 1e-24


class _CoMoments:
    """Count, means and co-moment of a pair of series, with add and remove in O(1).

    `c` is sum((x - mean_x) * (y - mean_y)); for a single series pass it as both x and y.
    """

    __slots__ = ("c", "mean_x", "mean_y", "n")

    def __init__(self) -> None:
        self.n = 0
        self.mean_x = 0.0
        self.mean_y = 0.0
        self.c = 0.0

    def add(self, x: float, y: float) -> None:
        self.n += 1
        dx = x - self.mean_x
        self.mean_x += dx / self.n
        self.mean_y += (y - self.mean_y) / self.n
        self.c += dx * (y - self.mean_y)

    def remove(self, x: float, y: float) -> None:
        # The exact inverse of `add`: undo the means first, then the co-moment term.
        if self.n <= 1:
            self.n, self.mean_x, self.mean_y, self.c = 0, 0.0, 0.0, 0.0
            return
        mean_y_with = self.mean_y
        self.n -= 1
        self.mean_x -= (x - self.mean_x) / self.n
        self.mean_y -= (y - self.mean_y) / self.n
        self.c -= (x - self.mean_x) * (y - mean_y_with)


class SMA:
    """Simple moving average of the last `period` values."""

    def __init__(self, period: int) -> None:
        self.period = _check_period(period)
        self._window: deque[float] = deque()
        self._sum = 0.0

    def update(self, x: SupportsFloat) -> float | None:
        """Add a value; return the average once `period` values have been seen."""
        value = float(x)
        self._window.append(value)
        self._sum += value
        if len(self._window) > self.period:
            self._sum -= self._window.popleft()
        return self.value

    @property
    def ready(self) -> bool:
        """True once the window is full."""
        return len(self._window) == self.period

    @property
    def value(self) -> float | None:
        """The average, or None until warm."""
        return self._sum / self.period if self.ready else None


class EMA:
    """Exponential moving average, alpha = 2 / (period + 1), seeded with the SMA of the first
    `period` values (the TA-Lib convention), so it is warm after `period` values."""

    def __init__(self, period: int) -> None:
        self.period = _check_period(period)
        self.alpha = 2.0 / (period + 1)
        self._count = 0
        self._seed_sum = 0.0
        self._value: float | None = None

    def update(self, x: SupportsFloat) -> float | None:
        """Add a value; return the average once warm."""
        value = float(x)
        if self._value is not None:
            self._value += self.alpha * (value - self._value)
        else:
            self._count += 1
            self._seed_sum += value
            if self._count == self.period:
                self._value = self._seed_sum / self.period
        return self._value

    @property
    def ready(self) -> bool:
        """True once `period` values have been seen."""
        return self._value is not None

    @property
    def value(self) -> float | None:
        """The average, or None until warm."""
        return self._value


class WMA:
    """Linearly weighted moving average: the newest value weighs `period`, the oldest 1."""

    def __init__(self, period: int) -> None:
        self.period = _check_period(period)
        self._window: deque[float] = deque()
        self._sum = 0.0  # plain sum of the window
        self._weighted = 0.0  # sum of weight * value
        self._divisor = period * (period + 1) / 2

    def update(self, x: SupportsFloat) -> float | None:
        """Add a value; return the average once the window is full."""
        value = float(x)
        if len(self._window) == self.period:
            # Every weight drops by one (the oldest reaches 0 and leaves): subtract the sum.
            self._weighted += self.period * value - self._sum
            self._sum += value - self._window.popleft()
        else:
            self._weighted += (len(self._window) + 1) * value
            self._sum += value
        self._window.append(value)
        return self.value

    @property
    def ready(self) -> bool:
        """True once the window is full."""
        return len(self._window) == self.period

    @property
    def value(self) -> float | None:
        """The average, or None until warm."""
        return self._weighted / self._divisor if self.ready else None


class RSI:
    """Wilder's relative strength index, 0..100.

    Needs `period` price changes (period + 1 prices): the first averages of gains and losses
    are plain means, then Wilder's smoothing avg = (avg * (period - 1) + x) / period. With no
    losses the RSI is 100; with neither gains nor losses (a flat market) it is 50.
    """

    def __init__(self, period: int = 14) -> None:
        self.period = _check_period(period)
        self._prev: float | None = None
        self._count = 0
        self._avg_gain = 0.0
        self._avg_loss = 0.0

    def update(self, price: SupportsFloat) -> float | None:
        """Add a price; return the RSI once warm."""
        value = float(price)
        prev, self._prev = self._prev, value
        if prev is None:
            return None
        change = value - prev
        gain = change if change > 0 else 0.0
        loss = -change if change < 0 else 0.0
        n = self.period
        if self._count < n:
            self._count += 1
            self._avg_gain += gain / n
            self._avg_loss += loss / n
        else:
            self._avg_gain = (self._avg_gain * (n - 1) + gain) / n
            self._avg_loss = (self._avg_loss * (n - 1) + loss) / n
        return self.value

    @property
    def ready(self) -> bool:
        """True once `period` changes have been seen."""
        return self._count == self.period

    @property
    def value(self) -> float | None:
        """The RSI, or None until warm."""
        if not self.ready:
            return None
        if self._avg_loss == 0.0:
            return 50.0 if self._avg_gain == 0.0 else 100.0
        rs = self._avg_gain / self._avg_loss
        return 100.0 - 100.0 / (1.0 + rs)


class MACDValue(NamedTuple):
    """The three MACD outputs."""

    line: float
    signal: float
    histogram: float


class MACD:
    """MACD: line = EMA(fast) - EMA(slow), signal = EMA(signal) of the line, histogram = line
    - signal. The line exists after `slow` values; `value` after `slow + signal - 1`."""

    def __init__(self, fast: int = 12, slow: int = 26, signal: int = 9) -> None:
        _check_period(fast, "fast")
        _check_period(slow, "slow")
        _check_period(signal, "signal")
        if fast >= slow:
            raise ValueError(f"fast ({fast}) must be below slow ({slow})")
        self._fast = EMA(fast)
        self._slow = EMA(slow)
        self._signal = EMA(signal)
        self._value: MACDValue | None = None
        self.line: float | None = None

    def update(self, x: SupportsFloat) -> MACDValue | None:
        """Add a value; return (line, signal, histogram) once warm."""
        value = float(x)
        fast = self._fast.update(value)
        slow = self._slow.update(value)
        if fast is None or slow is None:
            return None
        self.line = fast - slow
        signal = self._signal.update(self.line)
        if signal is not None:
            self._value = MACDValue(self.line, signal, self.line - signal)
        return self._value

    @property
    def ready(self) -> bool:
        """True once the signal line exists."""
        return self._value is not None

    @property
    def value(self) -> MACDValue | None:
        """(line, signal, histogram), or None until warm."""
        return self._value


class ATR:
    """Wilder's average true range over `period` bars.

    True range = max(high - low, |high - previous close|, |low - previous close|); the first
    bar, having no previous close, counts high - low. The first ATR is the mean of the first
    `period` true ranges, then avg = (avg * (period - 1) + tr) / period.
    """

    def __init__(self, period: int = 14) -> None:
        self.period = _check_period(period)
        self._prev_close: float | None = None
        self._count = 0
        self._value = 0.0

    def update(self, high: SupportsFloat, low: SupportsFloat, close: SupportsFloat) -> float | None:
        """Add a bar; return the ATR once warm."""
        h, lo, c = float(high), float(low), float(close)
        if self._prev_close is None:
            tr = h - lo
        else:
            tr = max(h - lo, abs(h - self._prev_close), abs(lo - self._prev_close))
        self._prev_close = c
        n = self.period
        if self._count < n:
            self._count += 1
            self._value += tr / n
        else:
            self._value = (self._value * (n - 1) + tr) / n
        return self.value

    @property
    def ready(self) -> bool:
        """True once `period` bars have been seen."""
        return self._count == self.period

    @property
    def value(self) -> float | None:
        """The ATR, or None until warm."""
        return self._value if self.ready else None


class RollingStd:
    """Standard deviation of the last `period` values.

    `sample=True` (the default) divides by period - 1, the unbiased estimator statistics and
    z-scores use (and needs period >= 2); `sample=False` divides by period (the population
    deviation, what Bollinger bands use).
    """

    def __init__(self, period: int, *, sample: bool = True) -> None:
        self.period = _check_period(period)
        if sample and period < 2:
            raise ValueError("a sample standard deviation needs period >= 2")
        self.sample = sample
        self._window: deque[float] = deque()
        self._m = _CoMoments()

    def update(self, x: SupportsFloat) -> float | None:
        """Add a value; return the deviation once the window is full."""
        value = float(x)
        if len(self._window) == self.period:
            old = self._window.popleft()
            self._m.remove(old, old)
        self._window.append(value)
        self._m.add(value, value)
        return self.value

    @property
    def ready(self) -> bool:
        """True once the window is full."""
        return len(self._window) == self.period

    @property
    def mean(self) -> float | None:
        """The mean of the window, or None until warm."""
        return self._m.mean_x if self.ready else None

    @property
    def value(self) -> float | None:
        """The deviation, or None until warm."""
        if not self.ready:
            return None
        divisor = self.period - 1 if self.sample else self.period
        return math.sqrt(max(self._m.c, 0.0) / divisor)


class BollingerValue(NamedTuple):
    """The three Bollinger bands."""

    mid: float
    upper: float
    lower: float


class Bollinger:
    """Bollinger bands: mid = SMA(period), upper/lower = mid +/- k * population std (period)."""

    def __init__(self, period: int = 20, k: float = 2.0) -> None:
        if not k > 0:
            raise ValueError(f"k must be > 0, got {k!r}")
        self.period = _check_period(period)
        self.k = float(k)
        self._std = RollingStd(period, sample=False)

    def update(self, x: SupportsFloat) -> BollingerValue | None:
        """Add a value; return the bands once the window is full."""
        self._std.update(x)
        return self.value

    @property
    def ready(self) -> bool:
        """True once the window is full."""
        return self._std.ready

    @property
    def value(self) -> BollingerValue | None:
        """(mid, upper, lower), or None until warm."""
        mid, std = self._std.mean, self._std.value
        if mid is None or std is None:
            return None
        return BollingerValue(mid, mid + self.k * std, mid - self.k * std)


class VWAP:
    """Volume-weighted average price.

    With `window=None` it is a session VWAP: cumulative since the start of the session, which
    restarts whenever `update` is given a `session` key different from the previous one (e.g.
    the UTC date) or `reset()` is called. With `window=N` it covers the last N updates. The
    value is None until the window is full (rolling) and while no volume has traded.
    """

    def __init__(self, window: int | None = None) -> None:
        self.window = None if window is None else _check_period(window, "window")
        self._items: deque[tuple[float, float]] = deque()
        self._count = 0
        self._pv = 0.0
        self._volume = 0.0
        self._session: Hashable | None = None

    def reset(self) -> None:
        """Start a new session."""
        self._items.clear()
        self._count = 0
        self._pv = 0.0
        self._volume = 0.0

    def update(
        self, price: SupportsFloat, volume: SupportsFloat, session: Hashable | None = None
    ) -> float | None:
        """Add a trade or bar (price, volume); return the VWAP once warm."""
        p, v = float(price), float(volume)
        if v < 0:
            raise ValueError(f"volume must be >= 0, got {v}")
        if session is not None and session != self._session:
            if self._session is not None:
                self.reset()
            self._session = session
        self._count += 1
        self._pv += p * v
        self._volume += v
        if self.window is not None:
            self._items.append((p, v))
            if len(self._items) > self.window:
                op, ov = self._items.popleft()
                self._pv -= op * ov
                self._volume -= ov
        return self.value

    @property
    def ready(self) -> bool:
        """True once the window is full (rolling) or anything traded this session."""
        if self.window is not None and len(self._items) < self.window:
            return False
        return self._count > 0 and self._volume > 0

    @property
    def value(self) -> float | None:
        """The VWAP, or None until warm."""
        return self._pv / self._volume if self.ready else None


class RollingCorrelation:
    """Pearson correlation of two series over the last `period` pairs (period >= 2).

    `value` is None until the window is full, and also when either series is constant over
    the window (the correlation is undefined there); `ready` only says the window is full.
    """

    def __init__(self, period: int) -> None:
        self.period = _check_period(period)
        if period < 2:
            raise ValueError("a correlation needs period >= 2")
        self._window: deque[tuple[float, float]] = deque()
        self._xy = _CoMoments()
        self._xx = _CoMoments()
        self._yy = _CoMoments()

    def update(self, x: SupportsFloat, y: SupportsFloat) -> float | None:
        """Add a pair; return the correlation once warm."""
        a, b = float(x), float(y)
        if len(self._window) == self.period:
            oa, ob = self._window.popleft()
            self._xy.remove(oa, ob)
            self._xx.remove(oa, oa)
            self._yy.remove(ob, ob)
        self._window.append((a, b))
        self._xy.add(a, b)
        self._xx.add(a, a)
        self._yy.add(b, b)
        return self.value

    @property
    def ready(self) -> bool:
        """True once the window is full."""
        return len(self._window) == self.period

    @property
    def value(self) -> float | None:
        """The correlation in [-1, 1], or None until warm or when undefined."""
        if not self.ready:
            return None
        sxx, syy = self._xx.c, self._yy.c
        if _negligible(sxx, self._xx.mean_x, self.period) or _negligible(
            syy, self._yy.mean_x, self.period
        ):
            return None
        r = self._xy.c / math.sqrt(sxx * syy)
        return max(-1.0, min(1.0, r))


# --------------------------------------------------------------------------------------------
# Batch versions: a whole series at once, equal bit for bit to feeding the incremental
# indicator value by value (NaN where it would return None). Backtests use them to decide on
# every bar of a history without a Python call per bar.
# --------------------------------------------------------------------------------------------


def sma_batch(values: npt.ArrayLike, period: int) -> npt.NDArray[np.float64]:
    """`SMA(period)` over `values`: element i is what the i-th `update` returns (NaN: None).

    Exactly equal, not merely close: `SMA` keeps a running sum, adding each value and then
    subtracting the one leaving the window. That is one cumulative sum over the interleaved
    steps x0 .. x(p-1), x(p), -x0, x(p+1), -x1, ..., which `np.add.accumulate` adds in the
    same order (an accumulation is sequential, unlike numpy's pairwise `sum`).
    """
    p = _check_period(period)
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    out = np.full(n, np.nan)
    if n < p:
        return out
    steps = np.empty(p + 2 * (n - p))
    steps[:p] = x[:p]
    steps[p::2] = x[p:]
    steps[p + 1 :: 2] = -x[: n - p]
    sums = np.add.accumulate(steps)
    out[p - 1] = sums[p - 1]
    out[p:] = sums[p + 1 :: 2]
    out[p - 1 :] /= p
    return out


def rsi_batch(values: npt.ArrayLike, period: int = 14) -> npt.NDArray[np.float64]:
    """`RSI(period)` over `values`: element i is what the i-th `update` returns (NaN: None).

    Changes, gains, losses and the first averages are columnar; Wilder's smoothing is a
    recursion whose rounding must match `RSI`'s, so it runs as one plain float loop.
    """
    p = _check_period(period)
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    out = np.full(n, np.nan)
    if n < p + 1:
        return out
    change = np.diff(x)
    gains = np.where(change > 0, change, 0.0)
    losses = np.where(change < 0, -change, 0.0)
    avg_gain = float(np.add.accumulate(gains[:p] / p)[-1])
    avg_loss = float(np.add.accumulate(losses[:p] / p)[-1])
    values_out = [_rsi_value(avg_gain, avg_loss)]
    for gain, loss in zip(gains[p:].tolist(), losses[p:].tolist(), strict=True):
        avg_gain = (avg_gain * (p - 1) + gain) / p
        avg_loss = (avg_loss * (p - 1) + loss) / p
        values_out.append(_rsi_value(avg_gain, avg_loss))
    out[p:] = values_out
    return out


def _rsi_value(avg_gain: float, avg_loss: float) -> float:
    # RSI.value's formula, for the batch loop.
    if avg_loss == 0.0:
        return 50.0 if avg_gain == 0.0 else 100.0
    return 100.0 - 100.0 / (1.0 + avg_gain / avg_loss)
