"""Historical backfill of OHLCV and trades through ccxt REST: paged, rate-limited, resumable."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from quantmesh_common.ccxt_context import decimal_guarded
from quantmesh_common.clock import Clock
from quantmesh_common.envelope import Event
from quantmesh_common.messages import CollectorState, CollectorStatus, bar_interval_ns
from quantmesh_common.topics import Topic
from quantmesh_marketdata.health import Backoff
from quantmesh_marketdata.normalize import NS_PER_MS, NormalizeError, ohlcv_to_bar, trade_to_tick
from quantmesh_marketdata.venue import ccxt_module

log = logging.getLogger(__name__)

#: publish(topic, event, ts_event), as for the streamer.
Publish = Callable[[str, Event, int], Awaitable[None]]

#: How far an empty page of trades moves the cursor: venues answer trades by time window.
TRADES_EMPTY_STEP_NS = 3_600 * 1_000_000_000


@dataclass(frozen=True, slots=True)
class BackfillJob:
    """What to fetch: one symbol's OHLCV of one timeframe, or its trades, over [start, end)."""

    job_id: str
    kind: Literal["ohlcv", "trades"]
    symbol: str
    instrument_id: str
    venue: str
    start_ns: int
    end_ns: int
    timeframe: str | None = None
    page_limit: int = 500
    max_retries: int = 5

    def __post_init__(self) -> None:
        if self.end_ns <= self.start_ns:
            raise ValueError("a backfill needs start < end")
        if self.kind == "ohlcv" and self.timeframe is None:
            raise ValueError("an OHLCV backfill needs a timeframe")
        if self.page_limit < 1:
            raise ValueError("page_limit must be >= 1")


class CursorStore(Protocol):
    """Where a job's cursor is persisted, so an interrupted backfill resumes."""

    def load(self, job_id: str) -> int | None:
        """The saved cursor of `job_id` (UTC ns), or None."""
        ...

    def save(self, job_id: str, cursor_ns: int) -> None:
        """Persist `cursor_ns`: everything before it is collected."""
        ...


class FileCursorStore:
    """Cursors in one JSON file ({job_id: cursor_ns}), rewritten atomically on each save."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("backfill cursors %s unreadable (%s); starting over", self.path, exc)
            return {}
        return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def load(self, job_id: str) -> int | None:
        """The saved cursor of `job_id`, or None."""
        return self._read().get(job_id)

    def save(self, job_id: str, cursor_ns: int) -> None:
        """Persist the cursor (a crash leaves the previous file or the new one)."""
        data = self._read()
        data[job_id] = cursor_ns
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class Backfill:
    """Runs one BackfillJob page by page, publishing Bars (md.bars) or trade Ticks (md.ticks).

    Pages are asked with `since` = the cursor and `limit` = page_limit; ccxt's rate limiter
    (enableRateLimit) spaces the requests. After each page the cursor is saved, and a
    CollectorStatus with the progress is published on md.collector and logged. `cancel()` stops
    it between pages (state CANCELLED); a crash or task cancellation loses at most the page in
    flight, which is fetched again on resume (downstream is idempotent on trade id / bar key).
    A network error is retried with backoff `max_retries` times before the job FAILs.
    """

    def __init__(
        self,
        exchange: Any,
        job: BackfillJob,
        cursors: CursorStore,
        publish: Publish,
        clock: Clock,
        backoff: Backoff | None = None,
    ) -> None:
        self.exchange = decimal_guarded(exchange)  # ccxt must not change our decimal context
        self.job = job
        self.cursors = cursors
        self.publish = publish
        self.clock = clock
        self.backoff = backoff or Backoff(base_s=1.0, cap_s=30.0)
        self.fetched = 0
        self.pages = 0
        self.cursor_ns = job.start_ns
        self.state = CollectorState.STOPPED
        self._cancel = asyncio.Event()
        self._seen_at_cursor: set[str] = set()

    def cancel(self) -> None:
        """Stop after the page in flight; the cursor stays saved for a later resume."""
        self._cancel.set()

    @property
    def progress(self) -> float:
        """Fraction of [start, end) collected."""
        span = self.job.end_ns - self.job.start_ns
        return min(1.0, max(0.0, (self.cursor_ns - self.job.start_ns) / span))

    def status(self, message: str = "") -> CollectorStatus:
        """The job's status now."""
        job = self.job
        return CollectorStatus(
            job_id=job.job_id,
            kind=f"backfill.{job.kind}",
            state=self.state,
            venue=job.venue,
            instrument_id=job.instrument_id,
            timeframe=job.timeframe,
            start_ns=job.start_ns,
            end_ns=job.end_ns,
            cursor_ns=self.cursor_ns,
            fetched=self.fetched,
            progress=round(self.progress, 6),
            message=message,
            details={"symbol": job.symbol, "pages": str(self.pages)},
            ts_event=self.clock.now_ns(),
        )

    async def _report(self, message: str = "") -> CollectorStatus:
        status = self.status(message)
        await self.publish(Topic.MD_COLLECTOR, status, status.ts_event)
        return status

    async def run(self) -> CollectorStatus:
        """Fetch until the end, cancellation or failure; returns the final status."""
        job = self.job
        saved = self.cursors.load(job.job_id)
        self.cursor_ns = max(job.start_ns, saved) if saved is not None else job.start_ns
        self.state = CollectorState.RUNNING
        resumed = f"resumed at {self.cursor_ns}" if saved is not None else "started"
        log.info("backfill %s %s %s: %s", job.job_id, job.kind, job.symbol, resumed)
        await self._report(resumed)
        ccxt = ccxt_module()
        while self.cursor_ns < job.end_ns:
            if self._cancel.is_set():
                self.state = CollectorState.CANCELLED
                log.info("backfill %s cancelled at %.1f%%", job.job_id, 100 * self.progress)
                return await self._report("cancelled")
            try:
                page = await self._fetch_page()
            except ccxt.NetworkError as exc:
                if self.backoff.attempt >= job.max_retries:
                    self.state = CollectorState.FAILED
                    log.error("backfill %s failed: %s", job.job_id, exc)
                    return await self._report(f"failed: {exc}"[:500])
                delay = self.backoff.next_delay()
                log.warning("backfill %s: %s; retry in %.2f s", job.job_id, exc, delay)
                await self.clock.sleep(delay)
                continue
            except ccxt.BaseError as exc:  # a bad symbol or request: retrying will not help
                self.state = CollectorState.FAILED
                log.error("backfill %s failed: %s", job.job_id, exc)
                return await self._report(f"failed: {exc}"[:500])
            self.backoff.reset()
            self.pages += 1
            await self._publish_page(page)
            self.cursors.save(job.job_id, self.cursor_ns)
            log.info(
                "backfill %s %s: %5.1f%% (%d rows, %d pages)",
                job.job_id,
                job.symbol,
                100 * self.progress,
                self.fetched,
                self.pages,
            )
            await self._report()
        self.cursor_ns = max(self.cursor_ns, job.end_ns)  # a later saved cursor stays
        self.cursors.save(job.job_id, self.cursor_ns)
        self.state = CollectorState.COMPLETED
        return await self._report("completed")

    async def _fetch_page(self) -> list[Any]:
        job = self.job
        since_ms = self.cursor_ns // NS_PER_MS
        if job.kind == "ohlcv":
            rows = await self.exchange.fetch_ohlcv(
                job.symbol, job.timeframe, since_ms, job.page_limit
            )
        else:
            rows = await self.exchange.fetch_trades(job.symbol, since_ms, job.page_limit)
        return list(rows or [])

    async def _publish_page(self, page: list[Any]) -> None:
        job = self.job
        now = self.clock.now_ns()
        events: list[tuple[str, Event, int]] = []
        last_ns: int | None = None  # the latest row in range, published before or not
        keys_at_last: set[str] = set()
        for row in page:
            try:
                if job.kind == "ohlcv":
                    assert job.timeframe is not None
                    bar = ohlcv_to_bar(row, job.instrument_id, job.timeframe)
                    if not self.cursor_ns <= bar.ts_open < job.end_ns:
                        continue
                    events.append((Topic.MD_BARS, bar, bar.ts_close))
                    last_ns = bar.ts_open if last_ns is None else max(last_ns, bar.ts_open)
                    continue
                tick = trade_to_tick(row, job.instrument_id, now)
            except (NormalizeError, ValueError) as exc:
                log.warning("backfill %s: row skipped: %s", job.job_id, exc)
                continue
            if not self.cursor_ns <= tick.ts_event < job.end_ns:
                continue
            key = tick.trade_id or f"{tick.ts_event}:{tick.price}:{tick.size}"
            if last_ns is None or tick.ts_event > last_ns:
                last_ns, keys_at_last = tick.ts_event, set()
            if tick.ts_event == last_ns:
                keys_at_last.add(key)
            if tick.ts_event == self.cursor_ns and key in self._seen_at_cursor:
                continue  # the page boundary's millisecond, published with the last page
            events.append((Topic.MD_TICKS, tick, tick.ts_event))
        for topic, event, ts_event in events:
            await self.publish(topic, event, ts_event)
        self.fetched += len(events)
        self._advance(last_ns, keys_at_last, bool(events))

    def _advance(self, last_ns: int | None, keys_at_last: set[str], published: bool) -> None:
        job = self.job
        if last_ns is None:
            # Nothing in this window (no trading, or before the listing): move past it.
            step = (
                job.page_limit * bar_interval_ns(job.timeframe)
                if job.kind == "ohlcv" and job.timeframe
                else TRADES_EMPTY_STEP_NS
            )
            self.cursor_ns = min(job.end_ns, self.cursor_ns + step)
            self._seen_at_cursor = set()
        elif job.kind == "ohlcv":
            assert job.timeframe is not None
            self.cursor_ns = last_ns + bar_interval_ns(job.timeframe)
        elif last_ns == self.cursor_ns and not published:
            # A whole page inside one millisecond, all seen: step over that millisecond.
            self.cursor_ns, self._seen_at_cursor = last_ns + NS_PER_MS, set()
        else:
            # Ask again from the last trade's millisecond: more trades may share it.
            if last_ns == self.cursor_ns:
                keys_at_last |= self._seen_at_cursor
            self.cursor_ns, self._seen_at_cursor = last_ns, keys_at_last
