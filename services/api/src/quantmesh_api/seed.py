"""Start from PostgreSQL and the update topics' committed end instead of replaying the topics.

Why no update is lost or applied twice (services/api/README.md, "Start"):

- The portfolio, the only writer of `portfolio.updates` and `portfolio.snapshots`, produces
  them in a Kafka transaction that commits after its PostgreSQL transaction holding the same
  positions and snapshots (its batch hook). The api reads `read_committed`.
- The api first asks the broker for each partition's last stable offset (LSO, the end as a
  `read_committed` reader sees it: every transaction below it is decided), then reads
  PostgreSQL, then consumes from those offsets. A committed message below the LSO had its
  rows committed before the LSO was read, so the PostgreSQL read has them; every message at
  or above it is consumed.
- Messages both in the rows and consumed (a transaction deciding between the two reads) fold
  in by event time, newest wins, so a second copy changes nothing.

The other topics (`orders.updates`, `exec.reports`, `alerts`) feed only WebSocket pushes of
what happens from now on (REST reads orders and trades from PostgreSQL); the OCO follower,
which a replay used to retry for legs that filled while no api ran, gets a start-up sweep over
the `orders` table instead (`ApiService._sweep_oco`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from confluent_kafka import Consumer, IsolationLevel, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]

from quantmesh_api import oco
from quantmesh_api.live import Projection
from quantmesh_api.store import _ORDER_COLUMNS
from quantmesh_common.messages import Order, PortfolioSnapshot, Position

log = logging.getLogger(__name__)


def stable_ends(bootstrap: str, topics: Sequence[str], timeout_s: float) -> list[TopicPartition]:
    """Every partition of `topics` at its last stable offset (blocking; topics not yet made
    have no partitions, and the group starts them from their beginning)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    metadata = admin.list_topics(timeout=timeout_s)
    request = {
        TopicPartition(topic, partition): OffsetSpec.latest()  # type: ignore[no-untyped-call]
        for topic in topics
        if topic in metadata.topics and metadata.topics[topic].error is None
        for partition in metadata.topics[topic].partitions
    }
    if not request:
        return []
    futures = admin.list_offsets(
        request, isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=timeout_s
    )
    return [
        TopicPartition(tp.topic, tp.partition, future.result(timeout_s).offset)
        for tp, future in futures.items()
    ]


def commit_start(bootstrap: str, group: str, offsets: list[TopicPartition]) -> None:
    """Commit `offsets` for the new, empty `group`: its consumer starts there (blocking)."""
    if not offsets:
        return
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    try:
        consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()


def position_of(row: Any) -> Position:
    """A `positions` row (V0001, written by the portfolio) as the Position it published."""
    return Position(
        account_id=row["account_id"],
        instrument_id=row["instrument_id"],
        side=row["side"],
        quantity=row["quantity"],
        avg_entry_price=row["avg_entry_price"],
        realized_pnl=row["realized_pnl"],
        unrealized_pnl=row["unrealized_pnl"],
        fees=row["fees"],
        last_price=row["last_price"],
        ts_event=row["ts_event"],
    )


def snapshot_of(row: Any) -> PortfolioSnapshot:
    """An `equity_snapshots` row as the PortfolioSnapshot it was stored from (its positions
    are in the `positions` rows, stored with it)."""
    balances = row["balances"]
    if isinstance(balances, str):  # jsonb without a codec on the pool
        balances = json.loads(balances)
    return PortfolioSnapshot(
        account_id=row["account_id"],
        base_currency=row["base_currency"],
        balances={str(k): Decimal(str(v)) for k, v in balances.items()},
        equity=row["equity"],
        realized_pnl=row["realized_pnl"],
        unrealized_pnl=row["unrealized_pnl"],
        fees=row["fees"],
        peak_equity=row["peak_equity"],
        drawdown=row["drawdown"],
        ts_event=row["ts_event"],
    )


def seed(projection: Projection, positions: list[Any], snapshots: list[Any]) -> tuple[int, int]:
    """Fold stored positions and snapshots (oldest first per account) into `projection`.

    Return how many of each were taken. A row that does not validate is skipped with a
    warning: the next update of its account repairs the view.
    """
    taken = [0, 0]
    for rows, build, index in ((snapshots, snapshot_of, 1), (positions, position_of, 0)):
        for row in rows:
            try:
                event = build(row)
            except ValueError as exc:
                log.warning("start: a stored row does not validate; skipped: %s", exc)
                continue
            projection.apply_payload(event)
            taken[index] += 1
    return taken[0], taken[1]


_POSITIONS = (
    "SELECT account_id, instrument_id, side, quantity, avg_entry_price, realized_pnl,"
    " unrealized_pnl, fees, last_price, ts_event FROM positions"
)
#: The newest `$1` snapshots of each account, oldest first (the equity curve's points).
_SNAPSHOTS = (
    "SELECT account_id, ts_event, base_currency, equity, realized_pnl, unrealized_pnl, fees,"
    " peak_equity, drawdown, balances FROM (SELECT *, row_number() OVER (PARTITION BY"
    " account_id ORDER BY ts_event DESC) AS newest FROM equity_snapshots) s"
    " WHERE newest <= $1 ORDER BY account_id, ts_event"
)
#: Protect legs that filled while their sibling still works (the sibling's id: the leg's id
#: with the other suffix, oco.leg_ids).
_FILLED_LEGS = (
    f"SELECT {_ORDER_COLUMNS} FROM orders o WHERE o.tag = ANY($1::text[])"
    " AND o.filled_quantity > 0 AND EXISTS (SELECT 1 FROM orders s"
    " WHERE s.account_id = o.account_id AND s.status = ANY($2::text[])"
    " AND s.client_order_id = regexp_replace(o.client_order_id, ':(SL|TP)$', '')"
    " || CASE WHEN o.tag = $3 THEN ':TP' ELSE ':SL' END)"
)


async def load(pool: Any, projection: Projection, history: int) -> tuple[int, int]:
    """Seed `projection` with every stored position and each account's last `history`
    snapshots; return how many of each."""
    positions = await pool.fetch(_POSITIONS)
    snapshots = await pool.fetch(_SNAPSHOTS, history)
    return seed(projection, positions, snapshots)


async def filled_protect_legs(pool: Any) -> list[Order]:
    """Protect legs with a fill whose other leg is still working, as Orders."""
    rows = await pool.fetch(
        _FILLED_LEGS, [oco.PROTECT_SL, oco.PROTECT_TP], sorted(oco.WORKING), oco.PROTECT_SL
    )
    legs: list[Order] = []
    for row in rows:
        try:
            legs.append(Order.model_validate({**dict(row), "tag": row["tag"] or ""}))
        except ValueError as exc:
            log.warning("start: a stored order does not validate; skipped: %s", exc)
    return legs
