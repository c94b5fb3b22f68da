"""Columnar indicators and strategies: equal to their incremental, per-bar versions."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantmesh_signals.columnar import (
    BarSeries,
    Decisions,
    columnar_form,
    decisions_by_bar,
    regime_changes,
)
from quantmesh_signals.indicators import RSI, SMA, rsi_batch, sma_batch
from quantmesh_signals.strategies.bollinger_breakout import BollingerBreakout
from quantmesh_signals.strategies.rsi_reversion import RsiReversion
from quantmesh_signals.strategies.sma_cross import SmaCross

MINUTE = 60_000_000_000


def _incremental(indicator: SMA | RSI, values: list[float]) -> list[float | None]:
    return [indicator.update(v) for v in values]


def _as_list(batch: npt.NDArray[np.float64]) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in batch]


def _walk(n: int, seed: int, cents: bool = True) -> list[float]:
    rng = np.random.default_rng(seed)
    path = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.002, n)))
    return [float(v) for v in (np.round(path, 2) if cents else path)]


def _series(closes: list[float]) -> BarSeries:
    c = np.asarray(closes, dtype=np.float64)
    return BarSeries(
        instrument_id="ASSET-USD.SIM",
        ts_close=(np.arange(1, len(c) + 1, dtype=np.int64) * MINUTE),
        open=c,
        high=c,
        low=c,
        close=c,
        volume=np.ones(len(c)),
    )


def _same(a: Decisions, b: Decisions) -> bool:
    return (
        a.index.tolist() == b.index.tolist()
        and a.target == b.target
        and a.reason == b.reason
        and (len(a) == 0 or a.tag == b.tag)
    )


EDGE_SERIES = {
    "empty": [],
    "shorter than the window": [1.0, 2.0, 3.0],
    "exactly the window": [float(v) for v in range(1, 21)],
    "constant": [100.0] * 60,
    "saw-tooth with exact ties": [100.0, 100.1, 100.2, 100.1] * 30,
    "large prices": [50_000.0 + (i % 7) * 0.01 for i in range(200)],
}


@pytest.mark.parametrize("period", [1, 2, 3, 10, 20, 57])
@pytest.mark.parametrize("seed", [1, 2])
def test_sma_batch_when_random_walk_equals_incremental_bit_for_bit(period: int, seed: int) -> None:
    # Arrange
    values = _walk(3_000, seed, cents=seed == 1)
    # Act
    batch = sma_batch(values, period)
    # Assert
    assert _as_list(batch) == _incremental(SMA(period), values)


@pytest.mark.parametrize("name", sorted(EDGE_SERIES))
@pytest.mark.parametrize("period", [1, 3, 20])
def test_sma_batch_when_edge_series_equals_incremental(name: str, period: int) -> None:
    values = EDGE_SERIES[name]
    assert _as_list(sma_batch(values, period)) == _incremental(SMA(period), values)


@pytest.mark.parametrize("period", [1, 2, 14, 30])
@pytest.mark.parametrize("seed", [3, 4])
def test_rsi_batch_when_random_walk_equals_incremental_bit_for_bit(period: int, seed: int) -> None:
    values = _walk(3_000, seed, cents=seed == 3)
    assert _as_list(rsi_batch(values, period)) == _incremental(RSI(period), values)


@pytest.mark.parametrize("name", sorted(EDGE_SERIES))
@pytest.mark.parametrize("period", [1, 14])
def test_rsi_batch_when_edge_series_equals_incremental(name: str, period: int) -> None:
    values = EDGE_SERIES[name]
    assert _as_list(rsi_batch(values, period)) == _incremental(RSI(period), values)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), max_size=80),
    period=st.integers(min_value=1, max_value=25),
)
def test_batches_when_arbitrary_floats_equal_incremental(values: list[float], period: int) -> None:
    assert _as_list(sma_batch(values, period)) == _incremental(SMA(period), values)
    assert _as_list(rsi_batch(values, period)) == _incremental(RSI(period), values)


def test_sma_batch_when_period_is_zero_raises() -> None:
    with pytest.raises(ValueError, match="period"):
        sma_batch([1.0, 2.0], 0)


def test_regime_changes_when_ties_and_warm_up_keeps_previous_regime() -> None:
    # Arrange: NaN (warm-up), first sign sets the regime, zero keeps it, then two changes.
    diff = np.array([np.nan, np.nan, 1.0, 0.0, 2.0, -1.0, 0.0, -3.0, 0.5])
    # Act
    index, signs = regime_changes(diff)
    # Assert
    assert index.tolist() == [5, 8]
    assert signs.tolist() == [-1, 1]


STRATEGY_CASES: list[tuple[type[Any], dict[str, Any]]] = [
    (SmaCross, {"fast": 10, "slow": 20, "allow_short": True}),
    (SmaCross, {"fast": 2, "slow": 3}),
    (SmaCross, {"fast": 1, "slow": 2, "quantity": "0.5"}),
    (RsiReversion, {}),
    (RsiReversion, {"period": 3, "oversold": 40, "overbought": 60, "allow_short": True}),
    (RsiReversion, {"period": 1, "oversold": 10, "overbought": 90}),
]


@pytest.mark.parametrize(("cls", "params"), STRATEGY_CASES)
@pytest.mark.parametrize("seed", [11, 12])
def test_decide_when_random_walk_equals_on_bar(
    cls: type[Any], params: dict[str, Any], seed: int
) -> None:
    # Arrange
    series = _series(_walk(4_000, seed, cents=seed == 11))
    # Act
    columnar = cls(params).decide(series)
    by_bar = decisions_by_bar(cls(params), series)
    # Assert: something happened, and exactly the same things.
    assert len(by_bar) > 10
    assert _same(columnar, by_bar)


@pytest.mark.parametrize(("cls", "params"), STRATEGY_CASES)
@pytest.mark.parametrize("name", sorted(EDGE_SERIES))
def test_decide_when_edge_series_equals_on_bar(
    cls: type[Any], params: dict[str, Any], name: str
) -> None:
    series = _series(EDGE_SERIES[name])
    assert _same(cls(params).decide(series), decisions_by_bar(cls(params), series))


def test_sma_cross_decide_when_hand_made_cross_gives_its_bars_and_targets() -> None:
    # Arrange: fast 1 vs slow 2 is the sign of close - previous close; flat steps keep it.
    series = _series([10.0, 11.0, 12.0, 12.0, 11.0, 11.0, 13.0])
    # Act
    decisions = SmaCross({"fast": 1, "slow": 2, "allow_short": True}).decide(series)
    # Assert: up regime set at bar 1, down at bar 4, up again at bar 6.
    assert decisions.index.tolist() == [4, 6]
    assert decisions.target == [Decimal(-1), Decimal(1)]
    assert decisions.reason == ["fast SMA crossed below slow", "fast SMA crossed above slow"]


def test_columnar_form_when_strategy_has_none_is_none() -> None:
    assert columnar_form(BollingerBreakout({})) is None
    assert columnar_form(SmaCross({})) is not None
    assert columnar_form(SmaCross({}), instruments=2) is None


def _prefix(series: BarSeries, k: int) -> BarSeries:
    return BarSeries(
        series.instrument_id,
        series.ts_close[:k],
        series.open[:k],
        series.high[:k],
        series.low[:k],
        series.close[:k],
        series.volume[:k],
    )


@pytest.mark.parametrize(("cls", "params"), STRATEGY_CASES)
def test_decide_when_series_is_cut_short_keeps_the_earlier_decisions(
    cls: type[Any], params: dict[str, Any]
) -> None:
    # Arrange: no look-ahead means a decision on bar i depends on bars 0..i only, so cutting
    # the series after bar k leaves every decision up to k as it was.
    series = _series(_walk(1_500, seed=21))
    full = cls(params).decide(series)
    for k in (1, 25, 400, 999, 1_499):
        # Act
        cut = cls(params).decide(_prefix(series, k))
        # Assert
        keep = full.index < k
        assert cut.index.tolist() == full.index[keep].tolist()
        assert cut.target == [t for t, kept in zip(full.target, keep, strict=True) if kept]
