"""Replays a recorded trades CSV on md.ticks and md.bars as its own process, via marketdata.

The recording is rebased onto the wall clock and compressed `--compress` times, so its ticks
arrive as live ones would (event time close to the stages' wall clocks); bars come from the
marketdata stage's own BarAggregator and replay() paces everything in event time. Run as
`python tests/e2e/replay_feed.py --csv F --instrument I --bootstrap B`; on exit it prints one
JSON line: how many ticks and bars it published and the event-time span it covered.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.clock import WallClock
from quantmesh_common.envelope import Event
from quantmesh_common.messages import AggressorSide, Tick, TickKind
from quantmesh_marketdata.bars import BarAggregator
from quantmesh_marketdata.replay import replay

NANOS_PER_MS = 1_000_000


def recorded_ticks(
    path: Path, instrument_id: str, *, start_ns: int, compress: float, limit: int | None = None
) -> list[Tick]:
    """The trades of `path` (time_ms, trade_id, price, quantity, buyer_is_maker) as Ticks.

    The first trade happens at `start_ns`; later ones `compress` times sooner than recorded.
    """
    venue = instrument_id.rsplit(".", 1)[1]
    ticks: list[Tick] = []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))[:limit]
    first_ms = int(rows[0]["time_ms"])
    for row in rows:
        ts = start_ns + int((int(row["time_ms"]) - first_ms) * NANOS_PER_MS / compress)
        # A buyer who is the maker means the seller took liquidity.
        taker = AggressorSide.SELLER if row["buyer_is_maker"] == "true" else AggressorSide.BUYER
        ticks.append(
            Tick(
                instrument_id=instrument_id,
                venue=venue,
                kind=TickKind.TRADE,
                price=Decimal(row["price"]),
                size=Decimal(row["quantity"]),
                aggressor_side=taker,
                trade_id=row["trade_id"],
                ts_event=ts,
                ts_init=ts,
            )
        )
    return ticks


def with_bars(ticks: list[Tick], instrument_id: str, interval: str) -> Iterator[Event]:
    """The ticks with the bars they close, each bar just before the tick that closed it."""
    bars = BarAggregator(instrument_id, interval)
    for tick in ticks:
        yield from bars.update(tick)
        yield tick
    if ticks:
        yield from bars.flush_until(ticks[-1].ts_event + 10**15)


async def main(argv: list[str] | None = None) -> int:
    """Publish the recording; print what was published."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--csv", type=Path, required=True)
    parser.add_argument("--instrument", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--compress", type=float, default=1.0)
    parser.add_argument("--bar-interval", default="1s")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--lead-ms", type=int, default=500, help="start this far in the future")
    args = parser.parse_args(argv)
    start_ns = time.time_ns() + args.lead_ms * NANOS_PER_MS
    ticks = recorded_ticks(
        args.csv, args.instrument, start_ns=start_ns, compress=args.compress, limit=args.limit
    )
    events = list(with_bars(ticks, args.instrument, args.bar_interval))
    # A broker restart mid-run must stall the feed, not end it (the default waits 30 s).
    bus = KafkaBus("replay-feed", args.bootstrap, flush_timeout=300.0)
    await bus.start()
    try:
        await WallClock().sleep(max(0, start_ns - time.time_ns()) / 1e9)
        count = await replay(events, bus, WallClock(), speed=1.0)
        await bus.flush()
    finally:
        await bus.close()
    summary = {
        "events": count,
        "ticks": len(ticks),
        "bars": count - len(ticks),
        "first_ns": ticks[0].ts_event if ticks else None,
        "last_ns": ticks[-1].ts_event if ticks else None,
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
