"""The oms storing per consumed batch: held until the batch hook, one transaction, crash-safe."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import ExecType, Order, OrderStatus
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.topics import Topic, dlq
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.service import GROUP, OmsService, OrderStoreUnavailableError
from quantmesh_oms.store import InMemoryOrderStore, PendingSave

NOW = stubs.TS + 10 * stubs.SECOND_NS


class BatchFailingStore(InMemoryOrderStore):
    """A store whose next `fail` batch saves raise, as a database that went away would."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = 0
        self.batches: list[int] = []

    async def save_many(self, saves: Sequence[PendingSave]) -> int:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("database went away")
        self.batches.append(len(saves))
        return await super().save_many(saves)


class Instance(StageHarness[OmsService]):
    """One oms instance storing per batch into `store` (the in-memory bus: a batch of one)."""

    def __init__(self, store: InMemoryOrderStore) -> None:
        service = OmsService(OmsSettings(bus="memory", http_port=0))
        service.store = store
        service.batched = True
        super().__init__(service, now_ns=NOW)

    def updates(self) -> list[Order]:
        return self.payloads(Topic.ORDERS_UPDATES)


def _envelope(payload: Any) -> Envelope[Any]:
    return Envelope.wrap(payload, source="test", ts_event=NOW, ts_init=NOW)


def _fill() -> Any:
    return stubs.execution_report(
        report_id="R-1",
        trade_id="T-1",
        exec_type=ExecType.FILL,
        last_qty=Decimal("0.1"),
        last_price=Decimal("49000"),
    )


async def test_handle_when_batched_holds_the_changes_until_the_hook_stores_them() -> None:
    store = BatchFailingStore()
    oms = await Instance(store).start()
    service = oms.service

    await service.handle(_envelope(stubs.risk_decision()))
    await service.handle(_envelope(_fill()))
    held = list(store.event_ids)
    await service.flush()

    assert held == []
    assert store.batches == [2]
    assert store.event_ids == ["O-1:SUBMIT", "O-1:R-1"]
    assert len(store.outbox) == 2


async def test_hook_when_store_fails_publishes_nothing_and_a_new_member_applies_once() -> None:
    store = BatchFailingStore()
    oms = await Instance(store).start()
    store.fail = 1

    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    published_after_failure = list(oms.updates())
    forgotten = oms.service.orders.get("O-1")
    restarted = oms.bus.subscribe(
        GROUP,
        list(oms.service.order_flow),
        oms.service.handle,
        transactional=True,
        on_batch=oms.service.flush,
    )
    await restarted.start()
    await oms.bus.run_until_idle()

    assert published_after_failure == []
    assert forgotten is None
    assert oms.bus.records(dlq(Topic.ORDERS_APPROVED)) == []
    assert [o.status for o in oms.updates()] == [OrderStatus.SUBMITTED]
    assert store.event_ids == ["O-1:SUBMIT"]


async def test_flush_when_it_fails_raises_the_crash_and_forgets_the_batch_orders() -> None:
    store = BatchFailingStore()
    oms = await Instance(store).start()
    await oms.service.handle(_envelope(stubs.risk_decision()))
    store.fail = 1

    try:
        await oms.service.flush()
    except OrderStoreUnavailableError as exc:
        raised = str(exc)
    else:
        raised = ""

    assert raised.startswith("storing a batch of 1 messages")
    assert oms.service.orders.get("O-1") is None
    assert store.event_ids == []


async def test_expiry_when_a_batch_is_held_stores_the_held_changes_first() -> None:
    store = BatchFailingStore()
    oms = await Instance(store).start()
    await oms.service.handle(_envelope(stubs.risk_decision()))

    await oms.service.publish_expiries(oms.bus)

    assert store.batches == [1]
    assert store.event_ids == ["O-1:SUBMIT"]


def _decision(n: int) -> Any:
    intent = stubs.order_intent(client_order_id=f"O-{n}", intent_id=f"I-{n}")
    return stubs.risk_decision(intent=intent, decision_id=f"D-{n}")


def _filled(n: int) -> Any:
    return stubs.execution_report(
        report_id=f"R-{n}",
        trade_id=f"T-{n}",
        client_order_id=f"O-{n}",
        exec_type=ExecType.FILL,
        last_qty=Decimal("0.1"),
        last_price=Decimal("49000"),
    )


class Bounded(Instance):
    """An instance that keeps at most `keep` terminal orders in memory, as with PostgreSQL."""

    def __init__(self, store: InMemoryOrderStore, keep: int) -> None:
        super().__init__(store)
        self.service._terminal = OrderedDict()
        self.service.keep_terminal = keep


async def test_terminal_orders_when_past_the_bound_are_evicted_and_reread_from_the_store() -> None:
    store = BatchFailingStore()
    oms = await Bounded(store, keep=2).start()
    for n in (1, 2, 3):
        await oms.send(Topic.ORDERS_APPROVED, _decision(n))
        await oms.send(Topic.EXEC_REPORTS, _filled(n))
    in_memory = sorted(oms.service.orders.orders)
    commands_before = len(oms.payloads(Topic.ORDERS_COMMANDS))

    # The decision of the evicted order delivered again: read from the store, not resubmitted.
    await oms.send(Topic.ORDERS_APPROVED, _decision(1))

    assert in_memory == ["O-2", "O-3"]
    assert oms.service.stored_high_water == NOW
    assert oms.service.lookups == 1
    assert len(oms.payloads(Topic.ORDERS_COMMANDS)) == commands_before == 3
    assert oms.service.orders.get("O-1") is not None
    assert store.event_ids.count("O-1:SUBMIT") == 1


async def test_decision_when_newer_than_every_stored_order_does_not_read_the_store() -> None:
    store = BatchFailingStore()
    oms = await Bounded(store, keep=10).start()

    await oms.send(Topic.ORDERS_APPROVED, _decision(1), _decision(2))

    assert oms.service.stored_high_water is None
    assert oms.service.lookups == 0
    assert [c.client_order_id for c in oms.payloads(Topic.ORDERS_COMMANDS)] == ["O-1", "O-2"]
