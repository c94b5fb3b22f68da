"""Risk's state in PostgreSQL: breakers and loss references it owns, and the rest it reads.

Owned (V0011): `risk_account_state` (a tripped breaker, the day's opening equity, the peak) and
`risk_applied_resets` (breaker resets already applied, so a replay of `control` at start does
not reset a breaker tripped after them). Read at start only: positions (`positions`) and the
fills behind them (`portfolio_applied_fills`) from the portfolio, working orders (`orders`)
from the OMS. In idempotent order-flow delivery also `risk_decisions` (V0025): each intent's
decision, so a redelivered intent gets it again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from quantmesh_common.messages import OrderStatus, RiskDecision, Side
from quantmesh_risk.decisions import StoredDecision, stored_row
from quantmesh_risk.engine import Breaker, RiskEngine, WorkingOrder

_OPEN = [s.value for s in OrderStatus if not s.is_terminal]

_UPSERT = """
INSERT INTO risk_account_state (account_id, breaker_cause, breaker_details, ts_tripped, day,
                                day_open_equity, peak_equity, ts_updated)
VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7, qm_now_ns())
ON CONFLICT (account_id) DO UPDATE SET
    breaker_cause = EXCLUDED.breaker_cause, breaker_details = EXCLUDED.breaker_details,
    ts_tripped = EXCLUDED.ts_tripped, day = EXCLUDED.day,
    day_open_equity = EXCLUDED.day_open_equity, peak_equity = EXCLUDED.peak_equity,
    ts_updated = EXCLUDED.ts_updated
"""

_DECISION_COLUMNS = (
    "intent_id, account_id, client_order_id, decision_id, approved, reason, details,"
    " adjusted_quantity, side, ts_event"
)

#: A batch's decisions in one statement, its rows as one JSON text (as the oms stores its
#: orders: cheaper than an array per column). One stored already (the intent was redelivered
#: before its batch was committed) stays as it is.
_INSERT_DECISIONS = f"""
INSERT INTO risk_decisions ({_DECISION_COLUMNS})
SELECT {_DECISION_COLUMNS} FROM json_populate_recordset(NULL::risk_decisions, $1::text::json)
ON CONFLICT (account_id, intent_id) DO NOTHING
"""

#: The newest decisions, oldest first (the store's clock orders them: decision times come
#: from the stage's clock, which a replay simulates).
_SELECT_DECISIONS = f"""
SELECT {_DECISION_COLUMNS} FROM (
    SELECT * FROM risk_decisions ORDER BY ts_stored DESC LIMIT $1
) AS newest ORDER BY ts_stored
"""

_PRUNE_DECISIONS = "DELETE FROM risk_decisions WHERE ts_stored < qm_now_ns() - $1"

#: What is stored of an account: breaker cause, details, trip time, day, opening equity, peak.
AccountRow = tuple[str | None, dict[str, str], int | None, int | None, Any, Any]


def account_row(engine: RiskEngine, account_id: str) -> AccountRow:
    """Return what the store keeps of an account, to compare with what was saved last."""
    breaker = engine.breakers.get(account_id)
    losses = engine.losses.account(account_id)
    return (
        breaker.cause if breaker else None,
        breaker.details if breaker else {},
        breaker.ts_ns if breaker else None,
        losses.day,
        losses.day_open_equity,
        losses.peak_equity,
    )


class PostgresRiskStore:
    """Risk's rows, through an asyncpg pool."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def save_accounts(self, rows: dict[str, AccountRow], conn: Any = None) -> None:
        """Store the accounts' breakers and loss references."""
        args = [(a, r[0], json.dumps(r[1]), r[2], r[3], r[4], r[5]) for a, r in rows.items()]
        if conn is not None:
            await conn.executemany(_UPSERT, args)
            return
        async with self.pool.acquire() as own:
            await own.executemany(_UPSERT, args)

    async def save_accounts_atomically(self, rows: dict[str, AccountRow]) -> None:
        """Store the accounts' breakers and loss references in one transaction."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self.save_accounts(rows, conn)

    async def save_batch(self, rows: dict[str, AccountRow], decisions: list[RiskDecision]) -> None:
        """Store a batch's changed accounts and its decisions in one transaction."""
        async with self.pool.acquire() as conn:
            if not rows:
                await self._save_decisions(conn, decisions)
                return
            async with conn.transaction():
                await self.save_accounts(rows, conn)
                if decisions:
                    await self._save_decisions(conn, decisions)

    @staticmethod
    async def _save_decisions(conn: Any, decisions: list[RiskDecision]) -> None:
        await conn.execute(_INSERT_DECISIONS, json.dumps([stored_row(d) for d in decisions]))

    async def recent_decisions(self, limit: int) -> list[tuple[tuple[str, str], StoredDecision]]:
        """Return the newest `limit` decisions by (account id, intent id), oldest first."""
        rows = await self.pool.fetch(_SELECT_DECISIONS, limit)
        decisions = []
        for r in rows:
            details = r["details"]
            if isinstance(details, str):
                details = json.loads(details)
            side = r["side"]
            stored = StoredDecision(
                client_order_id=r["client_order_id"],
                decision_id=r["decision_id"],
                approved=r["approved"],
                reason=r["reason"],
                details=dict(details),
                adjusted_quantity=r["adjusted_quantity"],
                side=None if side is None else Side(side),
                ts_event=r["ts_event"],
            )
            decisions.append(((r["account_id"], r["intent_id"]), stored))
        return decisions

    async def prune_decisions(self, older_than_ns: int) -> int:
        """Delete the decisions stored more than `older_than_ns` ago; return how many."""
        status: str = await self.pool.execute(_PRUNE_DECISIONS, older_than_ns)
        return int(status.rsplit(" ", 1)[-1])

    async def apply_reset(
        self, command_id: str, target: str, ts_ns: int, rows: dict[str, AccountRow]
    ) -> None:
        """Record a reset as applied together with the accounts it re-opened."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO risk_applied_resets (command_id, target, ts_applied)"
                " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                command_id,
                target,
                ts_ns,
            )
            await self.save_accounts(rows, conn)

    async def applied_resets(self) -> set[str]:
        """Return the ids of the resets already applied."""
        rows = await self.pool.fetch("SELECT command_id FROM risk_applied_resets")
        return {r["command_id"] for r in rows}

    async def stored_fills(self, keys: Iterable[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
        """Return which of the fills (account, instrument, fill id) the portfolio stored."""
        wanted = list(keys)
        if not wanted:
            return set()
        rows = await self.pool.fetch(
            "SELECT f.account_id, f.instrument_id, f.fill_id FROM portfolio_applied_fills f"
            " JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(a, i, fid)"
            " ON f.account_id = k.a AND f.instrument_id = k.i AND f.fill_id = k.fid",
            [k[0] for k in wanted],
            [k[1] for k in wanted],
            [k[2] for k in wanted],
        )
        return {(r["account_id"], r["instrument_id"], r["fill_id"]) for r in rows}

    async def known_orders(self, client_order_ids: Iterable[str]) -> set[str]:
        """Return which of the client order ids the OMS stored (in any status)."""
        ids = list(client_order_ids)
        if not ids:
            return set()
        rows = await self.pool.fetch(
            "SELECT client_order_id FROM orders WHERE client_order_id = ANY($1::text[])", ids
        )
        return {r["client_order_id"] for r in rows}

    async def load(self, engine: RiskEngine) -> dict[str, int]:
        """Fill an empty engine: breakers, loss references, positions, fills, working orders."""
        async with self.pool.acquire() as conn:
            accounts = await conn.fetch("SELECT * FROM risk_account_state")
            positions = await conn.fetch(
                "SELECT account_id, instrument_id, quantity FROM positions WHERE quantity <> 0"
            )
            # The newest `keep_ids` only (the engine remembers no more), oldest first.
            keep = engine.keep_ids
            fills = await conn.fetch(
                "SELECT account_id, instrument_id, fill_id FROM ("
                " SELECT account_id, instrument_id, fill_id, ts_event FROM portfolio_applied_fills"
                + ("" if keep is None else " ORDER BY ts_event DESC LIMIT $1")
                + ") AS newest ORDER BY ts_event",
                *(() if keep is None else (keep,)),
            )
            orders = await conn.fetch(
                "SELECT client_order_id, account_id, instrument_id, side, quantity,"
                " filled_quantity FROM orders WHERE status = ANY($1::text[])",
                _OPEN,
            )
        for row in accounts:
            account_id = row["account_id"]
            if row["breaker_cause"] is not None:
                details = row["breaker_details"]
                if isinstance(details, str):
                    details = json.loads(details)
                engine.breakers[account_id] = Breaker(
                    row["breaker_cause"], dict(details), row["ts_tripped"] or 0
                )
            losses = engine.losses.account(account_id)
            losses.day = row["day"]
            losses.day_open_equity = row["day_open_equity"]
            losses.peak_equity = row["peak_equity"]
        for row in positions:
            engine.positions[(row["account_id"], row["instrument_id"])] = row["quantity"]
        engine.seen_trades.update(
            dict.fromkeys((r["account_id"], r["instrument_id"], r["fill_id"]) for r in fills)
        )
        for row in orders:
            leaves: Decimal = row["quantity"] - row["filled_quantity"]
            if leaves > 0:
                engine.working(row["account_id"]).put(
                    row["client_order_id"],
                    WorkingOrder(row["instrument_id"], Side(row["side"]), leaves),
                )
        return {
            "breakers": len(engine.breakers),
            "positions": len(positions),
            "fills": len(fills),
            "open_orders": len(orders),
        }
