"""Where sent notifications are kept: a bounded in-memory window, and PostgreSQL when configured."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from quantmesh_alerts.rules import Notification
from quantmesh_common.messages import AlertSeverity

#: The table of V0024__alerts.sql.
TABLE = "alert_notifications"


@dataclass(frozen=True, slots=True)
class StoredAlert:
    """A notification as kept in the history, with what each channel made of it."""

    notification: Notification
    outcome: Mapping[str, str]


class AlertHistory:
    """The last `capacity` notifications, newest last, in memory."""

    def __init__(self, capacity: int) -> None:
        self._items: deque[StoredAlert] = deque(maxlen=capacity)
        #: Notifications stored since start (also those pushed out of the window).
        self.total = 0

    def add(self, item: StoredAlert) -> None:
        """Keep `item`, dropping the oldest when full."""
        self._items.append(item)
        self.total += 1

    def recent(self, limit: int | None = None) -> list[StoredAlert]:
        """The newest `limit` items (all if None), oldest first."""
        items = list(self._items)
        return items if limit is None else items[-limit:]

    def __len__(self) -> int:
        return len(self._items)


class PostgresAlertStore:
    """Every notification in `alert_notifications`, keyed by its notification id.

    `add` is one INSERT ... ON CONFLICT DO NOTHING, so storing a notification again (an
    event redelivered after a restart) leaves the first row as it was.
    """

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def check(self) -> None:
        """Raise naming the fix when the table is missing (migrations not applied)."""
        found = await self.pool.fetchval("SELECT to_regclass($1) IS NOT NULL", TABLE)
        if not found:
            raise RuntimeError(f"table {TABLE} is missing: run quantmesh-migrate (V0024)")

    async def contains(self, notification_id: str) -> bool:
        """Whether a notification with this id was stored (so it was already sent)."""
        found = await self.pool.fetchval(
            f"SELECT true FROM {TABLE} WHERE notification_id = $1", notification_id
        )
        return found is True

    async def add(self, item: StoredAlert) -> bool:
        """Store `item`; False if its notification id was there already."""
        n = item.notification
        inserted = await self.pool.fetchval(
            f"""
            INSERT INTO {TABLE} (
                notification_id, rule, kind, severity, code, message, dedupe_key, channels,
                outcome, suppressed, event_id, account_id, instrument_id, details, ts_ns
            )
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
            ON CONFLICT (notification_id) DO NOTHING
            RETURNING true
            """,
            n.notification_id,
            n.rule,
            n.kind,
            str(n.severity),
            n.code,
            n.message,
            n.dedupe_key,
            list(n.channels),
            dict(item.outcome),
            n.suppressed,
            n.event_id,
            n.account_id,
            n.instrument_id,
            dict(n.details),
            n.ts_ns,
        )
        return inserted is True

    async def recent(self, limit: int = 100) -> list[StoredAlert]:
        """The newest `limit` stored notifications, oldest first."""
        rows = await self.pool.fetch(
            f"SELECT * FROM {TABLE} ORDER BY ts_ns DESC, stored_at DESC LIMIT $1", limit
        )
        return [_from_row(row) for row in reversed(rows)]


def _from_row(row: Any) -> StoredAlert:
    notification = Notification(
        notification_id=row["notification_id"],
        rule=row["rule"],
        kind=row["kind"],
        severity=AlertSeverity(row["severity"]),
        code=row["code"],
        message=row["message"],
        dedupe_key=row["dedupe_key"],
        channels=tuple(row["channels"]),
        ts_ns=row["ts_ns"],
        suppressed=row["suppressed"],
        event_id=row["event_id"],
        account_id=row["account_id"],
        instrument_id=row["instrument_id"],
        details=dict(row["details"]),
    )
    return StoredAlert(notification, dict(row["outcome"]))
