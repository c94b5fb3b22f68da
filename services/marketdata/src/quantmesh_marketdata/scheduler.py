"""Collection scheduler: backfills and periodic OHLCV/trade collection, run through `control`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from quantmesh_common.clock import Clock, datetime_to_ns
from quantmesh_common.messages import CollectorState, CollectorStatus, bar_interval_ns
from quantmesh_common.topics import Topic
from quantmesh_marketdata.backfill import Backfill, BackfillJob, CursorStore, Publish
from quantmesh_marketdata.health import Backoff
from quantmesh_marketdata.markets import instruments_of
from quantmesh_marketdata.venue import SymbolMap

log = logging.getLogger(__name__)

SCHEDULER_JOB_ID = "collector"
TRADES = "trades"
DAY_NS = 86_400 * 1_000_000_000

#: Builds the REST exchange of a venue (markets loaded) and returns it with its venue name.
ExchangeFactory = Callable[[str | None], Awaitable[tuple[Any, str]]]


def _time_ns(value: str, name: str) -> int:
    value = value.strip()
    if value.isdigit():
        number = int(value)
        # seconds, milliseconds or nanoseconds by magnitude (all three appear in APIs)
        if number < 10**11:
            return number * 1_000_000_000
        if number < 10**14:
            return number * 1_000_000
        return number
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not epoch s/ms/ns or an ISO time") from None
    if moment.tzinfo is None:
        raise ValueError(f"{name}: {value!r} needs a time zone (e.g. Z)")
    return datetime_to_ns(moment)


@dataclass(frozen=True, slots=True)
class CollectRequest:
    """A COLLECTOR_START's params, checked.

    `symbols` and `timeframes` are comma-separated (a timeframe `trades` collects trades);
    `interval` the seconds between rounds; `since` / `until` bound the range (epoch s, ms, ns
    or ISO). With `until` the job is a one-off backfill; without, a round runs every
    `interval` s and collects what closed since the last round (the first round starts at
    `since`, else `lookback` seconds ago, default one day). `venue` overrides QM_VENUE.
    """

    symbols: tuple[str, ...]
    timeframes: tuple[str, ...]
    interval_s: float = 60.0
    since_ns: int | None = None
    until_ns: int | None = None
    lookback_ns: int = DAY_NS
    venue: str | None = None
    page_limit: int = 500

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> CollectRequest:
        """Parse and check the params; ValueError with the reason if they are unusable."""
        symbols = tuple(s.strip() for s in params.get("symbols", "").split(",") if s.strip())
        if not symbols:
            raise ValueError("params.symbols: at least one ccxt symbol, e.g. BTC/USDT")
        raw_frames = params.get("timeframes", "1m")
        timeframes = tuple(t.strip() for t in raw_frames.split(",") if t.strip())
        if not timeframes:
            raise ValueError("params.timeframes: e.g. 1m,1h or trades")
        for timeframe in timeframes:
            if timeframe != TRADES:
                try:
                    bar_interval_ns(timeframe)
                except ValueError as exc:
                    raise ValueError(f"params.timeframes: {exc}") from None
        try:
            interval_s = float(params.get("interval", "60"))
            lookback_s = float(params.get("lookback", str(DAY_NS // 1_000_000_000)))
            page_limit = int(params.get("page_limit", "500"))
        except ValueError as exc:
            raise ValueError(f"params: {exc}") from None
        if not 0 < interval_s <= 7 * 86_400 or lookback_s <= 0 or not 0 < page_limit <= 5000:
            raise ValueError(
                "params: need 0 < interval <= 604800 s, lookback > 0, page_limit 1-5000"
            )
        since = _time_ns(params["since"], "params.since") if params.get("since") else None
        until = _time_ns(params["until"], "params.until") if params.get("until") else None
        if since is not None and until is not None and until <= since:
            raise ValueError("params: until must be after since")
        return cls(
            symbols=symbols,
            timeframes=timeframes,
            interval_s=interval_s,
            since_ns=since,
            until_ns=until,
            lookback_ns=int(lookback_s * 1_000_000_000),
            venue=params.get("venue") or None,
            page_limit=page_limit,
        )


class CollectionScheduler:
    """Runs at most one CollectRequest at a time; status and progress go to md.collector.

    Each (symbol, timeframe) is a Backfill with a stable job id, so its cursor carries over
    from round to round and across restarts: a round only fetches what is new.
    """

    def __init__(
        self,
        exchange_factory: ExchangeFactory,
        cursors: CursorStore,
        publish: Publish,
        clock: Clock,
        backoff: Callable[[], Backoff] | None = None,
    ) -> None:
        self.exchange_factory = exchange_factory
        self.cursors = cursors
        self.publish = publish
        self.clock = clock
        self.backoff = backoff or (lambda: Backoff(base_s=1.0, cap_s=30.0))
        self.request: CollectRequest | None = None
        self.state = CollectorState.STOPPED
        self.rounds = 0
        self.current: Backfill | None = None
        self.last: dict[str, CollectorStatus] = {}
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._venue = ""

    @property
    def running(self) -> bool:
        """Whether a request is being worked on."""
        return self._task is not None and not self._task.done()

    async def start(self, request: CollectRequest) -> None:
        """Replace whatever runs with `request`."""
        await self.stop(publish=False)
        self.request, self.rounds, self.last = request, 0, {}
        self._stop = asyncio.Event()
        self.state = CollectorState.RUNNING
        self._task = asyncio.create_task(self._run(request), name="collector")

    async def stop(self, publish: bool = True) -> None:
        """Stop after the page in flight (cursors stay saved); publishes STOPPED."""
        self._stop.set()
        if self.current is not None:
            self.current.cancel()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if publish and self.state is CollectorState.RUNNING:
            self.state = CollectorState.STOPPED
            await self._report("stopped")

    async def rejected(self, reason: str) -> None:
        """A COLLECTOR_START that could not be used: say why on md.collector."""
        status = CollectorStatus(
            job_id=SCHEDULER_JOB_ID,
            kind="schedule",
            state=CollectorState.FAILED,
            venue=self._venue or "UNKNOWN",
            message=reason[:500],
            ts_event=self.clock.now_ns(),
        )
        await self.publish(Topic.MD_COLLECTOR, status, status.ts_event)

    def status(self, message: str = "") -> CollectorStatus:
        """The scheduler's own status: what it collects, rounds done, overall progress."""
        request = self.request
        details: dict[str, str] = {"rounds": str(self.rounds)}
        if request is not None:
            details |= {
                "symbols": ",".join(request.symbols),
                "timeframes": ",".join(request.timeframes),
                "interval_s": f"{request.interval_s:g}",
            }
        jobs = len(request.symbols) * len(request.timeframes) if request else 0
        done = sum(s.progress for s in self.last.values())
        return CollectorStatus(
            job_id=SCHEDULER_JOB_ID,
            kind="schedule",
            state=self.state,
            venue=self._venue or "UNKNOWN",
            start_ns=request.since_ns if request else None,
            end_ns=request.until_ns if request else None,
            fetched=sum(s.fetched for s in self.last.values()),
            progress=round(min(1.0, done / jobs), 6) if jobs else 0.0,
            message=message,
            details=details,
            ts_event=self.clock.now_ns(),
        )

    async def _report(self, message: str = "") -> None:
        status = self.status(message)
        await self.publish(Topic.MD_COLLECTOR, status, status.ts_event)

    async def _run(self, request: CollectRequest) -> None:
        try:
            exchange, self._venue = await self.exchange_factory(request.venue)
        except Exception as exc:  # an unknown venue or one unreachable without a cache
            log.error("collector: venue unusable: %s", exc)
            self.state = CollectorState.FAILED
            await self._report(f"venue unusable: {exc}"[:500])
            return
        try:
            await self._rounds(exchange, request)
        finally:
            await exchange.close()

    async def _rounds(self, exchange: Any, request: CollectRequest) -> None:
        symbols = SymbolMap(exchange.markets, self._venue)
        unknown = [s for s in request.symbols if s not in symbols]
        if unknown:
            self.state = CollectorState.FAILED
            await self._report(f"unknown symbols on {self._venue}: {', '.join(unknown)}")
            return
        for instrument in instruments_of(
            exchange.markets, self._venue, exchange.precisionMode, list(request.symbols)
        ):
            await self.publish(Topic.REF_INSTRUMENTS, instrument, self.clock.now_ns())
        await self._report("started")
        while not self._stop.is_set():
            self.rounds += 1
            await self._round(exchange, request, symbols)
            if self._stop.is_set():
                return
            if request.until_ns is not None:
                failed = [
                    s.job_id for s in self.last.values() if s.state is not CollectorState.COMPLETED
                ]
                self.state = CollectorState.FAILED if failed else CollectorState.COMPLETED
                await self._report(f"failed: {', '.join(failed)}" if failed else "completed")
                return
            await self._report(f"round {self.rounds} done; next in {request.interval_s:g} s")
            await self.clock.sleep(request.interval_s)  # stop() cancels the task

    async def _round(self, exchange: Any, request: CollectRequest, symbols: SymbolMap) -> None:
        now = self.clock.now_ns()
        for symbol in request.symbols:
            for timeframe in request.timeframes:
                if self._stop.is_set():
                    return
                kind: Literal["ohlcv", "trades"] = "trades" if timeframe == TRADES else "ohlcv"
                step = 1_000_000 if kind == "trades" else bar_interval_ns(timeframe)
                # Only closed bars: the end is the start of the bar in progress.
                end = request.until_ns if request.until_ns is not None else now // step * step
                start = (
                    request.since_ns if request.since_ns is not None else end - request.lookback_ns
                )
                if end <= start:
                    continue
                job = BackfillJob(
                    job_id=f"collect:{self._venue}:{symbol}:{timeframe}",
                    kind=kind,
                    symbol=symbol,
                    instrument_id=symbols.instrument_id(symbol),
                    venue=symbols.instrument_id(symbol).rsplit(".", 1)[1],
                    start_ns=start,
                    end_ns=end,
                    timeframe=None if kind == "trades" else timeframe,
                    page_limit=request.page_limit,
                )
                self.current = Backfill(
                    exchange, job, self.cursors, self.publish, self.clock, self.backoff()
                )
                self.last[job.job_id] = await self.current.run()
                self.current = None
