"""`quantmesh optimize`: grid search, walk-forward validation and a trade-order Monte Carlo."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TextIO

from pydantic import ValidationError

from quantmesh_common.messages import Bar
from quantmesh_embedded.backtest import BacktestConfig, run_backtest
from quantmesh_embedded.data import read_bars
from quantmesh_signals.strategy import UnknownStrategyError, load_strategy_class

#: Figures a run can be ranked by, and whether a higher value is better.
OBJECTIVES: dict[str, bool] = {
    "sharpe": True,
    "sortino": True,
    "calmar": True,
    "omega": True,
    "return_pct": True,
    "cagr_pct": True,
    "win_rate_pct": True,
    "profit_factor": True,
    "max_drawdown_pct": False,
}
#: Timing figures differ run to run; they are left out so an optimization is reproducible.
_UNSTABLE = ("elapsed_s", "bars_per_s")
QUANTILES = (5, 50, 95)
Params = dict[str, Any]


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """`["fast=5,10", "slow=30"]` -> `{"fast": [5, 10], "slow": [30]}` (values read as JSON)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ValueError(f"--grid wants KEY=V1,V2,..., got {item!r}")
        if key in grid:
            raise ValueError(f"--grid {key} given twice")
        grid[key] = [_value(v.strip()) for v in values.split(",")]
    return grid


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def combinations(grid: Mapping[str, Sequence[Any]]) -> list[Params]:
    """Every combination of the grid's values, in the order the grid lists them."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def with_params(base: BacktestConfig, params: Params) -> BacktestConfig:
    """`base` with `params` laid over its strategy parameters."""
    return dataclasses.replace(base, params={**base.params, **params})


def invalid_reason(base: BacktestConfig, params: Params) -> str | None:
    """Why `params` cannot be run with `base` (e.g. fast >= slow), or None if they can."""
    try:
        config = with_params(base, params)
        load_strategy_class(config.strategy).params_type.model_validate(config.strategy_params())
    except ValidationError as exc:
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors()
        )
    except ValueError as exc:
        return str(exc)
    return None


def split_valid(base: BacktestConfig, grid: list[Params]) -> tuple[list[Params], list[Params]]:
    """The runnable combinations, and the others as `{"params": ..., "reason": ...}`."""
    valid: list[Params] = []
    skipped: list[Params] = []
    for params in grid:
        reason = invalid_reason(base, params)
        if reason is None:
            valid.append(params)
        else:
            skipped.append({"params": params, "reason": reason})
    return valid, skipped


@dataclass(frozen=True)
class Outcome:
    """One backtest of one combination over bars [start, stop): its figures and trade P&Ls."""

    params: Params
    start: int
    stop: int
    figures: dict[str, Any]
    trade_pnls: tuple[Decimal, ...]


Task = tuple[BacktestConfig, Params, int, int]
_worker_bars: Sequence[Bar] = ()


def _init_worker(bars: Sequence[Bar]) -> None:
    # The bars go to each worker once, not with every task.
    global _worker_bars
    _worker_bars = bars


def _run_task(task: Task) -> Outcome:
    return _run(task, _worker_bars)


def _run(task: Task, bars: Sequence[Bar]) -> Outcome:
    base, params, start, stop = task
    result = asyncio.run(run_backtest(with_params(base, params), bars[start:stop]))
    figures = {k: v for k, v in result.figures().items() if k not in _UNSTABLE}
    pnls = tuple(trip.pnl for trip in result.round_trips)
    return Outcome(params, start, stop, figures, pnls)


class Runner:
    """Runs backtests over one series of bars, in `workers` processes (in-process if 1)."""

    def __init__(self, bars: Sequence[Bar], workers: int) -> None:
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        self.bars = bars
        self._pool = (
            ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(bars,))
            if workers > 1
            else None
        )

    def run(self, tasks: Sequence[Task]) -> list[Outcome]:
        """The outcomes of `tasks`, in the order given."""
        if self._pool is None:
            return [_run(task, self.bars) for task in tasks]
        return list(self._pool.map(_run_task, tasks))

    def close(self) -> None:
        """Stop the worker processes."""
        if self._pool is not None:
            self._pool.shutdown()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rank(outcomes: Sequence[Outcome], objective: str) -> list[Outcome]:
    """Best first by `objective`; None figures rank last; ties keep the grid's order."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    sign = -1.0 if OBJECTIVES[objective] else 1.0

    def key(outcome: Outcome) -> tuple[bool, float]:
        value = outcome.figures.get(objective)
        return (value is None, 0.0 if value is None else sign * float(value))

    return sorted(outcomes, key=key)  # sorted is stable: equal keys keep the grid order


def grid_search(
    runner: Runner, base: BacktestConfig, valid: Sequence[Params], objective: str
) -> list[Outcome]:
    """Every valid combination over all of the runner's bars, ranked best first."""
    n = len(runner.bars)
    return rank(runner.run([(base, p, 0, n) for p in valid]), objective)


def walk_forward_windows(bars: int, train: int, test: int) -> list[tuple[int, int, int]]:
    """Rolling (train start, test start, test stop) bar indexes; each test follows its train.

    Windows roll forward by `test` bars so the test windows tile the data without overlap;
    a trailing remainder shorter than a full test window is left out.
    """
    if train < 1 or test < 1:
        raise ValueError(f"walk-forward windows must be positive, got {train}:{test}")
    windows = []
    start = 0
    while start + train + test <= bars:
        windows.append((start, start + train, start + train + test))
        start += test
    return windows


def walk_forward(
    runner: Runner,
    base: BacktestConfig,
    valid: Sequence[Params],
    objective: str,
    train: int,
    test: int,
) -> dict[str, Any]:
    """Pick the best combination in-sample on each window; report only its out-of-sample run."""
    windows = walk_forward_windows(len(runner.bars), train, test)
    if not windows:
        raise ValueError(f"{len(runner.bars)} bars are too few for a {train}:{test} walk-forward")
    in_sample = runner.run([(base, p, a, b) for a, b, _ in windows for p in valid])
    chosen = [
        rank(in_sample[i * len(valid) : (i + 1) * len(valid)], objective)[0].params
        for i in range(len(windows))
    ]
    out = runner.run([(base, p, b, c) for p, (_, b, c) in zip(chosen, windows, strict=True)])
    growth = Decimal(1)
    reports = []
    for (a, b, c), outcome in zip(windows, out, strict=True):
        growth *= Decimal(outcome.figures["final_equity"]) / base.cash
        reports.append(
            {
                "train": [a, b],
                "test": [b, c],
                "train_from": _ts(runner.bars[a]),
                "test_from": _ts(runner.bars[b]),
                "test_to": _ts(runner.bars[c - 1]),
                "params": outcome.params,
                "out_of_sample": outcome.figures,
            }
        )
    return {
        "train_bars": train,
        "test_bars": test,
        "windows": reports,
        "out_of_sample_return_pct": round(float((growth - 1) * 100), 6),
    }


def _ts(bar: Bar) -> int:
    return bar.ts_open


def _quantile(ordered: Sequence[float], q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default).
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def path_figures(pnls: Sequence[float], cash: float) -> tuple[float, float]:
    """(total return %, max drawdown %) of trades taken in this order from `cash`."""
    equity = peak = cash
    worst = 0.0
    for pnl in pnls:
        equity += pnl
        peak = max(peak, equity)
        worst = max(worst, (peak - equity) / peak if peak > 0 else 0.0)
    return (equity / cash - 1) * 100, worst * 100


def monte_carlo(pnls: Sequence[Decimal], cash: Decimal, runs: int, seed: int) -> dict[str, Any]:
    """Bootstrap (with replacement) of round-trip P&Ls: quantiles of return and drawdown."""
    if runs < 1:
        raise ValueError(f"--monte-carlo wants at least 1 run, got {runs}")
    if not pnls:
        return {"runs": runs, "seed": seed, "skipped": "the best run made no round trips"}
    values = [float(p) for p in pnls]
    start = float(cash)
    rng = random.Random(seed)
    returns, drawdowns = [], []
    for _ in range(runs):
        ret, dd = path_figures(rng.choices(values, k=len(values)), start)
        returns.append(ret)
        drawdowns.append(dd)
    returns.sort()
    drawdowns.sort()
    original = path_figures(values, start)
    return {
        "runs": runs,
        "seed": seed,
        "trades": len(values),
        "original": {
            "return_pct": round(original[0], 6),
            "max_drawdown_pct": round(original[1], 6),
        },
        "return_pct": {f"p{q}": round(_quantile(returns, q / 100), 6) for q in QUANTILES},
        "max_drawdown_pct": {f"p{q}": round(_quantile(drawdowns, q / 100), 6) for q in QUANTILES},
    }


def optimize(
    base: BacktestConfig,
    bars: Sequence[Bar],
    grid: Mapping[str, Sequence[Any]],
    *,
    objective: str = "sharpe",
    workers: int | None = None,
    walk: tuple[int, int] | None = None,
    mc_runs: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """The whole of `quantmesh optimize` as one JSON-ready object."""
    try:
        load_strategy_class(base.strategy)
    except UnknownStrategyError as exc:
        raise ValueError(str(exc)) from None
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if not bars:
        raise ValueError("no bars to optimize over")
    valid, skipped = split_valid(base, combinations(grid))
    if not valid:
        raise ValueError(f"no valid combination in the grid ({len(skipped)} skipped)")
    result: dict[str, Any] = {"objective": objective, "bars": len(bars), "skipped": skipped}
    with Runner(bars, workers or os.cpu_count() or 1) as runner:
        ranked = grid_search(runner, base, valid, objective)
        result["ranking"] = [{"params": o.params, "figures": o.figures} for o in ranked]
        result["best"] = ranked[0].params
        if walk is not None:
            result["walk_forward"] = walk_forward(runner, base, valid, objective, *walk)
    if mc_runs:
        result["monte_carlo"] = monte_carlo(ranked[0].trade_pnls, base.cash, mc_runs, seed)
    return result


def _walk(text: str) -> tuple[int, int]:
    train, sep, test = text.partition(":")
    try:
        pair = (int(train), int(test))
    except ValueError:
        pair = (0, 0)
    if not sep or min(pair) < 1:
        raise ValueError(f"--walk-forward wants TRAIN_BARS:TEST_BARS (positive), got {text!r}")
    return pair


def add_optimize_parser(commands: Any, types: Mapping[str, Callable[[str], Any]]) -> None:
    """Add `optimize` to the `quantmesh` subcommands; `types` holds the backtest's arg parsers."""
    op = commands.add_parser("optimize", help="grid search, walk-forward and Monte Carlo")
    op.add_argument("--data", type=types["path"], required=True, help="OHLCV: CSV or .parquet")
    op.add_argument("--symbol", type=types["instrument"], default="ASSET-USD.SIM")
    op.add_argument("--interval", help="bar interval, e.g. 1d (default: from the data)")
    op.add_argument("--strategy", required=True, help="a registered strategy, e.g. sma_cross")
    op.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...")
    op.add_argument("--param", type=types["param"], action="append", default=[], metavar="K=V")
    op.add_argument("--cash", type=types["decimal"], default=Decimal("100000"))
    op.add_argument("--commission", type=types["decimal"], default=Decimal("0.001"))
    op.add_argument("--slippage-bps", type=types["decimal"], default=Decimal(0))
    op.add_argument("--fill-at", choices=["next_open", "close"], default="next_open")
    op.add_argument("--allow-short", action="store_true")
    op.add_argument("--size", type=types["size"], help="N, N%% or all-in")
    op.add_argument("--lot-size", type=types["positive"])
    op.add_argument("--objective", choices=list(OBJECTIVES), default="sharpe")
    op.add_argument("--workers", type=int, default=None, help="processes (default: CPUs)")
    op.add_argument("--walk-forward", metavar="TRAIN_BARS:TEST_BARS")
    op.add_argument("--monte-carlo", type=int, default=0, metavar="N", help="bootstrap runs")
    op.add_argument("--seed", type=int, default=0, help="Monte Carlo seed")
    op.add_argument("--top", type=int, default=10, help="ranked runs shown without --json")
    op.add_argument("--json", action="store_true", help="print one JSON object")


def optimize_command(args: Any, out: TextIO) -> int:
    """Run `quantmesh optimize` from parsed arguments and write its results to `out`."""
    params = dict(args.param)
    if args.allow_short:
        params["allow_short"] = True
    grid = parse_grid(args.grid)
    if clash := sorted(set(grid) & set(params)):
        raise ValueError(f"{', '.join(clash)} given both as --grid and --param")
    base = BacktestConfig(
        instrument_id=args.symbol,
        strategy=args.strategy,
        params=params,
        cash=args.cash,
        commission=args.commission,
        slippage_bps=args.slippage_bps,
        fill_at=args.fill_at,
        size=args.size,
        lot_size=args.lot_size,
    )
    result = optimize(
        base,
        read_bars(args.data, args.symbol, args.interval),
        grid,
        objective=args.objective,
        workers=args.workers,
        walk=_walk(args.walk_forward) if args.walk_forward else None,
        mc_runs=args.monte_carlo,
        seed=args.seed,
    )
    if args.json:
        out.write(json.dumps(result) + "\n")
    else:
        out.write(_text(result, args.top))
    return 0


def _show(params: Params) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _text(result: dict[str, Any], top: int) -> str:
    objective = result["objective"]
    lines = [f"ranked by {objective} over {result['bars']} bars (best first):"]
    for row in result["ranking"][:top]:
        f = row["figures"]
        lines.append(
            f"  {_show(row['params']):<30} {objective}={f[objective]} "
            f"return_pct={f['return_pct']} max_drawdown_pct={f['max_drawdown_pct']} "
            f"trades={f['trades']}"
        )
    lines += [f"  skipped {_show(s['params'])}: {s['reason']}" for s in result["skipped"]]
    if wf := result.get("walk_forward"):
        lines.append(f"walk-forward {wf['train_bars']}:{wf['test_bars']} (out-of-sample only):")
        for w in wf["windows"]:
            f = w["out_of_sample"]
            lines.append(
                f"  test bars {w['test'][0]}-{w['test'][1]} {_show(w['params']):<30} "
                f"return_pct={f['return_pct']} {objective}={f[objective]}"
            )
        lines.append(f"  out-of-sample return_pct={wf['out_of_sample_return_pct']}")
    if mc := result.get("monte_carlo"):
        if "skipped" in mc:
            lines.append(f"monte carlo: skipped, {mc['skipped']}")
        else:
            lines.append(f"monte carlo of {mc['trades']} trades, {mc['runs']} runs:")
            for figure in ("return_pct", "max_drawdown_pct"):
                q = mc[figure]
                lines.append(
                    f"  {figure}: original {mc['original'][figure]} "
                    + " ".join(f"{k}={v}" for k, v in q.items())
                )
    return "\n".join(lines) + "\n"
