"""The columnar backtest path: the same fills, curve and figures as the per-bar path."""

from __future__ import annotations

import json
import math
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from quantmesh_common.messages import Bar, Tick
from quantmesh_embedded.backtest import (
    BAR_LIQUIDITY,
    BacktestConfig,
    BacktestResult,
    _print,
    columnar_plan,
    run_backtest,
)
from quantmesh_embedded.cli import main
from quantmesh_embedded.columns import BarColumns
from quantmesh_embedded.sizing import SizeSpec

MINUTE = 60 * 1_000_000_000
DAY = 1_440 * MINUTE
T0 = 1_672_531_200 * 1_000_000_000  # 2023-01-01T00:00:00Z
SYMBOL = "ASSET-USD.SIM"


def _walk(count: int, seed: int, *, step_ns: int = MINUTE, gap_every: int = 0) -> list[Bar]:
    """A seeded random walk of bars; every `gap_every` bars the market closes two intervals."""
    rng = random.Random(seed)
    price, ts, bars = 100.0, T0, []
    for i in range(count):
        if gap_every and i and i % gap_every == 0:
            ts += 2 * step_ns
        path = [price]
        for _ in range(3):
            price *= math.exp(rng.gauss(0.0, 0.004))
            path.append(price)
        o, c = Decimal(f"{path[0]:.2f}"), Decimal(f"{path[-1]:.2f}")
        bars.append(
            Bar(
                instrument_id=SYMBOL,
                interval="1m" if step_ns == MINUTE else "1d",
                open=o,
                high=max(Decimal(f"{max(path):.2f}"), o, c),
                low=min(Decimal(f"{min(path):.2f}"), o, c),
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


def _fills(result: BacktestResult) -> list[tuple[Any, ...]]:
    return [
        (f.ts_event, f.side, f.last_qty, f.last_price, f.fee, f.client_order_id)
        for f in result.fills
    ]


def _figures(result: BacktestResult) -> dict[str, Any]:
    return {k: v for k, v in result.figures().items() if k not in ("elapsed_s", "bars_per_s")}


CASES: dict[str, BacktestConfig] = {
    "next open, short": _config(),
    "close fills": _config(fill_at="close"),
    "long or flat": _config(params={"fast": 3, "slow": 8}),
    "50% of equity with slippage": _config(size=SizeSpec("percent", Decimal(50)), slippage_bps=5),
    "all-in, lots of 0.01": _config(size=SizeSpec("all_in"), lot_size=Decimal("0.01")),
    "fixed size 3, lot 2": _config(size=SizeSpec("fixed", Decimal(3)), lot_size=Decimal(2)),
    "rsi_reversion": _config(strategy="rsi_reversion", params={"period": 5, "allow_short": True}),
    "rsi_reversion long only": _config(
        strategy="rsi_reversion", params={"period": 4, "oversold": 40, "overbought": 60}
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
async def test_columnar_when_same_bars_gives_per_bar_fills_curve_and_figures(name: str) -> None:
    # Arrange
    config, bars = CASES[name], _walk(400, seed=5)
    # Act
    per_bar = await run_backtest(config, bars, mode="per_bar")
    columnar = await run_backtest(config, bars, mode="columnar")
    # Assert: the run traded, and both paths agree on everything.
    assert len(per_bar.fills) > 10
    assert _fills(columnar) == _fills(per_bar)
    assert list(columnar.equity) == list(per_bar.equity)
    assert columnar.exposure_bars == per_bar.exposure_bars
    assert _figures(columnar) == _figures(per_bar)


async def test_columnar_when_bars_have_gaps_gives_per_bar_curve() -> None:
    # Arrange: daily bars with a two-day hole every five bars (weekends).
    bars = _walk(120, seed=9, step_ns=DAY, gap_every=5)
    config = _config(params={"fast": 2, "slow": 4, "allow_short": True})
    # Act
    per_bar = await run_backtest(config, bars, mode="per_bar")
    columnar = await run_backtest(config, bars, mode="columnar")
    # Assert
    assert len(per_bar.fills) > 5
    assert _fills(columnar) == _fills(per_bar)
    assert list(columnar.equity) == list(per_bar.equity)


async def test_columnar_when_decision_on_last_bar_fills_at_the_end_print() -> None:
    # Arrange: fast 1 / slow 2 turns up on the last close (7 -> 8).
    closes = ["10", "9", "8", "7", "8"]
    bars = [
        Bar(
            instrument_id=SYMBOL,
            interval="1d",
            open=Decimal(c),
            high=Decimal(c),
            low=Decimal(c),
            close=Decimal(c),
            volume=Decimal(1),
            ts_open=T0 + i * DAY,
            ts_close=T0 + (i + 1) * DAY,
        )
        for i, c in enumerate(closes)
    ]
    config = _config(params={"fast": 1, "slow": 2})
    # Act
    per_bar = await run_backtest(config, bars, mode="per_bar")
    columnar = await run_backtest(config, bars, mode="columnar")
    # Assert: one buy at the last close (the end print), the same in both paths.
    assert [(f.last_qty, f.last_price) for f in columnar.fills] == [(Decimal(1), Decimal(8))]
    assert _fills(columnar) == _fills(per_bar)
    assert list(columnar.equity) == list(per_bar.equity)


async def test_columnar_when_no_decision_gives_flat_curve_at_cash() -> None:
    bars = _walk(5, seed=1)
    result = await run_backtest(_config(), bars, mode="columnar")
    assert result.fills == []
    assert [e for _, e in result.equity] == [Decimal(100000)] * 6


def test_columnar_plan_when_strategy_has_no_columnar_form_is_none() -> None:
    bars = _walk(50, seed=2)
    assert columnar_plan(_config(strategy="bollinger_breakout", params={}), bars) is None
    assert columnar_plan(_config(), bars) is not None


def test_columnar_plan_when_bars_repeat_a_time_is_none() -> None:
    bars = _walk(30, seed=2)
    assert columnar_plan(_config(), [*bars, bars[-1]]) is None


async def test_run_backtest_when_columnar_is_impossible_and_asked_raises() -> None:
    with pytest.raises(ValueError, match="cannot run columnar"):
        await run_backtest(
            _config(strategy="bollinger_breakout", params={}), _walk(30, 2), mode="columnar"
        )


async def test_run_backtest_when_no_columnar_form_falls_back_to_per_bar_on_columns() -> None:
    # Arrange: bollinger_breakout has no `decide`; columns are read back as bars.
    bars = _walk(300, seed=4)
    config = _config(strategy="bollinger_breakout", params={"period": 10, "k": 1.0})
    # Act
    from_columns = await run_backtest(config, BarColumns.from_bars(bars))
    from_bars = await run_backtest(config, bars, mode="per_bar")
    # Assert
    assert len(from_bars.fills) > 2
    assert _fills(from_columns) == _fills(from_bars)
    assert list(from_columns.equity) == list(from_bars.equity)


def test_bar_columns_when_read_back_give_the_same_bars_and_decimals() -> None:
    # Arrange: trailing zeros must survive (100.20 is not 100.2 in a report).
    bars = _walk(20, seed=3)
    bars[0] = bars[0].model_copy(update={"close": Decimal("100.20")})
    # Act
    columns = BarColumns.from_bars(bars)
    # Assert
    assert list(columns.bars()) == bars
    assert str(columns.price("close", 0)) == "100.20"
    assert columns.close[0] == 100.2


def test_bar_columns_when_bars_are_made_set_the_same_fields_and_json_as_the_source() -> None:
    # Arrange
    bars = _walk(5, seed=4)
    columns = BarColumns.from_bars(bars)

    # Act: read twice (each read a new copy of the first bar).
    first, again = list(columns.bars()), list(columns.bars())

    # Assert
    assert [b.model_dump_json() for b in first] == [b.model_dump_json() for b in bars]
    assert [b.model_fields_set for b in first] == [b.model_fields_set for b in bars]
    assert first == again == bars
    assert first[1] is not again[1]


def test_print_when_made_again_equals_a_print_built_field_by_field() -> None:
    # Arrange: what the prints were before they were copies of the instrument's first one.
    def built(instrument_id: str, price: Decimal, ts: int, n: int) -> Tick:
        return Tick.model_construct(
            instrument_id=instrument_id,
            venue="SIM",
            price=price,
            size=BAR_LIQUIDITY,
            trade_id=f"BAR-{n}",
            ts_event=ts,
            ts_init=ts,
        )

    cases = [
        (SYMBOL, Decimal("100.20"), T0, 0),
        (SYMBOL, Decimal("99.5"), T0 + MINUTE, 1),
        ("OTHER-USD.SIM", Decimal("7"), T0 + 2 * MINUTE, 2),
    ]

    # Act
    made = [_print(i, "SIM", p, ts, n) for i, p, ts, n in cases]

    # Assert
    want = [built(i, p, ts, n) for i, p, ts, n in cases]
    assert made == want
    assert [m.model_dump_json() for m in made] == [w.model_dump_json() for w in want]
    assert [m.model_fields_set for m in made] == [w.model_fields_set for w in want]
    assert str(made[0].price) == "100.20"


def test_bar_columns_from_grid_when_floats_round_to_cents_keep_exact_prices() -> None:
    import numpy as np

    prices = {k: np.array([100.004, 100.126]) for k in ("open", "high", "low", "close")}
    prices["volume"] = np.array([1.0, 2.0])
    ts = np.array([T0, T0 + MINUTE])
    columns = BarColumns.from_grid(SYMBOL, "1m", ts, ts + MINUTE, prices)  # type: ignore[arg-type]
    assert [str(columns.price("close", i)) for i in range(2)] == ["100.00", "100.13"]
    assert columns.close.tolist() == [100.0, 100.13]


def test_cli_when_mode_per_bar_or_columnar_prints_the_same_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange
    data = tmp_path / "bars.csv"
    rows = ["timestamp,open,high,low,close,volume"]
    rows += [f"{b.ts_open},{b.open},{b.high},{b.low},{b.close},{b.volume}" for b in _walk(200, 6)]
    data.write_text("\n".join(rows) + "\n")
    args = ["backtest", "--data", str(data), "--symbol", SYMBOL, "--strategy", "sma_cross"]
    args += ["--param", "fast=3", "--param", "slow=8", "--allow-short", "--json", "--quiet"]
    figures, engines = [], []
    # Act
    for mode in ("per_bar", "columnar"):
        assert main([*args, "--mode", mode]) == 0
        out = json.loads(capsys.readouterr().out)
        engines.append(out.pop("engine"))
        figures.append({k: v for k, v in out.items() if k not in ("elapsed_s", "bars_per_s")})
    # Assert: the same figures; bar by bar the stages ran, columnar the engine.
    assert figures[0]["fills"] > 5
    assert figures[0] == figures[1]
    assert engines == ["stages", "columnar"]


def test_cli_when_columnar_is_impossible_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "bars.csv"
    rows = ["timestamp,open,high,low,close,volume"]
    rows += [f"{b.ts_open},{b.open},{b.high},{b.low},{b.close},{b.volume}" for b in _walk(30, 6)]
    data.write_text("\n".join(rows) + "\n")
    args = ["backtest", "--data", str(data), "--symbol", SYMBOL, "--strategy"]
    code = main([*args, "bollinger_breakout", "--mode", "columnar", "--quiet"])
    assert code == 2
    assert "cannot run columnar" in capsys.readouterr().err
