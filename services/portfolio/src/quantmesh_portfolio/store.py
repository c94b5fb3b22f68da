"""Where the portfolio keeps its state across restarts: PostgreSQL (asyncpg).

Each applied fill is stored in one transaction with its effects — the fill's key, the position
row, its open lots, the account's balances — so a redelivered fill is recognised after a
restart, and the state rebuilt at start is exactly what the fills applied. Snapshots add the
equity snapshot rows and refresh the marks and the peak.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from quantmesh_common.messages import PortfolioSnapshot
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
INSERT INTO portfolio_accounts (account_id, base_currency, peak_equity, ts_event)
VALUES ($1, $2, $3, $4)
ON CONFLICT (account_id) DO UPDATE SET base_currency = EXCLUDED.base_currency,
    peak_equity = EXCLUDED.peak_equity, ts_event = EXCLUDED.ts_event
"""

_INSERT_SNAPSHOT = """
INSERT INTO equity_snapshots (account_id, ts_event, base_currency, equity, realized_pnl,
                              unrealized_pnl, fees, peak_equity, drawdown, balances)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (account_id, ts_event) DO NOTHING
"""


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


class PostgresPortfolioStore:
    """The portfolio's tables (V0001 positions and equity_snapshots, V0011 the rest)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def save_fill(self, key: FillKey, account: Account, book: PositionBook, ts: int) -> bool:
        """Store an applied fill and its effects atomically; False if its key was stored."""
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetchval(
                "INSERT INTO portfolio_applied_fills (account_id, instrument_id, fill_id, ts_event)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING 1",
                *key,
                ts,
            )
            if inserted is None:
                return False
            await conn.execute(_UPSERT_POSITION, *_position_row(book))
            await conn.execute(
                "DELETE FROM portfolio_lots WHERE account_id = $1 AND instrument_id = $2",
                book.account_id,
                book.instrument_id,
            )
            await conn.executemany(
                "INSERT INTO portfolio_lots (account_id, instrument_id, seq, quantity, price,"
                " direction, ts_event) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                [
                    (
                        book.account_id,
                        book.instrument_id,
                        seq,
                        lot.quantity,
                        lot.price,
                        book.direction,
                        lot.ts_ns,
                    )
                    for seq, lot in enumerate(book.lots)
                ],
            )
            await conn.executemany(
                _UPSERT_BALANCE,
                [(account.account_id, c, a, ts) for c, a in sorted(account.balances.items())],
            )
            await conn.execute(
                _UPSERT_ACCOUNT, account.account_id, account.base_currency, account.peak_equity, ts
            )
        return True

    async def save_snapshots(
        self, snapshots: Iterable[PortfolioSnapshot], portfolio: Portfolio
    ) -> None:
        """Store equity snapshots, the accounts' peaks and the positions' current marks."""
        rows = list(snapshots)
        if not rows:
            return
        async with self.pool.acquire() as conn, conn.transaction():
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
                    )
                    for s in rows
                ],
            )
            accounts = [portfolio.accounts[s.account_id] for s in rows]
            await conn.executemany(
                _UPSERT_ACCOUNT,
                [
                    (a.account_id, a.base_currency, a.peak_equity, s.ts_event)
                    for a, s in zip(accounts, rows, strict=True)
                ],
            )
            await conn.executemany(
                _UPSERT_POSITION,
                [_position_row(b) for a in accounts for b in a.positions.values()],
            )

    async def load(self, portfolio: Portfolio) -> int:
        """Rebuild `portfolio` (empty) from the tables; return how many fills were applied."""
        async with self.pool.acquire() as conn:
            accounts = await conn.fetch(
                "SELECT account_id, base_currency, peak_equity FROM portfolio_accounts"
            )
            balances = await conn.fetch(
                "SELECT account_id, currency, amount FROM portfolio_balances"
            )
            positions = await conn.fetch(
                "SELECT account_id, instrument_id, realized_pnl, fees, last_price, ts_event"
                " FROM positions"
            )
            lots = await conn.fetch(
                "SELECT account_id, instrument_id, quantity, price, direction, ts_event"
                " FROM portfolio_lots ORDER BY account_id, instrument_id, seq"
            )
            fills = await conn.fetch(
                "SELECT account_id, instrument_id, fill_id FROM portfolio_applied_fills"
            )
        for row in accounts:
            account = Account(row["account_id"], row["base_currency"], {})
            account.peak_equity = row["peak_equity"]
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
            book.lots.append(Lot(row["quantity"], row["price"], row["ts_event"]))
            book.direction = int(row["direction"])
            book.open_quantity += row["quantity"]
            book.cost += row["quantity"] * row["price"]
        for instrument_id, price, ts in sorted(marks, key=lambda m: m[2]):
            portfolio.mark(instrument_id, price, ts)
        portfolio.seen_fills.update(
            (r["account_id"], r["instrument_id"], r["fill_id"]) for r in fills
        )
        return len(fills)
