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
    Range,
    combinations,
    compound_figures,
    monte_carlo,
    monte_carlo_returns,
    optimize,
    parse_grid,
    parse_ranges,
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
    assert result["monte_carlo"]["trades"]["return_pct"]["p50"] == 0.0
    assert result["monte_carlo"]["returns"]["periods"] == 10
    assert bad.returncode == 2
    assert "given twice" in bad.stderr


def test_optuna_when_seeded_twice_gives_the_same_search_and_finds_the_best() -> None:
    # Arrange: 3 valid combinations of 4 (fast=2 slow=2 is invalid); 12 trials cover them
    grid = parse_grid(["fast=1,2", "slow=2,3"])

    # Act
    first = optimize(
        _base(), _bars(), grid, search="optuna", trials=12, objective="return_pct", workers=2
    )
    again = optimize(
        _base(), _bars(), grid, search="optuna", trials=12, objective="return_pct", workers=2
    )

    # Assert
    assert first == again
    assert first["best"] == {"fast": 1, "slow": 3}
    order = [(r["params"]["fast"], r["params"]["slow"]) for r in first["ranking"]]
    assert order == [(1, 3), (2, 3), (1, 2)]  # each combination once, ranked as the grid ranks
    assert [s["params"] for s in first["skipped"]] == [{"fast": 2, "slow": 2}]
    assert (first["search"], first["trials"], first["seed"]) == ("optuna", 12, 0)


def test_optuna_when_given_integer_ranges_searches_inside_them_only() -> None:
    # Arrange
    ranges = parse_ranges(["fast=1:2", "slow=3:4"])

    # Act
    result = optimize(
        _base(),
        _bars(),
        {},
        ranges=ranges,
        search="optuna",
        trials=6,
        objective="return_pct",
        workers=1,
        seed=5,
    )

    # Assert
    tried = {(r["params"]["fast"], r["params"]["slow"]) for r in result["ranking"]}
    assert tried <= {(1, 3), (1, 4), (2, 3), (2, 4)}
    assert tried


def test_optuna_walk_forward_when_run_reports_each_test_window_alone() -> None:
    # Arrange
    grid = parse_grid(["fast=1,2", "slow=2,3"])

    # Act
    result = optimize(
        _base(),
        _bars(),
        grid,
        search="optuna",
        trials=8,
        objective="return_pct",
        workers=1,
        walk=(6, 4),
    )

    # Assert: in bars 0-5 fast=1 with slow=2 or slow=3 gain 200 each (a tie the trials'
    # order breaks); the winner runs alone on bars 6-9 (12, 11.5, 13, 9): slow=2 loses 400
    # (see the grid test); slow=3 first has its average on bar 8 (13 > 12.17: sets its
    # regime, no trade), crosses down on bar 9 (9 < 11.17) while flat and long-only: no
    # trade, 100,000.
    [window] = result["walk_forward"]["windows"]
    expected = {2: "99600", 3: "100000"}
    assert window["params"] in ({"fast": 1, "slow": 2}, {"fast": 1, "slow": 3})
    oos = window["out_of_sample"]
    assert oos["bars"] == 4
    assert oos["final_equity"] == expected[window["params"]["slow"]]
    assert (window["train"], window["test"]) == ([0, 6], [6, 10])


def test_parse_ranges_when_bounds_have_points_makes_float_ranges() -> None:
    # Arrange / Act
    ranges = parse_ranges(["fast=2:5", "k=1.5:2.5:0.5", "n=1:7:3"])

    # Assert
    assert ranges["fast"] == Range(2, 5, None, True)
    assert ranges["fast"].values() == [2, 3, 4, 5]
    assert ranges["k"].values() == [1.5, 2.0, 2.5]
    assert ranges["n"].values() == [1, 4, 7]


@pytest.mark.parametrize("item", ["fast=5:2", "fast=1", "fast=a:b", "fast=1:5:0", "=1:2"])
def test_parse_ranges_when_malformed_raises(item: str) -> None:
    with pytest.raises(ValueError, match="--range"):
        parse_ranges([item])


def test_range_when_float_without_step_refuses_to_make_a_grid() -> None:
    with pytest.raises(ValueError, match="needs a step"):
        Range(1.0, 2.0, None, False).values()


def test_monte_carlo_trade_order_when_shuffled_bounds_drawdown_by_the_best_and_worst_order() -> (
    None
):
    # Arrange: trades +100, -300, +200 from 1000. Over the six orders the deepest fall is
    # 300/1300 (loss last) in two, 300/1200 and 300/1100 in one each, 300/1000 (loss first)
    # in two: the 5th percentile is the best order's, the 95th the worst's.
    pnls = [Decimal(100), Decimal(-300), Decimal(200)]

    # Act
    result = monte_carlo(pnls, Decimal(1000), 3000, seed=1)

    # Assert
    order = result["trade_order"]["max_drawdown_pct"]
    assert order["p5"] == pytest.approx(300 / 1300 * 100, abs=1e-6)
    assert order["p95"] == pytest.approx(30.0)
    assert result["original"] == {"return_pct": 0.0, "max_drawdown_pct": 27.272727}


def test_compound_figures_when_returns_fall_and_recover_gives_hand_computed_figures() -> None:
    # 1 -> 1.1 -> 0.55 -> 1.1: +10 % in all, the fall from 1.1 to 0.55 is 50 %.
    ret, drawdown = compound_figures([0.1, -0.5, 1.0])

    assert ret == pytest.approx(10.0)
    assert drawdown == pytest.approx(50.0)


def test_monte_carlo_returns_when_seeded_is_deterministic_and_brackets_the_original() -> None:
    # Arrange
    returns = [0.01, -0.02, 0.015, -0.005, 0.03, -0.01, 0.002, 0.004] * 5

    # Act
    first = monte_carlo_returns(returns, 2000, seed=3)
    again = monte_carlo_returns(returns, 2000, seed=3)

    # Assert
    assert first == again
    assert first["periods"] == 40
    q = first["return_pct"]
    assert q["p5"] < first["original"]["return_pct"] < q["p95"]
    dd = first["max_drawdown_pct"]
    assert 0 <= dd["p5"] <= dd["p50"] <= dd["p95"]


def test_monte_carlo_returns_when_every_period_is_the_same_every_resample_is_the_original() -> None:
    result = monte_carlo_returns([0.1, 0.1], 10, seed=1)

    assert result["return_pct"] == {"p5": 21.0, "p50": 21.0, "p95": 21.0}  # 1.1^2 - 1
    assert result["max_drawdown_pct"] == {"p5": 0.0, "p50": 0.0, "p95": 0.0}
