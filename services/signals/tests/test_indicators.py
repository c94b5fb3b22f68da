"""Incremental indicators against plain batch reference computations over seeded prices."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from decimal import Decimal

import pytest

from quantmesh_signals.indicators import (
    ATR,
    EMA,
    MACD,
    RSI,
    SMA,
    VWAP,
    WMA,
    Bollinger,
    RollingCorrelation,
    RollingStd,
)

N = 400
REL = 1e-9


def _prices(seed: int = 7, n: int = N, start: float = 50_000.0) -> list[float]:
    rng = random.Random(seed)
    out, price = [], start
    for _ in range(n):
        price *= math.exp(rng.gauss(0.0, 0.01))
        out.append(round(price, 2))
    return out


def _bars(seed: int = 11, n: int = N) -> list[tuple[float, float, float]]:
    rng = random.Random(seed)
    bars = []
    for close in _prices(seed, n):
        high = close * (1 + rng.random() * 0.01)
        low = close * (1 - rng.random() * 0.01)
        bars.append((high, low, close))
    return bars


def _close(a: float | None, b: float | None) -> bool:
    assert a is not None
    assert b is not None
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-9)


# -- batch references: whole-window recomputation with plain lists ------------------------


def ref_sma(xs: list[float], n: int) -> list[float | None]:
    return [None if i + 1 < n else sum(xs[i + 1 - n : i + 1]) / n for i in range(len(xs))]


def ref_ema(xs: list[float], n: int) -> list[float | None]:
    out: list[float | None] = []
    alpha, value = 2 / (n + 1), None
    for i, x in enumerate(xs):
        if i + 1 < n:
            out.append(None)
            continue
        value = sum(xs[:n]) / n if i + 1 == n else value + alpha * (x - value)  # type: ignore[operator]
        out.append(value)
    return out


def ref_wma(xs: list[float], n: int) -> list[float | None]:
    out: list[float | None] = []
    for i in range(len(xs)):
        if i + 1 < n:
            out.append(None)
            continue
        window = xs[i + 1 - n : i + 1]
        out.append(sum((j + 1) * x for j, x in enumerate(window)) / (n * (n + 1) / 2))
    return out


def ref_rsi(xs: list[float], n: int) -> list[float | None]:
    out: list[float | None] = [None]
    changes = [b - a for a, b in itertools.pairwise(xs)]
    avg_gain = avg_loss = 0.0
    for i, change in enumerate(changes):
        if i + 1 < n:
            out.append(None)
            continue
        gain, loss = max(change, 0.0), max(-change, 0.0)
        if i + 1 == n:
            avg_gain = sum(max(c, 0.0) for c in changes[:n]) / n
            avg_loss = sum(max(-c, 0.0) for c in changes[:n]) / n
        else:
            avg_gain = (avg_gain * (n - 1) + gain) / n
            avg_loss = (avg_loss * (n - 1) + loss) / n
        out.append(100.0 if avg_loss == 0 else 100 - 100 / (1 + avg_gain / avg_loss))
    return out


def ref_std(xs: list[float], n: int, ddof: int) -> list[float | None]:
    out: list[float | None] = []
    for i in range(len(xs)):
        if i + 1 < n:
            out.append(None)
            continue
        window = xs[i + 1 - n : i + 1]
        mean = sum(window) / n
        out.append(math.sqrt(sum((x - mean) ** 2 for x in window) / (n - ddof)))
    return out


def ref_true_ranges(bars: list[tuple[float, float, float]]) -> list[float]:
    trs = [bars[0][0] - bars[0][1]]
    for (_, _, prev_close), (high, low, _) in itertools.pairwise(bars):
        trs.append(max(high - low, abs(high - prev_close), abs(low - prev_close)))
    return trs


# -- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("period", [1, 5, 20])
def test_sma_when_fed_seeded_prices_matches_batch_mean(period: int) -> None:
    prices = _prices()
    sma = SMA(period)

    got = [sma.update(p) for p in prices]

    expected = ref_sma(prices, period)
    assert got[: period - 1] == [None] * (period - 1)
    assert all(_close(g, e) for g, e in zip(got[period - 1 :], expected[period - 1 :], strict=True))


def test_sma_when_fed_decimals_converts_at_the_boundary() -> None:
    sma = SMA(2)

    sma.update(Decimal("1.5"))
    value = sma.update(Decimal("2.5"))

    assert value == 2.0


@pytest.mark.parametrize("period", [3, 12, 26])
def test_ema_when_fed_seeded_prices_matches_sma_seeded_recursion(period: int) -> None:
    prices = _prices(seed=3)
    ema = EMA(period)

    got = [ema.update(p) for p in prices]

    expected = ref_ema(prices, period)
    assert got[: period - 1] == [None] * (period - 1)
    assert ema.ready
    assert all(_close(g, e) for g, e in zip(got[period - 1 :], expected[period - 1 :], strict=True))


@pytest.mark.parametrize("period", [1, 4, 30])
def test_wma_when_fed_seeded_prices_matches_weighted_window(period: int) -> None:
    prices = _prices(seed=5)
    wma = WMA(period)

    got = [wma.update(p) for p in prices]

    expected = ref_wma(prices, period)
    assert got[: period - 1] == [None] * (period - 1)
    assert all(_close(g, e) for g, e in zip(got[period - 1 :], expected[period - 1 :], strict=True))


def test_wma_when_window_is_3_weights_newest_most() -> None:
    wma = WMA(3)

    for x in (1, 2, 3, 10):
        value = wma.update(x)

    # window 2, 3, 10 -> (1*2 + 2*3 + 3*10) / 6 = 38 / 6
    assert value == pytest.approx(38 / 6, rel=1e-12)


@pytest.mark.parametrize("period", [2, 14])
def test_rsi_when_fed_seeded_prices_matches_wilder_reference(period: int) -> None:
    prices = _prices(seed=9)
    rsi = RSI(period)

    got = [rsi.update(p) for p in prices]

    expected = ref_rsi(prices, period)
    assert got[:period] == [None] * period
    assert all(_close(g, e) for g, e in zip(got[period:], expected[period:], strict=True))
    assert all(0 <= g <= 100 for g in got[period:] if g is not None)


def test_rsi_when_prices_only_rise_is_100_and_flat_is_50() -> None:
    rising, flat = RSI(3), RSI(3)

    for x in (1, 2, 3, 4):
        rising.update(x)
        flat.update(5)

    assert rising.value == 100.0
    assert flat.value == 50.0


def test_macd_when_fed_seeded_prices_matches_ema_differences() -> None:
    prices = _prices(seed=13)
    macd = MACD(12, 26, 9)

    got = [macd.update(p) for p in prices]

    fast, slow = ref_ema(prices, 12), ref_ema(prices, 26)
    line = [f - s for f, s in zip(fast[25:], slow[25:], strict=True)]  # type: ignore[operator]
    signal = ref_ema(line, 9)
    first = 25 + 8  # line from index 25, signal after 9 line values
    assert got[:first] == [None] * first
    for i in range(first, N):
        value = got[i]
        assert value is not None
        exp_line, exp_signal = line[i - 25], signal[i - 25]
        assert exp_signal is not None
        assert _close(value.line, exp_line)
        assert _close(value.signal, exp_signal)
        assert _close(value.histogram, exp_line - exp_signal)


def test_macd_when_fast_not_below_slow_refuses() -> None:
    with pytest.raises(ValueError, match="fast"):
        MACD(26, 12)


@pytest.mark.parametrize("period", [1, 14])
def test_atr_when_fed_seeded_bars_matches_wilder_reference(period: int) -> None:
    bars = _bars()
    atr = ATR(period)

    got = [atr.update(h, lo, c) for h, lo, c in bars]

    trs = ref_true_ranges(bars)
    expected: list[float] = []
    for i, tr in enumerate(trs):
        if i + 1 == period:
            expected.append(sum(trs[:period]) / period)
        elif i + 1 > period:
            expected.append((expected[-1] * (period - 1) + tr) / period)
    assert got[: period - 1] == [None] * (period - 1)
    assert all(_close(g, e) for g, e in zip(got[period - 1 :], expected, strict=True))


def test_atr_when_gap_up_uses_previous_close() -> None:
    atr = ATR(1)

    atr.update(10, 9, 9.5)
    value = atr.update(13, 12, 12.5)

    # |high 13 - previous close 9.5| = 3.5 exceeds high - low = 1
    assert value == 3.5


@pytest.mark.parametrize(("sample", "ddof"), [(True, 1), (False, 0)])
def test_rolling_std_when_fed_seeded_prices_matches_two_pass_std(sample: bool, ddof: int) -> None:
    prices = _prices(seed=17)
    std = RollingStd(20, sample=sample)

    got = [std.update(p) for p in prices]

    expected = ref_std(prices, 20, ddof)
    assert got[:19] == [None] * 19
    assert all(_close(g, e) for g, e in zip(got[19:], expected[19:], strict=True))


def test_rolling_std_when_constant_series_is_zero() -> None:
    std = RollingStd(5)

    for _ in range(12):
        value = std.update(50_000.1)

    assert value == pytest.approx(0.0, abs=1e-6)


def test_bollinger_when_fed_seeded_prices_matches_sma_and_population_std() -> None:
    prices = _prices(seed=19)
    bands = Bollinger(20, 2.5)

    got = [bands.update(p) for p in prices]

    mids, stds = ref_sma(prices, 20), ref_std(prices, 20, 0)
    assert got[:19] == [None] * 19
    for value, mid, std in zip(got[19:], mids[19:], stds[19:], strict=True):
        assert value is not None
        assert mid is not None
        assert std is not None
        assert _close(value.mid, mid)
        assert _close(value.upper, mid + 2.5 * std)
        assert _close(value.lower, mid - 2.5 * std)


def test_vwap_when_rolling_matches_window_reference() -> None:
    prices = _prices(seed=23)
    rng = random.Random(23)
    volumes = [round(rng.uniform(0.0, 5.0), 4) for _ in prices]
    vwap = VWAP(window=10)

    got = [vwap.update(p, v) for p, v in zip(prices, volumes, strict=True)]

    assert got[:9] == [None] * 9
    for i in range(9, N):
        ps, vs = prices[i - 9 : i + 1], volumes[i - 9 : i + 1]
        expected = sum(p * v for p, v in zip(ps, vs, strict=True)) / sum(vs)
        assert _close(got[i], expected)


def test_vwap_when_session_changes_restarts_the_sum() -> None:
    vwap = VWAP()

    vwap.update(100, 1, session="2024-01-01")
    day_one = vwap.update(200, 3, session="2024-01-01")
    day_two = vwap.update(300, 2, session="2024-01-02")

    assert day_one == (100 * 1 + 200 * 3) / 4
    assert day_two == 300.0


def test_vwap_when_no_volume_yet_is_none() -> None:
    vwap = VWAP()

    value = vwap.update(100, 0)

    assert value is None
    assert not vwap.ready


def test_rolling_correlation_when_fed_seeded_pairs_matches_pearson() -> None:
    xs = _prices(seed=29)
    rng = random.Random(31)
    ys = [0.5 * x + rng.gauss(0, 200) for x in xs]
    corr = RollingCorrelation(30)

    got = [corr.update(x, y) for x, y in zip(xs, ys, strict=True)]

    assert got[:29] == [None] * 29
    for i in range(29, N):
        wx, wy = xs[i - 29 : i + 1], ys[i - 29 : i + 1]
        mx, my = sum(wx) / 30, sum(wy) / 30
        sxy = sum((a - mx) * (b - my) for a, b in zip(wx, wy, strict=True))
        sxx = sum((a - mx) ** 2 for a in wx)
        syy = sum((b - my) ** 2 for b in wy)
        assert _close(got[i], sxy / math.sqrt(sxx * syy))


def test_rolling_correlation_when_one_series_is_constant_is_none_but_ready() -> None:
    corr = RollingCorrelation(3)

    for x in (1.0, 2.0, 3.0, 4.0):
        corr.update(x, 7.0)

    assert corr.ready
    assert corr.value is None


@pytest.mark.parametrize(
    ("factory", "phrase"),
    [
        (lambda: SMA(0), "period must be an integer >= 1"),
        (lambda: EMA(-1), "period must be an integer >= 1"),
        (lambda: RollingStd(1), "needs period >= 2"),
    ],
)
def test_indicator_when_period_is_invalid_refuses(
    factory: Callable[[], object], phrase: str
) -> None:
    with pytest.raises(ValueError, match=phrase):
        factory()
