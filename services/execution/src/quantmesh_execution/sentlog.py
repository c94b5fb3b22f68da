"""The sent-log: a durable record, written before the venue call, of every SUBMIT sent."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
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

    async def claim_many(self, claims: Sequence[tuple[OrderCommand, str]]) -> list[str]:
        """Insert a batch of claims in one statement (one transaction); return the client order
        ids that were already there (claimed by another writer), which are left unchanged."""
        if not claims:
            return []
        rows = await self.pool.fetch(
            f"""
            INSERT INTO {TABLE}
                (venue, client_order_id, account_id, instrument_id, command_id, route, ts_command)
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                 $6::text[], $7::bigint[])
            ON CONFLICT (venue, client_order_id) DO NOTHING
            RETURNING client_order_id
            """,
            [c.venue for c, _ in claims],
            [c.client_order_id for c, _ in claims],
            [c.account_id for c, _ in claims],
            [c.instrument_id for c, _ in claims],
            [c.command_id for c, _ in claims],
            [route for _, route in claims],
            [c.ts_event for c, _ in claims],
        )
        inserted = {row["client_order_id"] for row in rows}
        return [c.client_order_id for c, _ in claims if c.client_order_id not in inserted]

    async def high_water(self) -> int | None:
        """Return the latest command time in the log (None: empty)."""
        value = await self.pool.fetchval(f"SELECT max(ts_command) FROM {TABLE}")
        return None if value is None else int(value)

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


class SentLogConflictError(BaseException):
    """A held claim was already in the log when its batch was stored: another writer sent it.

    A BaseException, so the bus neither dead-letters nor commits: the batch (and the reports
    of the second send) is aborted, and the restarted stage finds the claim in the log.
    """


class WriteBehindSentLog:
    """The PostgreSQL sent-log for an in-process (simulated) venue: claims written per batch.

    An in-process venue's sends are seen only through the reports the handler returns, which
    the bus commits with the batch (one Kafka transaction). So a claim need not be durable
    before the call, only before the batch commits: `claim` decides in memory and holds the
    entry, and `flush` — the subscription's batch hook — writes the batch's claims in one
    statement before the commit. A crash before then loses the venue with the claims (the
    process is gone, and no report of theirs was committed), so a redelivered SUBMIT is new.

    Whether an id was claimed is answered from memory for the ids this process claimed (the
    `recent` latest of them) and from the log otherwise — only for a command not newer than
    every claim this memory does not cover: the log's latest command time when the process
    started, or of a claim evicted from memory. A newer command cannot be in the log unless
    another writer races on it, which `flush` detects (SentLogConflictError: the batch is
    aborted). A live venue must not use this: its sends are seen at once, so its claim is
    written before the call (`PostgresSentLog`).
    """

    def __init__(self, log: PostgresSentLog, *, recent: int = 100_000) -> None:
        if recent < 1:
            raise ValueError("recent must be at least 1")
        self.log = log
        self.recent_limit = recent
        #: Claims of this process, oldest first, with their command times.
        self.recent: OrderedDict[tuple[str, str], tuple[SentEntry, int]] = OrderedDict()
        #: Commands at or before this time may be in the log without being in `recent`.
        self.high_water: int | None = None
        #: Claims decided since the last flush, in order.
        self.held: dict[tuple[str, str], tuple[OrderCommand, str]] = {}
        #: Log reads made by `claim` (the ids memory could not answer), for tests and metrics.
        self.lookups = 0

    async def start(self) -> None:
        """Check the table and read the log's latest command time."""
        await self.log.check()
        self.high_water = await self.log.high_water()

    async def claim(self, command: OrderCommand, route: str) -> SentEntry | None:
        """Return the entry if the id was claimed before, else hold a new claim and return None.

        The new claim is durable only after `flush`: for an in-process venue only.
        """
        key = (command.venue, command.client_order_id)
        known = self.recent.get(key)
        if known is not None:
            return known[0]
        pending = self.held.get(key)
        if pending is not None:  # evicted from `recent` before its batch was stored
            held_command, held_route = pending
            return SentEntry(
                held_command.venue,
                held_command.client_order_id,
                held_command.account_id,
                held_command.command_id,
                held_route,
            )
        if self.high_water is not None and command.ts_event <= self.high_water:
            self.lookups += 1
            stored = await self.log.get(command.venue, command.client_order_id)
            if stored is not None:
                self._remember(key, stored, command.ts_event)
                return stored
        entry = SentEntry(
            command.venue, command.client_order_id, command.account_id, command.command_id, route
        )
        self._remember(key, entry, command.ts_event)
        self.held[key] = (command, route)
        return None

    async def flush(self) -> None:
        """Write the held claims in one statement; a claim another writer made first raises."""
        held, self.held = self.held, {}
        if not held:
            return
        claims = list(held.values())
        taken = await self.log.claim_many(claims)
        if taken:
            venue = claims[0][0].venue
            for client_order_id in taken:
                # Not ours: forget it, so a later claim reads the log's entry.
                self.recent.pop((venue, client_order_id), None)
            raise SentLogConflictError(
                f"{len(taken)} client order ids were claimed by another writer: {taken[:5]}"
            )

    async def move(self, venue: str, client_order_id: str, route: str) -> None:
        """Record the new route (the held claims first, so the row exists)."""
        await self.flush()
        await self.log.move(venue, client_order_id, route)
        known = self.recent.get((venue, client_order_id))
        if known is not None:
            entry, ts = known
            moved = SentEntry(
                entry.venue, entry.client_order_id, entry.account_id, entry.command_id, route
            )
            self.recent[(venue, client_order_id)] = (moved, ts)

    async def get(self, venue: str, client_order_id: str) -> SentEntry | None:
        """Return the entry, from memory (held or recent) or else the log."""
        known = self.recent.get((venue, client_order_id))
        if known is not None:
            return known[0]
        return await self.log.get(venue, client_order_id)

    def _remember(self, key: tuple[str, str], entry: SentEntry, ts: int) -> None:
        self.recent[key] = (entry, ts)
        while len(self.recent) > self.recent_limit:
            _, (_, evicted_ts) = self.recent.popitem(last=False)
            if self.high_water is None or evicted_ts > self.high_water:
                self.high_water = evicted_ts
