"""Where the OMS keeps its orders and their audit trail: PostgreSQL, or memory for tests."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Any, Protocol

from pydantic_core import to_json

from quantmesh_common.bus.base import Emit
from quantmesh_common.envelope import schemas
from quantmesh_common.messages import InstrumentId, Order, OrderStatus
from quantmesh_oms.algo import AlgoPlan
from quantmesh_oms.orders import ManagedOrder, OcoTerms, OrderChange, ReplaceTerms
from quantmesh_oms.state_machine import OrderProgress

#: Statuses of orders that may still change (rebuilt into the book at start).
OPEN_STATUSES: tuple[str, ...] = tuple(s.value for s in OrderStatus if not s.is_terminal)


def event_id(change: OrderChange) -> str:
    """Return the stored id of a change: one per order and transition, whatever redelivers it."""
    return f"{change.order.client_order_id}:{change.key}"


def payload_of(change: OrderChange) -> dict[str, Any]:
    """Return the order_events payload of a change: its details plus what a rebuild needs."""
    progress = change.progress
    before = progress.status_before_cancel
    return {
        **change.details,
        "seq": change.seq,
        "filled_quantity": format(progress.filled_quantity, "f"),
        # The exact fill notional: the orders row keeps only the rounded average.
        "filled_notional": format(progress.filled_notional, "f"),
        "status_before_cancel": before.value if before is not None else None,
    }


def rebuild(order: Order, payloads: Iterable[Mapping[str, Any]]) -> ManagedOrder:
    """Return the managed order of a stored order and the payloads of its events."""
    ordered = sorted(payloads, key=lambda p: int(p["seq"]))
    last = ordered[-1] if ordered else {}
    before = last.get("status_before_cancel")
    # A parent's plan is stored once, with its SUBMIT; the slices sent with every event.
    plans = (AlgoPlan.from_details(dict(p)) for p in ordered)
    plan = next((p for p in plans if p is not None), None)
    algo_sent = int(last.get("algo_sent") or 0)
    if plan is not None:
        order = order.model_copy(
            update={"algo_slices_sent": algo_sent, "algo_slices_total": len(plan.sizes)}
        )
    progress = OrderProgress(
        quantity=order.quantity,
        status=order.status,
        filled_quantity=order.filled_quantity,
        filled_notional=Decimal(last.get("filled_notional", "0")),
        status_before_cancel=OrderStatus(before) if before else None,
    )
    return ManagedOrder(
        order=order,
        progress=progress,
        report_ids={p["report_id"] for p in ordered if "report_id" in p},
        trade_ids={p["trade_id"] for p in ordered if "trade_id" in p},
        request_ids={p["request_id"] for p in ordered if "request_id" in p},
        pending_replace=ReplaceTerms.from_details(dict(last))
        if last.get("replace_pending")
        else None,
        cancel_kind=last.get("cancel_kind") or None,
        cancel_cause=last.get("cancel_cause") or None,
        seq=int(last.get("seq", 0)),
        oco=OcoTerms.from_details(dict(last)),
        algo=plan,
        algo_sent=algo_sent,
    )


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """What one consumed message made the OMS publish, stored with the changes it caused."""

    input_id: str
    input_schema: str
    emits: tuple[Emit, ...]
    ts_init: int


@dataclass(frozen=True, slots=True)
class PendingSave:
    """One message's changes and outbox, held until its batch is stored (`save_many`)."""

    changes: tuple[OrderChange, ...]
    correlation_id: str | None
    causation_id: str | None
    outbox: OutboxEntry | None


def encode_emits(emits: Iterable[Emit]) -> list[dict[str, Any]]:
    """Return `emits` as JSON-ready dicts (decimals as strings, exact)."""
    return [
        {
            "topic": e.topic,
            "key": e.key,
            "ts_event": e.ts_event,
            "schema": e.payload.SCHEMA_NAME,
            "payload": e.payload.model_dump(mode="json"),
        }
        for e in emits
    ]


#: JSON string literals of the topics, schema names and keys seen (a few dozen in practice):
#: `json.dumps` of each cost the oms ~3 us, four times an emit. Cleared when it grows past
#: `_JSON_STRINGS_MAX`, so unbounded keys cannot make it grow without end.
_JSON_STRINGS: dict[str | None, str] = {None: "null"}
_JSON_STRINGS_MAX = 4096


def _json_string(value: str | None) -> str:
    """Return `json.dumps(value)`, remembered."""
    text = _JSON_STRINGS.get(value)
    if text is None:
        if len(_JSON_STRINGS) >= _JSON_STRINGS_MAX:
            _JSON_STRINGS.clear()
            _JSON_STRINGS[None] = "null"
        text = _JSON_STRINGS[value] = json.dumps(value)
    return text


def encode_emits_json(emits: Iterable[Emit]) -> str:
    """Return `encode_emits(emits)` as JSON text, each payload serialised by its own model.

    The batch store's form: a payload's dict and `json.dumps` of it cost the oms twice as much.
    """
    string = _JSON_STRINGS.get
    items = []
    for e in emits:
        payload = e.payload
        ts_event = e.ts_event
        items.append(
            f'{{"topic":{string(e.topic) or _json_string(e.topic)},'
            f'"key":{string(e.key) or _json_string(e.key)},'
            f'"ts_event":{"null" if ts_event is None else int(ts_event)},'
            f'"schema":{string(payload.SCHEMA_NAME) or _json_string(payload.SCHEMA_NAME)},'
            f'"payload":{payload.__pydantic_serializer__.to_json(payload).decode()}}}'
        )
    return "[" + ",".join(items) + "]"


def decode_emits(rows: Iterable[Mapping[str, Any]]) -> list[Emit]:
    """Return the emits `encode_emits` wrote, with payloads validated by their models again."""
    return [
        Emit(
            topic=row["topic"],
            payload=schemas.model(row["schema"]).model_validate(row["payload"]),
            key=row["key"],
            ts_event=row["ts_event"],
        )
        for row in rows
    ]


class OrderStore(Protocol):
    """Persistence of orders (one row per client order id), every applied transition, and the
    outbox of what each consumed message made the OMS publish."""

    async def save(
        self,
        changes: Sequence[OrderChange],
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        outbox: OutboxEntry | None = None,
    ) -> int:
        """Store `changes` (and `outbox`) atomically; returns how many changes were new.

        A stored change is skipped; an outbox entry already stored for the input is kept.
        """
        ...

    async def save_many(self, saves: Sequence[PendingSave]) -> int:
        """Store every save of a batch, in order, atomically; returns how many changes were new.

        The same as one `save` per entry in one transaction.
        """
        ...

    async def load_outbox(self, input_id: str) -> list[Emit] | None:
        """Return what the consumed message `input_id` made the OMS publish, or None."""
        ...

    async def load(self, client_order_id: str) -> ManagedOrder | None:
        """Return one stored order (terminal or not), or None."""
        ...

    async def load_open(self) -> list[ManagedOrder]:
        """Return every stored order that is not terminal."""
        ...

    async def high_water(self) -> int | None:
        """Return the latest creation time (`ts_init`) of a stored order, None if there is none."""
        ...


@dataclass
class _StoredOrder:
    order: Order
    payloads: list[dict[str, Any]]


class InMemoryOrderStore:
    """An OrderStore in a dict: for unit tests and one-process runs (lost on exit)."""

    def __init__(self) -> None:
        self._orders: dict[str, _StoredOrder] = {}
        #: Ids of the stored events, in the order they were saved.
        self.event_ids: list[str] = []
        self._seen: set[str] = set()
        #: The outbox by input id. Kept as given, not encoded: the emits and their payloads
        #: are frozen, and encoding every message's outputs cost backtests 3 % of their time.
        self.outbox: dict[str, tuple[Emit, ...]] = {}

    async def save(
        self,
        changes: Sequence[OrderChange],
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        outbox: OutboxEntry | None = None,
    ) -> int:
        """Store `changes` and `outbox`; returns how many changes were new."""
        if outbox is not None:
            self.outbox.setdefault(outbox.input_id, outbox.emits)
        new = 0
        for change in changes:
            eid = event_id(change)
            if eid in self._seen:
                continue
            self._seen.add(eid)
            self.event_ids.append(eid)
            coid = change.order.client_order_id
            stored = self._orders.setdefault(coid, _StoredOrder(change.order, []))
            stored.order = change.order
            stored.payloads.append(payload_of(change))
            new += 1
        return new

    async def save_many(self, saves: Sequence[PendingSave]) -> int:
        """Store each save in order; returns how many changes were new."""
        new = 0
        for pending in saves:
            new += await self.save(
                pending.changes,
                correlation_id=pending.correlation_id,
                causation_id=pending.causation_id,
                outbox=pending.outbox,
            )
        return new

    async def load_outbox(self, input_id: str) -> list[Emit] | None:
        """Return the stored emits of `input_id`, or None."""
        emits = self.outbox.get(input_id)
        return list(emits) if emits is not None else None

    async def load(self, client_order_id: str) -> ManagedOrder | None:
        """Return one stored order, or None."""
        stored = self._orders.get(client_order_id)
        return rebuild(stored.order, stored.payloads) if stored is not None else None

    async def load_open(self) -> list[ManagedOrder]:
        """Return every stored order that is not terminal."""
        return [
            rebuild(s.order, s.payloads)
            for s in self._orders.values()
            if not s.order.status.is_terminal
        ]

    async def high_water(self) -> int | None:
        """Return the latest `ts_init` of a stored order, or None."""
        return max((s.order.ts_init for s in self._orders.values()), default=None)


class NoOrderStore:
    """An OrderStore that keeps nothing: for one-process runs where nothing is read back.

    A backtest never redelivers a message nor restarts the stage, so no order history, no
    outbox and no closed order is ever asked for again; keeping them cost ~3 KB per order.
    Every read answers as for an empty store.
    """

    async def save(
        self,
        changes: Sequence[OrderChange],
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        outbox: OutboxEntry | None = None,
    ) -> int:
        """Keep nothing; return how many changes were given (each is new: none is kept)."""
        return len(changes)

    async def save_many(self, saves: Sequence[PendingSave]) -> int:
        """Keep nothing; return how many changes the saves held."""
        return sum(len(pending.changes) for pending in saves)

    async def load_outbox(self, input_id: str) -> list[Emit] | None:
        """None: no outbox is kept."""
        return None

    async def load(self, client_order_id: str) -> ManagedOrder | None:
        """None: no order is kept."""
        return None

    async def load_open(self) -> list[ManagedOrder]:
        """Nothing: no order is kept."""
        return []

    async def high_water(self) -> int | None:
        """None: no order is kept."""
        return None


#: The `orders` columns the oms writes (the keys of `_order_row`).
_ORDER_COLUMNS = (
    "client_order_id",
    "venue_order_id",
    "account_id",
    "strategy_id",
    "instrument_id",
    "venue",
    "intent_id",
    "parent_order_id",
    "side",
    "order_type",
    "quantity",
    "filled_quantity",
    "avg_fill_price",
    "limit_price",
    "stop_price",
    "time_in_force",
    "expire_time_ns",
    "post_only",
    "reduce_only",
    "status",
    "reason",
    "tag",
    "correlation_id",
    "ts_init",
    "ts_last",
)

#: A batch in one statement, so one round trip and one implicit transaction (five before —
#: BEGIN, three statements, COMMIT — each a wake-up of the server and of the oms on a busy
#: host). Parameters:
#: - $1-$4: the outbox (input id, schema, emits as JSON text, ts_init), one array each;
#: - $5: every event, one JSON text of rows, each event's payload nested in its row;
#: - $6: for each order, its row as of its last change in the batch, with that change's
#:   `event_id`; upserted only if that event is new.
#: Rows travel as JSON text (objects keyed by column, decimals as their exact strings), not as
#: one array per column: asyncpg's per-element encoding of arrays cost the oms about twice the
#: CPU per row, and the server's parse of the JSON about the same. An order's events are stored
#: in order and a batch's atomically, so when any of an order's changes in a batch is new its
#: last one is: the row is the order as of its last new change, and a row inserted now (all
#: its changes new) carries its first change's correlation id. Returns the new events' count.
_SAVE_BATCH = f"""
WITH outbox AS (
    INSERT INTO oms_outbox (input_id, input_schema, emits, ts_init)
    SELECT i, s, e::jsonb, t FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
        AS u(i, s, e, t)
    ON CONFLICT (input_id) DO NOTHING
), new_events AS (
    INSERT INTO order_events (event_id, client_order_id, account_id, event_type, status,
                              correlation_id, causation_id, payload, ts_event, ts_init)
    SELECT event_id, client_order_id, account_id, event_type, status,
           correlation_id, causation_id, payload, ts_event, ts_init
    FROM json_populate_recordset(NULL::order_events, $5::text::json)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
), upserted AS (
    INSERT INTO orders ({", ".join(_ORDER_COLUMNS)})
    SELECT {", ".join(f"r.{c}" for c in _ORDER_COLUMNS)}
    FROM json_array_elements($6::text::json) AS doc
    CROSS JOIN LATERAL json_populate_record(NULL::orders, doc) AS r
    WHERE doc->>'event_id' IN (SELECT event_id FROM new_events)
    ON CONFLICT (client_order_id) DO UPDATE SET
        venue_order_id = EXCLUDED.venue_order_id,
        quantity = EXCLUDED.quantity,
        limit_price = EXCLUDED.limit_price,
        stop_price = EXCLUDED.stop_price,
        filled_quantity = EXCLUDED.filled_quantity,
        avg_fill_price = EXCLUDED.avg_fill_price,
        status = EXCLUDED.status,
        reason = EXCLUDED.reason,
        ts_last = EXCLUDED.ts_last
    RETURNING 1
)
SELECT (SELECT count(*) FROM new_events) AS new_events
"""

_SELECT_OUTBOX = "SELECT emits FROM oms_outbox WHERE input_id = $1"

#: By the database's clock (V0029 `ts_stored`): `ts_init` is the oms's, which a replay simulates.
_PRUNE_OUTBOX = "DELETE FROM oms_outbox WHERE ts_stored < qm_now_ns() - $1"

_SELECT_ORDERS = "SELECT * FROM orders WHERE "

_SELECT_PAYLOADS = """
SELECT client_order_id, payload FROM order_events WHERE client_order_id = ANY($1::text[])
"""


class PostgresOrderStore:
    """An OrderStore on the V0001 `orders` and `order_events` tables and the V0012 `oms_outbox`
    (V0029: its `ts_stored`, by which old rows are pruned), through an asyncpg pool."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def save(
        self,
        changes: Sequence[OrderChange],
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        outbox: OutboxEntry | None = None,
    ) -> int:
        """Insert each change's event, upsert its order and insert the outbox, in one transaction.

        A change whose event is already stored (a replay) leaves its order row untouched.
        """
        return await self.save_many(
            [PendingSave(tuple(changes), correlation_id, causation_id, outbox)]
        )

    async def save_many(self, saves: Sequence[PendingSave]) -> int:
        """Store a batch atomically: the outbox entries, every event and, per order with a new
        event, its row as of its last new change (`_SAVE_BATCH`, one statement).

        As with `save`, an order whose events in the batch were all stored before keeps its
        row. Returns how many events were new.
        """
        outboxes = [p.outbox for p in saves if p.outbox is not None]
        flat = [(p, change) for p in saves for change in p.changes]
        if not outboxes and not flat:
            return 0
        ids = [event_id(change) for _, change in flat]
        events = [
            {
                "event_id": eid,
                "client_order_id": c.order.client_order_id,
                "account_id": c.order.account_id,
                "event_type": c.event_type,
                "status": c.order.status.value,
                "correlation_id": p.correlation_id,
                "causation_id": p.causation_id,
                "payload": payload_of(c),
                "ts_event": c.ts_event,
                "ts_init": c.order.ts_last,
            }
            for (p, c), eid in zip(flat, ids, strict=True)
        ]
        # Each order's last change in the batch (with its event id), and its first change's
        # correlation id for a row inserted now (an update never changes it).
        last: dict[str, tuple[Order, str]] = {}
        first: dict[str, str | None] = {}
        for (pending, change), eid in zip(flat, ids, strict=True):
            coid = change.order.client_order_id
            first.setdefault(coid, pending.correlation_id)
            last[coid] = (change.order, eid)
        rows = [
            {**_order_row(order, first[coid]), "event_id": eid}
            for coid, (order, eid) in last.items()
        ]
        new = await self._pool.fetchval(
            _SAVE_BATCH,
            [o.input_id for o in outboxes],
            [o.input_schema for o in outboxes],
            [encode_emits_json(o.emits) for o in outboxes],
            [o.ts_init for o in outboxes],
            to_json(events).decode(),
            to_json(rows).decode(),
        )
        return int(new)

    async def load_outbox(self, input_id: str) -> list[Emit] | None:
        """Return the stored emits of `input_id`, or None."""
        rows = await self._pool.fetchval(_SELECT_OUTBOX, input_id)
        return decode_emits(rows) if rows is not None else None

    async def prune_outbox(self, older_than_ns: int) -> int:
        """Delete the outbox rows stored more than `older_than_ns` ago; return how many."""
        status: str = await self._pool.execute(_PRUNE_OUTBOX, older_than_ns)
        return int(status.rsplit(" ", 1)[-1])

    async def load(self, client_order_id: str) -> ManagedOrder | None:
        """Return one stored order, or None."""
        found = await self._load("client_order_id = $1", client_order_id)
        return found[0] if found else None

    async def load_open(self) -> list[ManagedOrder]:
        """Return every stored order that is not terminal."""
        return await self._load("status = ANY($1::text[])", list(OPEN_STATUSES))

    async def high_water(self) -> int | None:
        """Return the latest `ts_init` of a stored order, or None."""
        value = await self._pool.fetchval("SELECT max(ts_init) FROM orders")
        return None if value is None else int(value)

    async def _load(self, where: str, arg: Any) -> list[ManagedOrder]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_SELECT_ORDERS + where, arg)
            ids = [row["client_order_id"] for row in rows]
            events = await conn.fetch(_SELECT_PAYLOADS, ids) if ids else []
        payloads: dict[str, list[dict[str, Any]]] = {}
        for event in events:
            payloads.setdefault(event["client_order_id"], []).append(event["payload"])
        return [rebuild(_order_of(row), payloads.get(row["client_order_id"], [])) for row in rows]


@lru_cache(maxsize=1024)
def _venue_of(instrument_id: str) -> str:
    """`Order.venue`, remembered: it parses the instrument id at every read."""
    return InstrumentId.parse(instrument_id).venue


def _order_row(order: Order, correlation_id: str | None) -> dict[str, Any]:
    """Return an order as the `orders` row `_SAVE_BATCH` reads (keys: `_ORDER_COLUMNS`)."""
    return {
        "client_order_id": order.client_order_id,
        "venue_order_id": order.venue_order_id,
        "account_id": order.account_id,
        "strategy_id": order.strategy_id,
        "instrument_id": order.instrument_id,
        "venue": _venue_of(order.instrument_id),
        "intent_id": order.intent_id,
        "parent_order_id": order.parent_order_id,
        "side": order.side.value,
        "order_type": order.order_type.value,
        "quantity": order.quantity,
        "filled_quantity": order.filled_quantity,
        "avg_fill_price": order.avg_fill_price,
        "limit_price": order.limit_price,
        "stop_price": order.stop_price,
        "time_in_force": order.time_in_force.value,
        "expire_time_ns": order.expire_time_ns,
        "post_only": order.post_only,
        "reduce_only": order.reduce_only,
        "status": order.status.value,
        "reason": order.reason,
        "tag": order.tag,
        "correlation_id": correlation_id,
        "ts_init": order.ts_init,
        "ts_last": order.ts_last,
    }


def _order_of(row: Mapping[str, Any]) -> Order:
    fields = set(Order.model_fields)
    return Order.model_validate({k: v for k, v in dict(row).items() if k in fields})
