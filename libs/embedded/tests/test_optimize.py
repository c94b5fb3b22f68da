"""`quantmesh optimize`: grid, ranking, walk-forward windows and the trade-order Monte Carlo."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from quantmesh_common.messages import Bar
from quantmesh_embedded.backtest import BacktestConfig
from quantmesh_embedded.optimize import (
    Outcome,
    combinations,
    monte_carlo,
    optimize,
    parse_grid,
    path_figures,
    rank,
    split_valid,
    walk_forward_windows,
)

DAY = 86_400 * 1_000_000_000
T0 = 1_672_531_200 * 1_000_000_000  # 2023-01-01T00:00:00Z
SYMBOL = "ASSET-USD.SIM"
# sma_cross, long-only, fills at the deciding close, no costs, 100 units per trade:
#   fast=1 slow=2 buys 9 (bar 3), sells 11.5 (bar 7), buys 13 (bar 8), sells 9 (bar 9): -150
#   fast=1 slow=3 buys 9 (bar 3); bar 7 is a tie (11.5 = 11.5); sells 9 (bar 9):          0
#   fast=2 slow=3 buys 10 (bar 4), sells 9 (bar 9):                                     -100
CLOSES = ["10", "9", "8", "9", "10", "11", "12", "11.5", "13", "9"]


def _bars() -> list[Bar]:
    bars, previous = [], Decimal(CLOSES[0])
    for i, c in enumerate(CLOSES):
        close = Decimal(c)
        bars.append(
            Bar(
                instrument_id=SYMBOL,
                interval="1d",
                open=previous,
                high=max(previous, close),
                low=min(previous, close),
                close=close,
                volume=Decimal(100),
                ts_open=T0 + i * DAY,
                ts_close=T0 + (i + 1) * DAY,
            )
        )
        previous = close
    return bars


def _base() -> BacktestConfig:
    return BacktestConfig(
        instrument_id=SYMBOL,
        strategy="sma_cross",
        params={"quantity": "100"},
        cash=Decimal("100000"),
        commission=Decimal(0),
        fill_at="close",
    )


def _outcome(name: str, **figures: float | None) -> Outcome:
    return Outcome({"name": name}, 0, 1, dict(figures), ())


def test_grid_when_some_combinations_have_fast_not_below_slow_skips_exactly_those() -> None:
    grid = combinations(parse_grid(["fast=5,10,20", "slow=10,30"]))

    valid, skipped = split_valid(_base(), grid)

    assert len(grid) == 6
    assert valid == [
        {"fast": 5, "slow": 10},
        {"fast": 5, "slow": 30},
        {"fast": 10, "slow": 30},
        {"fast": 20, "slow": 30},
    ]
    assert [s["params"] for s in skipped] == [{"fast": 10, "slow": 10}, {"fast": 20, "slow": 10}]
    assert all("must be below slow" in s["reason"] for s in skipped)


def test_parse_grid_when_a_key_repeats_or_has_no_values_raises() -> None:
    with pytest.raises(ValueError, match="twice"):
        parse_grid(["fast=1", "fast=2"])
    with pytest.raises(ValueError, match="KEY=V1"):
        parse_grid(["fast="])


def test_rank_when_figures_are_missing_puts_them_last_and_keeps_grid_order_on_ties() -> None:
    runs = [
        _outcome("a", sharpe=None, max_drawdown_pct=5.0),
        _outcome("b", sharpe=1.0, max_drawdown_pct=9.0),
        _outcome("c", sharpe=2.0, max_drawdown_pct=None),
        _outcome("d", sharpe=1.0, max_drawdown_pct=1.0),
    ]

    by_sharpe = [o.params["name"] for o in rank(runs, "sharpe")]
    by_drawdown = [o.params["name"] for o in rank(runs, "max_drawdown_pct")]

    assert by_sharpe == ["c", "b", "d", "a"]
    assert by_drawdown == ["d", "a", "b", "c"]  # a smaller drawdown is better


def test_optimize_when_best_params_are_known_ranks_them_first_in_parallel() -> None:
    grid = parse_grid(["fast=1,2", "slow=2,3"])

    result = optimize(_base(), _bars(), grid, objective="return_pct", workers=2)

    order = [(r["params"]["fast"], r["params"]["slow"]) for r in result["ranking"]]
    assert order == [(1, 3), (2, 3), (1, 2)]
    returns = [r["figures"]["return_pct"] for r in result["ranking"]]
    assert returns == pytest.approx([0.0, -0.1, -0.15])  # 0, -100, -150 on 100,000
    assert result["best"] == {"fast": 1, "slow": 3}
    assert [s["params"] for s in result["skipped"]] == [{"fast": 2, "slow": 2}]


def test_walk_forward_windows_when_data_leaves_a_remainder_rolls_by_the_test_length() -> None:
    assert walk_forward_windows(10, 4, 2) == [(0, 4, 6), (2, 6, 8), (4, 8, 10)]
    assert walk_forward_windows(11, 4, 3) == [(0, 4, 7), (3, 7, 10)]
    assert walk_forward_windows(5, 4, 2) == []


def test_walk_forward_when_choosing_in_sample_reports_out_of_sample_bars_only() -> None:
    grid = parse_grid(["fast=1,2", "slow=2,3"])

    full = optimize(_base(), _bars(), grid, objective="return_pct", workers=2, walk=(6, 4))
    result = full["walk_forward"]

    [window] = result["windows"]
    assert (window["train"], window["test"]) == ([0, 6], [6, 10])
    assert window["test_from"] == T0 + 6 * DAY
    # In bars 0-5 fast=1 slow=2 and fast=1 slow=3 both gain 200 (buy 9, marked at 11); the
    # grid's order breaks the tie. Run alone on bars 6-9 (12, 11.5, 13, 9) fast=1 slow=2
    # sets its regime at 11.5, buys 13 and sells 9: -400, one trade, four bars.
    assert window["params"] == {"fast": 1, "slow": 2}
    oos = window["out_of_sample"]
    assert (oos["bars"], oos["trades"]) == (4, 1)
    assert Decimal(oos["final_equity"]) == Decimal("99600")
    assert result["out_of_sample_return_pct"] == pytest.approx(-0.4)


def test_path_figures_when_trades_rise_fall_and_recover_gives_hand_computed_drawdown() -> None:
    # Equity 1000 -> 1100 -> 800 -> 1000: return 0 %, deepest fall 300 from 1100.
    ret, drawdown = path_figures([100.0, -300.0, 200.0], 1000.0)

    assert ret == pytest.approx(0.0)
    assert drawdown == pytest.approx(300 / 1100 * 100)


def test_monte_carlo_when_seeded_is_deterministic_and_brackets_the_original() -> None:
    pnls = [Decimal(p) for p in ("120", "-80", "45", "-30", "200", "-150", "60", "10")]

    first = monte_carlo(pnls, Decimal("10000"), 2000, seed=7)
    again = monte_carlo(pnls, Decimal("10000"), 2000, seed=7)
    other = monte_carlo(pnls, Decimal("10000"), 2000, seed=8)

    assert first == again
    assert first != other
    assert first["original"]["return_pct"] == pytest.approx(1.75)  # 175 on 10,000
    q = first["return_pct"]
    assert q["p5"] < first["original"]["return_pct"] < q["p95"]
    assert q["p5"] <= q["p50"] <= q["p95"]
    dd = first["max_drawdown_pct"]
    assert 0 <= dd["p5"] <= dd["p50"] <= dd["p95"]


def test_monte_carlo_when_one_trade_every_resample_equals_the_original() -> None:
    result = monte_carlo([Decimal(50)], Decimal(1000), 10, seed=1)

    assert result["return_pct"] == {"p5": 5.0, "p50": 5.0, "p95": 5.0}
    assert result["max_drawdown_pct"] == {"p5": 0.0, "p50": 0.0, "p95": 0.0}


def test_cli_when_asked_for_json_prints_ranking_walk_forward_and_monte_carlo(
    tmp_path: Path,
) -> None:
    data = tmp_path / "bars.csv"
    rows = ["timestamp,open,high,low,close,volume"] + [
        f"{b.ts_open // 1_000_000_000},{b.open},{b.high},{b.low},{b.close},100" for b in _bars()
    ]
    data.write_text("\n".join(rows) + "\n")
    exe = Path(sys.executable).parent / "quantmesh"
    args: list[str | Path] = [
        exe,
        "optimize",
        "--data",
        data,
        "--symbol",
        SYMBOL,
        "--strategy",
        "sma_cross",
    ]
    args += ["--param", "quantity=100", "--commission", "0", "--fill-at", "close"]
    args += ["--grid", "fast=1,2", "--grid", "slow=2,3", "--objective", "return_pct"]
    args += ["--workers", "2", "--walk-forward", "6:4", "--monte-carlo", "100", "--seed", "3"]

    ok = subprocess.run([*args, "--json"], capture_output=True, text=True, check=False)
    bad = subprocess.run([*args, "--grid", "fast=3"], capture_output=True, text=True, check=False)

    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["best"] == {"fast": 1, "slow": 3}
    assert result["walk_forward"]["out_of_sample_return_pct"] == pytest.approx(-0.4)
    # fast=1 slow=3 made one round trip (buy 9, sell 9): every resample returns 0 %.
    assert result["monte_carlo"]["return_pct"]["p50"] == 0.0
    assert bad.returncode == 2
    assert "given twice" in bad.stderr
