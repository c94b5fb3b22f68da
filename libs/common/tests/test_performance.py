"""Performance figures against values worked out by hand on tiny series (never the code's own)."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence
from decimal import Decimal
from statistics import NormalDist
from typing import Any

import numpy as np
import pytest

from quantmesh_common import performance as perf
from quantmesh_common.messages import PositionSide

D = Decimal
Y = perf.NS_PER_YEAR
T0 = 1_700_000_000_000_000_000

# The reference series: equity 100, 110, 99, 120 at a third of a year apart (one year in all).
#   returns  r1 = 110/100 - 1 = 1/10,  r2 = 99/110 - 1 = -1/10,  r3 = 120/99 - 1 = 7/33
#   mean     (1/10 - 1/10 + 7/33) / 3 = 7/99
#   in 990ths: r = 99, -99, 210 and mean = 70, so deviations are 29, -169, 140
#   squares  841 + 28561 + 19600 = 49002;  sample variance = 49002 / 990^2 / 2 = 24501 / 980100
#   stdev    sqrt(24501) / 990  (about 0.158109)
CURVE = [(T0, D(100)), (T0 + Y // 3, D(110)), (T0 + 2 * Y // 3, D(99)), (T0 + Y, D(120))]
MEAN = 7 / 99
STDEV = math.sqrt(24501) / 990
# z of the 95 % one-sided normal quantile, from the tables.
Z95 = 1.6448536269514722


def _curve(*values: int, step: int = 86_400 * 10**9) -> list[tuple[int, Decimal]]:
    return [(T0 + i * step, D(v)) for i, v in enumerate(values)]


# -- returns and growth ----------------------------------------------------------------------


def test_period_returns_when_reference_curve_are_simple_returns() -> None:
    returns = perf.period_returns(CURVE)

    assert returns == pytest.approx([0.1, -0.1, 7 / 33], rel=1e-12)


def test_total_return_when_100_to_120_is_20_percent() -> None:
    assert perf.total_return(CURVE) == pytest.approx(0.2, rel=1e-12)


def test_cagr_when_curve_spans_one_year_equals_total_return() -> None:
    assert perf.cagr(CURVE) == pytest.approx(0.2, rel=1e-12)


def test_cagr_when_curve_spans_two_years_is_the_square_root_of_growth() -> None:
    curve = [(T0, D(100)), (T0 + 2 * Y, D(121))]

    # 1.21 ** (1/2) - 1 = 1.1 - 1
    assert perf.cagr(curve) == pytest.approx(0.1, rel=1e-12)


def test_cagr_when_everything_is_lost_is_minus_one() -> None:
    assert perf.cagr([(T0, D(100)), (T0 + Y, D(0))]) == -1.0


def test_infer_periods_per_year_when_three_periods_in_one_year_is_three() -> None:
    assert perf.infer_periods_per_year(CURVE) == pytest.approx(3.0, rel=1e-12)


def test_infer_periods_per_year_when_daily_points_is_365_25() -> None:
    # 366 daily points = 365 periods over 365 days = 365 / (365 / 365.25) periods a year
    curve = _curve(*([100] * 366))

    assert perf.infer_periods_per_year(curve) == pytest.approx(365.25, rel=1e-12)


def test_period_returns_when_equity_not_positive_raises() -> None:
    with pytest.raises(ValueError, match="not positive"):
        perf.period_returns(_curve(100, 0, 50))


def test_period_returns_when_time_goes_back_raises() -> None:
    with pytest.raises(ValueError, match="back in time"):
        perf.period_returns([(T0, D(100)), (T0 - 1, D(101))])


# -- ratios ----------------------------------------------------------------------------------


def test_annualized_volatility_when_reference_curve_is_stdev_times_root_252() -> None:
    returns = perf.period_returns(CURVE)

    assert perf.annualized_volatility(returns) == pytest.approx(STDEV * math.sqrt(252), rel=1e-9)


def test_sharpe_when_reference_curve_and_252_periods_is_about_7_10() -> None:
    returns = perf.period_returns(CURVE)

    # (7/99) / (sqrt(24501)/990) * sqrt(252) = 70 * sqrt(252 / 24501) ≈ 7.0992
    assert perf.sharpe_ratio(returns) == pytest.approx(70 * math.sqrt(252 / 24501), rel=1e-9)
    assert perf.sharpe_ratio(returns) == pytest.approx(7.0992, abs=1e-4)


def test_sharpe_when_risk_free_rate_given_subtracts_it_per_period() -> None:
    returns = perf.period_returns(CURVE)

    # rf 0.0252 a year over 252 periods = 0.0001 a period
    expected = (MEAN - 0.0001) / STDEV * math.sqrt(252)
    assert perf.sharpe_ratio(returns, risk_free=0.0252) == pytest.approx(expected, rel=1e-9)


def test_sharpe_when_periods_per_year_is_three_scales_by_root_three() -> None:
    returns = perf.period_returns(CURVE)

    assert perf.sharpe_ratio(returns, periods_per_year=3) == pytest.approx(
        MEAN / STDEV * math.sqrt(3), rel=1e-9
    )


def test_sortino_when_reference_curve_uses_downside_over_all_periods() -> None:
    returns = perf.period_returns(CURVE)

    # min(r, 0) = 0, -1/10, 0 -> mean of squares (1/100)/3 = 1/300 -> DD = sqrt(1/300)
    # Sortino = (7/99) / sqrt(1/300) * sqrt(252) = (7/99) * sqrt(75600) ≈ 19.4412
    assert perf.downside_deviation(returns) == pytest.approx(math.sqrt(1 / 300), rel=1e-9)
    assert perf.sortino_ratio(returns) == pytest.approx(7 / 99 * math.sqrt(75600), rel=1e-9)
    assert perf.sortino_ratio(returns) == pytest.approx(19.4412, abs=1e-4)


def test_omega_when_reference_curve_is_gains_over_losses() -> None:
    returns = perf.period_returns(CURVE)

    # (1/10 + 7/33) / (1/10) = 1 + 70/33 = 103/33
    assert perf.omega_ratio(returns) == pytest.approx(103 / 33, rel=1e-9)


def test_calmar_when_reference_curve_is_cagr_over_drawdown() -> None:
    # CAGR 0.2 over one year; max drawdown (110 - 99) / 110 = 0.1
    assert perf.calmar_ratio(CURVE) == pytest.approx(2.0, rel=1e-9)


# -- edge cases ------------------------------------------------------------------------------


@pytest.mark.parametrize("curve", [[], [(T0, D(100))]])
def test_figures_when_fewer_than_two_points_are_none(curve: list[tuple[int, Decimal]]) -> None:
    returns = perf.period_returns(curve)

    assert returns == []
    assert perf.total_return(curve) is None
    assert perf.cagr(curve) is None
    assert perf.calmar_ratio(curve) is None
    assert perf.sharpe_ratio(returns) is None
    assert perf.sortino_ratio(returns) is None
    assert perf.omega_ratio(returns) is None
    assert perf.annualized_volatility(returns) is None
    assert perf.historical_var(returns) is None
    assert perf.parametric_var(returns) is None
    assert perf.max_drawdown(curve) is None


def test_summarize_when_curve_is_empty_gives_no_figures() -> None:
    summary = perf.summarize([])

    assert summary.points == 0
    assert summary.final_equity is None
    assert summary.sharpe is None
    assert summary.max_drawdown == 0.0
    assert summary.trades.trades == 0


def test_sharpe_when_returns_are_constant_and_positive_is_infinite() -> None:
    # 100 -> 110 -> 121: two returns of exactly 10 %, zero volatility
    returns = perf.period_returns(_curve(100, 110, 121))

    assert perf.annualized_volatility(returns) == 0.0
    assert perf.sharpe_ratio(returns) == math.inf


def test_ratios_when_equity_is_flat_are_none() -> None:
    returns = perf.period_returns(_curve(100, 100, 100))

    assert perf.sharpe_ratio(returns) is None
    assert perf.sortino_ratio(returns) is None
    assert perf.omega_ratio(returns) is None


def test_omega_and_sortino_when_no_losing_period_are_infinite() -> None:
    returns = perf.period_returns(_curve(100, 110, 115))

    assert perf.omega_ratio(returns) == math.inf
    assert perf.sortino_ratio(returns) == math.inf


def test_calmar_when_curve_never_draws_down_is_infinite() -> None:
    curve = [(T0, D(100)), (T0 + Y, D(110))]

    assert perf.max_drawdown(curve) is None
    assert perf.calmar_ratio(curve) == math.inf


# -- drawdowns -------------------------------------------------------------------------------


def test_max_drawdown_when_reference_curve_recovers_after_two_periods() -> None:
    deepest = perf.max_drawdown(CURVE)

    assert deepest is not None
    assert deepest.depth == pytest.approx(0.1, rel=1e-12)  # (110 - 99) / 110
    assert (deepest.peak_index, deepest.trough_index, deepest.end_index) == (1, 2, 3)
    assert deepest.recovered
    assert deepest.duration_periods == 2
    assert deepest.duration_ns == Y - Y // 3  # from the peak at Y/3 to the recovery at Y


def test_max_drawdown_when_unrecovered_runs_to_the_end() -> None:
    curve = _curve(100, 120, 90, 100)

    deepest = perf.max_drawdown(curve)

    assert deepest is not None
    assert deepest.depth == pytest.approx(0.25, rel=1e-12)  # (120 - 90) / 120
    assert not deepest.recovered
    assert deepest.duration_periods == 2  # peak at 1, end of data at 3
    assert deepest.duration_ns == 2 * 86_400 * 10**9


def test_drawdowns_when_two_episodes_picks_the_deepest_and_the_longest() -> None:
    # episode A: 100 -> 90 -> 100 (10 %, over 10 days)
    # episode B: 150 -> 120 -> 160 (20 %, over 2 days)
    day = 86_400 * 10**9
    days = [0, 1, 10, 11, 12, 13]
    curve = [(T0 + d * day, D(v)) for d, v in zip(days, [100, 90, 100, 150, 120, 160], strict=True)]

    episodes = perf.drawdowns(curve)
    deepest = perf.max_drawdown(curve)
    longest = perf.longest_drawdown(curve)

    assert [e.depth for e in episodes] == pytest.approx([0.1, 0.2], rel=1e-12)
    assert deepest is not None
    assert deepest.peak_index == 3
    assert deepest.duration_ns == 2 * day
    assert longest is not None
    assert longest.peak_index == 0
    assert longest.duration_ns == 10 * day


# -- value at risk ---------------------------------------------------------------------------


def test_quantile_when_between_order_statistics_interpolates_linearly() -> None:
    # h = (4 - 1) * 0.5 = 1.5 -> 2 + 0.5 * (3 - 2)
    assert perf.quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5


def test_historical_var_and_cvar_when_reference_curve() -> None:
    returns = perf.period_returns(CURVE)

    # sorted -1/10, 1/10, 7/33; h = 2 * 0.05 = 0.1 -> q = -0.1 + 0.1 * (0.1 - -0.1) = -0.08
    # VaR = 0.08; the tail at or below -0.08 is {-0.1} -> CVaR = 0.1
    assert perf.historical_var(returns, 0.95) == pytest.approx(0.08, rel=1e-9)
    assert perf.historical_cvar(returns, 0.95) == pytest.approx(0.1, rel=1e-9)


def test_parametric_var_and_cvar_when_reference_curve() -> None:
    returns = perf.period_returns(CURVE)

    # VaR = z * sigma - mu ≈ 1.64485 * 0.158109 - 0.070707 ≈ 0.18936
    # CVaR = sigma * phi(z) / 0.05 - mu, phi(z) = exp(-z^2/2) / sqrt(2 pi) ≈ 0.103136
    phi = math.exp(-(Z95**2) / 2) / math.sqrt(2 * math.pi)
    assert perf.parametric_var(returns, 0.95) == pytest.approx(Z95 * STDEV - MEAN, rel=1e-9)
    assert perf.parametric_var(returns, 0.95) == pytest.approx(0.18936, abs=1e-5)
    assert perf.parametric_cvar(returns, 0.95) == pytest.approx(STDEV * phi / 0.05 - MEAN, rel=1e-9)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5])
def test_var_when_confidence_outside_zero_one_raises(confidence: float) -> None:
    with pytest.raises(ValueError, match="confidence"):
        perf.historical_var([0.1, -0.1], confidence)


# -- round trips -----------------------------------------------------------------------------


def _trip(side: PositionSide, qty: str, entry: str, exit_: str, fees: str = "0") -> perf.RoundTrip:
    return perf.RoundTrip(side, D(qty), D(entry), D(exit_), T0, T0 + 1, D(fees))


def test_trade_stats_when_wins_losses_and_a_scratch_trade() -> None:
    trips = [
        _trip(PositionSide.LONG, "1", "100", "110", fees="1"),  # +10 - 1 = 9
        _trip(PositionSide.SHORT, "2", "50", "55"),  # -(55 - 50) * 2 = -10
        _trip(PositionSide.LONG, "1", "10", "30", fees="0.5"),  # +20 - 0.5 = 19.5
        _trip(PositionSide.LONG, "1", "10", "10"),  # 0: neither win nor loss
    ]

    stats = perf.trade_stats(trips)

    assert (stats.trades, stats.wins, stats.losses) == (4, 2, 1)
    assert stats.gross_profit == D("28.5")
    assert stats.gross_loss == D("-10")
    assert stats.net_pnl == D("18.5")
    assert stats.win_rate == 0.5
    assert stats.profit_factor == pytest.approx(2.85, rel=1e-12)  # 28.5 / 10
    assert stats.expectancy == D("4.625")  # 18.5 / 4
    assert stats.average_win == D("14.25")  # 28.5 / 2
    assert stats.average_loss == D("-10")


def test_trade_stats_when_no_losing_trade_profit_factor_is_infinite() -> None:
    stats = perf.trade_stats([_trip(PositionSide.LONG, "1", "100", "101")])

    assert stats.profit_factor == math.inf
    assert stats.average_loss is None


def test_trade_stats_when_no_trades_rates_are_none() -> None:
    stats = perf.trade_stats([])

    assert stats.win_rate is None
    assert stats.profit_factor is None
    assert stats.expectancy is None


def test_round_trip_when_flat_side_is_refused() -> None:
    with pytest.raises(ValueError, match="LONG or SHORT"):
        _trip(PositionSide.FLAT, "1", "100", "101")


def test_excursion_when_long_and_path_dips_and_rises() -> None:
    # entry 100: lowest 98 (2 against), highest 105 (5 for)
    exc = perf.excursion(PositionSide.LONG, D(100), [D(98), D(105), D(101)])

    assert (exc.mae, exc.mfe) == (D(2), D(5))
    assert exc.mae_fraction == pytest.approx(0.02, rel=1e-12)


def test_excursion_when_short_swaps_adverse_and_favourable() -> None:
    exc = perf.trip_excursion(_trip(PositionSide.SHORT, "1", "100", "101"), [D(98), D(105), D(101)])

    assert (exc.mae, exc.mfe) == (D(5), D(2))


def test_excursion_when_path_never_goes_against_mae_is_zero() -> None:
    exc = perf.excursion(PositionSide.LONG, D(100), [D(101), D(103)])

    assert (exc.mae, exc.mfe) == (D(0), D(3))


# -- summary ---------------------------------------------------------------------------------


def test_summarize_when_periods_inferred_uses_three_a_year() -> None:
    summary = perf.summarize(CURVE, periods_per_year="infer")

    assert summary.periods_per_year == pytest.approx(3.0, rel=1e-12)
    assert summary.sharpe == pytest.approx(MEAN / STDEV * math.sqrt(3), rel=1e-9)
    assert summary.max_drawdown == pytest.approx(0.1, rel=1e-12)
    assert summary.max_drawdown_duration_periods == 2
    assert summary.calmar == pytest.approx(2.0, rel=1e-9)
    assert summary.final_equity == D(120)


class _OncePerPoint(Sequence[tuple[int, Decimal]]):
    """A curve that counts its reads: iteration, and indexing other than the ends."""

    def __init__(self, points: list[tuple[int, Decimal]]) -> None:
        self.points = points
        self.passes = 0
        self.inner_reads = 0

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: Any) -> Any:
        if i not in (0, -1, len(self.points) - 1):
            self.inner_reads += 1
        return self.points[i]

    def __iter__(self) -> Iterator[tuple[int, Decimal]]:
        self.passes += 1
        return iter(self.points)


def _random_curve(seed: int, count: int) -> list[tuple[int, Decimal]]:
    # Flat stretches (zero returns), drawdowns that recover and one that does not.
    rng = random.Random(seed)
    equity, points = D(100), []
    for i in range(count):
        points.append((T0 + i * 60 * 10**9, equity))
        if rng.random() < 0.7:
            move = D(str(math.exp(rng.gauss(0.0, 0.01))))
            equity = (equity * move).quantize(D("0.00000001"))
    return points


def _list_figures(curve: list[tuple[int, Decimal]]) -> dict[str, float]:
    """The definitions over plain lists of Python floats, as the module computed them before
    it took arrays (Decimal drawdowns, fsum sums, a sorted list for the quantile)."""
    values = [float(e) for _, e in curve]
    r = [b / a - 1.0 for a, b in itertools.pairwise(values)]
    mean = math.fsum(r) / len(r)
    stdev = math.sqrt(math.fsum([(v - mean) * (v - mean) for v in r]) / (len(r) - 1))
    downside = math.sqrt(math.fsum([v * v for v in r if v < 0.0]) / len(r))
    ordered = sorted(r)
    h = (len(r) - 1) * (1.0 - 0.95)
    lo = math.floor(h)
    cutoff = ordered[lo] + (h - lo) * (ordered[lo + 1] - ordered[lo])
    tail = [v for v in r if v <= cutoff]
    peak, depth = curve[0][1], 0.0
    for _, e in curve:
        peak = max(peak, e)
        depth = max(depth, float((peak - e) / peak))
    return {
        "volatility": stdev * math.sqrt(252),
        "sharpe": mean / stdev * math.sqrt(252),
        "sortino": mean / downside * math.sqrt(252),
        "omega": math.fsum([v for v in r if v > 0]) / math.fsum([-v for v in r if v < 0]),
        "historical_var": -cutoff,
        "historical_cvar": -(math.fsum(tail) / len(tail)),
        "parametric_var": NormalDist().inv_cdf(0.95) * stdev - mean,
        "max_drawdown": depth,
    }


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_summarize_when_long_curve_equals_the_list_definitions_exactly(seed: int) -> None:
    # Arrange: 20,000 one-minute points.
    curve = _random_curve(seed, 20_000)
    expected = _list_figures(curve)

    # Act
    summary = perf.summarize(curve)

    # Assert: equal to the last bit, and Python floats (they are written to JSON and HTML).
    got = {name: getattr(summary, name) for name in expected}
    assert got == expected
    assert all(type(value) is float for value in got.values())
    assert summary.max_drawdown > 0.05


def test_summarize_when_given_a_sequence_reads_it_once_in_order() -> None:
    # Arrange
    curve = _OncePerPoint(_random_curve(4, 5_000))

    # Act
    summary = perf.summarize(curve, periods_per_year="infer")

    # Assert: one pass, and only the first and last points read by index.
    assert (curve.passes, curve.inner_reads) == (1, 0)
    assert summary.points == 5_000
    assert summary.final_equity == curve.points[-1][1]


def test_period_returns_and_ratios_when_list_or_array_give_the_same_floats() -> None:
    # Arrange
    returns = perf.period_returns(_random_curve(5, 2_000))
    array = np.asarray(returns, dtype=np.float64)

    # Act
    from_list = [f(returns) for f in (perf.sharpe_ratio, perf.sortino_ratio, perf.omega_ratio)]
    from_array = [f(array) for f in (perf.sharpe_ratio, perf.sortino_ratio, perf.omega_ratio)]

    # Assert
    assert all(type(r) is float for r in returns)
    assert from_list == from_array
    assert perf.historical_var(returns) == perf.historical_var(array)
