"""Backtest speed: issue 5's benchmark through the full stage code, as one JSON object.

A seeded synthetic 1-minute OHLCV series (default 1,000,000 bars), SMA crossover 10/20
always in the market (long on an up-cross, short on a down-cross), a fixed quantity of 1,
commission 0.1 %, fills at the next open. The strategy decides over all bars at once (its
columnar form). Two engines then compute the order flow, each run timed in a fresh process:

- the headline: the columnar order-flow engine (quantmesh_embedded.orderflow), which computes
  what risk, the OMS, the simulated venue and the portfolio make of the decisions with their
  own arithmetic and no bus (proven equal to the stages by tests/test_orderflow_engine.py);
- `stages`: every decision through the real risk, OMS, venue and portfolio handlers on the
  in-memory bus (what the live services run), on `--stages-bars` bars (default: all).

Only `run_backtest` is timed (`elapsed_s`, wall; `cpu_s`, this process's CPU); the figures
over the curve, round trips included, are timed apart (`figures_s`).

Checks printed with the figures: `reference` compares each engine's fills with a plain Python
loop over the same bars (SMA by running sums, a trade at the next open on every regime
change): same count, same prices, same sides. `same_as_stages` compares the two engines' fills
(time, side, quantity, price, fee, client order id: a SHA-256 over them) and figures when both
ran on the same bars. `peer` runs backtesting.py (the optional extra `peers`) on the same bars
with the same rules, and gives the ratio of bars per second.

    .venv/bin/python bench/bench_backtest.py [--bars 1000000] [--seed 7] [--no-peer]
        [--stages-bars N | --no-stages]   # the stage path on the first N bars, or not at all
        [--per-bar 20000]                 # also time the per-bar path on the first N bars
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import platform
import resource
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from decimal import Decimal
from typing import Any

import numpy as np

from quantmesh_embedded.backtest import BacktestConfig, Engine, run_backtest
from quantmesh_embedded.columns import BarColumns, Field

MINUTE_NS = 60 * 1_000_000_000
T0 = 1_672_531_200 * 1_000_000_000  # 2023-01-01T00:00:00Z
SYMBOL = "ASSET-USD.SIM"
FAST, SLOW = 10, 20
_BLOCK = 65_536  # bars per block of synthetic_columns


def synthetic_columns(count: int, seed: int, symbol: str = SYMBOL) -> BarColumns:
    """`count` one-minute bars of a seeded geometric random walk, on a cent grid.

    Four sub-steps per bar give it a high and a low apart from open and close. Same seed,
    same bars. Made in blocks of bars (the walk's running sum carried from one to the next),
    so its temporaries stay a few MB: the whole walk at once took ~270 MB at 1,000,000 bars.
    """
    rng = np.random.default_rng(seed)
    prices: dict[Field, np.ndarray[Any, np.dtype[np.float64]]] = {
        name: np.empty(count) for name in ("open", "high", "low", "close")
    }
    level, last = 0.0, 100.0  # the running sum of the steps; the previous bar's last point
    for start in range(0, count, _BLOCK):
        stop = min(start + _BLOCK, count)
        # The generator gives the same numbers in blocks as in one draw, in the same order.
        steps = rng.normal(0.0, 0.0005, size=(stop - start) * 4)
        steps[0] += level  # so the block's cumulative sum adds in the order one sum would
        np.cumsum(steps, out=steps)
        level = float(steps[-1])
        path = 100.0 * np.exp(steps).reshape(stop - start, 4)
        full = np.empty((stop - start, 5))
        full[0, 0] = last
        full[1:, 0] = path[:-1, -1]
        full[:, 1:] = path
        last = float(path[-1, -1])
        cents = np.round(full, 2)
        prices["open"][start:stop] = cents[:, 0]
        prices["high"][start:stop] = cents.max(axis=1)
        prices["low"][start:stop] = cents.min(axis=1)
        prices["close"][start:stop] = cents[:, -1]
    prices["volume"] = rng.integers(1, 101, size=count).astype(np.float64)
    ts_open = T0 + np.arange(count, dtype=np.int64) * MINUTE_NS
    return BarColumns.from_grid(symbol, "1m", ts_open, ts_open + MINUTE_NS, prices)


def reference_trades(columns: BarColumns) -> list[tuple[int, str]]:
    """(bar index of the fill, side) of every trade, by a plain loop: SMA 10/20 by running
    sums, the regime the sign of fast - slow (a tie keeps it), a trade at the next bar's
    open on each change (on the last bar: at the end, its close)."""
    fast_sum = slow_sum = 0.0
    regime = 0
    trades: list[tuple[int, str]] = []
    recent = [0.0] * SLOW  # close i - k at (i - k) % SLOW: a million Python floats cost 32 MB
    for i, close in enumerate(_floats(columns.close)):
        fast_sum += close
        if i >= FAST:
            fast_sum -= recent[(i - FAST) % SLOW]
        slow_sum += close
        if i >= SLOW:
            slow_sum -= recent[i % SLOW]
        recent[i % SLOW] = close
        if i < SLOW - 1:
            continue
        fast, slow = fast_sum / FAST, slow_sum / SLOW
        if fast == slow:
            continue
        now = 1 if fast > slow else -1
        if regime and now != regime:
            trades.append((i + 1, "BUY" if now > 0 else "SELL"))
        regime = now
    return trades


def _floats(column: np.ndarray[Any, np.dtype[np.float64]]) -> Iterator[float]:
    # A block at a time: Python floats are quick to add, numpy scalars are not.
    for start in range(0, len(column), _BLOCK):
        yield from column[start : start + _BLOCK].tolist()


def check_reference(columns: BarColumns, fills: Sequence[Any]) -> dict[str, Any]:
    """Compare the run's fills with the reference loop's trades: count, price, side."""
    expected = reference_trades(columns)
    n = len(columns)
    prices = [
        columns.price("open", i) if i < n else columns.price("close", n - 1) for i, _ in expected
    ]
    got = [(f.last_price, f.side.value) for f in fills]
    want = [(p, side) for p, (_, side) in zip(prices, expected, strict=True)]
    mismatch = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    return {
        "trades": len(want),
        "fills": len(got),
        "same_count": len(got) == len(want),
        "same_prices_and_sides": got == want,
        "first_mismatch": mismatch,
    }


def _config() -> BacktestConfig:
    return BacktestConfig(
        instrument_id=SYMBOL,
        strategy="sma_cross",
        params={"fast": FAST, "slow": SLOW, "quantity": "1", "allow_short": True},
        cash=Decimal("100000"),
        commission=Decimal("0.001"),
        fill_at="next_open",
    )


def ours(count: int, seed: int, per_bar: int, engine: Engine) -> dict[str, Any]:
    """The benchmark in this process with one engine: run, figures, reference check, RSS."""
    columns = synthetic_columns(count, seed)
    config = _config()
    started, cpu = time.perf_counter(), time.process_time()
    result = asyncio.run(run_backtest(config, columns, mode="columnar", engine=engine))
    elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    rss_after_run = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    figures = result.figures()
    figures_s = time.perf_counter() - started
    out: dict[str, Any] = {
        "engine": result.engine,
        "bars": count,
        "elapsed_s": round(elapsed, 3),
        "bars_per_s": round(count / elapsed),
        "cpu_s": round(cpu_s, 3),
        "bars_per_cpu_s": round(count / cpu_s) if cpu_s > 0 else None,
        "orders": len(result.fills),
        "us_per_order": round(1e6 * elapsed / len(result.fills), 1) if result.fills else None,
        "figures_s": round(figures_s, 3),
        "round_trips": figures["trades"],
        "fills": figures["fills"],
        "final_equity": figures["final_equity"],
        "return_pct": figures["return_pct"],
        "figures": {k: v for k, v in figures.items() if k not in ("elapsed_s", "bars_per_s")},
        "fills_sha256": _fills_digest(result.fills),
        "reference": check_reference(columns, result.fills),
    }
    if per_bar:
        head = BarColumns.from_grid(
            SYMBOL,
            "1m",
            columns.ts_open[:per_bar],
            columns.ts_close[:per_bar],
            {k: getattr(columns, k)[:per_bar] for k in ("open", "high", "low", "close", "volume")},
        )
        started = time.perf_counter()
        slow = asyncio.run(run_backtest(config, head, mode="per_bar"))
        took = time.perf_counter() - started
        out["per_bar_path"] = {
            "bars": per_bar,
            "elapsed_s": round(took, 3),
            "bars_per_s": round(per_bar / took),
            "same_fills_as_columnar_on_those_bars": _same_prefix(slow.fills, result.fills),
        }
    # ru_maxrss is in KiB on Linux: the peak of this (fresh) process, bars included; the
    # first figure is the peak until the run ended (before the figures were computed).
    out["peak_rss_after_run_mb"] = round(rss_after_run, 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _fills_digest(fills: Sequence[Any]) -> str:
    """SHA-256 of what both engines must agree on (the venue's own ids aside)."""
    digest = hashlib.sha256()
    for f in fills:
        row = (f.ts_event, f.side.value, f.last_qty, f.last_price, f.fee, f.client_order_id)
        digest.update(repr(row).encode())
    return digest.hexdigest()


def _same_prefix(short: Sequence[Any], long: Sequence[Any]) -> bool:
    # The head run ends early: its last fill may be the end print's; compare the rest.
    a = [(f.ts_event, f.last_price, f.side) for f in short[:-1]]
    b = [(f.ts_event, f.last_price, f.side) for f in long[: len(a)]]
    return a == b


def peer_backtesting(count: int, seed: int) -> dict[str, Any]:
    """backtesting.py on the same bars: SMA 10/20 cross, always in, size 1, 0.1 %, next open."""
    import pandas as pd  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from backtesting import Backtest, Strategy  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from backtesting.lib import crossover  # type: ignore[import-untyped,import-not-found,unused-ignore]

    columns = synthetic_columns(count, seed)
    frame = pd.DataFrame(
        {
            "Open": columns.open,
            "High": columns.high,
            "Low": columns.low,
            "Close": columns.close,
            "Volume": columns.volume,
        },
        index=pd.to_datetime(columns.ts_close, unit="ns", utc=True),
    )

    def sma(values: Any, n: int) -> Any:
        return pd.Series(values).rolling(n).mean()

    class SmaCross(Strategy):  # type: ignore[misc]
        def init(self) -> None:
            self.fast = self.I(sma, self.data.Close, FAST)
            self.slow = self.I(sma, self.data.Close, SLOW)

        def next(self) -> None:
            if crossover(self.fast, self.slow):
                self.position.close()
                self.buy(size=1)
            elif crossover(self.slow, self.fast):
                self.position.close()
                self.sell(size=1)

    started = time.perf_counter()
    # Its progress bar and its "trades still open" warning would mix into the JSON output.
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = Backtest(frame, SmaCross, cash=100_000, commission=0.001).run()
    elapsed = time.perf_counter() - started
    return {
        "name": "backtesting.py",
        "elapsed_s": round(elapsed, 3),
        "bars_per_s": round(count / elapsed),
        "round_trips": int(stats["# Trades"]),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _has_backtesting() -> bool:
    try:
        import backtesting  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    """Run the benchmark and print one JSON object."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--bars", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--per-bar", type=int, default=0, metavar="N")
    parser.add_argument("--stages-bars", type=int, default=None, metavar="N")
    parser.add_argument("--no-stages", action="store_true")
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args()
    out: dict[str, Any] = {"benchmark": "backtest_sma_cross_10_20", "bars": args.bars}
    out["seed"] = args.seed
    stages_bars = min(args.stages_bars or args.bars, args.bars)
    # One pool, a fresh process per run: each peak RSS is its own run's.
    with ProcessPoolExecutor(max_workers=1, max_tasks_per_child=1) as pool:
        headline = pool.submit(ours, args.bars, args.seed, 0, "columnar").result()
        out.update({k: v for k, v in headline.items() if k not in ("bars", "figures")})
        if args.no_stages:
            out["stages"] = {"skipped": "--no-stages"}
        else:
            stages = pool.submit(ours, stages_bars, args.seed, args.per_bar, "stages").result()
            out["stages"] = {k: v for k, v in stages.items() if k != "figures"}
            if stages_bars == args.bars:
                out["same_as_stages"] = (
                    stages["fills_sha256"] == headline["fills_sha256"]
                    and stages["figures"] == headline["figures"]
                )
            out["columnar_over_stages"] = round(out["bars_per_s"] / stages["bars_per_s"], 1)
        if args.no_peer:
            out["peer"] = {"skipped": "--no-peer"}
        elif not _has_backtesting():
            out["peer"] = {"skipped": "backtesting.py not installed (extra 'peers')"}
        else:
            peer = pool.submit(peer_backtesting, args.bars, args.seed).result()
            peer["ours_over_peer"] = round(out["bars_per_s"] / peer["bars_per_s"], 3)
            out["peer"] = peer
    out["python"] = platform.python_version()
    out["loadavg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    out["target_bars_per_s"] = 1_000_000
    out["target_met"] = (
        out["engine"] == "columnar"
        and out["bars_per_s"] >= 1_000_000
        and out["peak_rss_mb"] < 500
        and out["reference"]["same_prices_and_sides"]
        and out.get("same_as_stages", True) is True
    )
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
