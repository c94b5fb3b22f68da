"""Backtests over recorded trades: every print through the stages, bars aggregated from them."""

from __future__ import annotations

import importlib
import time
from itertools import chain
from pathlib import Path

from quantmesh_common.messages import (
    Bar,
    InstrumentId,
    Tick,
    TickKind,
    bar_interval_ns,
)
from quantmesh_common.topics import Topic
from quantmesh_embedded.backtest import (
    PROGRESS_EVERY,
    BacktestConfig,
    BacktestResult,
    Progress,
    Recorded,
    build_mesh,
)
from quantmesh_embedded.mesh import DrivenClock
from quantmesh_marketdata.files import DataFileError, csv_header, is_ohlcv_header, is_parquet
from quantmesh_marketdata.replay import event_time, file_events, topic_of

#: Bar interval of a trades backtest when none is given.
DEFAULT_TICK_INTERVAL = "1m"


def is_trades_file(path: Path) -> bool:
    """Whether `path` holds trades (a header or columns without OHLC), not bars; CSV or Parquet."""
    return not is_ohlcv_header([c.strip().lower() for c in csv_header(path)])


async def run_tick_backtest(
    config: BacktestConfig,
    path: Path,
    interval: str = DEFAULT_TICK_INTERVAL,
    progress: Progress | None = None,
) -> tuple[BacktestResult, list[Bar]]:
    """Replay a CSV of trades through signals, risk, oms, execution and portfolio; return
    the result and the bars aggregated from the trades (what the strategy saw).

    Every trade is published as the tick it is, in file order, and the `interval` bars
    aggregated from them right after the trade that closes each (as the marketdata stage
    publishes a venue's). The simulated venue fills against the prints themselves: a market
    order decided on a bar fills at the print that closed the bar, the next bar's first
    (whatever `fill_at` says), up to that print's size; what it cannot fill is canceled, as
    the venue cancels a market order's unfillable rest. `progress` counts trades.
    """
    started = time.perf_counter()
    total = _data_rows(path) if progress is not None else 0
    step_ns = bar_interval_ns(interval)
    events = file_events(path, config.instrument_id, interval)
    first = next(events, None)
    if first is None:
        raise DataFileError(f"{path}: no trades")
    clock = DrivenClock(event_time(first))
    mesh = build_mesh(config, clock, step_ns, trades=True)
    recorded = Recorded(config.cash)
    await recorded.attach(mesh)
    await mesh.start()
    bars: list[Bar] = []
    ticks = 0
    bus = mesh.bus
    settle = mesh.settle if mesh.has_tasks else bus.run_until_idle
    last: Tick | None = None
    for event in chain((first,), events):
        ts = event_time(event)
        if ts > clock.now_ns():
            clock.advance_to(ts)
        await bus.publish(topic_of(event), event, ts_event=ts)
        await settle()
        if isinstance(event, Tick):
            last = event
            ticks += 1
            if progress is not None and ticks % PROGRESS_EVERY == 0:
                progress(min(ticks, total - 1), total)
        else:
            assert isinstance(event, Bar)
            bars.append(event)
    if last is None or not bars:
        raise DataFileError(f"{path}: no trades")
    # Two closing marks, quotes at the last price that move no order (they carry no size):
    # at the last bar's close, so the venue acts on the orders still in flight (it acts when
    # its time passes their arrival) and the portfolio applies their fills; then one interval
    # later, so the portfolio snapshots that close with them, as its final boundary.
    close = bars[-1].ts_close
    for ts in (close, close + step_ns):
        clock.advance_to(max(ts, clock.now_ns()))
        await bus.publish(Topic.MD_TICKS, _closing_mark(last, ts), ts_event=ts)
        await settle()
    await mesh.stop()
    if progress is not None:
        progress(total, total)
    return recorded.result(bars, started), bars


def _data_rows(path: Path) -> int:
    """Lines after the header: the trades a progress bar counts towards (read in 1 MB blocks);
    a Parquet file's row count from its footer."""
    if is_parquet(path):
        parquet = importlib.import_module("pyarrow.parquet")
        return max(1, int(parquet.ParquetFile(str(path)).metadata.num_rows))
    lines = 0
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            lines += block.count(b"\n")
    return max(1, lines)


def _closing_mark(last: Tick, ts: int) -> Tick:
    venue = InstrumentId.parse(last.instrument_id).venue
    return Tick(
        instrument_id=last.instrument_id,
        venue=venue,
        kind=TickKind.QUOTE,
        price=last.price,
        bid=last.price,
        ask=last.price,
        ts_event=ts,
        ts_init=ts,
    )
