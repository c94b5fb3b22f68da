"""Reconciliation at start: a QUERY per rebuilt open order, and the venue's answers applied once."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from quantmesh_common.messages import (
    CommandType,
    ExecType,
    Order,
    OrderCommand,
    OrderStatus,
    Side,
    TimeInForce,
)
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.topics import Topic
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.service import OmsService
from quantmesh_oms.store import InMemoryOrderStore

NOW = stubs.TS + 10 * stubs.SECOND_NS


class Harness(StageHarness[OmsService]):
    """The oms service on a retaining in-memory bus, over a store shared across 'restarts'."""

    def __init__(self, store: InMemoryOrderStore, now_ns: int = NOW) -> None:
        service = OmsService(OmsSettings(bus="memory", http_port=0))
        service.store = store
        super().__init__(service, now_ns=now_ns)

    def updates(self) -> list[Order]:
        return self.payloads(Topic.ORDERS_UPDATES)

    def commands(self) -> list[OrderCommand]:
        return self.payloads(Topic.ORDERS_COMMANDS)


def _decision(client_order_id: str = "O-1", **intent: Any) -> Any:
    fields: dict[str, Any] = {
        "client_order_id": client_order_id,
        "intent_id": f"I-{client_order_id}",
        "quantity": Decimal("0.1"),
    }
    return stubs.risk_decision(
        decision_id=f"D-{client_order_id}", intent=stubs.limit_order_intent(**{**fields, **intent})
    )


def _unknown(client_order_id: str = "O-1", report_id: str = "O-1:QUERY:S2-R") -> Any:
    return stubs.execution_report(
        report_id=report_id,
        client_order_id=client_order_id,
        venue_order_id=None,
        exec_type=ExecType.REJECTED,
        order_status=OrderStatus.REJECTED,
        last_qty=Decimal(0),
        last_price=None,
        cum_qty=Decimal(0),
        leaves_qty=Decimal(0),
        avg_price=None,
        fee=Decimal(0),
        fee_currency=None,
        trade_id=None,
        reason=f"UNKNOWN_ORDER: client_order_id={client_order_id}, venue=BINANCE",
    )


async def _restart(store: InMemoryOrderStore) -> Harness:
    return await Harness(store, now_ns=NOW + stubs.SECOND_NS).start()


async def test_restart_when_orders_open_sends_one_query_each_and_none_for_finished() -> None:
    store = InMemoryOrderStore()
    first = await Harness(store).start()
    await first.send(Topic.ORDERS_APPROVED, _decision("O-1"), _decision("O-2"), _decision("O-3"))
    await first.send(
        Topic.EXEC_REPORTS,
        stubs.order_accepted(client_order_id="O-1", report_id="R-a1"),
        stubs.execution_report(client_order_id="O-3", report_id="R-f3", trade_id="T-3"),
    )

    second = await _restart(store)
    sent = await second.service.publish_reconciliation(second.bus, "S2")

    queries = second.commands()
    assert [c.command_id for c in queries] == ["O-1:QUERY:S2", "O-2:QUERY:S2"]
    assert {c.command_type for c in queries} == {CommandType.QUERY}
    assert queries[0].venue_order_id == "V-1"
    assert (queries[0].side, queries[0].ts_event) == (Side.BUY, NOW + stubs.SECOND_NS)
    assert len(sent) == 2


async def test_query_answer_when_fill_happened_while_down_fills_the_order_once() -> None:
    store = InMemoryOrderStore()
    first = await Harness(store).start()
    await first.send(Topic.ORDERS_APPROVED, _decision())
    await first.send(Topic.EXEC_REPORTS, stubs.order_accepted(report_id="R-a1"))
    second = await _restart(store)
    await second.service.publish_reconciliation(second.bus, "S2")
    answer = [
        stubs.order_accepted(report_id="R-a1"),
        stubs.execution_report(report_id="R-f1", trade_id="T-1"),
    ]

    await second.send(Topic.EXEC_REPORTS, *answer)
    await second.send(Topic.EXEC_REPORTS, *answer)  # a second QUERY's answer, or a redelivery

    [update] = second.updates()
    assert update.status is OrderStatus.FILLED
    assert (update.filled_quantity, update.avg_fill_price) == (Decimal("0.1"), Decimal("49000"))
    assert store.event_ids == ["O-1:SUBMIT", "O-1:R-a1", "O-1:R-f1"]


async def test_unknown_order_when_never_acknowledged_sends_the_same_submit_again_once() -> None:
    store = InMemoryOrderStore()
    first = await Harness(store).start()
    await first.send(Topic.ORDERS_APPROVED, _decision())
    [original] = first.commands()
    second = await _restart(store)
    await second.service.publish_reconciliation(second.bus, "S2")

    await second.send(Topic.EXEC_REPORTS, _unknown(), _unknown())

    resubmits = [c for c in second.commands() if c.command_type is CommandType.SUBMIT]
    [resubmit] = resubmits
    assert resubmit.command_id == original.command_id == "O-1:SUBMIT"
    assert resubmit.model_dump(exclude={"ts_event"}) == original.model_dump(exclude={"ts_event"})
    assert second.updates() == []
    assert store.event_ids == ["O-1:SUBMIT", "O-1:O-1:QUERY:S2-R"]


async def test_unknown_order_when_venue_had_acknowledged_it_is_canceled_with_the_reason() -> None:
    store = InMemoryOrderStore()
    first = await Harness(store).start()
    await first.send(Topic.ORDERS_APPROVED, _decision())
    await first.send(
        Topic.EXEC_REPORTS,
        stubs.order_accepted(report_id="R-a1"),
        stubs.execution_report(
            report_id="R-p1",
            trade_id="T-1",
            exec_type=ExecType.PARTIAL_FILL,
            order_status=OrderStatus.PARTIALLY_FILLED,
            last_qty=Decimal("0.04"),
            cum_qty=Decimal("0.04"),
        ),
    )
    second = await _restart(store)
    await second.service.publish_reconciliation(second.bus, "S2")

    await second.send(Topic.EXEC_REPORTS, _unknown())

    [update] = second.updates()
    assert update.status is OrderStatus.CANCELED
    assert update.filled_quantity == Decimal("0.04")
    assert update.reason == "UNKNOWN_ORDER: client_order_id=O-1, venue=BINANCE"
    assert [c.command_type for c in second.commands()] == [CommandType.QUERY]


async def test_unknown_order_when_order_already_over_here_changes_nothing() -> None:
    store = InMemoryOrderStore()
    oms = await Harness(store).start()
    await oms.send(Topic.ORDERS_APPROVED, _decision())
    await oms.send(Topic.EXEC_REPORTS, stubs.execution_report(report_id="R-f1", trade_id="T-1"))
    updates_before = len(oms.updates())

    await oms.send(Topic.EXEC_REPORTS, _unknown())

    assert len(oms.updates()) == updates_before
    assert oms.service.orders.get("O-1").status is OrderStatus.FILLED  # type: ignore[union-attr]


async def test_restart_when_gtd_cancel_was_stored_but_not_sent_sends_it_again() -> None:
    store = InMemoryOrderStore()
    first = await Harness(store).start()
    expire_at = NOW + 5 * stubs.SECOND_NS
    await first.send(
        Topic.ORDERS_APPROVED, _decision(time_in_force=TimeInForce.GTD, expire_time_ns=expire_at)
    )
    # The expiry's changes are stored; the process dies before its CANCEL is published.
    first.clock.advance_to(expire_at)
    first.service.orders.expire_due(expire_at)
    await store.save(first.service.orders.take_changes())

    second = await Harness(store, now_ns=expire_at + stubs.SECOND_NS).start()
    await second.service.publish_reconciliation(second.bus, "S2")

    assert [(c.command_type, c.command_id) for c in second.commands()] == [
        (CommandType.QUERY, "O-1:QUERY:S2"),
        (CommandType.CANCEL, "O-1:CANCEL:EXPIRE"),
    ]
