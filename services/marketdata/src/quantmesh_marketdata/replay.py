"""Replay of recorded ticks and bars from PostgreSQL or CSV files, paced in event time."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from quantmesh_common.bus.base import Bus
from quantmesh_common.clock import Clock
from quantmesh_common.envelope import Event
from quantmesh_common.messages import Bar, Tick
from quantmesh_common.topics import Topic
from quantmesh_marketdata.bars import BarAggregator
from quantmesh_marketdata.files import csv_header, is_ohlcv_header, read_ohlcv_csv, read_trades_csv
from quantmesh_marketdata.recorder import BAR_COLUMNS, TICK_COLUMNS

NANOS_PER_SECOND = 1_000_000_000
#: Rows fetched per query when reading the database.
DEFAULT_PAGE_ROWS = 5_000


def event_time(event: Event) -> int:
    """When an event happened: a tick's ts_event, a bar's ts_close (it is known at its close)."""
    if isinstance(event, Tick):
        return event.ts_event
    if isinstance(event, Bar):
        return event.ts_close
    raise TypeError(f"cannot replay {type(event).__name__}")


def topic_of(event: Event) -> str:
    """The topic an event is replayed on."""
    if isinstance(event, Tick):
        return Topic.MD_TICKS
    if isinstance(event, Bar):
        return Topic.MD_BARS
    raise TypeError(f"cannot replay {type(event).__name__}")


class Pacer:
    """Waits so that events are released `speed` times faster than they happened.

    `speed=None` (or 0) means as fast as possible; 1.0 is real time; 10.0 is ten times faster.
    The first event is released at once and anchors the schedule, so a slow consumer delays
    the replay without making it rush afterwards beyond the schedule.
    """

    def __init__(self, clock: Clock, speed: float | None) -> None:
        if speed is not None and speed < 0:
            raise ValueError("speed must be positive, or None for as fast as possible")
        self.clock = clock
        self.speed = speed or None
        self._anchor: tuple[int, int] | None = None  # (event time, clock time) of the first

    async def wait(self, ts_event: int) -> None:
        """Return when the event at `ts_event` is due."""
        if self.speed is None:
            return
        if self._anchor is None:
            self._anchor = (ts_event, self.clock.now_ns())
            return
        first_event, first_clock = self._anchor
        due = first_clock + int((ts_event - first_event) / self.speed)
        delay_ns = due - self.clock.now_ns()
        if delay_ns > 0:
            await self.clock.sleep(delay_ns / NANOS_PER_SECOND)


async def replay(
    events: Iterable[Event] | AsyncIterable[Event],
    bus: Bus,
    clock: Clock,
    *,
    speed: float | None = None,
) -> int:
    """Publish `events` in the order given on md.ticks / md.bars; return how many.

    Each envelope's ts_event is the event's own time (`event_time`), never the replay's, so
    consumers see the original timeline at any speed.
    """
    pacer = Pacer(clock, speed)
    count = 0

    async def one(event: Event) -> None:
        ts = event_time(event)
        await pacer.wait(ts)
        await bus.publish(topic_of(event), event, ts_event=ts)

    if isinstance(events, AsyncIterable):
        async for event in events:
            await one(event)
            count += 1
    else:
        for event in events:
            await one(event)
            count += 1
    return count


def csv_bars(path: Path, instrument_id: str, interval: str) -> Iterable[Bar]:
    """The bars of an OHLCV CSV file (see files.read_ohlcv_csv), for `replay`."""
    return read_ohlcv_csv(path, instrument_id, interval)


def file_events(path: Path, instrument_id: str, interval: str) -> Iterator[Event]:
    """The events a CSV file replays as, in the order a live feed would publish them.

    An OHLCV file (open/high/low/close columns) gives its bars. A trade file gives its trades
    as ticks plus the `interval` bars aggregated from them, each bar right after the trade
    that closed it (as the venue feed publishes them); the last open bar is closed at the end
    of the file, since no later trade will.
    """
    for _topic, event, _ts in file_records(path, instrument_id, interval):
        yield event


def file_records(path: Path, instrument_id: str, interval: str) -> Iterator[tuple[str, Event, int]]:
    """`file_events` as (topic, event, event time) triples: what a replay publishes, without
    asking each event its topic and time again (`topic_of`, `event_time`)."""
    ticks, bars_topic = Topic.MD_TICKS, Topic.MD_BARS
    if is_ohlcv_header(csv_header(path)):
        for bar in read_ohlcv_csv(path, instrument_id, interval):
            yield bars_topic, bar, bar.ts_close
        return
    bars = BarAggregator(instrument_id, interval)
    # Every tick of the file is a trade of `instrument_id`: update()'s checks are not needed.
    add_trade = bars.add_trade
    for tick in read_trades_csv(path, instrument_id):
        ts = tick.ts_event
        yield ticks, tick, ts
        closed = add_trade(ts, tick.price, tick.size)
        if closed is not None:
            yield bars_topic, closed, closed.ts_close
    for bar in bars.flush_until(2**63 - 1):
        yield bars_topic, bar, bar.ts_close


_TICK_SELECT = f"SELECT {', '.join(TICK_COLUMNS)} FROM ticks"
_TICK_ORDER = "ORDER BY ts_event, instrument_id, ts_init, trade_id NULLS LAST"


async def db_ticks(
    pool: Any,
    instrument_ids: Sequence[str],
    start_ns: int,
    end_ns: int,
    *,
    page_rows: int = DEFAULT_PAGE_ROWS,
) -> AsyncIterator[Tick]:
    """Stored ticks of `instrument_ids` with start_ns <= ts_event < end_ns, in event time.

    Read page by page (no transaction stays open while a slow replay waits). Ticks sharing a
    timestamp are ordered by instrument, ts_init, then trade id.
    """
    ids = list(instrument_ids)
    after = start_ns - 1
    while True:
        rows = await pool.fetch(
            f"{_TICK_SELECT} WHERE instrument_id = ANY($1) AND ts_event > $2 AND ts_event < $3 "
            f"{_TICK_ORDER} LIMIT $4",
            ids,
            after,
            end_ns,
            page_rows,
        )
        if len(rows) < page_rows:
            for row in rows:
                yield Tick.model_validate(dict(row))
            return
        # The page may have cut a timestamp's ticks in two: read that timestamp whole.
        edge = rows[-1]["ts_event"]
        for row in rows:
            if row["ts_event"] == edge:
                break
            yield Tick.model_validate(dict(row))
        for row in await pool.fetch(
            f"{_TICK_SELECT} WHERE instrument_id = ANY($1) AND ts_event = $2 {_TICK_ORDER}",
            ids,
            edge,
        ):
            yield Tick.model_validate(dict(row))
        after = edge


async def db_bars(
    pool: Any,
    instrument_ids: Sequence[str],
    interval: str,
    start_ns: int,
    end_ns: int,
    *,
    page_rows: int = DEFAULT_PAGE_ROWS,
) -> AsyncIterator[Bar]:
    """Stored `interval` bars of `instrument_ids` with start_ns <= ts_open < end_ns, in time order.

    Bars opening together are ordered by instrument id (the key continues from there).
    """
    ids = list(instrument_ids)
    last_ts, last_id = start_ns, ""  # instrument ids are never empty
    while True:
        rows = await pool.fetch(
            f"SELECT {', '.join(BAR_COLUMNS)} FROM bars"
            " WHERE instrument_id = ANY($1) AND interval = $2 AND ts_open < $3"
            " AND (ts_open, instrument_id) > ($4, $5)"
            " ORDER BY ts_open, instrument_id LIMIT $6",
            ids,
            interval,
            end_ns,
            last_ts,
            last_id,
            page_rows,
        )
        for row in rows:
            yield Bar.model_validate(dict(row))
        if len(rows) < page_rows:
            return
        last_ts, last_id = rows[-1]["ts_open"], rows[-1]["instrument_id"]
