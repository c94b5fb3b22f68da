"""The history of `quantmesh run` in one SQLite file: orders, fills, positions, equity, alerts."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import (
    Alert,
    AlertSeverity,
    ExecType,
    ExecutionReport,
    Order,
    PortfolioSnapshot,
    Position,
    RiskDecision,
)
from quantmesh_common.topics import Topic

#: The topics whose events the history keeps.
TOPICS = (
    Topic.ORDERS_UPDATES,
    Topic.ORDERS_REJECTED,
    Topic.EXEC_REPORTS,
    Topic.PORTFOLIO_UPDATES,
    Topic.PORTFOLIO_SNAPSHOTS,
    Topic.ALERTS,
)

# Money is TEXT: the exact Decimal the mesh published, never a float.
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_ns INTEGER NOT NULL,
    stopped_ns INTEGER,
    config TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    event_id TEXT NOT NULL,
    ts_ns INTEGER NOT NULL,
    client_order_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    strategy_id TEXT NOT NULL,
    instrument_id TEXT NOT NULL,
    side TEXT NOT NULL,
    order_type TEXT NOT NULL,
    quantity TEXT NOT NULL,
    filled_quantity TEXT NOT NULL,
    avg_fill_price TEXT,
    limit_price TEXT,
    status TEXT NOT NULL,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS fills (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    event_id TEXT NOT NULL,
    ts_ns INTEGER NOT NULL,
    account_id TEXT NOT NULL,
    client_order_id TEXT NOT NULL,
    trade_id TEXT NOT NULL,
    instrument_id TEXT NOT NULL,
    side TEXT NOT NULL,
    quantity TEXT NOT NULL,
    price TEXT NOT NULL,
    fee TEXT NOT NULL,
    liquidity_side TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS positions (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    event_id TEXT NOT NULL,
    ts_ns INTEGER NOT NULL,
    account_id TEXT NOT NULL,
    instrument_id TEXT NOT NULL,
    quantity TEXT NOT NULL,
    avg_entry_price TEXT NOT NULL,
    realized_pnl TEXT NOT NULL,
    unrealized_pnl TEXT NOT NULL,
    fees TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS equity (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    event_id TEXT NOT NULL,
    ts_ns INTEGER NOT NULL,
    account_id TEXT NOT NULL,
    equity TEXT NOT NULL,
    balances TEXT NOT NULL,
    realized_pnl TEXT NOT NULL,
    unrealized_pnl TEXT NOT NULL,
    fees TEXT NOT NULL,
    drawdown TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS alerts (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    event_id TEXT NOT NULL,
    ts_ns INTEGER NOT NULL,
    severity TEXT NOT NULL,
    source TEXT NOT NULL,
    code TEXT NOT NULL,
    message TEXT NOT NULL,
    account_id TEXT,
    instrument_id TEXT
);
CREATE INDEX IF NOT EXISTS orders_run ON orders(run_id, ts_ns);
CREATE INDEX IF NOT EXISTS fills_run ON fills(run_id, ts_ns);
CREATE INDEX IF NOT EXISTS positions_run ON positions(run_id, ts_ns);
CREATE INDEX IF NOT EXISTS equity_run ON equity(run_id, ts_ns);
CREATE INDEX IF NOT EXISTS alerts_run ON alerts(run_id, ts_ns);
"""

_INSERT = {
    "orders": "INSERT INTO orders VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
    "fills": "INSERT INTO fills VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
    "positions": "INSERT INTO positions VALUES (?,?,?,?,?,?,?,?,?,?)",
    "equity": "INSERT INTO equity VALUES (?,?,?,?,?,?,?,?,?,?)",
    "alerts": "INSERT INTO alerts VALUES (?,?,?,?,?,?,?,?,?)",
}


def default_path() -> Path:
    """`$XDG_DATA_HOME/quantmesh/run.sqlite`, else `~/.local/share/quantmesh/run.sqlite`."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "quantmesh" / "run.sqlite"


def _text(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def alert_row(event: Any) -> tuple[str, str, str, str, str | None, str | None] | None:
    """(severity, source, code, message, account, instrument) if `event` is one to alert on.

    An Alert any stage raised, a risk denial, or a venue's reject: what a person watching
    the run needs to see (the alerts stage's own rules are not run in one process).
    """
    if isinstance(event, Alert):
        return (
            str(event.severity),
            event.source_service,
            event.code,
            event.message,
            event.account_id,
            event.instrument_id,
        )
    if isinstance(event, RiskDecision) and not event.approved:
        intent = event.intent
        return (
            str(AlertSeverity.WARNING),
            "risk",
            event.reason or "DENIED",
            f"intent {intent.client_order_id} denied: {event.reason_text}",
            event.account_id,
            intent.instrument_id,
        )
    if isinstance(event, ExecutionReport) and event.exec_type is ExecType.REJECTED:
        return (
            str(AlertSeverity.WARNING),
            "execution",
            "VENUE_REJECTED",
            f"order {event.client_order_id} rejected by the venue: {event.reason or '-'}",
            event.account_id,
            event.instrument_id,
        )
    return None


class History:
    """Appends what the mesh publishes to SQLite; one `runs` row per run, all rows carry it.

    Rows are buffered and written in one transaction per `flush()`, so the bus handler never
    waits on the disk; `close()` flushes the rest and stamps the run's end.
    """

    def __init__(self, path: Path, started_ns: int, config: Mapping[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path)
        self._db.executescript(SCHEMA)
        cursor = self._db.execute(
            "INSERT INTO runs (started_ns, config) VALUES (?, ?)",
            (started_ns, json.dumps(dict(config), sort_keys=True, default=str)),
        )
        run_id = cursor.lastrowid
        assert run_id is not None
        self.run_id: int = run_id
        self._db.commit()
        self._pending: dict[str, list[tuple[Any, ...]]] = {table: [] for table in _INSERT}

    def on_event(self, envelope: Envelope[Any]) -> None:
        """Buffer the rows one published event makes (a bus handler)."""
        event, eid, run = envelope.payload, envelope.event_id, self.run_id
        if isinstance(event, Order):
            self._pending["orders"].append(
                (
                    run,
                    eid,
                    event.ts_last,
                    event.client_order_id,
                    event.account_id,
                    event.strategy_id,
                    event.instrument_id,
                    str(event.side),
                    str(event.order_type),
                    str(event.quantity),
                    str(event.filled_quantity),
                    _text(event.avg_fill_price),
                    _text(event.limit_price),
                    str(event.status),
                    event.reason,
                )
            )
        elif isinstance(event, ExecutionReport) and event.exec_type.is_fill:
            self._pending["fills"].append(
                (
                    run,
                    eid,
                    event.ts_event,
                    event.account_id,
                    event.client_order_id,
                    event.trade_id,
                    event.instrument_id,
                    str(event.side),
                    str(event.last_qty),
                    str(event.last_price),
                    str(event.fee),
                    str(event.liquidity_side),
                )
            )
        elif isinstance(event, Position):
            self._pending["positions"].append(
                (
                    run,
                    eid,
                    event.ts_event,
                    event.account_id,
                    event.instrument_id,
                    str(event.quantity),
                    str(event.avg_entry_price),
                    str(event.realized_pnl),
                    str(event.unrealized_pnl),
                    str(event.fees),
                )
            )
        elif isinstance(event, PortfolioSnapshot):
            self._pending["equity"].append(
                (
                    run,
                    eid,
                    event.ts_event,
                    event.account_id,
                    str(event.equity),
                    json.dumps({k: str(v) for k, v in sorted(event.balances.items())}),
                    str(event.realized_pnl),
                    str(event.unrealized_pnl),
                    str(event.fees),
                    str(event.drawdown),
                )
            )
        if (alert := alert_row(event)) is not None:
            ts = getattr(event, "ts_event", envelope.ts_event)
            self._pending["alerts"].append((run, eid, ts, *alert))

    def flush(self) -> None:
        """Write the buffered rows in one transaction."""
        with self._db:
            for table, rows in self._pending.items():
                if rows:
                    self._db.executemany(_INSERT[table], rows)
                    rows.clear()

    def close(self, stopped_ns: int) -> None:
        """Flush, record when the run stopped, close the file."""
        self.flush()
        with self._db:
            self._db.execute(
                "UPDATE runs SET stopped_ns = ? WHERE run_id = ?", (stopped_ns, self.run_id)
            )
        self._db.close()
