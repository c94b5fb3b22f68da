"""Where the portfolio keeps its state across restarts: PostgreSQL (asyncpg).

Each applied fill is stored in one transaction with its effects — the fill's key, the position
row, its open lots, the account's balances, the performance books it moved and the round trips
it closed — so a redelivered fill is recognised after a restart, and the state rebuilt at start
is exactly what the fills applied. Open lots are rows (`portfolio_lots`, and the trip books'
`portfolio_trip_lots`, V0031) numbered in FIFO order, and a write stores only those that
changed. Snapshots add the equity snapshot rows (and the strategies' curve points) and refresh
the marks, the peak and the lots' price ranges. Performance reports are stored as they are
published (V0017).
"""

from __future__ import annotations

import json
import logging
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from quantmesh_common import performance as perf
from quantmesh_common.messages import (
    PerformanceReport,
    PortfolioSnapshot,
    Position,
    PositionSide,
)
from quantmesh_portfolio.performance import ClosedTrip, PerformanceTracker, TripBook, TripLot
from quantmesh_portfolio.positions import Account, FillKey, Lot, Portfolio, PositionBook

log = logging.getLogger(__name__)

_UPSERT_POSITION = """
INSERT INTO positions (account_id, instrument_id, side, quantity, avg_entry_price, realized_pnl,
                       unrealized_pnl, fees, last_price, version, ts_event)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1, $10)
ON CONFLICT (account_id, instrument_id) DO UPDATE SET
    side = EXCLUDED.side, quantity = EXCLUDED.quantity,
    avg_entry_price = EXCLUDED.avg_entry_price, realized_pnl = EXCLUDED.realized_pnl,
    unrealized_pnl = EXCLUDED.unrealized_pnl, fees = EXCLUDED.fees,
    last_price = EXCLUDED.last_price, version = positions.version + 1,
    ts_event = EXCLUDED.ts_event, ts_updated = qm_now_ns()
"""

_UPSERT_BALANCE = """
INSERT INTO portfolio_balances (account_id, currency, amount, ts_event) VALUES ($1, $2, $3, $4)
ON CONFLICT (account_id, currency) DO UPDATE SET amount = EXCLUDED.amount,
    ts_event = EXCLUDED.ts_event
"""

_UPSERT_ACCOUNT = """
INSERT INTO portfolio_accounts (account_id, base_currency, peak_equity, ts_event, capital)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (account_id) DO UPDATE SET base_currency = EXCLUDED.base_currency,
    peak_equity = EXCLUDED.peak_equity, ts_event = EXCLUDED.ts_event,
    capital = EXCLUDED.capital
"""

_UPSERT_TRIP_BOOK = """
INSERT INTO portfolio_trip_books (account_id, strategy_id, instrument_id, state, ts_event)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (account_id, strategy_id, instrument_id) DO UPDATE SET state = EXCLUDED.state,
    ts_event = EXCLUDED.ts_event
"""

_INSERT_TRIP = """
INSERT INTO portfolio_round_trips (account_id, strategy_id, instrument_id, close_fill_id, side,
    quantity, entry_price, exit_price, entry_ts, exit_ts, fees, pnl, mae, mfe)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
ON CONFLICT DO NOTHING
"""

_INSERT_REPORT = """
INSERT INTO portfolio_performance (account_id, strategy_id, ts_event, report_id, total_return,
    sharpe, max_drawdown, trades, net_pnl, report)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (account_id, strategy_id, ts_event) DO UPDATE SET report_id = EXCLUDED.report_id,
    total_return = EXCLUDED.total_return, sharpe = EXCLUDED.sharpe,
    max_drawdown = EXCLUDED.max_drawdown, trades = EXCLUDED.trades,
    net_pnl = EXCLUDED.net_pnl, report = EXCLUDED.report
"""

_INSERT_SNAPSHOT = """
INSERT INTO equity_snapshots (account_id, ts_event, base_currency, equity, realized_pnl,
                              unrealized_pnl, fees, peak_equity, drawdown, balances, snapshot)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (account_id, ts_event) DO NOTHING
"""


#: Drops each book's lots below its front lot (closed since the last write).
_DELETE_CLOSED_LOTS = """
DELETE FROM portfolio_lots AS l
USING unnest($1::text[], $2::text[], $3::integer[]) AS d(account_id, instrument_id, front)
WHERE l.account_id = d.account_id AND l.instrument_id = d.instrument_id AND l.seq < d.front
"""

#: Writes lots new since the last write, and the front lot, whose quantity a fill may have cut.
_UPSERT_LOTS = """
INSERT INTO portfolio_lots (account_id, instrument_id, seq, quantity, price, direction, ts_event)
SELECT * FROM unnest($1::text[], $2::text[], $3::integer[], $4::numeric[], $5::numeric[],
                     $6::smallint[], $7::bigint[])
ON CONFLICT (account_id, instrument_id, seq) DO UPDATE SET quantity = EXCLUDED.quantity
"""


def _changed_lots(book: PositionBook) -> list[Lot]:
    """The lots a write must (re)store: the front one and those added since `stored_seq`."""
    lots = book.lots
    changed: list[Lot] = []
    for lot in reversed(lots):  # new lots are at the back
        if lot.seq < book.stored_seq:
            break
        changed.append(lot)
    if lots and lots[0].seq < book.stored_seq:
        changed.append(lots[0])
    return changed


async def _write_lot_changes(
    conn: Any,
    delete: str,
    fronts: list[tuple[Any, ...]],
    upsert: str,
    changed: list[tuple[Any, ...]],
) -> None:
    """Run `delete` over the books' (key..., front seq) and `upsert` over the changed lots'
    rows, each as one statement taking a column's values per parameter (unnest)."""
    if fronts:
        await conn.execute(delete, *(list(column) for column in zip(*fronts, strict=True)))
    if changed:
        await conn.execute(upsert, *(list(column) for column in zip(*changed, strict=True)))


def _lot_fronts(books: Iterable[PositionBook]) -> list[tuple[Any, ...]]:
    """Each book's key and front lot's number (`_DELETE_CLOSED_LOTS`)."""
    return [(b.account_id, b.instrument_id, b.lots[0].seq if b.lots else b.next_seq) for b in books]


def _lot_rows(books: Iterable[PositionBook]) -> list[tuple[Any, ...]]:
    """The rows of the books' changed lots (`_UPSERT_LOTS`)."""
    return [
        (b.account_id, b.instrument_id, lot.seq, lot.quantity, lot.price, b.direction, lot.ts_ns)
        for b in books
        for lot in _changed_lots(b)
    ]


async def _write_lots(conn: Any, books: list[PositionBook]) -> None:
    """Bring the stored lots of `books` to their state in memory (the changes only)."""
    await _write_lot_changes(
        conn, _DELETE_CLOSED_LOTS, _lot_fronts(books), _UPSERT_LOTS, _lot_rows(books)
    )


def _lots_stored(books: Iterable[PositionBook]) -> None:
    """Note that `books` are stored as they are now (after the write's commit)."""
    for book in books:
        book.stored_seq = book.next_seq


#: Drops each trip book's lots below its front lot (closed since the last write).
_DELETE_CLOSED_TRIP_LOTS = """
DELETE FROM portfolio_trip_lots AS l
USING unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
    AS d(account_id, strategy_id, instrument_id, front)
WHERE l.account_id = d.account_id AND l.strategy_id = d.strategy_id
    AND l.instrument_id = d.instrument_id AND l.seq < d.front
"""

#: Writes trip lots new or widened since the last write, and the front lot (a fill may cut it).
_UPSERT_TRIP_LOTS = """
INSERT INTO portfolio_trip_lots (account_id, strategy_id, instrument_id, seq, quantity, price,
                                 low, high)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::numeric[],
                     $6::numeric[], $7::numeric[], $8::numeric[])
ON CONFLICT (account_id, strategy_id, instrument_id, seq) DO UPDATE SET
    quantity = EXCLUDED.quantity, low = EXCLUDED.low, high = EXCLUDED.high
"""


def _trip_lot_fronts(books: Iterable[TripBook]) -> list[tuple[Any, ...]]:
    """Each trip book's key and front lot's number (`_DELETE_CLOSED_TRIP_LOTS`)."""
    return [(b.account_id, b.strategy_id or "", b.instrument_id, b.front_seq()) for b in books]


def _trip_lot_rows(books: Iterable[TripBook]) -> list[tuple[Any, ...]]:
    """The rows of the trip books' changed lots (`_UPSERT_TRIP_LOTS`)."""
    return [
        (
            b.account_id,
            b.strategy_id or "",
            b.instrument_id,
            lot.seq,
            lot.quantity,
            lot.price,
            lot.low,
            lot.high,
        )
        for b in books
        for lot in b.changed_lots()
    ]


async def _write_trip_books(conn: Any, books: list[tuple[TripBook, int]]) -> None:
    """Store `books` (each once) as they are in memory: the state, and the lots that changed."""
    if not books:
        return
    await conn.executemany(_UPSERT_TRIP_BOOK, [_book_row(b, ts) for b, ts in books])
    trip_books = [b for b, _ in books]
    await _write_lot_changes(
        conn,
        _DELETE_CLOSED_TRIP_LOTS,
        _trip_lot_fronts(trip_books),
        _UPSERT_TRIP_LOTS,
        _trip_lot_rows(trip_books),
    )


def _trip_lots_stored(books: Iterable[TripBook]) -> None:
    """Note that `books`' lots are stored as they are now (after the write's commit)."""
    for book in books:
        book.dirty_seq = book.next_seq


_INSERT_APPLIED_FILLS = """
INSERT INTO portfolio_applied_fills (account_id, instrument_id, fill_id, ts_event, position,
                                     event_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::jsonb[], $6::text[])
ON CONFLICT DO NOTHING
RETURNING 1
"""


def _from_arrays(statement: str, select: str) -> str:
    """`statement` (INSERT ... VALUES (...) ON CONFLICT ...) inserting the rows of `select`."""
    values, conflict = statement.index("VALUES"), statement.index("ON CONFLICT")
    return f"{statement[:values]}{select}\n{statement[conflict:]}"


def _shifted(statement: str, by: int) -> str:
    """`statement` with its parameters $n renumbered $(n + by)."""
    return re.sub(r"\$(\d+)", lambda m: f"${int(m[1]) + by}", statement)


def _one_statement(parts: list[str], result: str) -> str:
    """`parts` as the data-modifying CTEs w0, w1... of one statement selecting `result`, each
    part's parameters numbered after the previous parts'."""
    ctes: list[str] = []
    shift = 0
    for i, part in enumerate(parts):
        ctes.append(f"w{i} AS (\n{_shifted(part.strip(), shift)}\n)")
        shift += max(int(n) for n in re.findall(r"\$(\d+)", part))
    return f"WITH {', '.join(ctes)}\nSELECT {result}"


#: The fills of a batch and their effects in one statement, so one round trip and one implicit
#: transaction (BEGIN, some twelve statements and COMMIT before, each a wake-up of the server
#: and of the portfolio on a busy host): the applied fills (w0, counted: the new ones), then
#: the positions, lots, balances, accounts, trip books, trip lots and round trips, each part
#: taking its columns as arrays (`_batch_arrays`). Every part sees the snapshot from before the
#: statement and none modifies a row another does: a book's closed lots are deleted below its
#: front lot, its changed ones upserted from the front on; each key is one row of its part.
_SAVE_FILLS = _one_statement(
    [
        _INSERT_APPLIED_FILLS,
        _from_arrays(
            _UPSERT_POSITION,
            "SELECT a, i, side, q, avg, realized, unrealized, fees, price, 1, ts"
            " FROM unnest($1::text[], $2::text[], $3::text[], $4::numeric[], $5::numeric[],"
            " $6::numeric[], $7::numeric[], $8::numeric[], $9::numeric[], $10::bigint[])"
            " AS p(a, i, side, q, avg, realized, unrealized, fees, price, ts)",
        ),
        _DELETE_CLOSED_LOTS,
        _UPSERT_LOTS,
        _from_arrays(
            _UPSERT_BALANCE,
            "SELECT * FROM unnest($1::text[], $2::text[], $3::numeric[], $4::bigint[])",
        ),
        _from_arrays(
            _UPSERT_ACCOUNT,
            "SELECT * FROM unnest($1::text[], $2::text[], $3::numeric[], $4::bigint[],"
            " $5::numeric[])",
        ),
        _from_arrays(
            _UPSERT_TRIP_BOOK,
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::bigint[])",
        ),
        _DELETE_CLOSED_TRIP_LOTS,
        _UPSERT_TRIP_LOTS,
        _from_arrays(
            _INSERT_TRIP,
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],"
            " $6::numeric[], $7::numeric[], $8::numeric[], $9::bigint[], $10::bigint[],"
            " $11::numeric[], $12::numeric[], $13::numeric[], $14::numeric[])",
        ),
    ],
    "count(*) FROM w0",
)


@dataclass
class PortfolioBatch:
    """What the handlers changed during one consumed batch, stored by `save_batch` at its end.

    Positions, accounts and trip books are held by reference: stored as they are after the
    batch, one row each. Each applied fill keeps the position right after it (republished if
    the fill is delivered again after a restart) and the id of the event that applied it.
    """

    opened: list[tuple[Account, int]] = field(default_factory=list)
    fills: list[tuple[FillKey, int, dict[str, Any], str]] = field(default_factory=list)
    books: dict[tuple[str, str], tuple[PositionBook, int]] = field(default_factory=dict)
    accounts: dict[str, tuple[Account, int]] = field(default_factory=dict)
    trip_books: dict[tuple[str, str | None, str], tuple[TripBook, int]] = field(
        default_factory=dict
    )
    trips: list[ClosedTrip] = field(default_factory=list)
    snapshots: list[tuple[list[PortfolioSnapshot], list[tuple[str, str, int, Decimal]]]] = field(
        default_factory=list
    )
    reports: list[PerformanceReport] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.opened or self.fills or self.snapshots or self.reports)


def _position_row(book: PositionBook) -> tuple[Any, ...]:
    event = book.to_event()
    return (
        book.account_id,
        book.instrument_id,
        event.side.value,
        event.quantity,
        event.avg_entry_price,
        event.realized_pnl,
        event.unrealized_pnl,
        event.fees,
        event.last_price,
        event.ts_event,
    )


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """`rows` as `width` columns, one list each: the arrays an unnest takes."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


def _batch_arrays(
    batch: PortfolioBatch,
    books: list[tuple[PositionBook, int]],
    accounts: list[tuple[Account, int]],
    trip_books: list[tuple[TripBook, int]],
) -> list[list[Any]]:
    """The parameters of `_SAVE_FILLS` for a batch, its parts' columns in order."""
    position_books = [b for b, _ in books]
    moved_books = [b for b, _ in trip_books]
    parts: list[tuple[list[tuple[Any, ...]], int]] = [
        ([(*key, ts, position, event_id) for key, ts, position, event_id in batch.fills], 6),
        ([_position_row(b) for b in position_books], 10),
        (_lot_fronts(position_books), 3),
        (_lot_rows(position_books), 7),
        (
            [
                (a.account_id, c, amount, ts)
                for a, ts in accounts
                for c, amount in sorted(a.balances.items())
            ],
            4,
        ),
        ([(a.account_id, a.base_currency, a.peak_equity, ts, a.capital) for a, ts in accounts], 5),
        ([_book_row(b, ts) for b, ts in trip_books], 5),
        (_trip_lot_fronts(moved_books), 4),
        (_trip_lot_rows(moved_books), 8),
        ([_trip_row(t) for t in batch.trips], 14),
    ]
    return [column for rows, width in parts for column in _columns(rows, width)]


class PostgresPortfolioStore:
    """The portfolio's tables (V0001 positions and equity_snapshots, V0011 the rest; V0017
    and V0031 the performance books)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def save_fill(
        self,
        key: FillKey,
        account: Account,
        book: PositionBook,
        ts: int,
        *,
        trip_books: Iterable[TripBook] = (),
        trips: Iterable[ClosedTrip] = (),
    ) -> bool:
        """Store an applied fill and its effects atomically; False if its key was stored."""
        moved = list(trip_books)
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetchval(
                "INSERT INTO portfolio_applied_fills (account_id, instrument_id, fill_id, ts_event,"
                " position) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING 1",
                *key,
                ts,
                json.loads(book.to_event().model_dump_json()),
            )
            if inserted is None:
                return False
            await conn.execute(_UPSERT_POSITION, *_position_row(book))
            await _write_lots(conn, [book])
            await conn.executemany(
                _UPSERT_BALANCE,
                [(account.account_id, c, a, ts) for c, a in sorted(account.balances.items())],
            )
            await conn.execute(
                _UPSERT_ACCOUNT,
                account.account_id,
                account.base_currency,
                account.peak_equity,
                ts,
                account.capital,
            )
            await _write_trip_books(conn, [(b, ts) for b in moved])
            await conn.executemany(_INSERT_TRIP, [_trip_row(t) for t in trips])
        _lots_stored([book])
        _trip_lots_stored(moved)
        return True

    async def save_opened(self, account: Account, ts: int) -> None:
        """Store an account seeded from its opening: its cash, capital and `opened_ts`."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _write_opened(conn, account, ts)

    async def save_batch(
        self,
        batch: PortfolioBatch,
        portfolio: Portfolio,
        tracker: PerformanceTracker | None = None,
    ) -> int:
        """Store what a consumed batch changed in one transaction; return the new fills.

        Openings first, then the applied fills' keys (with the position after each), and the
        state after the batch of every position, account and trip book a fill moved — one row
        each, however many fills moved it — and the round trips, all in one statement
        (`_SAVE_FILLS`), then the snapshots and reports. A batch of fills alone is that one
        statement and its implicit transaction.
        """
        books = list(batch.books.values())
        accounts = list(batch.accounts.values())
        trip_books = list(batch.trip_books.values())
        moved = bool(batch.fills or books or accounts or trip_books or batch.trips)
        args = _batch_arrays(batch, books, accounts, trip_books) if moved else []
        if batch.opened or batch.snapshots or batch.reports:
            async with self.pool.acquire() as conn, conn.transaction():
                for account, ts in batch.opened:
                    await _write_opened(conn, account, ts)
                new = await conn.fetchval(_SAVE_FILLS, *args) if moved else 0
                for snapshots, points in batch.snapshots:
                    written = await _write_snapshots(conn, snapshots, portfolio, tracker, points)
                    trip_books += written
                if batch.reports:
                    await conn.executemany(_INSERT_REPORT, [_report_row(r) for r in batch.reports])
        else:
            # The latency path (fills only): one round trip, in its implicit transaction.
            new = await self.pool.fetchval(_SAVE_FILLS, *args) if moved else 0
        _lots_stored(b for b, _ in books)
        _trip_lots_stored(b for b, _ in trip_books)
        return int(new)

    async def fill_high_water(self) -> int | None:
        """Return the latest `ts_event` of an applied fill, None if there is none."""
        async with self.pool.acquire() as conn:
            value = await conn.fetchval("SELECT max(ts_event) FROM portfolio_applied_fills")
        return None if value is None else int(value)

    async def is_applied(self, key: FillKey) -> bool:
        """Return whether a fill's key is stored (it was applied)."""
        async with self.pool.acquire() as conn:
            found = await conn.fetchval(
                "SELECT true FROM portfolio_applied_fills"
                " WHERE account_id = $1 AND instrument_id = $2 AND fill_id = $3",
                *key,
            )
        return bool(found)

    async def applied_position(self, key: FillKey) -> Position | None:
        """Return the position stored with an applied fill (None for rows older than V0017)."""
        return (await self.applied(key))[0]

    async def applied(self, key: FillKey) -> tuple[Position | None, str | None]:
        """Return the position stored with an applied fill and the event id of the message
        that applied it (None for rows older than V0017 and V0028, or no such fill)."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT position, event_id FROM portfolio_applied_fills"
                " WHERE account_id = $1 AND instrument_id = $2 AND fill_id = $3",
                *key,
            )
        if row is None:
            return None, None
        raw = row["position"]
        return (None if raw is None else Position.model_validate(raw)), row["event_id"]

    async def last_snapshot_ts(self) -> int | None:
        """Return the newest boundary an equity snapshot is stored for, None if there is none."""
        async with self.pool.acquire() as conn:
            value = await conn.fetchval("SELECT max(ts_event) FROM equity_snapshots")
        return None if value is None else int(value)

    async def stored_boundary(
        self, ts: int, accounts: Iterable[str]
    ) -> tuple[dict[str, PortfolioSnapshot], list[PerformanceReport]]:
        """Return the snapshots stored at boundary `ts` of `accounts` (rows of V0028 on) and
        the performance reports stored at `ts` for them, as they were published."""
        wanted = sorted(accounts)
        async with self.pool.acquire() as conn:
            snapshots = await conn.fetch(
                "SELECT account_id, snapshot FROM equity_snapshots WHERE ts_event = $1"
                " AND account_id = ANY($2::text[]) AND snapshot IS NOT NULL ORDER BY account_id",
                ts,
                wanted,
            )
            reports = await conn.fetch(
                "SELECT report FROM portfolio_performance WHERE ts_event = $1"
                " AND account_id = ANY($2::text[]) ORDER BY account_id, strategy_id",
                ts,
                wanted,
            )
        return (
            {r["account_id"]: PortfolioSnapshot.model_validate(r["snapshot"]) for r in snapshots},
            [PerformanceReport.model_validate(r["report"]) for r in reports],
        )

    async def save_reports(self, reports: Iterable[PerformanceReport]) -> None:
        """Store published performance reports (a report of the same scope and time replaces)."""
        rows = [_report_row(r) for r in reports]
        if not rows:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(_INSERT_REPORT, rows)

    async def save_snapshots(
        self,
        snapshots: Iterable[PortfolioSnapshot],
        portfolio: Portfolio,
        tracker: PerformanceTracker | None = None,
        strategy_points: Iterable[tuple[str, str, int, Decimal]] = (),
    ) -> None:
        """Store equity snapshots, the accounts' peaks and the positions' current marks; with
        a tracker, the strategies' curve points and every open trip book (its price ranges)."""
        rows = list(snapshots)
        if not rows:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            written = await _write_snapshots(conn, rows, portfolio, tracker, strategy_points)
        _trip_lots_stored(b for b, _ in written)

    async def load(
        self,
        portfolio: Portfolio,
        tracker: PerformanceTracker | None = None,
        *,
        recent_fills: int | None = None,
    ) -> int:
        """Rebuild `portfolio` (empty), and `tracker` if given, from the tables; return how many
        applied fill keys were loaded (with `recent_fills`, only that many of the newest)."""
        async with self.pool.acquire() as conn:
            accounts = await conn.fetch(
                "SELECT account_id, base_currency, peak_equity, capital, opened_ts"
                " FROM portfolio_accounts"
            )
            balances = await conn.fetch(
                "SELECT account_id, currency, amount FROM portfolio_balances"
            )
            positions = await conn.fetch(
                "SELECT account_id, instrument_id, realized_pnl, fees, last_price, ts_event"
                " FROM positions"
            )
            lots = await conn.fetch(
                "SELECT account_id, instrument_id, seq, quantity, price, direction, ts_event"
                " FROM portfolio_lots ORDER BY account_id, instrument_id, seq"
            )
            fills = await conn.fetch(
                "SELECT account_id, instrument_id, fill_id FROM portfolio_applied_fills"
                + ("" if recent_fills is None else " ORDER BY ts_event DESC LIMIT $1"),
                *(() if recent_fills is None else (recent_fills,)),
            )
            if tracker is not None:
                await _load_tracker(conn, tracker)
        for row in accounts:
            account = Account(row["account_id"], row["base_currency"], {}, row["capital"])
            account.peak_equity = row["peak_equity"]
            account.opened = row["opened_ts"] is not None
            portfolio.accounts[account.account_id] = account
        for row in balances:
            portfolio.account(row["account_id"]).balances[row["currency"]] = row["amount"]
        marks: list[tuple[str, Decimal, int]] = []
        for row in positions:
            book = portfolio.book(row["account_id"], row["instrument_id"])
            book.realized_pnl = row["realized_pnl"]
            book.fees = row["fees"]
            book.ts_event = row["ts_event"]
            if row["last_price"] is not None:
                marks.append((row["instrument_id"], row["last_price"], row["ts_event"]))
        for row in lots:
            book = portfolio.book(row["account_id"], row["instrument_id"])
            book.lots = book.lots if book.lots else deque()
            book.lots.append(Lot(row["quantity"], row["price"], row["ts_event"], row["seq"]))
            book.next_seq = book.stored_seq = row["seq"] + 1
            book.direction = int(row["direction"])
            book.open_quantity += row["quantity"]
            book.cost += row["quantity"] * row["price"]
        for instrument_id, price, ts in sorted(marks, key=lambda m: m[2]):
            portfolio.mark(instrument_id, price, ts)
        portfolio.seen_fills.update(
            (r["account_id"], r["instrument_id"], r["fill_id"]) for r in fills
        )
        return len(fills)


async def _write_opened(conn: Any, account: Account, ts: int) -> None:
    """Write an account seeded from its opening: its cash, capital and `opened_ts`."""
    await conn.execute(
        "INSERT INTO portfolio_accounts (account_id, base_currency, peak_equity, ts_event,"
        " capital, opened_ts) VALUES ($1, $2, $3, $4, $5, $4)"
        " ON CONFLICT (account_id) DO UPDATE SET base_currency = EXCLUDED.base_currency,"
        " peak_equity = EXCLUDED.peak_equity, capital = EXCLUDED.capital,"
        " opened_ts = EXCLUDED.opened_ts",
        account.account_id,
        account.base_currency,
        account.peak_equity,
        ts,
        account.capital,
    )
    await conn.execute("DELETE FROM portfolio_balances WHERE account_id = $1", account.account_id)
    await conn.executemany(
        _UPSERT_BALANCE,
        [(account.account_id, c, a, ts) for c, a in sorted(account.balances.items())],
    )


def _report_row(r: PerformanceReport) -> tuple[Any, ...]:
    return (
        r.account_id,
        r.strategy_id or "",
        r.ts_event,
        r.report_id,
        r.total_return,
        r.sharpe,
        r.max_drawdown,
        r.trades,
        r.net_pnl,
        # Through the event's own JSON: infinities as "Infinity" strings, as on the bus
        # (PostgreSQL's jsonb has no infinite numbers).
        json.loads(r.model_dump_json()),
    )


async def _write_snapshots(
    conn: Any,
    rows: list[PortfolioSnapshot],
    portfolio: Portfolio,
    tracker: PerformanceTracker | None,
    strategy_points: Iterable[tuple[str, str, int, Decimal]],
) -> list[tuple[TripBook, int]]:
    """Write snapshots and what they refresh; return the trip books written (with their ts)."""
    await conn.executemany(
        _INSERT_SNAPSHOT,
        [
            (
                s.account_id,
                s.ts_event,
                s.base_currency,
                s.equity,
                s.realized_pnl,
                s.unrealized_pnl,
                s.fees,
                s.peak_equity,
                s.drawdown,
                {c: format(a, "f") for c, a in s.balances.items()},
                # The event itself (V0028), for publishing it again after a restart.
                json.loads(s.model_dump_json()),
            )
            for s in rows
        ],
    )
    accounts = [portfolio.accounts[s.account_id] for s in rows]
    await conn.executemany(
        _UPSERT_ACCOUNT,
        [
            (a.account_id, a.base_currency, a.peak_equity, s.ts_event, a.capital)
            for a, s in zip(accounts, rows, strict=True)
        ],
    )
    await conn.executemany(
        _UPSERT_POSITION,
        [_position_row(b) for a in accounts for b in a.positions.values()],
    )
    if tracker is None:
        return []
    await conn.executemany(
        "INSERT INTO portfolio_strategy_equity (account_id, strategy_id, ts_event, equity)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        list(strategy_points),
    )
    ts = rows[-1].ts_event
    snapshotted = {s.account_id for s in rows}
    books = [
        (b, ts)
        for b in tracker.books.values()
        if b.trip is not None and b.account_id in snapshotted
    ]
    await _write_trip_books(conn, books)
    return books


def _book_row(book: TripBook, ts: int) -> tuple[Any, ...]:
    return (book.account_id, book.strategy_id or "", book.instrument_id, book.state(), ts)


def _trip_row(closed: ClosedTrip) -> tuple[Any, ...]:
    trip = closed.trip
    return (
        closed.account_id,
        closed.strategy_id or "",
        trip.instrument_id,
        closed.close_fill_id,
        trip.side.value,
        trip.quantity,
        trip.entry_price,
        trip.exit_price,
        trip.entry_ts_ns,
        trip.exit_ts_ns,
        trip.fees,
        closed.pnl,
        closed.mae,
        closed.mfe,
    )


async def _load_tracker(conn: Any, tracker: PerformanceTracker) -> None:
    """Rebuild the performance books, round trips and equity curves."""
    for row in await conn.fetch(
        "SELECT account_id, strategy_id, instrument_id, state FROM portfolio_trip_books"
    ):
        book = tracker.book(row["account_id"], row["strategy_id"] or None, row["instrument_id"])
        book.restore(row["state"])
    for row in await conn.fetch(
        "SELECT account_id, strategy_id, instrument_id, seq, quantity, price, low, high"
        " FROM portfolio_trip_lots ORDER BY account_id, strategy_id, instrument_id, seq"
    ):
        book = tracker.book(row["account_id"], row["strategy_id"] or None, row["instrument_id"])
        book.restore_lot(
            TripLot(row["quantity"], row["price"], row["low"], row["high"], row["seq"])
        )
    for row in await conn.fetch(
        "SELECT * FROM portfolio_round_trips ORDER BY exit_ts, entry_ts, instrument_id"
    ):
        strategy_id = row["strategy_id"] or None
        trip = perf.RoundTrip(
            side=PositionSide(row["side"]),
            quantity=row["quantity"],
            entry_price=row["entry_price"],
            exit_price=row["exit_price"],
            entry_ts_ns=row["entry_ts"],
            exit_ts_ns=row["exit_ts"],
            fees=row["fees"],
            instrument_id=row["instrument_id"],
        )
        closed = ClosedTrip(
            row["account_id"],
            strategy_id,
            row["close_fill_id"],
            trip,
            row["pnl"],
            row["mae"],
            row["mfe"],
        )
        tracker.trips.setdefault((row["account_id"], strategy_id), []).append(closed)
    for row in await conn.fetch(
        "SELECT account_id, ts_event, equity FROM equity_snapshots ORDER BY account_id, ts_event"
    ):
        tracker.curves.setdefault((row["account_id"], None), []).append(
            (row["ts_event"], row["equity"])
        )
    for row in await conn.fetch(
        "SELECT account_id, strategy_id, ts_event, equity FROM portfolio_strategy_equity"
        " ORDER BY account_id, strategy_id, ts_event"
    ):
        tracker.curves.setdefault((row["account_id"], row["strategy_id"]), []).append(
            (row["ts_event"], row["equity"])
        )
