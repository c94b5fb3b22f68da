"""`quantmesh optimize`: grid or Optuna search, walk-forward validation, Monte Carlo intervals."""

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

import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState
from pydantic import ValidationError

from quantmesh_common.messages import Bar
from quantmesh_common.performance import period_returns
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
    #: The equity curve's period returns, kept only when asked (for the returns bootstrap).
    returns: tuple[float, ...] = ()


Task = tuple[BacktestConfig, Params, int, int]
_worker_bars: Sequence[Bar] = ()


def _init_worker(bars: Sequence[Bar]) -> None:
    # The bars go to each worker once, not with every task.
    global _worker_bars
    _worker_bars = bars


def _run_task(task: Task) -> Outcome:
    return _run(task, _worker_bars)


def _run(task: Task, bars: Sequence[Bar], keep_returns: bool = False) -> Outcome:
    base, params, start, stop = task
    result = asyncio.run(run_backtest(with_params(base, params), bars[start:stop]))
    figures = {k: v for k, v in result.figures().items() if k not in _UNSTABLE}
    pnls = tuple(trip.pnl for trip in result.round_trips)
    returns = tuple(period_returns(result.equity)) if keep_returns else ()
    return Outcome(params, start, stop, figures, pnls, returns)


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

    def run_one(self, task: Task, *, keep_returns: bool = False) -> Outcome:
        """One task in this process (e.g. the best combination again, keeping its returns)."""
        return _run(task, self.bars, keep_returns)

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
    runner: Runner,
    base: BacktestConfig,
    valid: Sequence[Params],
    objective: str,
    span: tuple[int, int] | None = None,
) -> list[Outcome]:
    """Every valid combination over bars `span` (default: all), ranked best first."""
    start, stop = span or (0, len(runner.bars))
    return rank(runner.run([(base, p, start, stop) for p in valid]), objective)


@dataclass(frozen=True)
class Range:
    """A numeric parameter range, LOW..HIGH inclusive: integers unless a bound has a point."""

    low: float
    high: float
    step: float | None
    integer: bool

    def values(self) -> list[Any]:
        """The grid's values: every step from low to high (integers step 1 by default)."""
        if self.integer:
            step = int(self.step or 1)
            return list(range(int(self.low), int(self.high) + 1, step))
        if self.step is None:
            raise ValueError("a float --range needs a step for grid search: LOW:HIGH:STEP")
        count = math.floor((self.high - self.low) / self.step + 1e-9)
        return [round(self.low + i * self.step, 12) for i in range(count + 1)]


def parse_ranges(items: Sequence[str]) -> dict[str, Range]:
    """`["fast=2:20", "k=1.5:3.0:0.5"]` -> ranges; integer unless a number has a point."""
    ranges: dict[str, Range] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = text.split(":")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if not sep or not key or len(numbers) not in (2, 3) or numbers[0] > numbers[1]:
            raise ValueError(f"--range wants KEY=LOW:HIGH[:STEP] with LOW <= HIGH, got {item!r}")
        if key in ranges:
            raise ValueError(f"--range {key} given twice")
        step = numbers[2] if len(numbers) == 3 else None
        if step is not None and step <= 0:
            raise ValueError(f"--range {key}: the step must be positive, got {item!r}")
        integer = not any("." in p or "e" in p.lower() for p in parts)
        ranges[key] = Range(numbers[0], numbers[1], step, integer)
    return ranges


def _key(params: Params) -> str:
    return json.dumps(params, sort_keys=True)


def optuna_search(
    runner: Runner,
    base: BacktestConfig,
    space: Mapping[str, Sequence[Any] | Range],
    objective: str,
    *,
    trials: int,
    seed: int,
    batch: int,
    span: tuple[int, int] | None = None,
    skipped: list[Params] | None = None,
) -> list[Outcome]:
    """`trials` trials of a seeded TPE sampler over `space`, ranked best first.

    Trials are asked `batch` at a time, run in the runner's processes, then told: the batch
    size is fixed (not the order they finish in), so a seed gives the same search every time.
    A combination tried before is not run again; an invalid one (e.g. fast >= slow) or one
    whose objective is undefined is told as failed. The ranking holds each combination once.
    """
    if trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}")
    start, stop = span or (0, len(runner.bars))
    direction = StudyDirection.MAXIMIZE if OBJECTIVES[objective] else StudyDirection.MINIMIZE
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.TPESampler(seed=seed))
    done: dict[str, Outcome] = {}
    reasons: dict[str, str] = {}
    asked = 0
    while asked < trials:
        wave = [study.ask() for _ in range(min(batch, trials - asked))]
        asked += len(wave)
        params = [_suggest(trial, space) for trial in wave]
        todo: dict[str, Params] = {}
        for p in params:
            key = _key(p)
            if key in done or key in reasons or key in todo:
                continue
            reason = invalid_reason(base, p)
            if reason is None:
                todo[key] = p
            else:
                reasons[key] = reason
                if skipped is not None:
                    skipped.append({"params": p, "reason": reason})
        for key, outcome in zip(
            todo, runner.run([(base, p, start, stop) for p in todo.values()]), strict=True
        ):
            done[key] = outcome
        for trial, p in zip(wave, params, strict=True):
            found = done.get(_key(p))
            value = found.figures.get(objective) if found is not None else None
            if value is None:
                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, float(value))
    if not done:
        raise ValueError(f"no valid combination among {trials} Optuna trials")
    return rank(list(done.values()), objective)


def _suggest(trial: optuna.trial.Trial, space: Mapping[str, Sequence[Any] | Range]) -> Params:
    params: Params = {}
    for name, dim in space.items():
        if isinstance(dim, Range):
            if dim.integer:
                step = int(dim.step or 1)
                params[name] = trial.suggest_int(name, int(dim.low), int(dim.high), step=step)
            else:
                params[name] = trial.suggest_float(name, dim.low, dim.high, step=dim.step)
        else:
            params[name] = trial.suggest_categorical(name, list(dim))
    return params


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


#: A search over bars [start, stop): its outcomes, best first.
Search = Callable[[tuple[int, int]], list[Outcome]]


def walk_forward(
    runner: Runner, base: BacktestConfig, search: Search, train: int, test: int
) -> dict[str, Any]:
    """Pick the best combination in-sample on each window; report only its out-of-sample run.

    The out-of-sample run starts from the strategy's initial state on the test bars alone, so
    nothing it reports was seen in-sample, neither by the search nor by the indicators.
    """
    windows = walk_forward_windows(len(runner.bars), train, test)
    if not windows:
        raise ValueError(f"{len(runner.bars)} bars are too few for a {train}:{test} walk-forward")
    chosen = [search((a, b))[0].params for a, b, _ in windows]
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


def _quantiles(values: list[float]) -> dict[str, float]:
    values.sort()
    return {f"p{q}": round(_quantile(values, q / 100), 6) for q in QUANTILES}


def monte_carlo(pnls: Sequence[Decimal], cash: Decimal, runs: int, seed: int) -> dict[str, Any]:
    """Round-trip P&Ls resampled: quantiles of return and drawdown.

    `trade_order` shuffles the trades (the same trades, another order: the return is the
    original's, the drawdown is what the order made it); `trades` bootstraps them (with
    replacement: other trades of the same kind).
    """
    if runs < 1:
        raise ValueError(f"--monte-carlo wants at least 1 run, got {runs}")
    if not pnls:
        return {"runs": runs, "seed": seed, "skipped": "the best run made no round trips"}
    values = [float(p) for p in pnls]
    start = float(cash)
    rng = random.Random(seed)
    order_dd: list[float] = []
    boot_ret: list[float] = []
    boot_dd: list[float] = []
    shuffled = list(values)
    for _ in range(runs):
        rng.shuffle(shuffled)
        order_dd.append(path_figures(shuffled, start)[1])
        ret, dd = path_figures(rng.choices(values, k=len(values)), start)
        boot_ret.append(ret)
        boot_dd.append(dd)
    original = path_figures(values, start)
    return {
        "runs": runs,
        "seed": seed,
        "trades": len(values),
        "original": {
            "return_pct": round(original[0], 6),
            "max_drawdown_pct": round(original[1], 6),
        },
        "trade_order": {"max_drawdown_pct": _quantiles(order_dd)},
        "return_pct": _quantiles(boot_ret),
        "max_drawdown_pct": _quantiles(boot_dd),
    }


def compound_figures(returns: Sequence[float]) -> tuple[float, float]:
    """(total return %, max drawdown %) of period returns compounded in this order."""
    equity = peak = 1.0
    worst = 0.0
    for r in returns:
        equity *= 1.0 + r
        if equity > peak:
            peak = equity
        elif peak > 0:
            worst = max(worst, (peak - equity) / peak)
    return (equity - 1) * 100, worst * 100


def monte_carlo_returns(returns: Sequence[float], runs: int, seed: int) -> dict[str, Any]:
    """Bootstrap (with replacement) of the equity curve's period returns: return and drawdown.

    Each resample is as long as the curve; resampling single periods treats them as
    independent (no block structure), which narrows the intervals for trending strategies.
    """
    if runs < 1:
        raise ValueError(f"--monte-carlo wants at least 1 run, got {runs}")
    if not returns:
        return {"runs": runs, "seed": seed, "skipped": "the best run has no returns"}
    rng = random.Random(seed)
    values = list(returns)
    rets: list[float] = []
    dds: list[float] = []
    for _ in range(runs):
        ret, dd = compound_figures(rng.choices(values, k=len(values)))
        rets.append(ret)
        dds.append(dd)
    original = compound_figures(values)
    return {
        "runs": runs,
        "seed": seed,
        "periods": len(values),
        "original": {
            "return_pct": round(original[0], 6),
            "max_drawdown_pct": round(original[1], 6),
        },
        "return_pct": _quantiles(rets),
        "max_drawdown_pct": _quantiles(dds),
    }


def optimize(
    base: BacktestConfig,
    bars: Sequence[Bar],
    grid: Mapping[str, Sequence[Any]],
    *,
    ranges: Mapping[str, Range] | None = None,
    search: str = "grid",
    trials: int = 50,
    objective: str = "sharpe",
    workers: int | None = None,
    walk: tuple[int, int] | None = None,
    mc_runs: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """The whole of `quantmesh optimize` as one JSON-ready object.

    `search="grid"` runs every combination of `grid` and the expanded `ranges`;
    `search="optuna"` runs `trials` trials of a TPE sampler seeded with `seed` over them.
    """
    try:
        load_strategy_class(base.strategy)
    except UnknownStrategyError as exc:
        raise ValueError(str(exc)) from None
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if search not in ("grid", "optuna"):
        raise ValueError(f"unknown search {search!r}; known: grid, optuna")
    if not bars:
        raise ValueError("no bars to optimize over")
    ranges = dict(ranges or {})
    if clash := sorted(set(grid) & set(ranges)):
        raise ValueError(f"{', '.join(clash)} given both as --grid and --range")
    if not grid and not ranges:
        raise ValueError("nothing to search: give --grid or --range")
    n_workers = workers or os.cpu_count() or 1
    result: dict[str, Any] = {"search": search, "objective": objective, "bars": len(bars)}
    skipped: list[Params] = []
    with Runner(bars, n_workers) as runner:
        if search == "grid":
            full = {**grid, **{k: r.values() for k, r in ranges.items()}}
            valid, skipped = split_valid(base, combinations(full))
            if not valid:
                raise ValueError(f"no valid combination in the grid ({len(skipped)} skipped)")

            def run_search(span: tuple[int, int], window: int = 0) -> list[Outcome]:
                return grid_search(runner, base, valid, objective, span)

        else:
            space: dict[str, Sequence[Any] | Range] = {**grid, **ranges}
            result["trials"] = trials
            result["seed"] = seed
            optuna.logging.set_verbosity(optuna.logging.WARNING)

            def run_search(span: tuple[int, int], window: int = 0) -> list[Outcome]:
                return optuna_search(
                    runner,
                    base,
                    space,
                    objective,
                    trials=trials,
                    seed=seed + window,
                    batch=n_workers,
                    span=span,
                    skipped=skipped if window == 0 else None,
                )

        ranked = run_search((0, len(bars)))
        result["skipped"] = skipped
        result["ranking"] = [{"params": o.params, "figures": o.figures} for o in ranked]
        result["best"] = ranked[0].params
        if walk is not None:
            windows = iter(range(1, 1 << 30))
            result["walk_forward"] = walk_forward(
                runner, base, lambda span: run_search(span, next(windows)), *walk
            )
        if mc_runs:
            best = runner.run_one((base, ranked[0].params, 0, len(bars)), keep_returns=True)
            result["monte_carlo"] = {
                "trades": monte_carlo(ranked[0].trade_pnls, base.cash, mc_runs, seed),
                "returns": monte_carlo_returns(best.returns, mc_runs, seed),
            }
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
    op = commands.add_parser("optimize", help="grid or Optuna search, walk-forward and Monte Carlo")
    op.add_argument("--data", type=types["path"], required=True, help="OHLCV: CSV or .parquet")
    op.add_argument("--symbol", type=types["instrument"], default="ASSET-USD.SIM")
    op.add_argument("--interval", help="bar interval, e.g. 1d (default: from the data)")
    op.add_argument("--strategy", required=True, help="a registered strategy, e.g. sma_cross")
    op.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...")
    op.add_argument(
        "--range",
        action="append",
        default=[],
        metavar="KEY=LOW:HIGH[:STEP]",
        help="numeric range (integers unless a bound has a point)",
    )
    op.add_argument("--search", choices=["grid", "optuna"], default="grid")
    op.add_argument("--trials", type=int, default=50, help="Optuna trials (--search optuna)")
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
    op.add_argument("--monte-carlo", type=int, default=0, metavar="N", help="resampling runs")
    op.add_argument(
        "--seed", type=int, default=0, help="seed of the Optuna sampler and Monte Carlo"
    )
    op.add_argument("--top", type=int, default=10, help="ranked runs shown without --json")
    op.add_argument("--json", action="store_true", help="print one JSON object")


def optimize_command(args: Any, out: TextIO) -> int:
    """Run `quantmesh optimize` from parsed arguments and write its results to `out`."""
    params = dict(args.param)
    if args.allow_short:
        params["allow_short"] = True
    grid = parse_grid(args.grid)
    ranges = parse_ranges(args.range)
    if clash := sorted((set(grid) | set(ranges)) & set(params)):
        raise ValueError(f"{', '.join(clash)} given both as --grid/--range and --param")
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
        ranges=ranges,
        search=args.search,
        trials=args.trials,
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


def _q(quantiles: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v}" for k, v in quantiles.items())


def _text(result: dict[str, Any], top: int) -> str:
    objective = result["objective"]
    how = result["search"] + (f" ({result['trials']} trials)" if "trials" in result else "")
    lines = [f"{how}, ranked by {objective} over {result['bars']} bars (best first):"]
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
        trades, returns = mc["trades"], mc["returns"]
        if "skipped" in trades:
            lines.append(f"monte carlo of trades: skipped, {trades['skipped']}")
        else:
            lines.append(f"monte carlo of {trades['trades']} trades, {trades['runs']} runs:")
            original_dd = trades["original"]["max_drawdown_pct"]
            lines.append(
                f"  trade order: max_drawdown_pct original {original_dd} "
                + _q(trades["trade_order"]["max_drawdown_pct"])
            )
            for figure in ("return_pct", "max_drawdown_pct"):
                lines.append(
                    f"  bootstrap {figure}: original {trades['original'][figure]} "
                    + _q(trades[figure])
                )
        if "skipped" in returns:
            lines.append(f"monte carlo of returns: skipped, {returns['skipped']}")
        else:
            lines.append(f"monte carlo of {returns['periods']} period returns:")
            for figure in ("return_pct", "max_drawdown_pct"):
                lines.append(
                    f"  bootstrap {figure}: original {returns['original'][figure]} "
                    + _q(returns[figure])
                )
    return "\n".join(lines) + "\n"
