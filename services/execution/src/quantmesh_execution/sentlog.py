"""The sent-log: a durable record, written before the venue call, of every SUBMIT sent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from quantmesh_common.messages import OrderCommand

#: The PostgreSQL table (migration V0014__execution.sql).
TABLE = "execution_sent_orders"


@dataclass(frozen=True, slots=True)
class SentEntry:
    """What the log knows of a client order id already sent."""

    venue: str
    client_order_id: str
    account_id: str
    command_id: str
    route: str


class SentLog(Protocol):
    """At most one send per (venue, client order id), decided before the venue is called."""

    async def claim(self, command: OrderCommand, route: str) -> SentEntry | None:
        """Record `command` as sent to `route`; None if this is the first claim, else the entry.

        The record is durable when this returns: a crash after it and before the venue call
        loses the order (at most once), never sends it twice.
        """
        ...

    async def move(self, venue: str, client_order_id: str, route: str) -> None:
        """Record that the order is now sent to `route` instead (failover to another route)."""
        ...

    async def get(self, venue: str, client_order_id: str) -> SentEntry | None:
        """Return the entry of a client order id, or None if it was never sent."""
        ...


class MemorySentLog:
    """A sent-log in memory: one process's lifetime only (tests, the one-process mode)."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], SentEntry] = {}

    async def claim(self, command: OrderCommand, route: str) -> SentEntry | None:
        """Record `command` unless its client order id is already there."""
        key = (command.venue, command.client_order_id)
        existing = self.entries.get(key)
        if existing is None:
            self.entries[key] = SentEntry(
                command.venue,
                command.client_order_id,
                command.account_id,
                command.command_id,
                route,
            )
        return existing

    async def move(self, venue: str, client_order_id: str, route: str) -> None:
        """Change the route of an entry."""
        entry = self.entries[(venue, client_order_id)]
        self.entries[(venue, client_order_id)] = SentEntry(
            entry.venue, entry.client_order_id, entry.account_id, entry.command_id, route
        )

    async def get(self, venue: str, client_order_id: str) -> SentEntry | None:
        """Return the entry, if any."""
        return self.entries.get((venue, client_order_id))


class PostgresSentLog:
    """The sent-log in PostgreSQL (`execution_sent_orders`), on an asyncpg pool.

    `claim` is one autocommitted INSERT ... ON CONFLICT DO NOTHING: the primary key decides,
    so two members of the consumer group racing on one redelivered command cannot both send.
    """

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def check(self) -> None:
        """Raise naming the fix when the table is missing (migrations not applied)."""
        found = await self.pool.fetchval("SELECT to_regclass($1) IS NOT NULL", TABLE)
        if not found:
            raise RuntimeError(f"table {TABLE} is missing: run quantmesh-migrate (V0014)")

    async def claim(self, command: OrderCommand, route: str) -> SentEntry | None:
        """Insert the entry; on a conflict return the one already there."""
        inserted = await self.pool.fetchval(
            f"""
            INSERT INTO {TABLE}
                (venue, client_order_id, account_id, instrument_id, command_id, route, ts_command)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            ON CONFLICT (venue, client_order_id) DO NOTHING
            RETURNING true
            """,
            command.venue,
            command.client_order_id,
            command.account_id,
            command.instrument_id,
            command.command_id,
            route,
            command.ts_event,
        )
        if inserted:
            return None
        entry = await self.get(command.venue, command.client_order_id)
        assert entry is not None  # rows are never deleted
        return entry

    async def move(self, venue: str, client_order_id: str, route: str) -> None:
        """Update the entry's route."""
        await self.pool.execute(
            f"UPDATE {TABLE} SET route = $3 WHERE venue = $1 AND client_order_id = $2",
            venue,
            client_order_id,
            route,
        )

    async def get(self, venue: str, client_order_id: str) -> SentEntry | None:
        """Read the entry."""
        row = await self.pool.fetchrow(
            f"""
            SELECT venue, client_order_id, account_id, command_id, route FROM {TABLE}
            WHERE venue = $1 AND client_order_id = $2
            """,
            venue,
            client_order_id,
        )
        if row is None:
            return None
        return SentEntry(
            row["venue"], row["client_order_id"], row["account_id"], row["command_id"], row["route"]
        )
