"""The oms's outbox: a redelivery after a crash between the store and the bus commit re-emits."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from quantmesh_common.bus.base import Emit
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import CommandType, Order, OrderCommand, OrderStatus
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.topics import Topic
from quantmesh_oms import store as store_module
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.service import GROUP, OmsService
from quantmesh_oms.store import (
    InMemoryOrderStore,
    decode_emits,
    encode_emits,
    encode_emits_json,
)

NOW = stubs.TS + 10 * stubs.SECOND_NS


class Crash(BaseException):
    """The process dies: raised after the store committed, before the bus commits."""


class Instance(StageHarness[OmsService]):
    """One oms process storing into `store`; `crash_after_store` kills it once, mid-message."""

    def __init__(self, store: InMemoryOrderStore, *, share: Instance | None = None) -> None:
        service = OmsService(OmsSettings(bus="memory", http_port=0))
        service.store = store
        super().__init__(service, now_ns=NOW)
        if share is not None:  # the same bus and group: a restarted process of the same stage
            self.bus, self.clock = share.bus, share.clock
        self.crash_after_store = False

    async def start(self) -> Instance:
        self.service.clock = self.clock
        await self.service.rebuild()
        subscription = self.bus.subscribe(
            GROUP, list(self.service.order_flow), self._handle, transactional=True
        )
        await subscription.start()
        return self

    async def _handle(self, envelope: Envelope[Any]) -> list[Emit]:
        emits = await self.service.handle(envelope)
        if self.crash_after_store:
            self.crash_after_store = False
            raise Crash("killed after the database commit")
        return emits

    def commands(self) -> list[OrderCommand]:
        return self.payloads(Topic.ORDERS_COMMANDS)

    def updates(self) -> list[Order]:
        return self.payloads(Topic.ORDERS_UPDATES)


async def test_decision_when_process_dies_after_db_commit_is_submitted_once_after_restart() -> None:
    store = InMemoryOrderStore()
    first = await Instance(store).start()
    first.crash_after_store = True
    await first.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    published_before_restart = list(first.commands())

    second = await Instance(store, share=first).start()
    await second.bus.run_until_idle()

    assert published_before_restart == []
    [command] = second.commands()
    assert command.command_type is CommandType.SUBMIT
    assert command.command_id == "O-1:SUBMIT"
    assert command.quantity == Decimal("0.1")
    assert command.ts_event == NOW
    [update] = second.updates()
    assert update.status is OrderStatus.SUBMITTED
    assert store.event_ids == ["O-1:SUBMIT"]


async def test_fill_when_process_dies_after_db_commit_publishes_the_update_once() -> None:
    store = InMemoryOrderStore()
    first = await Instance(store).start()
    await first.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    first.crash_after_store = True
    fill = stubs.execution_report(last_qty=Decimal("0.1"), last_price=Decimal("49000"))
    await first.send(Topic.EXEC_REPORTS, fill)

    second = await Instance(store, share=first).start()
    await second.bus.run_until_idle()

    submitted, filled = second.updates()
    assert submitted.status is OrderStatus.SUBMITTED
    assert filled.status is OrderStatus.FILLED
    assert filled.avg_fill_price == Decimal("49000")
    assert len(second.commands()) == 1
    assert store.event_ids == ["O-1:SUBMIT", "O-1:R-1"]


async def test_redelivery_when_nothing_was_stored_for_it_emits_nothing() -> None:
    store = InMemoryOrderStore()
    oms = await Instance(store).start()
    decision = stubs.risk_decision()
    await oms.send(Topic.ORDERS_APPROVED, decision)

    # A second, distinct message for the same order: idempotent on the client order id, and
    # its own event id has no outputs stored.
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision(decision_id="D-2"))

    assert len(oms.commands()) == 1
    assert len(store.outbox) == 1


def test_emits_when_encoded_and_decoded_are_equal_field_for_field() -> None:
    order = stubs.order(
        filled_quantity=Decimal("0.04"),
        avg_fill_price=Decimal("49000.10"),
        status=OrderStatus.PARTIALLY_FILLED,
    )
    command = OrderCommand.for_cancel(order, command_id="O-1:CANCEL:X", ts_event=NOW)
    emits = [
        Emit(Topic.ORDERS_COMMANDS, command),
        Emit(Topic.ORDERS_UPDATES, order, key="k", ts_event=7),
    ]

    decoded = decode_emits(encode_emits(emits))

    assert decoded == emits
    assert isinstance(decoded[1].payload, Order)
    assert decoded[1].payload.avg_fill_price == Decimal("49000.10")


def test_emits_when_encoded_as_json_text_read_back_as_the_dict_form() -> None:
    order = stubs.order(
        filled_quantity=Decimal("0.04"),
        avg_fill_price=Decimal("49000.10"),
        status=OrderStatus.PARTIALLY_FILLED,
    )
    command = OrderCommand.for_cancel(order, command_id="O-1:CANCEL:X", ts_event=NOW)
    emits = [
        Emit(Topic.ORDERS_COMMANDS, command),
        Emit(Topic.ORDERS_UPDATES, order, key='k\u00e9"', ts_event=7),
    ]

    text = encode_emits_json(emits)

    assert json.loads(text) == encode_emits(emits)
    assert decode_emits(json.loads(text)) == emits
    assert encode_emits_json([]) == "[]"


def test_emits_when_keys_outnumber_the_remembered_strings_encode_each_as_json_dumps() -> None:
    order = stubs.order()
    # More distinct keys than the encoder remembers, so its memory is cleared on the way.
    emits = [
        Emit(Topic.ORDERS_UPDATES, order, key=f"acct-{i}\t\u00e9", ts_event=i)
        for i in range(store_module._JSON_STRINGS_MAX + 10)
    ]
    emits.append(Emit(Topic.ORDERS_UPDATES, order, key=None, ts_event=None))

    text = encode_emits_json(emits)

    decoded = json.loads(text)
    assert [(d["key"], d["ts_event"]) for d in decoded[:2]] == [
        ("acct-0\t\u00e9", 0),
        ("acct-1\t\u00e9", 1),
    ]
    assert (decoded[-1]["key"], decoded[-1]["ts_event"]) == (None, None)
    assert decoded == encode_emits(emits)
    assert len(store_module._JSON_STRINGS) <= store_module._JSON_STRINGS_MAX
