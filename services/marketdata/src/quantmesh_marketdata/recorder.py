"""The recorder: ticks and bars to PostgreSQL in COPY batches, 24 h statistics to Redis."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from prometheus_client import Counter

from quantmesh_common.clock import Clock
from quantmesh_common.envelope import Envelope, Event
from quantmesh_common.messages import Bar, Tick, TickKind
from quantmesh_common.storage.redis import RedisClient
from quantmesh_marketdata.stats import RollingStats24h, Stats24h

log = logging.getLogger(__name__)

#: Columns of `ticks` (V0001) in the order rows are copied.
TICK_COLUMNS = (
    "venue",
    "instrument_id",
    "ts_event",
    "ts_init",
    "kind",
    "price",
    "size",
    "aggressor_side",
    "trade_id",
    "bid",
    "ask",
    "bid_size",
    "ask_size",
)
#: Columns of `bars` (V0001) in the order rows are copied.
BAR_COLUMNS = (
    "instrument_id",
    "interval",
    "ts_open",
    "ts_close",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "trades",
)

#: Default prefix of every Redis key the recorder writes (see the README for the layout).
DEFAULT_REDIS_PREFIX = "qm:md:"

RECORDED_ROWS = Counter(
    "quantmesh_marketdata_recorded_rows",
    "Rows the recorder sent to PostgreSQL, by table and outcome (inserted, duplicate).",
    ["table", "outcome"],
)

Row = tuple[Any, ...]

_TRADE = TickKind.TRADE
_TICK_KEY = TICK_COLUMNS.index("instrument_id")
_BAR_KEY = BAR_COLUMNS.index("instrument_id")


def tick_row(tick: Tick) -> Row:
    """The `ticks` row of a tick, in TICK_COLUMNS order."""
    return (
        tick.venue,
        tick.instrument_id,
        tick.ts_event,
        tick.ts_init,
        tick.kind.value,
        tick.price,
        tick.size,
        tick.aggressor_side.value,
        tick.trade_id,
        tick.bid,
        tick.ask,
        tick.bid_size,
        tick.ask_size,
    )


def bar_row(bar: Bar) -> Row:
    """The `bars` row of a bar, in BAR_COLUMNS order."""
    return (
        bar.instrument_id,
        bar.interval,
        bar.ts_open,
        bar.ts_close,
        bar.open,
        bar.high,
        bar.low,
        bar.close,
        bar.volume,
        bar.trades,
    )


#: Text-format COPY (PostgreSQL's default): tab-separated, `\\N` for NULL, one row a line.
_NULL = "\\N"
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})

#: Rows of one table grouped by instrument: instrument id -> its COPY lines, in arrival order.
Lines = Mapping[str, Sequence[str]]


def copy_text(value: str) -> str:
    """A text cell of a text-format COPY line: backslash, tab, newline and CR escaped."""
    # isprintable() is False for tab, newline and CR: one C call instead of four searches.
    if "\\" in value or not value.isprintable():
        return value.translate(_ESCAPES)
    return value


def _cell(value: Any) -> str:
    if value is None:
        return _NULL
    if isinstance(value, str):
        return copy_text(value)
    return str(value)


def row_line(row: Row) -> str:
    """A row (any column order) as one text-format COPY line, newline included."""
    return "\t".join([_cell(value) for value in row]) + "\n"


def tick_line(tick: Tick) -> str:
    """A tick's `ticks` row as a text-format COPY line, in TICK_COLUMNS order.

    Built straight from the model (no row tuple, no per-column encoder): this runs once per
    recorded tick. Venue, instrument id, kind and side are validated to safe characters
    (`messages`: patterns and enums); the trade id is the venue's text and is escaped. A
    Decimal prints as its exact digits, which PostgreSQL's numeric input reads back exactly
    (exponent forms such as 1E+3 included); `!s` because Decimal's `__format__` is about three
    times slower than its `__str__`.
    """
    trade_id = tick.trade_id
    if (
        tick.kind is _TRADE
        and tick.bid is None
        and tick.ask is None
        and tick.bid_size is None
        and tick.ask_size is None
    ):
        return (
            f"{tick.venue}\t{tick.instrument_id}\t{tick.ts_event}\t{tick.ts_init}\tTRADE\t"
            f"{tick.price!s}\t{tick.size!s}\t{tick.aggressor_side}\t"
            f"{_NULL if trade_id is None else copy_text(trade_id)}\t\\N\t\\N\t\\N\t\\N\n"
        )
    return row_line(tick_row(tick))


def bar_line(bar: Bar) -> str:
    """A bar's `bars` row as a text-format COPY line, in BAR_COLUMNS order."""
    return row_line(bar_row(bar))


def group_lines(rows: Sequence[Row], key_index: int) -> dict[str, list[str]]:
    """Row tuples as COPY lines grouped by the instrument id at `key_index`."""
    groups: dict[str, list[str]] = {}
    for row in rows:
        key = row[key_index]
        lines = groups.get(key)
        if lines is None:
            lines = groups[key] = []
        lines.append(row_line(row))
    return groups


def _inserted(status: str) -> int:
    # asyncpg returns the command tag, e.g. "INSERT 0 4999".
    return int(status.rsplit(" ", 1)[-1])


class PostgresSink:
    """Writes rows with text-format COPY, idempotently on the tables' unique keys.

    Rows arrive as COPY lines grouped by instrument (`Lines`; `write_ticks` / `write_bars`
    encode row tuples first). Fast path: each batch is COPYed straight into `ticks` / `bars`,
    split over up to `parallel` connections (one transaction each) with whole instruments per
    chunk, so chunks never wait on each other's keys; instruments are dealt largest first to
    the emptiest chunk. The lines are joined into one buffer per chunk: the client does no
    per-column encoding (asyncpg's binary encoding of the row tuples, Decimals above all, was
    the client's limit). COPY cannot skip duplicates: a chunk that hits a unique violation (a
    redelivered or re-collected row) is rolled back and written again through a per-session
    temporary staging table and `INSERT ... SELECT ... ON CONFLICT DO NOTHING`. Either way
    writing the same rows twice stores them once. Tables are found through the connection's
    search_path.
    """

    def __init__(self, pool: Any, *, parallel: int = 2, min_chunk_rows: int = 2_000) -> None:
        self.pool = pool
        self.parallel = max(1, parallel)
        self.min_chunk_rows = min_chunk_rows
        self.fallbacks = 0

    async def write_ticks(self, rows: Sequence[Row]) -> int:
        """Store tick rows (TICK_COLUMNS order); return how many were new."""
        return await self.write_tick_lines(group_lines(rows, _TICK_KEY))

    async def write_bars(self, rows: Sequence[Row]) -> int:
        """Store bar rows (BAR_COLUMNS order); return how many were new."""
        return await self.write_bar_lines(group_lines(rows, _BAR_KEY))

    async def write_tick_lines(self, lines: Lines) -> int:
        """Store `tick_line` lines; return how many were new (the rest were already stored)."""
        return await self._write(
            lines,
            "ticks",
            TICK_COLUMNS,
            "ON CONFLICT (venue, instrument_id, ts_event, trade_id) DO NOTHING",
        )

    async def write_bar_lines(self, lines: Lines) -> int:
        """Store `bar_line` lines; return how many were new (a stored bar is kept as it was)."""
        return await self._write(
            lines, "bars", BAR_COLUMNS, "ON CONFLICT (instrument_id, interval, ts_open) DO NOTHING"
        )

    def _chunks(self, lines: Lines, total: int) -> list[tuple[bytes, int]]:
        """(COPY buffer, rows) per chunk: whole instruments, balanced by row count."""
        n = min(self.parallel, len(lines), total // self.min_chunk_rows)
        if n <= 1:
            parts = [line for group in lines.values() for line in group]
            return [("".join(parts).encode(), total)]
        chunks: list[list[str]] = [[] for _ in range(n)]
        sizes = [0] * n
        for group in sorted(lines.values(), key=len, reverse=True):
            i = sizes.index(min(sizes))
            chunks[i].extend(group)
            sizes[i] += len(group)
        return [("".join(c).encode(), size) for c, size in zip(chunks, sizes, strict=True) if c]

    async def _write(self, lines: Lines, table: str, columns: Sequence[str], conflict: str) -> int:
        total = sum(len(group) for group in lines.values())
        if not total:
            return 0
        counts = await asyncio.gather(
            *(
                self._write_chunk(data, rows, table, columns, conflict)
                for data, rows in self._chunks(lines, total)
            )
        )
        inserted = sum(counts)
        RECORDED_ROWS.labels(table, "inserted").inc(inserted)
        RECORDED_ROWS.labels(table, "duplicate").inc(total - inserted)
        return inserted

    async def _write_chunk(
        self, data: bytes, rows: int, table: str, columns: Sequence[str], conflict: str
    ) -> int:
        # A memoryview: asyncpg would take bytes for a file name.
        source = memoryview(data)
        async with self.pool.acquire() as conn:
            try:
                async with conn.transaction():
                    await conn.copy_to_table(table, source=source, columns=list(columns))
                return rows
            except (asyncpg.UniqueViolationError, asyncpg.DeadlockDetectedError):
                self.fallbacks += 1
            stage = f"qm_stage_{table}"
            names = ", ".join(f'"{c}"' for c in columns)
            async with conn.transaction():
                await conn.execute(
                    f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table} INCLUDING DEFAULTS)"
                    " ON COMMIT DELETE ROWS"
                )
                await conn.copy_to_table(stage, source=source, columns=list(columns))
                status = await conn.execute(
                    f"INSERT INTO {table} ({names}) SELECT {names} FROM {stage} {conflict}"
                )
            return _inserted(status)


class RedisLatest:
    """Latest price and 24 h statistics per instrument, as Redis hashes.

    Keys: `<prefix>latest:<instrument_id>` (a hash of Stats24h.as_fields()) and
    `<prefix>instruments` (a set of the instrument ids that have a hash).
    """

    def __init__(self, client: RedisClient, prefix: str = DEFAULT_REDIS_PREFIX) -> None:
        self.client = client
        self.prefix = prefix

    def key(self, instrument_id: str) -> str:
        """The hash key of one instrument."""
        return f"{self.prefix}latest:{instrument_id}"

    @property
    def index_key(self) -> str:
        """The set of instrument ids with a hash."""
        return f"{self.prefix}instruments"

    async def write(self, stats: Iterable[Stats24h]) -> None:
        """Replace the hashes of these instruments in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        ids: list[str] = []
        for item in stats:
            pipe.hset(self.key(item.instrument_id), mapping=item.as_fields())
            ids.append(item.instrument_id)
        if not ids:
            return
        pipe.sadd(self.index_key, *ids)
        await pipe.execute()

    async def read(self, instrument_id: str) -> dict[str, str]:
        """The hash of one instrument (empty if none)."""
        result: dict[str, str] = await self.client.hgetall(self.key(instrument_id))
        return result


def _merged(first: dict[str, list[str]], then: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each instrument's lines of `first` followed by its lines of `then`."""
    for instrument_id, lines in then.items():
        first.setdefault(instrument_id, []).extend(lines)
    return first


class RecorderStalledError(BaseException):
    """The database refused writes for so long that the buffer is full.

    A BaseException on purpose: raised from the bus handler it stops the subscription without
    committing (the messages are redelivered after a restart) instead of dead-lettering them.
    """


@dataclass
class FlushResult:
    """What one flush wrote."""

    ticks: int = 0
    ticks_inserted: int = 0
    bars: int = 0
    bars_inserted: int = 0
    instruments: int = 0


class Recorder:
    """Buffers ticks and bars and flushes them every `batch_rows` rows or `flush_interval_s`.

    Trades also update each instrument's RollingStats24h at once; the instruments changed
    since the last flush get their Redis hash rewritten after the rows are stored. A flush
    that fails keeps its rows for the next one; past `max_pending_rows` the handler raises
    RecorderStalledError.
    """

    def __init__(
        self,
        sink: PostgresSink,
        latest: RedisLatest | None,
        clock: Clock,
        *,
        batch_rows: int = 10_000,
        flush_interval_s: float = 0.25,
        max_pending_rows: int | None = None,
    ) -> None:
        if batch_rows < 1 or flush_interval_s <= 0:
            raise ValueError("batch_rows must be >= 1 and flush_interval_s > 0")
        self.sink = sink
        self.latest = latest
        self.clock = clock
        self.batch_rows = batch_rows
        self.flush_interval_s = flush_interval_s
        self.max_pending_rows = max_pending_rows or 20 * batch_rows
        self.stats: dict[str, RollingStats24h] = {}
        # COPY lines by instrument (the sink's chunks are whole instruments), and their count.
        self._ticks: dict[str, list[str]] = {}
        self._bars: dict[str, list[str]] = {}
        self._pending = 0
        self._dirty: set[str] = set()
        self._oldest_ns: int | None = None
        self._lock = asyncio.Lock()
        self.written_ticks = 0
        self.written_bars = 0

    @property
    def pending(self) -> int:
        """Rows buffered and not yet stored."""
        return self._pending

    def add(self, event: Event) -> None:
        """Buffer a Tick or Bar (anything else is ignored) and update the 24 h statistics."""
        if isinstance(event, Tick):
            instrument_id = event.instrument_id
            lines = self._ticks.get(instrument_id)
            if lines is None:
                lines = self._ticks[instrument_id] = []
            lines.append(tick_line(event))
            stats = self.stats.get(instrument_id)
            if stats is None:
                stats = self.stats[instrument_id] = RollingStats24h(instrument_id)
            if stats.update(event):
                self._dirty.add(instrument_id)
        elif isinstance(event, Bar):
            lines = self._bars.get(event.instrument_id)
            if lines is None:
                lines = self._bars[event.instrument_id] = []
            lines.append(bar_line(event))
        else:
            return
        self._pending += 1
        if self._oldest_ns is None:
            self._oldest_ns = self.clock.now_ns()

    async def handle(self, envelope: Envelope[Any]) -> None:
        """The bus handler of md.ticks and md.bars: buffer, and flush when a batch is full."""
        self.add(envelope.payload)
        if self.pending >= self.batch_rows:
            try:
                await self.flush()
            except Exception:
                log.exception("recorder flush failed; %d rows kept for a retry", self.pending)
                if self.pending >= self.max_pending_rows:
                    raise RecorderStalledError(
                        f"{self.pending} rows could not be stored; stopping the recorder"
                    ) from None

    async def flush(self) -> FlushResult:
        """Store everything buffered, then rewrite the Redis hashes of changed instruments."""
        async with self._lock:
            ticks, bars, dirty = self._ticks, self._bars, self._dirty
            self._ticks, self._bars, self._dirty = {}, {}, set()
            self._pending = 0
            self._oldest_ns = None
            result = FlushResult(
                ticks=sum(map(len, ticks.values())), bars=sum(map(len, bars.values()))
            )
            try:
                result.ticks_inserted = await self.sink.write_tick_lines(ticks)
                ticks = {}
                result.bars_inserted = await self.sink.write_bar_lines(bars)
                bars = {}
            except BaseException:
                # Put back what was not stored, ahead of what arrived meanwhile.
                self._ticks = _merged(ticks, self._ticks)
                self._bars = _merged(bars, self._bars)
                self._pending = sum(map(len, self._ticks.values())) + sum(
                    map(len, self._bars.values())
                )
                self._dirty |= dirty
                if self.pending:
                    self._oldest_ns = self.clock.now_ns()
                raise
            self.written_ticks += result.ticks
            self.written_bars += result.bars
            if self.latest is not None and dirty:
                snapshots = [s for i in dirty if (s := self.stats[i].snapshot()) is not None]
                try:
                    await self.latest.write(snapshots)
                except Exception:
                    log.exception("writing latest prices to redis failed; retrying next flush")
                    self._dirty |= dirty
                except BaseException:
                    self._dirty |= dirty
                    raise
                result.instruments = len(snapshots)
            return result

    async def run(self) -> None:
        """Flush rows older than `flush_interval_s` until cancelled (a background task)."""
        interval_ns = int(self.flush_interval_s * 1_000_000_000)
        while True:
            oldest = self._oldest_ns
            if oldest is None:
                await self.clock.sleep(self.flush_interval_s)
                continue
            wait_ns = oldest + interval_ns - self.clock.now_ns()
            if wait_ns > 0:
                await self.clock.sleep(wait_ns / 1_000_000_000)
                continue
            try:
                await self.flush()
            except Exception:
                log.exception("recorder flush failed; %d rows kept for a retry", self.pending)
                await self.clock.sleep(self.flush_interval_s)
