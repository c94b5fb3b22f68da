"""The output log: each input's reports, stored with its batch and published again on redelivery."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from quantmesh_common.messages import ExecutionReport

#: The PostgreSQL table (migration V0027__execution_outputs.sql; V0030 indexes `recorded_at`).
TABLE = "execution_outputs"


_COMMAND = "command:"
_EVENT = "event:"


def command_cause(command_id: str) -> str:
    """The cause key of an order command: its command id (the same when the oms sends it again)."""
    return _COMMAND + command_id


def event_cause(event_id: str) -> str:
    """The cause key of market data or a control command: the envelope's event id."""
    return _EVENT + event_id


class OutputLog:
    """What execution published for each input it applied, for idempotent order-flow delivery.

    With `output_after_batch` a batch's reports are published after its batch hook and its
    offsets committed after that: a crash in between redelivers inputs that already reached
    the venue, and a rebalance can too. `record` holds an input's reports under its cause key,
    `flush` (in the batch hook, after the sent-log's claims) writes them in one statement, and
    `known` recognises the redelivered input: from memory for what this process recorded (the
    `recent` latest causes; the keys of the latest stored rows are loaded at `start`), and from
    the table for an order command older than every cause memory does not cover.

    Without a pool (no PostgreSQL) it covers one process's lifetime only.
    """

    def __init__(self, venue: str, pool: Any | None, *, recent: int = 20_000) -> None:
        if recent < 1:
            raise ValueError("recent must be at least 1")
        self.venue = venue
        self.pool = pool
        self.recent_limit = recent
        #: cause -> (input time, its reports; None: stored, not loaded).
        self.recent: OrderedDict[str, tuple[int, list[ExecutionReport] | None]] = OrderedDict()
        #: Commands at or before this time may be stored without being in `recent` (only
        #: commands are looked up: market data time runs on its own clock, the venue's).
        self.high_water: int | None = None
        #: Recorded since the last flush, in order.
        self.held: list[tuple[str, int, ExecutionReport]] = []
        #: Table reads made to answer `known` and `history` (tests, metrics).
        self.lookups = 0

    async def start(self) -> None:
        """Check the table; load the keys of the latest stored causes and the latest input time."""
        if self.pool is None:
            return
        found = await self.pool.fetchval("SELECT to_regclass($1) IS NOT NULL", TABLE)
        if not found:
            raise RuntimeError(f"table {TABLE} is missing: run quantmesh-migrate (V0027)")
        rows = await self.pool.fetch(
            f"""
            SELECT cause, max(ts_cause) AS ts, max(id) AS last FROM (
                SELECT cause, ts_cause, id FROM {TABLE} WHERE venue = $1
                ORDER BY id DESC LIMIT $2
            ) latest GROUP BY cause ORDER BY last
            """,
            self.venue,
            self.recent_limit,
        )
        for row in rows:
            self.recent[row["cause"]] = (int(row["ts"]), None)
        value = await self.pool.fetchval(
            f"SELECT max(ts_cause) FROM {TABLE} WHERE venue = $1 AND cause LIKE 'command:%'",
            self.venue,
        )
        self.high_water = None if value is None else int(value)

    async def known(self, cause: str, ts: int, *, look_up: bool) -> list[ExecutionReport] | None:
        """The reports recorded for `cause` (never empty), or None: the input is new.

        `look_up`: ask the table when memory does not know the cause and the input is not newer
        than the stored ones (order commands: the oms may send one again long after).
        """
        known = self.recent.get(cause)
        if known is not None:
            reports = known[1]
            if reports is not None:
                return reports
            # Loaded at start, and its rows pruned since (`prune`): the input is new again.
            return await self._fetch_cause(cause) or None
        if look_up and self.high_water is not None and ts <= self.high_water:
            reports = await self._fetch_cause(cause)
            return reports or None
        return None

    def record(self, cause: str, ts: int, reports: list[ExecutionReport]) -> None:
        """Hold the reports an input made, to be written by `flush` (nothing for no reports)."""
        if not reports:
            return
        self.recent[cause] = (ts, reports)
        self.recent.move_to_end(cause)
        while len(self.recent) > self.recent_limit:
            evicted, (evicted_ts, _) = self.recent.popitem(last=False)
            if evicted.startswith(_COMMAND) and (
                self.high_water is None or evicted_ts > self.high_water
            ):
                self.high_water = evicted_ts
        if self.pool is not None:
            self.held += [(cause, ts, report) for report in reports]

    async def flush(self) -> None:
        """Write the held reports in one statement (the batch hook; a rewrite adds nothing)."""
        held, self.held = self.held, []
        if not held or self.pool is None:
            return
        await self.pool.execute(
            f"""
            INSERT INTO {TABLE} (venue, cause, ts_cause, client_order_id, report_id, report)
            SELECT $1, c, t, o, r, j::jsonb
            FROM unnest($2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[])
                WITH ORDINALITY AS u(c, t, o, r, j, n)
            ORDER BY n
            ON CONFLICT (venue, cause, report_id) DO NOTHING
            """,
            self.venue,
            [cause for cause, _, _ in held],
            [ts for _, ts, _ in held],
            [report.client_order_id for _, _, report in held],
            [report.report_id for _, _, report in held],
            [report.model_dump_json() for _, _, report in held],
        )

    async def prune(self, older_than_ns: int) -> int:
        """Delete this venue's rows recorded more than `older_than_ns` ago; return how many.

        By the database's clock (`recorded_at`): `ts_cause` is the input's, which a replay or
        the venue's market data sets.
        """
        if self.pool is None:
            return 0
        return await prune_recorded(self.pool, TABLE, self.venue, older_than_ns)

    async def history(self, client_order_id: str, account_id: str) -> list[ExecutionReport]:
        """Every stored report of the order, once each, in the order made; [] if none or
        another account's."""
        if self.pool is None:
            return []
        self.lookups += 1
        rows = await self.pool.fetch(
            f"""
            SELECT report::text AS report FROM {TABLE}
            WHERE venue = $1 AND client_order_id = $2 ORDER BY id
            """,
            self.venue,
            client_order_id,
        )
        reports = _distinct(ExecutionReport.model_validate_json(row["report"]) for row in rows)
        if any(report.account_id != account_id for report in reports):
            return []
        return reports

    async def _fetch_cause(self, cause: str) -> list[ExecutionReport]:
        if self.pool is None:
            return []
        self.lookups += 1
        rows = await self.pool.fetch(
            f"""
            SELECT report::text AS report FROM {TABLE}
            WHERE venue = $1 AND cause = $2 ORDER BY id
            """,
            self.venue,
            cause,
        )
        return [ExecutionReport.model_validate_json(row["report"]) for row in rows]


async def prune_recorded(pool: Any, table: str, venue: str, older_than_ns: int) -> int:
    """Delete `venue`'s rows of `table` recorded (`recorded_at`) more than `older_than_ns` ago,
    by the database's clock; return how many."""
    status: str = await pool.execute(
        f"""
        DELETE FROM {table}
        WHERE venue = $1 AND recorded_at < qm_ns_to_timestamptz(qm_now_ns() - $2)
        """,
        venue,
        older_than_ns,
    )
    return int(status.rsplit(" ", 1)[-1])


def _distinct(reports: Any) -> list[ExecutionReport]:
    seen: set[str] = set()
    kept: list[ExecutionReport] = []
    for report in reports:
        if report.report_id not in seen:
            seen.add(report.report_id)
            kept.append(report)
    return kept


def merge(first: list[ExecutionReport], then: list[ExecutionReport]) -> list[ExecutionReport]:
    """`first`, then the reports of `then` whose report ids `first` does not have."""
    return _distinct([*first, *then])
