"""The oms stage's order store in memory: what is saved, and orders rebuilt after a restart."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from quantmesh_common.messages import Order, OrderCommand, OrderStatus
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.topics import Topic, dlq
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.orders import ManagedOrder, OrderChange
from quantmesh_oms.service import GROUP, OmsService
from quantmesh_oms.state_machine import OrderEvent, apply
from quantmesh_oms.store import InMemoryOrderStore, OutboxEntry

from .conftest import partial_fill, rest_fill

NOW = stubs.TS + 10 * stubs.SECOND_NS


class Instance(StageHarness[OmsService]):
    """One oms service instance on its own in-memory bus, storing into `store`."""

    def __init__(self, store: Any) -> None:
        service = OmsService(OmsSettings(bus="memory", http_port=0))
        service.store = store
        super().__init__(service, now_ns=NOW)

    def updates(self) -> list[Order]:
        return self.payloads(Topic.ORDERS_UPDATES)

    def commands(self) -> list[OrderCommand]:
        return self.payloads(Topic.ORDERS_COMMANDS)


class FailingStore(InMemoryOrderStore):
    """A store whose next `fail` saves raise, as a database that went away would."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = 0

    async def save(
        self,
        changes: Sequence[OrderChange],
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        outbox: OutboxEntry | None = None,
    ) -> int:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("database went away")
        return await super().save(
            changes, correlation_id=correlation_id, causation_id=causation_id, outbox=outbox
        )


async def test_store_when_order_submitted_and_filled_records_one_event_per_transition() -> None:
    store = InMemoryOrderStore()
    oms = await Instance(store).start()

    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    await oms.send(
        Topic.EXEC_REPORTS, stubs.order_accepted(), rest_fill("R-1", "T-1", "0.1", "49000")
    )

    assert store.event_ids == ["O-1:SUBMIT", "O-1:R-0", "O-1:R-1"]
    stored = await store.load("O-1")
    assert stored is not None
    assert stored.order.status is OrderStatus.FILLED
    assert stored.order == oms.updates()[-1]


async def test_restart_when_order_partly_filled_rebuilds_it_and_applies_the_rest() -> None:
    store = InMemoryOrderStore()
    first = await Instance(store).start()
    await first.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    await first.send(
        Topic.EXEC_REPORTS,
        stubs.order_accepted(),
        partial_fill("R-1", "T-1", "0.04", "0.04", "49000"),
    )

    second = await Instance(store).start()
    await second.send(Topic.EXEC_REPORTS, rest_fill("R-2", "T-2", "0.06", "49010"))

    [filled] = second.updates()
    assert filled.status is OrderStatus.FILLED
    assert filled.filled_quantity == Decimal("0.1")
    assert filled.venue_order_id == "V-1"
    # (0.04 x 49000 + 0.06 x 49010) / 0.1 = 4900.6 / 0.1 = 49006
    assert filled.avg_fill_price == Decimal("49006")


async def test_restart_when_report_redelivered_after_it_applies_it_once() -> None:
    store = InMemoryOrderStore()
    first = await Instance(store).start()
    await first.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    await first.send(Topic.EXEC_REPORTS, partial_fill("R-1", "T-1", "0.04", "0.04", "49000"))

    second = await Instance(store).start()
    await second.send(
        Topic.EXEC_REPORTS,
        partial_fill("R-1", "T-1", "0.04", "0.04", "49000"),
        partial_fill("R-7", "T-1", "0.04", "0.08", "49000"),
    )

    assert second.updates() == []
    assert store.event_ids == ["O-1:SUBMIT", "O-1:R-1"]


async def test_restart_when_closed_order_decision_redelivered_submits_nothing() -> None:
    store = InMemoryOrderStore()
    first = await Instance(store).start()
    await first.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    await first.send(Topic.EXEC_REPORTS, rest_fill("R-1", "T-1", "0.1", "49000"))

    second = await Instance(store).start()
    rebuilt_at_start = dict(second.service.orders.orders)
    await second.send(Topic.ORDERS_APPROVED, stubs.risk_decision())

    assert rebuilt_at_start == {}  # a filled order is not rebuilt at start...
    assert second.commands() == []  # ...but found when its decision comes again
    assert second.updates() == []


async def test_restart_when_cancel_pending_keeps_the_status_to_restore() -> None:
    store = InMemoryOrderStore()
    first = await Instance(store).start()
    await first.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    await first.send(Topic.EXEC_REPORTS, stubs.order_accepted())
    managed = first.service.orders.orders["O-1"]
    # No cancel command exists yet: the pending cancel is put in place by hand.
    pending = apply(managed.progress, OrderEvent.CANCEL_REQUEST)
    order = managed.order.model_copy(update={"status": pending.status})
    await store.save([OrderChange(order, pending, "CANCEL_REQUEST", "CX-1", 3, NOW, {})])

    [rebuilt] = await store.load_open()

    assert rebuilt.progress.status is OrderStatus.CANCEL_PENDING
    assert rebuilt.progress.status_before_cancel is OrderStatus.ACCEPTED
    assert rebuilt.report_ids == {"R-0"}


async def test_save_when_store_fails_crashes_and_a_restarted_member_reapplies_it() -> None:
    store = FailingStore()
    oms = await Instance(store).start()
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    report = partial_fill("R-1", "T-1", "0.04", "0.04", "49000")
    store.fail = 1

    await oms.send(Topic.EXEC_REPORTS, report)
    forgotten = oms.service.orders.get("O-1")
    # The process restarts: a new member of the group gets the message again.
    restarted = oms.bus.subscribe(
        GROUP, list(oms.service.order_flow), oms.service.handle, transactional=True
    )
    await restarted.start()
    await oms.bus.run_until_idle()

    assert forgotten is None
    assert oms.bus.records(dlq(Topic.EXEC_REPORTS)) == []
    assert [o.status for o in oms.updates()] == [
        OrderStatus.SUBMITTED,
        OrderStatus.PARTIALLY_FILLED,
    ]
    assert store.event_ids == ["O-1:SUBMIT", "O-1:R-1"]


async def test_store_when_same_change_saved_twice_counts_it_once() -> None:
    store = InMemoryOrderStore()
    oms = await Instance(store).start()
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    managed: ManagedOrder = oms.service.orders.orders["O-1"]
    change = OrderChange(managed.order, managed.progress, "SUBMIT", "SUBMIT", 1, NOW, {})

    again = await store.save([change])

    assert again == 0
    assert store.event_ids == ["O-1:SUBMIT"]
