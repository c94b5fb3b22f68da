"""The columnar order-flow engine against the stages: the same fills, curve and figures, digit
for digit, or it declines and the run goes through the stages."""

from __future__ import annotations

import asyncio
import json
import math
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantmesh_common.messages import Bar
from quantmesh_embedded.backtest import BAR_LIQUIDITY, BacktestConfig, BacktestResult, run_backtest
from quantmesh_embedded.cli import main
from quantmesh_embedded.columns import BarColumns
from quantmesh_embedded.orderflow import EngineDeclinedError, _fill_prints
from quantmesh_embedded.sizing import SizeSpec
from quantmesh_signals.columnar import Decisions

MINUTE = 60 * 1_000_000_000
DAY = 1_440 * MINUTE
T0 = 1_672_531_200 * 1_000_000_000  # 2023-01-01T00:00:00Z
SYMBOL = "ASSET-USD.SIM"
#: Fields the venue names with its own random prefix: the engine names them differently.
VENUE_IDS = ("report_id", "venue_order_id", "trade_id")


def _bars(
    count: int,
    seed: int,
    *,
    step_ns: int = MINUTE,
    gap_every: int = 0,
    places: int = 2,
    start: float = 100.0,
) -> list[Bar]:
    """A seeded random walk whose opens jump away from the last close (so a fill at the next
    open and a fill at the last close differ); every `gap_every` bars the market is shut for
    three intervals."""
    rng = random.Random(seed)
    price, ts, bars = start, T0, []
    quantum = Decimal(1).scaleb(-places)
    for i in range(count):
        if gap_every and i and i % gap_every == 0:
            ts += 3 * step_ns
        price *= math.exp(rng.gauss(0.0, 0.003))  # the jump between a close and the next open
        path = [price]
        for _ in range(3):
            price *= math.exp(rng.gauss(0.0, 0.006))
            path.append(price)
        o, c = (Decimal(repr(v)).quantize(quantum) for v in (path[0], path[-1]))
        high = max(Decimal(repr(max(path))).quantize(quantum), o, c)
        low = min(Decimal(repr(min(path))).quantize(quantum), o, c)
        bars.append(
            Bar(
                instrument_id=SYMBOL,
                interval="1m" if step_ns == MINUTE else "1d",
                open=o,
                high=high,
                low=low,
                close=c,
                volume=Decimal(rng.randint(1, 50)),
                ts_open=ts,
                ts_close=ts + step_ns,
            )
        )
        ts += step_ns
    return bars


def _config(**changes: Any) -> BacktestConfig:
    fields: dict[str, Any] = {
        "instrument_id": SYMBOL,
        "strategy": "sma_cross",
        "params": {"fast": 3, "slow": 8, "allow_short": True},
    }
    fields.update(changes)
    return BacktestConfig(**fields)


def _fill_values(result: BacktestResult) -> list[dict[str, Any]]:
    return [{k: v for k, v in fill.__dict__.items() if k not in VENUE_IDS} for fill in result.fills]


def _figures(result: BacktestResult) -> dict[str, Any]:
    return {k: v for k, v in result.figures().items() if k not in ("elapsed_s", "bars_per_s")}


def _assert_same(engine: BacktestResult, stages: BacktestResult) -> None:
    assert engine.engine == "columnar"
    assert stages.engine == "stages"
    assert _fill_values(engine) == _fill_values(stages)
    # Digit for digit: the same Decimal text, not only equal values.
    assert [str(f.fee) for f in engine.fills] == [str(f.fee) for f in stages.fills]
    assert [str(f.last_price) for f in engine.fills] == [str(f.last_price) for f in stages.fills]
    engine_curve, stages_curve = list(engine.equity), list(stages.equity)
    assert engine_curve == stages_curve
    assert [str(e) for _, e in engine_curve] == [str(e) for _, e in stages_curve]
    assert engine.exposure_bars == stages.exposure_bars
    assert list(engine.round_trips) == list(stages.round_trips)
    assert _figures(engine) == _figures(stages)


async def _both(config: BacktestConfig, bars: list[Bar]) -> tuple[BacktestResult, BacktestResult]:
    engine = await run_backtest(config, bars, mode="columnar", engine="columnar")
    stages = await run_backtest(config, bars, mode="columnar", engine="stages")
    return engine, stages


CASES: dict[str, tuple[BacktestConfig, dict[str, Any]]] = {
    "next open, short": (_config(), {}),
    "next open, long or flat": (_config(params={"fast": 3, "slow": 8}), {}),
    "close fills": (_config(fill_at="close"), {}),
    "close fills, long or flat": (_config(fill_at="close", params={"fast": 2, "slow": 5}), {}),
    "gaps, next open": (_config(), {"gap_every": 4}),
    "gaps, close fills": (_config(fill_at="close"), {"gap_every": 3}),
    "daily bars with gaps": (
        _config(params={"fast": 2, "slow": 4, "allow_short": True}),
        {
            "step_ns": DAY,
            "gap_every": 5,
        },
    ),
    "slippage 7.5 bps, commission 0.25 %": (
        _config(slippage_bps=Decimal("7.5"), commission=Decimal("0.0025")),
        {},
    ),
    "no commission": (_config(commission=Decimal(0)), {}),
    "fixed size 3, lot 2": (_config(size=SizeSpec("fixed", Decimal(3)), lot_size=Decimal(2)), {}),
    "fixed size 2.7, lot 1, close": (
        _config(size=SizeSpec("fixed", Decimal("2.7")), lot_size=Decimal(1), fill_at="close"),
        {},
    ),
    "fractional fixed size 0.125": (_config(size=SizeSpec("fixed", Decimal("0.125"))), {}),
    "50 % of equity with slippage": (
        _config(size=SizeSpec("percent", Decimal(50)), slippage_bps=Decimal(5)),
        {},
    ),
    "12.5 % of equity, lot 0.01, close": (
        _config(
            size=SizeSpec("percent", Decimal("12.5")), lot_size=Decimal("0.01"), fill_at="close"
        ),
        {},
    ),
    "all-in, lots of 0.01": (_config(size=SizeSpec("all_in"), lot_size=Decimal("0.01")), {}),
    "all-in, fractional, slippage, gaps": (
        _config(size=SizeSpec("all_in"), slippage_bps=Decimal(3)),
        {"gap_every": 6},
    ),
    "all-in, whole lots, long or flat, close": (
        _config(
            size=SizeSpec("all_in"),
            lot_size=Decimal(1),
            fill_at="close",
            params={"fast": 3, "slow": 8},
        ),
        {},
    ),
    "all-in, lots of 1000 for 150,000 cash": (
        _config(size=SizeSpec("all_in"), lot_size=Decimal(1000), cash=Decimal(150_000)),
        {},
    ),
    "prices with four places": (_config(slippage_bps=Decimal(2)), {"places": 4, "start": 1.5}),
    "rsi_reversion, short": (
        _config(strategy="rsi_reversion", params={"period": 5, "allow_short": True}),
        {},
    ),
    "rsi_reversion, long only, all-in": (
        _config(
            strategy="rsi_reversion",
            params={"period": 4, "oversold": 40, "overbought": 60},
            size=SizeSpec("all_in"),
            lot_size=Decimal("0.1"),
        ),
        {},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
async def test_engine_when_same_bars_and_config_gives_the_stages_fills_curve_and_figures(
    name: str,
) -> None:
    # Arrange
    config, shape = CASES[name]
    bars = _bars(300, seed=11, **shape)
    # Act
    engine, stages = await _both(config, bars)
    # Assert: the run traded, and the engine agrees with the stages on everything.
    assert len(stages.fills) > 5
    _assert_same(engine, stages)


async def test_engine_when_benchmark_config_gives_the_stages_results() -> None:
    # Arrange: issue 5's benchmark in small: SMA 10/20 always in, quantity 1, 0.1 %, next
    # open, on a cent grid made as the bench makes it (BarColumns.from_grid).
    rng = np.random.default_rng(7)
    count = 3_000
    closes = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.001, size=count)))
    opens = np.concatenate(([100.0], closes[:-1]))
    ts_open = T0 + np.arange(count, dtype=np.int64) * MINUTE
    columns = BarColumns.from_grid(
        SYMBOL,
        "1m",
        ts_open,
        ts_open + MINUTE,
        {
            "open": opens,
            "high": np.maximum(opens, closes),
            "low": np.minimum(opens, closes),
            "close": closes,
            "volume": np.ones(count),
        },
    )
    config = _config(
        params={"fast": 10, "slow": 20, "quantity": "1", "allow_short": True},
        commission=Decimal("0.001"),
        fill_at="next_open",
    )
    # Act
    engine = await run_backtest(config, columns, mode="columnar", engine="columnar")
    stages = await run_backtest(config, columns, mode="columnar", engine="stages")
    # Assert
    assert len(stages.fills) > 100
    _assert_same(engine, stages)


async def test_engine_when_decision_on_the_last_bar_fills_at_the_end_print() -> None:
    # Arrange: fast 1 / slow 2 turns up on the last close (7 -> 8).
    closes = ["10", "9", "8", "7", "8"]
    bars = [
        Bar(
            instrument_id=SYMBOL,
            interval="1d",
            open=Decimal(c) + 1,
            high=Decimal(c) + 1,
            low=Decimal(c),
            close=Decimal(c),
            volume=Decimal(1),
            ts_open=T0 + i * DAY,
            ts_close=T0 + (i + 1) * DAY,
        )
        for i, c in enumerate(closes)
    ]
    # Act
    engine, stages = await _both(_config(params={"fast": 1, "slow": 2}), bars)
    # Assert: one buy of 1 at the end print (the last close, 8), stamped at it: one bar
    # length after the last close.
    assert [(f.last_qty, f.last_price, f.ts_event) for f in engine.fills] == [
        (Decimal(1), Decimal(8), T0 + 6 * DAY)
    ]
    _assert_same(engine, stages)


async def test_engine_when_gap_before_the_next_open_fills_at_that_open() -> None:
    # Arrange: the market is shut for a day before bars 2 and 3, three before bar 4; a market
    # order waits at the venue for the next print, so a gap changes nothing: it fills at the
    # next bar's open, at its time.
    rows = [("10", "10", 0), ("10", "12", 1), ("20", "9", 3), ("20", "15", 5), ("30", "15", 9)]
    bars = [
        Bar(
            instrument_id=SYMBOL,
            interval="1d",
            open=Decimal(o),
            high=max(Decimal(o), Decimal(c)),
            low=min(Decimal(o), Decimal(c)),
            close=Decimal(c),
            volume=Decimal(1),
            ts_open=T0 + day * DAY,
            ts_close=T0 + (day + 1) * DAY,
        )
        for o, c, day in rows
    ]
    config = _config(params={"fast": 1, "slow": 2, "allow_short": True})
    # Act: fast 1 / slow 2 over 10 12 9 15 15: up on bar 1, down on bar 2, up on bar 3.
    engine, stages = await _both(config, bars)
    # Assert: sell 1 at 20 (bar 3's open, day 5; not bar 2's close of 9), buy 2 at 30 (bar
    # 4's open, day 9; not bar 3's close of 15).
    assert [(f.side.value, f.last_qty, f.last_price, f.ts_event) for f in engine.fills] == [
        ("SELL", Decimal(1), Decimal(20), T0 + 5 * DAY),
        ("BUY", Decimal(2), Decimal(30), T0 + 9 * DAY),
    ]
    _assert_same(engine, stages)


@pytest.mark.parametrize(
    "config",
    [
        _config(size=SizeSpec("fixed", Decimal("0.4")), lot_size=Decimal(1)),
        _config(size=SizeSpec("all_in"), lot_size=Decimal(2000), cash=Decimal(150_000)),
    ],
    ids=["below one lot (risk denies)", "all-in, one lot costs more than the cash"],
)
async def test_engine_when_every_order_is_below_a_lot_trades_nothing_like_the_stages(
    config: BacktestConfig,
) -> None:
    engine, stages = await _both(config, _bars(200, seed=11))
    assert list(engine.fills) == []
    _assert_same(engine, stages)


async def test_engine_when_no_decision_gives_a_flat_curve_like_the_stages() -> None:
    bars = _bars(5, seed=1)
    engine, stages = await _both(_config(), bars)
    assert list(engine.fills) == []
    _assert_same(engine, stages)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 10_000),
    count=st.integers(20, 160),
    fill_at=st.sampled_from(["next_open", "close"]),
    allow_short=st.booleans(),
    size=st.sampled_from([None, "fixed 1.5", "fixed 4", "percent 30", "percent 95", "all_in"]),
    lot=st.sampled_from([None, "0.001", "0.01", "1", "0.5"]),
    slippage=st.sampled_from(["0", "1", "5", "12.5"]),
    commission=st.sampled_from(["0", "0.001", "0.0025"]),
    gap_every=st.sampled_from([0, 2, 5]),
    places=st.sampled_from([2, 3]),
    strategy=st.sampled_from(["sma_cross", "rsi_reversion"]),
)
def test_engine_when_random_series_and_config_gives_the_stages_results(
    seed: int,
    count: int,
    fill_at: str,
    allow_short: bool,
    size: str | None,
    lot: str | None,
    slippage: str,
    commission: str,
    gap_every: int,
    places: int,
    strategy: str,
) -> None:
    # Arrange
    spec = None
    if size is not None:
        kind, _, value = size.partition(" ")
        spec = SizeSpec(kind, Decimal(value or 0))  # type: ignore[arg-type]
    params: dict[str, Any] = {"fast": 2, "slow": 5} if strategy == "sma_cross" else {"period": 3}
    if allow_short:
        params["allow_short"] = True
    config = _config(
        strategy=strategy,
        params=params,
        fill_at=fill_at,
        size=spec,
        lot_size=Decimal(lot) if lot is not None else None,
        slippage_bps=Decimal(slippage),
        commission=Decimal(commission),
    )
    bars = _bars(count, seed, gap_every=gap_every, places=places)
    # Act
    engine, stages = asyncio.run(_both(config, bars))
    # Assert
    _assert_same(engine, stages)


# -- declining ---------------------------------------------------------------------------------


async def test_auto_when_risk_limits_are_configured_declines_and_runs_the_stages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange: a limit risk would enforce; the engine does not reproduce limits.
    monkeypatch.setenv("QM_RISK_LIMITS", json.dumps({"default": {"max_order_quantity": "1"}}))
    bars = _bars(200, seed=3)
    # Act
    auto = await run_backtest(_config(), bars, engine="auto")
    # Assert: the stages ran (and enforced the limit: a reversal of 2 is denied).
    assert auto.engine == "stages"
    assert auto.declined is not None
    assert "risk limits" in auto.declined
    assert [f.last_qty for f in auto.fills] == [Decimal(1)]


async def test_auto_when_unknown_instruments_are_refused_declines_and_runs_the_stages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange: no numeric limit, but risk refuses an instrument without reference data.
    monkeypatch.setenv(
        "QM_RISK_LIMITS", json.dumps({"default": {"allow_unknown_instruments": False}})
    )
    # Act
    auto = await run_backtest(_config(), _bars(120, seed=3), engine="auto")
    # Assert: the stages ran and denied every order.
    assert auto.engine == "stages"
    assert auto.declined is not None
    assert "risk limits" in auto.declined
    assert list(auto.fills) == []


async def test_columnar_engine_when_risk_sizing_is_configured_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "QM_RISK_SIZING", json.dumps({"default": {"method": "fixed", "quantity": "3"}})
    )
    with pytest.raises(ValueError, match="declines this run: a risk sizing policy"):
        await run_backtest(_config(), _bars(60, seed=3), engine="columnar")


async def test_auto_when_an_order_exceeds_the_prints_liquidity_falls_back_to_the_stages() -> None:
    # Arrange: an order larger than a bar's print fills in part at the venue.
    config = _config(size=SizeSpec("fixed", BAR_LIQUIDITY * 2))
    bars = _bars(120, seed=3)
    # Act
    auto = await run_backtest(config, bars, engine="auto")
    stages = await run_backtest(config, bars, engine="stages")
    # Assert
    assert auto.engine == "stages"
    assert auto.declined is not None
    assert "liquidity" in auto.declined
    assert _fill_values(auto) == _fill_values(stages)


async def test_columnar_engine_when_bars_overlap_in_time_declines() -> None:
    # Arrange: two-minute bars opening every minute: a bar opens before the last one closed,
    # so the prints are not in time order (the stages' simulated clock cannot go back either).
    bars = [
        bar.model_copy(update={"ts_close": bar.ts_close + MINUTE}) for bar in _bars(120, seed=3)
    ]
    # Act / Assert
    with pytest.raises(ValueError, match="declines this run: prints out of time order"):
        await run_backtest(_config(), bars, engine="columnar")


async def test_columnar_engine_when_no_columnar_form_raises() -> None:
    with pytest.raises(ValueError, match="needs the columnar path"):
        await run_backtest(
            _config(strategy="bollinger_breakout", params={}), _bars(30, 2), engine="columnar"
        )


async def test_columnar_engine_when_per_bar_mode_raises() -> None:
    with pytest.raises(ValueError, match="needs the columnar path"):
        await run_backtest(_config(), _bars(30, 2), mode="per_bar", engine="columnar")


def test_fill_prints_when_an_order_would_still_work_at_the_next_decision_declines() -> None:
    # Arrange: bars 500 ns apart, a 1 us latency: the order of bar 0 arrives after bar 1's
    # close, where the next decision is made.
    count = 4
    ts_open = T0 + np.arange(count, dtype=np.int64) * 500
    prices = {k: np.full(count, 10.0) for k in ("open", "high", "low", "close", "volume")}
    columns = BarColumns.from_grid(SYMBOL, "1m", ts_open, ts_open + 500, prices)  # type: ignore[arg-type]
    decisions = Decisions(np.asarray([0, 1]), [Decimal(1), Decimal(-1)], ["up", "down"])
    # Act / Assert
    with pytest.raises(EngineDeclinedError, match="still be open at the next decision"):
        _fill_prints(columns, decisions, T0 + 10_000, 1_000)
    assert _fill_prints(columns, decisions, T0 + 10_000, 0) == [1, 3]


def test_fill_prints_when_next_print_is_at_or_after_the_arrival_is_that_print() -> None:
    # Arrange: contiguous 1-minute bars: an order decided on bar 0's close (print 1) arrives
    # 1 us later; bar 1 opens at that close (before the arrival), so bar 1's close (print 3)
    # is the first print at or after it.
    count = 3
    ts_open = T0 + np.arange(count, dtype=np.int64) * MINUTE
    prices = {k: np.full(count, 10.0) for k in ("open", "high", "low", "close", "volume")}
    columns = BarColumns.from_grid(SYMBOL, "1m", ts_open, ts_open + MINUTE, prices)  # type: ignore[arg-type]
    decisions = Decisions(np.asarray([0, 2]), [Decimal(1), Decimal(-1)], ["up", "down"])
    # Act
    prints = _fill_prints(columns, decisions, T0 + 4 * MINUTE, 1_000)
    # Assert: bar 2's order fills with the end print (6)
    assert prints == [3, 6]


def test_fill_prints_when_orders_wait_for_a_trade_is_the_next_print_whatever_the_gap() -> None:
    # Arrange: bar 1 opens two minutes after bar 0 closes, bar 2 when bar 1 closes.
    ts_open = T0 + np.asarray([0, 3, 4], dtype=np.int64) * MINUTE
    prices = {k: np.full(3, 10.0) for k in ("open", "high", "low", "close", "volume")}
    columns = BarColumns.from_grid(SYMBOL, "1m", ts_open, ts_open + MINUTE, prices)  # type: ignore[arg-type]
    decisions = Decisions(np.asarray([0, 1, 2]), [Decimal(1), Decimal(-1), Decimal(1)], ["a"] * 3)
    # Act
    prints = _fill_prints(columns, decisions, T0 + 6 * MINUTE, 0, wait=True)
    # Assert: bar 1's open (2), bar 2's open (4), the end print (6)
    assert prints == [2, 4, 6]


# -- the command ---------------------------------------------------------------------------------


def _write_csv(path: Path, bars: list[Bar]) -> None:
    lines = ["timestamp,open,high,low,close,volume"]
    lines += [f"{b.ts_open},{b.open},{b.high},{b.low},{b.close},{b.volume}" for b in bars]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("engine", ["stages", "columnar", "auto"])
def test_backtest_command_when_engine_given_says_which_engine_ran(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], engine: str
) -> None:
    # Arrange
    data = tmp_path / "bars.csv"
    _write_csv(data, _bars(200, seed=8))
    # Act
    code = main(
        [
            "backtest",
            "--data",
            str(data),
            "--symbol",
            SYMBOL,
            "--strategy",
            "sma_cross",
            "--param",
            "fast=3",
            "--param",
            "slow=8",
            "--allow-short",
            "--engine",
            engine,
            "--json",
            "--quiet",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    # Assert
    assert code == 0
    assert out["engine"] == ("stages" if engine == "stages" else "columnar")
    assert out["fills"] > 5
