"""The oms stage on real PostgreSQL: orders and order events stored, open orders rebuilt."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import Order, OrderStatus
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.topics import Topic
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.orders import OrderChange
from quantmesh_oms.service import OmsService
from quantmesh_oms.store import PostgresOrderStore

from .conftest import partial_fill, rest_fill

pytestmark = pytest.mark.integration

NOW = stubs.TS + 10 * stubs.SECOND_NS


class Instance(StageHarness[OmsService]):
    """One oms service instance on its own in-memory bus, with the test schema's pool."""

    def __init__(self, pool: Any) -> None:
        super().__init__(OmsService(OmsSettings(bus="memory", http_port=0)), now_ns=NOW, pg=pool)

    def updates(self) -> list[Order]:
        return self.payloads(Topic.ORDERS_UPDATES)


async def _events(pool: Any) -> list[Any]:
    return list(
        await pool.fetch(
            "SELECT event_id, event_type, status, causation_id, correlation_id, payload"
            " FROM order_events ORDER BY (payload->>'seq')::int"
        )
    )


async def test_decision_then_fills_when_stored_leave_the_order_row_and_every_event(
    oms_pool: Any,
) -> None:
    oms = await Instance(oms_pool).start()

    [decision] = await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    reports = await oms.send(
        Topic.EXEC_REPORTS,
        stubs.order_accepted(),
        partial_fill("R-1", "T-1", "0.04", "0.04", "49000.00"),
        rest_fill("R-2", "T-2", "0.06", "49010.00"),
    )

    [row] = await oms_pool.fetch("SELECT * FROM orders")
    assert row["client_order_id"] == "O-1"
    assert (row["account_id"], row["venue"], row["instrument_id"]) == (
        "acc-1",
        "SIM",
        "BTC-USDT.SIM",
    )
    assert (row["side"], row["order_type"], row["quantity"]) == ("BUY", "MARKET", Decimal("0.1"))
    assert row["status"] == "FILLED"
    assert row["filled_quantity"] == Decimal("0.1")
    # (0.04 x 49000 + 0.06 x 49010) / 0.1 = 49006
    assert row["avg_fill_price"] == Decimal("49006")
    assert row["venue_order_id"] == "V-1"
    assert row["correlation_id"] == decision.correlation_id
    events = await _events(oms_pool)
    assert [(e["event_id"], e["event_type"], e["status"]) for e in events] == [
        ("O-1:SUBMIT", "SUBMIT", "SUBMITTED"),
        ("O-1:R-0", "ACCEPTED", "ACCEPTED"),
        ("O-1:R-1", "PARTIAL_FILL", "PARTIALLY_FILLED"),
        ("O-1:R-2", "FILL", "FILLED"),
    ]
    assert [e["causation_id"] for e in events] == [decision.event_id] + [
        r.event_id for r in reports
    ]
    assert events[2]["payload"]["last_qty"] == "0.04"
    assert events[2]["payload"]["trade_id"] == "T-1"
    # 0.04 x 49000 + 0.06 x 49010 = 1960 + 2940.6 = 4900.6
    assert Decimal(events[3]["payload"]["filled_notional"]) == Decimal("4900.6")


async def test_new_instance_when_order_open_rebuilds_it_and_applies_a_later_fill(
    oms_pool: Any,
) -> None:
    first = await Instance(oms_pool).start()
    await first.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    await first.send(
        Topic.EXEC_REPORTS,
        stubs.order_accepted(),
        partial_fill("R-1", "T-1", "0.04", "0.04", "49000.00"),
    )

    second = await Instance(oms_pool).start()
    rebuilt = second.service.orders.get("O-1")
    await second.send(Topic.EXEC_REPORTS, rest_fill("R-2", "T-2", "0.06", "49010.00"))

    assert rebuilt is not None
    assert rebuilt.status is OrderStatus.PARTIALLY_FILLED
    assert rebuilt.filled_quantity == Decimal("0.04")
    [filled] = second.updates()
    assert filled.status is OrderStatus.FILLED
    assert filled.filled_quantity == Decimal("0.1")
    assert filled.avg_fill_price == Decimal("49006")
    row = await oms_pool.fetchrow("SELECT status, filled_quantity FROM orders")
    assert (row["status"], row["filled_quantity"]) == ("FILLED", Decimal("0.1"))
    assert len(await _events(oms_pool)) == 4


async def test_report_when_redelivered_before_and_after_restart_writes_no_second_event(
    oms_pool: Any,
) -> None:
    first = await Instance(oms_pool).start()
    await first.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    partial = partial_fill("R-1", "T-1", "0.04", "0.04", "49000.00")
    await first.send(Topic.EXEC_REPORTS, partial, partial)

    second = await Instance(oms_pool).start()
    await second.send(Topic.EXEC_REPORTS, partial)

    events = await _events(oms_pool)
    assert [e["event_id"] for e in events] == ["O-1:SUBMIT", "O-1:R-1"]
    assert second.updates() == []
    row = await oms_pool.fetchrow("SELECT status, filled_quantity FROM orders")
    assert (row["status"], row["filled_quantity"]) == ("PARTIALLY_FILLED", Decimal("0.04"))


async def test_store_when_the_same_changes_are_saved_again_inserts_nothing(
    oms_pool: Any,
) -> None:
    oms = await Instance(oms_pool).start()
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    managed = oms.service.orders.orders["O-1"]
    store = PostgresOrderStore(oms_pool)
    change = OrderChange(managed.order, managed.progress, "SUBMIT", "SUBMIT", 1, NOW, {})

    again = await store.save([change], causation_id="other")

    assert again == 0
    [event] = await _events(oms_pool)
    assert event["causation_id"] != "other"


async def test_restart_when_order_filled_rebuilds_nothing_and_ignores_its_decision(
    oms_pool: Any,
) -> None:
    first = await Instance(oms_pool).start()
    await first.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    await first.send(Topic.EXEC_REPORTS, rest_fill("R-1", "T-1", "0.1", "49000.00"))

    second = await Instance(oms_pool).start()
    rebuilt_at_start = dict(second.service.orders.orders)
    await second.send(Topic.ORDERS_APPROVED, stubs.risk_decision())

    assert rebuilt_at_start == {}
    assert second.bus.messages(Topic.ORDERS_COMMANDS) == []
    assert len(await _events(oms_pool)) == 2


async def test_batch_when_one_flush_holds_an_order_life_stores_each_event_and_the_last_row(
    oms_pool: Any,
) -> None:
    oms = await Instance(oms_pool).start()
    service = oms.service
    messages = [
        stubs.risk_decision(),
        partial_fill("R-1", "T-1", "0.04", "0.04", "49000.00"),
        rest_fill("R-2", "T-2", "0.06", "49100.00"),
    ]
    for payload in messages:
        await service.handle(Envelope.wrap(payload, source="test", ts_event=NOW, ts_init=NOW))
    held = list(service._pending)
    stored_before_flush = await oms_pool.fetchval("SELECT count(*) FROM order_events")

    await service.flush()
    again = await PostgresOrderStore(oms_pool).save_many(held)

    assert stored_before_flush == 0
    events = await _events(oms_pool)
    assert [e["event_id"] for e in events] == ["O-1:SUBMIT", "O-1:R-1", "O-1:R-2"]
    row = await oms_pool.fetchrow("SELECT status, filled_quantity, avg_fill_price FROM orders")
    # 0.04 at 49000 and 0.06 at 49100: (1960 + 2946) / 0.1 = 49060.
    assert (row["status"], row["filled_quantity"]) == ("FILLED", Decimal("0.1"))
    assert row["avg_fill_price"] == Decimal("49060")
    assert await oms_pool.fetchval("SELECT count(*) FROM oms_outbox") == 3
    assert again == 0


async def test_batch_when_flushed_stores_payloads_and_outbox_as_json_that_reads_back(
    oms_pool: Any,
) -> None:
    oms = await Instance(oms_pool).start()
    service = oms.service
    decision = Envelope.wrap(stubs.risk_decision(), source="test", ts_event=NOW, ts_init=NOW)
    emitted = await service.handle(decision)

    await service.flush()

    kinds = await oms_pool.fetch("SELECT jsonb_typeof(payload) AS kind FROM order_events")
    assert [k["kind"] for k in kinds] == ["object"]
    event = await oms_pool.fetchrow("SELECT payload FROM order_events")
    assert (event["payload"]["seq"], event["payload"]["filled_quantity"]) == (1, "0")
    stored = await PostgresOrderStore(oms_pool).load_outbox(decision.event_id)
    assert stored == emitted
    assert [e.topic for e in emitted] == [Topic.ORDERS_COMMANDS, Topic.ORDERS_UPDATES]
