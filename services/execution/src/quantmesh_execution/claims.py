"""Command claims: a durable record, made before a live venue's call, of each CANCEL/REPLACE."""

from __future__ import annotations

from typing import Any, Protocol

from quantmesh_common.messages import OrderCommand
from quantmesh_execution.outputs import prune_recorded

#: The PostgreSQL table (migration V0032__execution_command_claims.sql).
TABLE = "execution_command_claims"


class CommandClaims(Protocol):
    """At most one venue call per (venue, command id), decided before the venue is called."""

    async def claim(self, command: OrderCommand) -> bool:
        """Record `command` as sent; True if this is its first claim, False if it was claimed.

        The record is durable when this returns: a crash after it and before the venue call
        loses the command (at most once), never sends it twice.
        """
        ...


class PostgresCommandClaims:
    """The claims in PostgreSQL (`execution_command_claims`), on an asyncpg pool.

    `claim` is one autocommitted INSERT ... ON CONFLICT DO NOTHING, as the live SUBMIT's
    sent-log claim: the bus has no hook before a batch's handlers, and a claim written with
    the batch (after the calls) would come too late for a venue that acts on the call.
    """

    def __init__(self, venue: str, pool: Any) -> None:
        self.venue = venue
        self.pool = pool

    async def check(self) -> None:
        """Raise naming the fix when the table is missing (migrations not applied)."""
        found = await self.pool.fetchval("SELECT to_regclass($1) IS NOT NULL", TABLE)
        if not found:
            raise RuntimeError(f"table {TABLE} is missing: run quantmesh-migrate (V0032)")

    async def claim(self, command: OrderCommand) -> bool:
        """Insert the claim; False when the command id was already there."""
        inserted = await self.pool.fetchval(
            f"""
            INSERT INTO {TABLE}
                (venue, command_id, command_type, client_order_id, account_id, ts_command)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (venue, command_id) DO NOTHING
            RETURNING true
            """,
            self.venue,
            command.command_id,
            command.command_type.value,
            command.client_order_id,
            command.account_id,
            command.ts_event,
        )
        return bool(inserted)

    async def prune(self, older_than_ns: int) -> int:
        """Delete this venue's claims recorded more than `older_than_ns` ago; return how many.

        By the database's clock (`recorded_at`), as the stored reports are pruned.
        """
        return await prune_recorded(self.pool, TABLE, self.venue, older_than_ns)
