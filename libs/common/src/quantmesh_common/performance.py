"""Performance analytics: pure functions over an equity curve and a list of round trips.

Shared by the portfolio stage and the backtester, so a live account and a backtest report the
same figures by the same definitions. Nothing here reads a clock, a bus or a store.

Inputs
    An *equity curve* is a sequence of `(ts_ns, equity)` pairs: UTC nanoseconds, non-decreasing,
    and `Decimal` equity. Period returns are `r_i = e_i / e_{i-1} - 1`; every point but the
    last must be positive for them to exist (ValueError otherwise). A *round trip* is one
    position opened and closed (`RoundTrip`).

Definitions (the usual ones; issue 5 "Correctness")
    - total return: `e_last / e_first - 1`.
    - CAGR: `(e_last / e_first) ** (1 / years) - 1`, where `years` is the calendar time between
      the first and last timestamps over a year of 365.25 days (`NS_PER_YEAR`); not the count
      of periods, so gaps in the data do not distort it.
    - volatility: sample standard deviation (n - 1) of period returns x sqrt(periods per year).
    - Sharpe: `mean(r - rf_p) / stdev(r) * sqrt(P)` with `rf_p = risk_free / P`, `risk_free`
      an annual rate (default 0) and `P` periods per year (default 252, or inferred from the
      data with `infer_periods_per_year`: observed periods per calendar year).
    - Sortino: `mean(r - rf_p) / DD * sqrt(P)` with the downside deviation
      `DD = sqrt(mean(min(r - rf_p, 0) ** 2))` taken over ALL periods (the gains count as zeros
      in the mean), not only over the losing ones: the standard definition (Sortino & Price),
      which keeps DD comparable with the standard deviation.
    - Calmar: `CAGR / |max drawdown|`.
    - Omega at threshold 0: `sum(max(r, 0)) / sum(max(-r, 0))` over period returns.
    - max drawdown: the largest `(peak - trough) / peak`, a fraction in [0, 1] (above 1 only if
      equity went negative); its duration runs from the peak to the first later point whose
      equity is back at or above the peak (recovery), or to the last point if unrecovered.
    - win rate, profit factor (`gross profit / |gross loss|`), expectancy (mean net P&L per
      round trip), average win and average loss over round trips; a trip with P&L exactly zero
      is neither a win nor a loss but counts in the number of trips.
    - MAE / MFE: the largest move against / in favour of a round trip's position, per unit,
      measured from its entry price over the price path during the trade.
    - historical VaR at confidence c: minus the (1 - c) quantile of period returns, with
      linear interpolation between order statistics (numpy's default, Hyndman & Fan type 7);
      historical CVaR: minus the mean of the returns at or below that quantile. Parametric
      (Gaussian) VaR: `z_c * stdev(r) - mean(r)`, CVaR: `stdev(r) * pdf(z_c) / (1 - c) -
      mean(r)`. All are losses as positive fractions; a negative value means even the tail
      gained. Multiply by equity for an amount. They take any series (returns or P&L).

Float for statistics, Decimal for money
    Ratios, roots, powers and quantiles are computed in binary floating point: their inputs
    are already rounded ratios, `Decimal` has no square root of practical speed or any
    transcendental functions, and the figures are compared with (and must agree with) float
    references such as numpy and other backtesters. Sums use `math.fsum` (exactly rounded) so
    the order of the data does not change the result. Money — P&L sums, average win/loss,
    expectancy, excursions — stays `Decimal`, so it reconciles to the cent with the ledger.

Undefined and unbounded values
    A figure that cannot be computed (too few points, 0 / 0) is `None`. A ratio whose
    denominator is zero while its numerator is not — no losing period (Omega, Sortino), no
    losing trade (profit factor), no volatility (Sharpe), no drawdown (Calmar) — is
    `math.inf` (or `-math.inf` for a negative numerator): it is unbounded, not unknown, and a
    caller may want to tell the two apart. Writers of strict JSON must map infinities
    themselves (e.g. to null).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from statistics import NormalDist
from typing import Literal

import numpy as np
import numpy.typing as npt

from quantmesh_common.messages import PositionSide

#: One point of an equity curve: (UTC ns, equity).
EquityPoint = tuple[int, Decimal]
#: An equity curve: points in non-decreasing time order.
EquityCurve = Sequence[EquityPoint]
#: Float samples (returns or P&L): a sequence of floats or a float64 array.
Floats = Sequence[float] | npt.NDArray[np.float64]
_Array = npt.NDArray[np.float64]

#: A year of 365.25 days in nanoseconds: the calendar year used by CAGR and inference.
NS_PER_YEAR = 31_557_600 * 1_000_000_000
#: Trading days per year: the default number of periods per year.
DEFAULT_PERIODS_PER_YEAR = 252
#: The default VaR / CVaR confidence level.
DEFAULT_CONFIDENCE = 0.95

_ZERO = Decimal(0)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float | None:
    """Divide by a non-negative denominator; infinities and None as the module docstring says."""
    if denominator > 0:
        return numerator / denominator
    if numerator > 0:
        return math.inf
    if numerator < 0:
        return -math.inf
    return None


def _floats(values: Floats) -> _Array:
    # Every figure below is elementwise IEEE arithmetic and exactly rounded sums (fsum), so
    # an array gives the very results a list of the same floats gives, without a Python
    # float object per sample (a 1,000,000-point curve's returns: 8 MB instead of 32).
    if isinstance(values, np.ndarray) and values.dtype == np.float64:
        return values
    return np.asarray(values, dtype=np.float64)


def _mean(values: _Array) -> float:
    return math.fsum(values) / len(values)


def _stdev(values: _Array) -> float:
    """Sample standard deviation (n - 1); exactly 0.0 when every value is the same."""
    # A constant series must give exactly zero (the "zero volatility" case), which a float
    # two-pass formula does not guarantee: its mean may be off by an ulp.
    if values.max() == values.min():
        return 0.0
    mean = _mean(values)
    deviation = values - mean
    return math.sqrt(math.fsum(deviation * deviation) / (len(values) - 1))


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")


def _check_periods(periods_per_year: float) -> None:
    if not periods_per_year > 0:
        raise ValueError(f"periods_per_year must be positive, got {periods_per_year}")


# --------------------------------------------------------------------------------------------
# Returns and growth
# --------------------------------------------------------------------------------------------


def period_returns(curve: EquityCurve) -> list[float]:
    """Return the simple return of each period, `e_i / e_{i-1} - 1`; empty for < 2 points.

    Raises ValueError if a point before the last has non-positive equity (its next return does
    not exist) or if the timestamps go back in time.
    """
    returns, _ = _walk(curve)
    floats: list[float] = returns.tolist()
    return floats


def _walk(curve: EquityCurve) -> tuple[_Array, Drawdown | None]:
    """One pass over the curve: its period returns (as `period_returns` checks and computes
    them) and its deepest drawdown (as `max_drawdown`, when the first equity is positive).

    The curve is read once, in order, and nothing per point is kept but a float: a curve may
    make each point when it is read (the columnar backtest's does).
    """
    # Float division: a Decimal division of 28-digit equities costs ~3 us a point, and the
    # returns are float statistics inputs anyway (error ~1e-16 relative to each equity).
    values = array("d")
    episodes = _Episodes()
    points = iter(curve)
    first = next(points, None)
    if first is None:
        return np.empty(0, dtype=np.float64), None
    ts_prev, prev = first
    values.append(float(prev))
    track = prev > 0
    if track:
        episodes.start(ts_prev, prev)
    for i, (ts, equity) in enumerate(points, start=1):
        if ts < ts_prev:
            raise ValueError(f"equity curve goes back in time: {ts} after {ts_prev}")
        if prev <= 0:
            raise ValueError(f"equity {prev} at {ts_prev} is not positive: no return after it")
        values.append(float(equity))
        if track:
            episodes.see(i, ts, equity)
        ts_prev, prev = ts, equity
    floats = np.frombuffer(values, dtype=np.float64)
    deepest = None
    if track:
        deepest = episodes.finish()
    return floats[1:] / floats[:-1] - 1.0, deepest


def total_return(curve: EquityCurve) -> float | None:
    """Return `e_last / e_first - 1`, or None for fewer than two points or a first equity <= 0."""
    if len(curve) < 2 or curve[0][1] <= 0:
        return None
    return float(curve[-1][1] / curve[0][1]) - 1.0


def years_spanned(curve: EquityCurve) -> float:
    """Return the calendar time between the first and last points, in years of 365.25 days."""
    if len(curve) < 2:
        return 0.0
    return (curve[-1][0] - curve[0][0]) / NS_PER_YEAR


def cagr(curve: EquityCurve) -> float | None:
    """Return the compound annual growth rate over the curve's calendar time.

    None for fewer than two points, a zero time span or a first equity <= 0; -1.0 if the final
    equity is zero or negative (everything was lost).
    """
    if len(curve) < 2 or curve[0][1] <= 0:
        return None
    years = years_spanned(curve)
    if years <= 0:
        return None
    growth = float(curve[-1][1] / curve[0][1])
    if growth <= 0:
        return -1.0
    try:
        return float(growth ** (1.0 / years)) - 1.0
    except OverflowError:  # a large gain over a tiny span: unbounded for practical purposes
        return math.inf


def infer_periods_per_year(curve: EquityCurve) -> float | None:
    """Return the observed number of periods per calendar year: `(n - 1) / years`.

    Daily stock data (weekdays, holidays) gives about 252, daily crypto data 365, one-minute
    crypto data 525,960. None for fewer than two points or a zero time span.
    """
    years = years_spanned(curve)
    if years <= 0:
        return None
    return (len(curve) - 1) / years


# --------------------------------------------------------------------------------------------
# Risk-adjusted ratios over period returns
# --------------------------------------------------------------------------------------------


def annualized_volatility(
    returns: Floats, periods_per_year: float = DEFAULT_PERIODS_PER_YEAR
) -> float | None:
    """Return the sample standard deviation of `returns` times sqrt(periods_per_year).

    None for fewer than two returns.
    """
    _check_periods(periods_per_year)
    if len(returns) < 2:
        return None
    return _stdev(_floats(returns)) * math.sqrt(periods_per_year)


def sharpe_ratio(
    returns: Floats,
    *,
    risk_free: float = 0.0,
    periods_per_year: float = DEFAULT_PERIODS_PER_YEAR,
) -> float | None:
    """Return the annualised Sharpe ratio of period `returns` (`risk_free` is an annual rate).

    None for fewer than two returns, or zero volatility with a zero mean excess return;
    +/-inf for zero volatility with a non-zero mean excess return.
    """
    _check_periods(periods_per_year)
    if len(returns) < 2:
        return None
    values = _floats(returns)
    excess = _mean(values) - risk_free / periods_per_year
    ratio = _ratio(excess, _stdev(values))
    if ratio is None or math.isinf(ratio):
        return ratio
    return ratio * math.sqrt(periods_per_year)


def downside_deviation(returns: Floats, target: float = 0.0) -> float | None:
    """Return `sqrt(mean(min(r - target, 0) ** 2))` over ALL periods; None if `returns` is empty."""
    if not len(returns):
        return None
    deviation = _floats(returns) - target
    below = deviation[deviation < 0.0]
    return math.sqrt(math.fsum(below * below) / len(returns))


def sortino_ratio(
    returns: Floats,
    *,
    risk_free: float = 0.0,
    periods_per_year: float = DEFAULT_PERIODS_PER_YEAR,
) -> float | None:
    """Return the annualised Sortino ratio: mean excess return over the downside deviation.

    The target of the downside deviation is the per-period risk-free rate (0 by default).
    None for fewer than two returns; +inf when no period fell below the target and the mean
    excess return is positive.
    """
    _check_periods(periods_per_year)
    if len(returns) < 2:
        return None
    values = _floats(returns)
    target = risk_free / periods_per_year
    deviation = downside_deviation(values, target)
    assert deviation is not None  # returns is not empty
    ratio = _ratio(_mean(values) - target, deviation)
    if ratio is None or math.isinf(ratio):
        return ratio
    return ratio * math.sqrt(periods_per_year)


def omega_ratio(returns: Floats, threshold: float = 0.0) -> float | None:
    """Return `sum(max(r - t, 0)) / sum(max(t - r, 0))`; +inf with no period below `threshold`.

    None for no returns, or when every return equals the threshold.
    """
    if not len(returns):
        return None
    values = _floats(returns)
    gains = math.fsum(values[values > threshold] - threshold)
    losses = math.fsum(threshold - values[values < threshold])
    return _ratio(gains, losses)


# --------------------------------------------------------------------------------------------
# Drawdowns
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Drawdown:
    """One drawdown episode: from a peak, down to its trough, to recovery (or the curve's end).

    `depth` is `(peak - trough) / peak`. The duration runs from the peak to the recovery point
    (the first point at or above the peak's equity), or to the last point if `recovered` is
    False; `duration_periods` counts the periods (points after the peak) it spans.
    """

    depth: float
    peak_equity: Decimal
    trough_equity: Decimal
    peak_index: int
    trough_index: int
    end_index: int
    peak_ts_ns: int
    trough_ts_ns: int
    end_ts_ns: int
    recovered: bool

    @property
    def duration_ns(self) -> int:
        """Return the time from the peak to recovery (or to the end of the curve), in ns."""
        return self.end_ts_ns - self.peak_ts_ns

    @property
    def duration_periods(self) -> int:
        """Return the number of periods from the peak to recovery (or to the end of the curve)."""
        return self.end_index - self.peak_index


class _Episodes:
    """Drawdown episodes found point by point; keeps the deepest (the earliest of equal ones)."""

    def __init__(self) -> None:
        self.closed: list[Drawdown] | None = None  # every episode, when asked for them
        self.deepest: Drawdown | None = None
        self.peak_i = self.trough_i = self.last_i = 0
        self.peak_ts = self.trough_ts = self.last_ts = 0
        self.peak = self.trough = _ZERO
        self.in_drawdown = False

    def start(self, ts: int, equity: Decimal) -> None:
        self.peak_ts = self.trough_ts = self.last_ts = ts
        self.peak = self.trough = equity

    def _close(self, end_i: int, end_ts: int, recovered: bool) -> None:
        episode = Drawdown(
            depth=float((self.peak - self.trough) / self.peak),
            peak_equity=self.peak,
            trough_equity=self.trough,
            peak_index=self.peak_i,
            trough_index=self.trough_i,
            end_index=end_i,
            peak_ts_ns=self.peak_ts,
            trough_ts_ns=self.trough_ts,
            end_ts_ns=end_ts,
            recovered=recovered,
        )
        if self.closed is not None:
            self.closed.append(episode)
        if self.deepest is None or episode.depth > self.deepest.depth:
            self.deepest = episode

    def see(self, i: int, ts: int, equity: Decimal) -> None:
        if equity >= self.peak:
            if self.in_drawdown:
                self._close(i, ts, recovered=True)
                self.in_drawdown = False
            self.peak_i, self.peak_ts, self.peak = i, ts, equity
        elif not self.in_drawdown:
            self.in_drawdown = True
            self.trough_i, self.trough_ts, self.trough = i, ts, equity
        elif equity < self.trough:
            self.trough_i, self.trough_ts, self.trough = i, ts, equity
        self.last_i, self.last_ts = i, ts

    def finish(self) -> Drawdown | None:
        if self.in_drawdown:
            self._close(self.last_i, self.last_ts, recovered=False)
            self.in_drawdown = False
        return self.deepest


def _episodes(curve: EquityCurve, keep: bool) -> _Episodes:
    if not curve:
        return _Episodes()
    points: Iterator[EquityPoint] = iter(curve)
    ts, first = next(points)
    if first <= 0:
        raise ValueError(f"first equity {first} is not positive")
    episodes = _Episodes()
    if keep:
        episodes.closed = []
    episodes.start(ts, first)
    for i, (ts, equity) in enumerate(points, start=1):
        episodes.see(i, ts, equity)
    episodes.finish()
    return episodes


def drawdowns(curve: EquityCurve) -> list[Drawdown]:
    """Return every drawdown episode of the curve, in time order.

    Raises ValueError if the first equity is not positive (no drawdown fraction exists then).
    """
    return _episodes(curve, keep=True).closed or []


def max_drawdown(curve: EquityCurve) -> Drawdown | None:
    """Return the deepest drawdown episode (the earliest of equal ones), or None if none."""
    return _episodes(curve, keep=False).deepest


def longest_drawdown(curve: EquityCurve) -> Drawdown | None:
    """Return the longest drawdown episode in time (the earliest of equal ones), or None."""
    episodes = drawdowns(curve)
    if not episodes:
        return None
    return max(episodes, key=lambda d: d.duration_ns)


def calmar_ratio(curve: EquityCurve) -> float | None:
    """Return `CAGR / |max drawdown|`; None if CAGR is undefined; +/-inf with no drawdown."""
    growth = cagr(curve)
    if growth is None:
        return None
    deepest = max_drawdown(curve)
    return _ratio(growth, abs(deepest.depth) if deepest is not None else 0.0)


# --------------------------------------------------------------------------------------------
# Value at risk
# --------------------------------------------------------------------------------------------


def quantile(values: Floats, p: float) -> float:
    """Return the `p` quantile with linear interpolation between order statistics (type 7).

    The same as numpy's default `np.quantile`; ValueError for no values or p outside [0, 1].
    """
    if not len(values):
        raise ValueError("quantile of no values")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be within [0, 1], got {p}")
    # Stable, as `sorted` is: equal values (0.0 and -0.0) keep their order.
    ordered = np.sort(_floats(values), kind="stable")
    h = (len(ordered) - 1) * p
    lo = math.floor(h)
    low = float(ordered[lo])
    if lo + 1 >= len(ordered):
        return low
    return low + (h - lo) * (float(ordered[lo + 1]) - low)


def historical_var(returns: Floats, confidence: float = DEFAULT_CONFIDENCE) -> float | None:
    """Return the historical VaR: minus the `1 - confidence` quantile; None for no returns."""
    _check_confidence(confidence)
    if not len(returns):
        return None
    return -quantile(returns, 1.0 - confidence)


def historical_cvar(returns: Floats, confidence: float = DEFAULT_CONFIDENCE) -> float | None:
    """Return the historical CVaR (expected shortfall): minus the mean of the returns at or
    below the `1 - confidence` quantile; None for no returns."""
    _check_confidence(confidence)
    if not len(returns):
        return None
    values = _floats(returns)
    cutoff = quantile(values, 1.0 - confidence)
    # Never empty: the smallest value is always at or below a type-7 quantile.
    return -_mean(values[values <= cutoff])


def parametric_var(returns: Floats, confidence: float = DEFAULT_CONFIDENCE) -> float | None:
    """Return the Gaussian VaR `z_c * stdev - mean`; None for fewer than two returns."""
    _check_confidence(confidence)
    if len(returns) < 2:
        return None
    values = _floats(returns)
    z = NormalDist().inv_cdf(confidence)
    return z * _stdev(values) - _mean(values)


def parametric_cvar(returns: Floats, confidence: float = DEFAULT_CONFIDENCE) -> float | None:
    """Return the Gaussian CVaR `stdev * pdf(z_c) / (1 - c) - mean`; None for < 2 returns."""
    _check_confidence(confidence)
    if len(returns) < 2:
        return None
    values = _floats(returns)
    normal = NormalDist()
    z = normal.inv_cdf(confidence)
    return _stdev(values) * normal.pdf(z) / (1.0 - confidence) - _mean(values)


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoundTrip:
    """One position opened and closed: its side, size, entry and exit, and the fees it paid.

    Prices, quantity and fees are in the instrument's quote currency; `fees` are the total of
    entry and exit fees charged to this trip.
    """

    side: PositionSide
    quantity: Decimal
    entry_price: Decimal
    exit_price: Decimal
    entry_ts_ns: int
    exit_ts_ns: int
    fees: Decimal = _ZERO
    instrument_id: str = ""

    def __post_init__(self) -> None:
        if self.side is PositionSide.FLAT:
            raise ValueError("a round trip is LONG or SHORT, not FLAT")
        if self.quantity <= 0 or self.entry_price <= 0 or self.exit_price <= 0:
            raise ValueError("a round trip needs a positive quantity, entry and exit price")
        if self.exit_ts_ns < self.entry_ts_ns:
            raise ValueError("a round trip cannot exit before it enters")

    @property
    def gross_pnl(self) -> Decimal:
        """Return the P&L before fees: (exit - entry) x quantity, negated for a short."""
        move = self.exit_price - self.entry_price
        return (move if self.side is PositionSide.LONG else -move) * self.quantity

    @property
    def pnl(self) -> Decimal:
        """Return the P&L net of fees."""
        return self.gross_pnl - self.fees

    @property
    def duration_ns(self) -> int:
        """Return the time the position was open, in ns."""
        return self.exit_ts_ns - self.entry_ts_ns


@dataclass(frozen=True, slots=True)
class TradeStats:
    """Figures over a list of round trips (money in Decimal, ratios in float)."""

    trades: int
    wins: int
    losses: int
    gross_profit: Decimal
    gross_loss: Decimal
    net_pnl: Decimal
    win_rate: float | None
    profit_factor: float | None
    expectancy: Decimal | None
    average_win: Decimal | None
    average_loss: Decimal | None


def trade_stats(trips: Iterable[RoundTrip]) -> TradeStats:
    """Return win rate, profit factor, expectancy and average win/loss of `trips` (net of fees).

    `gross_loss` and `average_loss` are negative (or zero). With no trips the rates are None;
    the profit factor is +inf with wins and no loss, None with neither.
    """
    trades = wins = losses = 0
    gross_profit = gross_loss = _ZERO
    for trip in trips:
        pnl = trip.pnl
        trades += 1
        if pnl > 0:
            wins += 1
            gross_profit += pnl
        elif pnl < 0:
            losses += 1
            gross_loss += pnl
    net = gross_profit + gross_loss
    return TradeStats(
        trades=trades,
        wins=wins,
        losses=losses,
        gross_profit=gross_profit,
        gross_loss=gross_loss,
        net_pnl=net,
        win_rate=wins / trades if trades else None,
        profit_factor=_ratio(float(gross_profit), float(-gross_loss)) if trades else None,
        expectancy=net / trades if trades else None,
        average_win=gross_profit / wins if wins else None,
        average_loss=gross_loss / losses if losses else None,
    )


@dataclass(frozen=True, slots=True)
class Excursion:
    """Maximum adverse and favourable excursion of a trade, per unit of quantity, >= 0."""

    mae: Decimal
    mfe: Decimal
    entry_price: Decimal

    @property
    def mae_fraction(self) -> float:
        """Return MAE as a fraction of the entry price."""
        return float(self.mae / self.entry_price)

    @property
    def mfe_fraction(self) -> float:
        """Return MFE as a fraction of the entry price."""
        return float(self.mfe / self.entry_price)


def excursion(side: PositionSide, entry_price: Decimal, prices: Iterable[Decimal]) -> Excursion:
    """Return the MAE and MFE of a position entered at `entry_price`, over `prices`.

    `prices` is the path while the trade was open (for bars, pass each bar's low and high).
    A long's adverse move is down, a short's up; a path that never moves against (or for) the
    trade gives 0. Multiply by the quantity for an amount in the quote currency.
    """
    if side is PositionSide.FLAT:
        raise ValueError("an excursion needs a LONG or SHORT side")
    low = high = entry_price
    for price in prices:
        if price < low:
            low = price
        elif price > high:
            high = price
    down, up = entry_price - low, high - entry_price
    if side is PositionSide.LONG:
        return Excursion(mae=down, mfe=up, entry_price=entry_price)
    return Excursion(mae=up, mfe=down, entry_price=entry_price)


def trip_excursion(trip: RoundTrip, prices: Iterable[Decimal]) -> Excursion:
    """Return the MAE and MFE of a round trip over the price path while it was open."""
    return excursion(trip.side, trip.entry_price, prices)


# --------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PerformanceSummary:
    """Every figure of a run: from its equity curve and its round trips."""

    points: int
    start_equity: Decimal | None
    final_equity: Decimal | None
    periods_per_year: float
    total_return: float | None
    cagr: float | None
    volatility: float | None
    sharpe: float | None
    sortino: float | None
    calmar: float | None
    omega: float | None
    max_drawdown: float
    max_drawdown_duration_ns: int
    max_drawdown_duration_periods: int
    historical_var: float | None
    historical_cvar: float | None
    parametric_var: float | None
    trades: TradeStats


def summarize(
    curve: EquityCurve,
    trips: Iterable[RoundTrip] = (),
    *,
    risk_free: float = 0.0,
    periods_per_year: float | Literal["infer"] = DEFAULT_PERIODS_PER_YEAR,
    confidence: float = DEFAULT_CONFIDENCE,
) -> PerformanceSummary:
    """Return every figure of an equity curve and its round trips.

    `periods_per_year="infer"` uses `infer_periods_per_year` (falling back to 252 when the
    curve spans no time). The drawdown duration is that of the deepest drawdown.

    The curve is read once, in order (plus its first and last points): the returns are one
    float64 array, the drawdowns are followed as the points go by.
    """
    ppy: float
    if periods_per_year == "infer":
        ppy = infer_periods_per_year(curve) or DEFAULT_PERIODS_PER_YEAR
    else:
        ppy = float(periods_per_year)
    returns, deepest = _walk(curve)
    if curve and curve[0][1] <= 0:  # one point (more would have failed in _walk)
        raise ValueError(f"first equity {curve[0][1]} is not positive")
    growth = cagr(curve)
    depth = deepest.depth if deepest is not None else 0.0
    return PerformanceSummary(
        points=len(curve),
        start_equity=curve[0][1] if curve else None,
        final_equity=curve[-1][1] if curve else None,
        periods_per_year=ppy,
        total_return=total_return(curve),
        cagr=growth,
        volatility=annualized_volatility(returns, ppy),
        sharpe=sharpe_ratio(returns, risk_free=risk_free, periods_per_year=ppy),
        sortino=sortino_ratio(returns, risk_free=risk_free, periods_per_year=ppy),
        calmar=_ratio(growth, abs(depth)) if growth is not None else None,  # = calmar_ratio
        omega=omega_ratio(returns),
        max_drawdown=depth,
        max_drawdown_duration_ns=deepest.duration_ns if deepest is not None else 0,
        max_drawdown_duration_periods=deepest.duration_periods if deepest is not None else 0,
        historical_var=historical_var(returns, confidence),
        historical_cvar=historical_cvar(returns, confidence),
        parametric_var=parametric_var(returns, confidence),
        trades=trade_stats(trips),
    )
