"""Backtests over recorded trades: every print through the stages, bars aggregated from them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from quantmesh_common.envelope import Envelope, Event
from quantmesh_common.messages import (
    Bar,
    ExecutionReport,
    InstrumentId,
    PortfolioSnapshot,
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
    build_mesh,
    round_trips,
)
from quantmesh_embedded.mesh import DrivenClock
from quantmesh_embedded.sparse import FillKeeper
from quantmesh_marketdata.files import DataFileError, csv_header, is_ohlcv_header
from quantmesh_marketdata.replay import event_time, file_events, topic_of

#: Bar interval of a trades backtest when none is given.
DEFAULT_TICK_INTERVAL = "1m"


def is_trades_file(path: Path) -> bool:
    """Whether `path` is a CSV of trades (a header without OHLC columns), not of bars."""
    if path.suffix.lower() in {".parquet", ".pq"}:
        return False
    return not is_ohlcv_header([c.strip().lower() for c in csv_header(path)])


@dataclass
class TickRun:
    """What a trades backtest collects from the bus while it runs."""

    cash: Decimal
    fills: list[ExecutionReport] = field(default_factory=list)
    equity: list[tuple[int, Decimal]] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    ticks: int = 0
    exposure: int = 0
    keeper: FillKeeper = field(default_factory=FillKeeper)

    def on_report(self, envelope: Envelope[Any]) -> None:
        report: ExecutionReport = envelope.payload
        if report.exec_type.is_fill:
            self.fills.append(self.keeper.keep(report))

    def on_snapshot(self, envelope: Envelope[Any]) -> None:
        snap: PortfolioSnapshot = envelope.payload
        self.equity.append((snap.ts_event, snap.equity))
        self.exposure += bool(snap.positions)

    def curve(self) -> list[tuple[int, Decimal]]:
        """The equity at every bar close: the portfolio's snapshots, and the starting cash at
        the closes before its first (it snapshots an account from its first fill on)."""
        first = self.equity[0][0] if self.equity else None
        idle = [(b.ts_close, self.cash) for b in self.bars if first is None or b.ts_close < first]
        start = [(self.bars[0].ts_open, self.cash)] if self.bars else []
        return start + idle + self.equity


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
    mesh = build_mesh(config, clock, step_ns)
    run = TickRun(config.cash)
    await mesh.bus.subscribe("backtest.fills", [Topic.EXEC_REPORTS], run.on_report).start()
    await mesh.bus.subscribe(
        "backtest.equity", [Topic.PORTFOLIO_SNAPSHOTS], run.on_snapshot
    ).start()
    await mesh.start()
    bus = mesh.bus
    settle = mesh.settle if mesh.has_tasks else bus.run_until_idle
    last: Tick | None = None
    for event in _chain(first, events):
        ts = event_time(event)
        if ts > clock.now_ns():
            clock.advance_to(ts)
        await bus.publish(topic_of(event), event, ts_event=ts)
        await settle()
        if isinstance(event, Tick):
            last = event
            run.ticks += 1
            if progress is not None and run.ticks % PROGRESS_EVERY == 0:
                progress(min(run.ticks, total - 1), total)
        else:
            assert isinstance(event, Bar)
            run.bars.append(event)
    if last is None or not run.bars:
        raise DataFileError(f"{path}: no trades")
    # Two closing marks, quotes at the last price that move no order (they carry no size):
    # at the last bar's close, so the venue acts on the orders still in flight (it acts when
    # its time passes their arrival) and the portfolio applies their fills; then one interval
    # later, so the portfolio snapshots that close with them, as its final boundary.
    close = run.bars[-1].ts_close
    for ts in (close, close + step_ns):
        clock.advance_to(max(ts, clock.now_ns()))
        await bus.publish(Topic.MD_TICKS, _closing_mark(last, ts), ts_event=ts)
        await settle()
    await mesh.stop()
    if progress is not None:
        progress(total, total)
    result = BacktestResult(
        bars=len(run.bars),
        fills=run.fills,
        equity=run.curve(),
        round_trips=round_trips(run.fills),
        elapsed_s=time.perf_counter() - started,
        exposure_bars=run.exposure,
    )
    return result, run.bars


def _data_rows(path: Path) -> int:
    """Lines after the header: the trades a progress bar counts towards (read in 1 MB blocks)."""
    lines = 0
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            lines += block.count(b"\n")
    return max(1, lines)


def _chain(first: Event, rest: Iterator[Event]) -> Iterator[Event]:
    yield first
    yield from rest


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
