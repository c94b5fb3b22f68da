"""Backtest speed: a seeded synthetic 1-minute series through the full stage code, as JSON.

The run is issue 5's benchmark at a smaller size by default: SMA crossover 10/20 always in the
market (long on an up-cross, short on a down-cross), a fixed quantity of 1, commission 0.1 %,
fills at the next open, every stage's handlers on the in-memory bus (risk checks and portfolio
accounting included). Only the backtest is timed, not making the bars.

    .venv/bin/python bench/bench_backtest.py [--bars 100000] [--seed 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import resource
import sys
import time
from decimal import Decimal

from quantmesh_common.messages import Bar
from quantmesh_embedded.backtest import BacktestConfig, run_backtest

MINUTE_NS = 60 * 1_000_000_000
T0 = 1_672_531_200 * 1_000_000_000  # 2023-01-01T00:00:00Z
CENT = Decimal("0.01")


def synthetic_bars(count: int, seed: int, symbol: str = "ASSET-USD.SIM") -> list[Bar]:
    """`count` one-minute OHLCV bars of a seeded geometric random walk (same seed, same bars)."""
    rng = random.Random(seed)
    price = 100.0
    bars = []
    for i in range(count):
        path = [price]
        for _ in range(4):  # four sub-steps give the bar a high and a low apart from O and C
            price *= math.exp(rng.gauss(0.0, 0.0005))
            path.append(price)
        o, c = Decimal(f"{path[0]:.2f}"), Decimal(f"{path[-1]:.2f}")
        hi, lo = Decimal(f"{max(path):.2f}"), Decimal(f"{min(path):.2f}")
        bars.append(
            Bar(
                instrument_id=symbol,
                interval="1m",
                open=o,
                high=max(hi, o, c),
                low=min(lo, o, c),
                close=c,
                volume=Decimal(rng.randint(1, 100)),
                ts_open=T0 + i * MINUTE_NS,
                ts_close=T0 + (i + 1) * MINUTE_NS,
            )
        )
    return bars


def main() -> None:
    """Run the benchmark and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    bars = synthetic_bars(args.bars, args.seed)
    config = BacktestConfig(
        instrument_id="ASSET-USD.SIM",
        strategy="sma_cross",
        params={"fast": 10, "slow": 20, "quantity": "1", "allow_short": True},
        cash=Decimal("100000"),
        commission=Decimal("0.001"),
        fill_at="next_open",
    )
    started = time.perf_counter()
    result = asyncio.run(run_backtest(config, bars))
    elapsed = time.perf_counter() - started
    figures = result.figures()
    # ru_maxrss is in KiB on Linux: the peak of the whole process, bars included.
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "benchmark": "backtest_sma_cross_10_20",
        "bars": args.bars,
        "seed": args.seed,
        "elapsed_s": round(elapsed, 3),
        "bars_per_s": round(args.bars / elapsed),
        "round_trips": figures["trades"],
        "fills": figures["fills"],
        "final_equity": figures["final_equity"],
        "peak_rss_mb": round(peak_mb, 1),
        "python": platform.python_version(),
    }
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
