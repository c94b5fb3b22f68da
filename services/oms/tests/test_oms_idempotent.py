"""The oms in idempotent delivery: a duplicate input is applied once and its output published
again, as the current state of its orders and the commands they still wait on."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from quantmesh_common.bus.base import Emit
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import (
    CommandType,
    ExecType,
    Order,
    OrderCommand,
    OrderRequestAction,
    OrderStatus,
)
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.topics import Topic
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.service import GROUP, OmsService
from quantmesh_oms.store import InMemoryOrderStore

NOW = stubs.TS + 10 * stubs.SECOND_NS


def _settings() -> OmsSettings:
    return OmsSettings(bus="memory", http_port=0, order_flow_delivery="idempotent")


class Oms(StageHarness[OmsService]):
    """The oms's own setup, in idempotent delivery, on an in-memory bus and store."""

    def __init__(self) -> None:
        super().__init__(OmsService(_settings()), now_ns=NOW)

    @property
    def store(self) -> InMemoryOrderStore:
        store = self.service.store
        assert isinstance(store, InMemoryOrderStore)
        return store

    def commands(self) -> list[OrderCommand]:
        return self.payloads(Topic.ORDERS_COMMANDS)

    def updates(self) -> list[Order]:
        return self.payloads(Topic.ORDERS_UPDATES)


def _canceled() -> Any:
    return stubs.execution_report(
        report_id="R-2",
        exec_type=ExecType.CANCELED,
        order_status=OrderStatus.CANCELED,
        last_qty=Decimal(0),
        last_price=None,
        cum_qty=Decimal(0),
        leaves_qty=Decimal(0),
        avg_price=None,
        fee=Decimal(0),
        fee_currency=None,
        trade_id=None,
    )


async def test_decision_when_delivered_twice_submits_once_and_publishes_both_again() -> None:
    oms = await Oms().start()

    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())

    first, again = oms.commands()
    assert (first.command_type, first.command_id) == (CommandType.SUBMIT, "O-1:SUBMIT")
    assert (again.command_type, again.command_id) == (CommandType.SUBMIT, "O-1:SUBMIT")
    assert again.quantity == Decimal("0.1")
    assert [(u.client_order_id, u.status) for u in oms.updates()] == [
        ("O-1", OrderStatus.SUBMITTED),
        ("O-1", OrderStatus.SUBMITTED),
    ]
    assert oms.store.event_ids == ["O-1:SUBMIT"]
    assert oms.service.duplicates == 1


async def test_decision_when_duplicated_after_the_ack_publishes_state_not_submit() -> None:
    oms = await Oms().start()
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    await oms.send(Topic.EXEC_REPORTS, stubs.order_accepted())

    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())

    assert [c.command_id for c in oms.commands()] == ["O-1:SUBMIT"]
    last = oms.updates()[-1]
    assert (last.status, last.venue_order_id) == (OrderStatus.ACCEPTED, "V-1")
    assert len(oms.updates()) == 3
    assert oms.store.event_ids == ["O-1:SUBMIT", "O-1:R-0"]


async def test_fill_when_its_trade_is_reported_again_counts_it_once_and_publishes_the_state() -> (
    None
):
    oms = await Oms().start()
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    partial = {
        "exec_type": ExecType.PARTIAL_FILL,
        "order_status": OrderStatus.PARTIALLY_FILLED,
        "last_qty": Decimal("0.04"),
        "cum_qty": Decimal("0.04"),
        "leaves_qty": Decimal("0.06"),
    }
    await oms.send(Topic.EXEC_REPORTS, stubs.execution_report(**partial))

    # The same trade under another report id (a venue's repeated answer).
    await oms.send(Topic.EXEC_REPORTS, stubs.execution_report(report_id="R-9", **partial))

    *_, applied, again = oms.updates()
    assert (applied.status, applied.filled_quantity) == (
        OrderStatus.PARTIALLY_FILLED,
        Decimal("0.04"),
    )
    assert again == applied
    assert [c.command_id for c in oms.commands()] == ["O-1:SUBMIT"]
    assert oms.store.event_ids == ["O-1:SUBMIT", "O-1:R-1"]


async def test_report_when_duplicated_while_cancel_pending_publishes_state_not_cancel() -> None:
    oms = await Oms().start()
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    await oms.send(Topic.EXEC_REPORTS, stubs.order_accepted())
    await oms.send(Topic.ORDERS_REQUESTS, stubs.order_request())

    # Execution answers a repeated command with the order's reports again: repeating the
    # CANCEL for each of them would go round for as long as the venue has not answered.
    await oms.send(Topic.EXEC_REPORTS, stubs.order_accepted())

    assert [c.command_id for c in oms.commands()] == ["O-1:SUBMIT", "O-1:CANCEL:RQ-1"]
    assert oms.updates()[-1].status is OrderStatus.CANCEL_PENDING
    assert len(oms.updates()) == 4


async def test_cancel_request_when_delivered_twice_publishes_the_cancel_again_with_its_id() -> None:
    oms = await Oms().start()
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    await oms.send(Topic.EXEC_REPORTS, stubs.order_accepted())
    await oms.send(Topic.ORDERS_REQUESTS, stubs.order_request())

    await oms.send(Topic.ORDERS_REQUESTS, stubs.order_request())

    *_, cancel, again = oms.commands()
    assert (cancel.command_type, cancel.command_id) == (CommandType.CANCEL, "O-1:CANCEL:RQ-1")
    assert (again.command_type, again.command_id) == (CommandType.CANCEL, "O-1:CANCEL:RQ-1")
    assert again.venue_order_id == "V-1"
    assert [u.status for u in oms.updates()[-2:]] == [OrderStatus.CANCEL_PENDING] * 2
    assert oms.store.event_ids == ["O-1:SUBMIT", "O-1:R-0", "O-1:CANCEL:RQ-1"]


async def test_cancel_request_when_duplicated_after_its_answer_publishes_only_state() -> None:
    oms = await Oms().start()
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    await oms.send(Topic.EXEC_REPORTS, stubs.order_accepted())
    await oms.send(Topic.ORDERS_REQUESTS, stubs.order_request())
    await oms.send(Topic.EXEC_REPORTS, _canceled())

    await oms.send(Topic.ORDERS_REQUESTS, stubs.order_request())

    assert [c.command_id for c in oms.commands()] == ["O-1:SUBMIT", "O-1:CANCEL:RQ-1"]
    assert [u.status for u in oms.updates()[-2:]] == [OrderStatus.CANCELED] * 2


async def test_replace_request_when_delivered_twice_publishes_the_replace_again_with_its_id() -> (
    None
):
    oms = await Oms().start()
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision(intent=stubs.limit_order_intent()))
    await oms.send(Topic.EXEC_REPORTS, stubs.order_accepted())
    replace = stubs.order_request(
        request_id="RQ-2",
        action=OrderRequestAction.REPLACE,
        new_quantity=Decimal("0.3"),
        new_limit_price=Decimal("48000"),
    )
    await oms.send(Topic.ORDERS_REQUESTS, replace)

    await oms.send(Topic.ORDERS_REQUESTS, replace)

    *_, first, again = oms.commands()
    assert first.command_id == again.command_id == "O-1:REPLACE:RQ-2"
    assert (again.command_type, again.new_quantity, again.new_limit_price) == (
        CommandType.REPLACE,
        Decimal("0.3"),
        Decimal("48000"),
    )
    last = oms.updates()[-1]
    assert (last.status, last.quantity) == (OrderStatus.ACCEPTED, Decimal("0.1"))
    assert oms.store.event_ids == ["O-1:SUBMIT", "O-1:R-0", "O-1:REPLACE:RQ-2"]


class Crash(BaseException):
    """The process dies after its store holds a message's effects, before its output went out."""


class Process(StageHarness[OmsService]):
    """One oms process on a shared bus and store (a restart: a new one, the same group)."""

    def __init__(self, store: InMemoryOrderStore, *, share: Process | None = None) -> None:
        service = OmsService(_settings())
        service.store = store
        super().__init__(service, now_ns=NOW)
        if share is not None:
            self.bus, self.clock = share.bus, share.clock
        self.crash_after_store = False

    async def start(self) -> Process:
        self.service.clock = self.clock
        await self.service.rebuild()
        subscription = self.bus.subscribe(
            GROUP, list(self.service.order_flow), self._handle, output_after_batch=True
        )
        await subscription.start()
        return self

    async def _handle(self, envelope: Envelope[Any]) -> list[Emit]:
        emits = await self.service.handle(envelope)
        if self.crash_after_store:
            self.crash_after_store = False
            raise Crash("killed after the store, before the output")
        return emits


async def test_entry_fill_when_process_dies_after_storing_it_sends_the_oco_legs_after_restart() -> (
    None
):
    store = InMemoryOrderStore()
    first = await Process(store).start()
    intent = stubs.limit_order_intent(
        stop_loss_price=Decimal("47000"), take_profit_price=Decimal("51000")
    )
    await first.send(Topic.ORDERS_APPROVED, stubs.risk_decision(intent=intent))
    await first.send(Topic.EXEC_REPORTS, stubs.order_accepted())
    first.crash_after_store = True
    await first.send(Topic.EXEC_REPORTS, stubs.execution_report())
    commands_before_restart = [c.command_id for c in first.payloads(Topic.ORDERS_COMMANDS)]

    second = await Process(store, share=first).start()
    await second.bus.run_until_idle()

    assert commands_before_restart == ["O-1:SUBMIT"]
    legs = [c for c in second.payloads(Topic.ORDERS_COMMANDS) if c.client_order_id != "O-1"]
    assert [(c.command_id, c.quantity) for c in legs] == [
        ("O-1:SL:SUBMIT", Decimal("0.1")),
        ("O-1:TP:SUBMIT", Decimal("0.1")),
    ]
    states = {u.client_order_id: u.status for u in second.payloads(Topic.ORDERS_UPDATES)}
    assert states == {
        "O-1": OrderStatus.FILLED,
        "O-1:SL": OrderStatus.SUBMITTED,
        "O-1:TP": OrderStatus.SUBMITTED,
    }
    assert store.event_ids.count("O-1:R-1") == 1
    assert store.event_ids.count("O-1:SL:SUBMIT") == 1


async def test_decision_when_redelivered_after_the_order_was_acknowledged_sends_no_submit() -> None:
    store = InMemoryOrderStore()
    first = await Process(store).start()
    first.crash_after_store = True
    await first.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    # Had the process died after its output went out but before the offsets were committed,
    # the venue's acknowledgement of the SUBMIT may be read before the decision comes again.
    second = await Process(store, share=first).start()
    second.crash_after_store = False
    await second.service.handle(stubs.envelope(stubs.order_accepted()))

    await second.bus.run_until_idle()

    assert second.payloads(Topic.ORDERS_COMMANDS) == []
    [update] = second.payloads(Topic.ORDERS_UPDATES)
    assert update.status is OrderStatus.ACCEPTED
    assert store.event_ids == ["O-1:SUBMIT", "O-1:R-0"]
