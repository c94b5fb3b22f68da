"""A cancel answered COMMAND_ALREADY_SENT (execution claimed it, crashed, and did not send it
again) is sent again under a new command id, a bounded number of times."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.base import Emit
from quantmesh_common.messages import (
    CommandType,
    ExecType,
    ExecutionReport,
    Order,
    OrderCommand,
    OrderRequestAction,
    OrderStatus,
    TimeInForce,
    format_reason,
)
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic
from quantmesh_oms.orders import (
    CANCEL_RESENT,
    COMMAND_ALREADY_SENT,
    MAX_CANCEL_RESENDS,
    OrderManager,
)
from quantmesh_oms.store import InMemoryOrderStore

from .conftest import NOW, OmsHarness


def _working(client_order_id: str = "O-1", **intent: Any) -> OrderManager:
    """An OrderManager holding one acknowledged LIMIT order of 0.1."""
    manager = OrderManager()
    fields: dict[str, Any] = {
        "client_order_id": client_order_id,
        "intent_id": f"I-{client_order_id}",
        "quantity": Decimal("0.1"),
        **intent,
    }
    manager.on_decision(
        stubs.risk_decision(
            decision_id=f"D-{client_order_id}", intent=stubs.limit_order_intent(**fields)
        ),
        NOW,
    )
    manager.on_report(
        stubs.order_accepted(client_order_id=client_order_id, report_id=f"R-{client_order_id}"),
        NOW,
    )
    return manager


def _already_sent(command_id: str, client_order_id: str = "O-1") -> ExecutionReport:
    """Execution's answer to a claimed command it did not send again (`_not_sent_again`)."""
    return stubs.order_accepted(
        report_id=f"{command_id}-R",
        client_order_id=client_order_id,
        exec_type=ExecType.CANCEL_REJECTED,
        order_status=OrderStatus.ACCEPTED,
        reason=format_reason(
            COMMAND_ALREADY_SENT, {"client_order_id": client_order_id, "command_id": command_id}
        ),
    )


def _commands(emits: list[Emit]) -> list[OrderCommand]:
    return [e.payload for e in emits if isinstance(e.payload, OrderCommand)]


def _statuses(emits: list[Emit]) -> list[OrderStatus]:
    return [e.payload.status for e in emits if isinstance(e.payload, Order)]


def test_cancel_when_answered_command_already_sent_is_sent_again_under_a_new_id() -> None:
    manager = _working()
    (first,) = _commands(manager.on_request(stubs.order_request(), NOW))

    emits = manager.on_report(_already_sent(first.command_id), NOW + 1)

    (again,) = _commands(emits)
    assert first.command_id == "O-1:CANCEL:RQ-1"
    assert again.command_type is CommandType.CANCEL
    assert again.command_id == "O-1:CANCEL:RQ-1:RESEND1"
    assert again.venue_order_id == "V-1"
    assert again.ts_event == NOW + 1
    assert manager.get("O-1").status is OrderStatus.CANCEL_PENDING  # type: ignore[union-attr]
    change = manager.take_changes()[-1]
    assert change.event_type == CANCEL_RESENT
    assert change.key == "O-1:CANCEL:RQ-1-R"
    assert change.details["command_id"] == "O-1:CANCEL:RQ-1:RESEND1"
    assert change.details["reason"].startswith("COMMAND_ALREADY_SENT: ")
    assert change.order.status is OrderStatus.CANCEL_PENDING
    # The command the order now waits on, so a replay publishes this one and not the old one.
    waiting = manager.waiting_commands(manager.orders["O-1"], NOW + 2)
    assert [c.command_id for c in waiting] == ["O-1:CANCEL:RQ-1:RESEND1"]


def test_cancel_sent_again_when_the_venue_then_cancels_ends_canceled() -> None:
    manager = _working()
    manager.on_request(stubs.order_request(), NOW)
    manager.on_report(_already_sent("O-1:CANCEL:RQ-1"), NOW)

    manager.on_report(
        stubs.order_accepted(
            report_id="R-cx", exec_type=ExecType.CANCELED, order_status=OrderStatus.CANCELED
        ),
        NOW,
    )

    assert manager.get("O-1").status is OrderStatus.CANCELED  # type: ignore[union-attr]


def test_command_already_sent_when_redelivered_sends_nothing_new() -> None:
    manager = _working()
    manager.on_request(stubs.order_request(), NOW)
    report = _already_sent("O-1:CANCEL:RQ-1")
    manager.on_report(report, NOW)
    manager.take_changes()

    again = manager.on_report(report, NOW + 5)

    assert again == []
    assert manager.duplicate
    assert manager.take_changes() == []
    assert manager.orders["O-1"].cancel_cause == "RQ-1:RESEND1"


def test_cancel_when_answered_command_already_sent_past_the_cap_is_given_up_at_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = _working()
    command_id = "O-1:CANCEL:RQ-1"
    manager.on_request(stubs.order_request(), NOW)
    sent: list[str] = []
    for _ in range(MAX_CANCEL_RESENDS):
        (command,) = _commands(manager.on_report(_already_sent(command_id), NOW))
        command_id = command.command_id
        sent.append(command_id)

    with caplog.at_level(logging.ERROR, logger="quantmesh_oms"):
        last = manager.on_report(_already_sent(command_id), NOW)

    assert sent == [f"O-1:CANCEL:RQ-1:RESEND{n}" for n in range(1, MAX_CANCEL_RESENDS + 1)]
    assert _commands(last) == []
    assert _statuses(last) == [OrderStatus.ACCEPTED]
    assert manager.orders["O-1"].cancel_kind is None
    assert manager.take_changes()[-1].event_type == ExecType.CANCEL_REJECTED.value
    assert f"sent {MAX_CANCEL_RESENDS} times again" in caplog.text


def test_cancel_request_when_answered_after_the_cap_is_a_new_cancel_with_its_own_resends() -> None:
    # The cap counts one cancel's resends (in its cause); a later request is asked anew.
    manager = _working()
    command_id = "O-1:CANCEL:RQ-1"
    manager.on_request(stubs.order_request(), NOW)
    for _ in range(MAX_CANCEL_RESENDS + 1):
        commands = _commands(manager.on_report(_already_sent(command_id), NOW))
        command_id = commands[0].command_id if commands else command_id

    (second,) = _commands(manager.on_request(stubs.order_request(request_id="RQ-2"), NOW))
    (again,) = _commands(manager.on_report(_already_sent(second.command_id), NOW))

    assert again.command_id == "O-1:CANCEL:RQ-2:RESEND1"


def test_command_already_sent_when_it_answers_an_older_cancel_leaves_the_pending_one_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = _working()
    manager.on_request(stubs.order_request(), NOW)
    manager.on_report(
        stubs.order_accepted(
            report_id="R-cr",
            exec_type=ExecType.CANCEL_REJECTED,
            order_status=OrderStatus.ACCEPTED,
            reason="TOO_LATE",
        ),
        NOW,
    )
    manager.on_request(stubs.order_request(request_id="RQ-2"), NOW)
    manager.take_changes()

    with caplog.at_level(logging.WARNING, logger="quantmesh_oms"):
        emits = manager.on_report(_already_sent("O-1:CANCEL:RQ-1"), NOW)

    assert emits == []
    assert manager.take_changes() == []
    assert manager.get("O-1").status is OrderStatus.CANCEL_PENDING  # type: ignore[union-attr]
    assert manager.orders["O-1"].cancel_cause == "RQ-2"
    assert "answers another command than the pending cancel O-1:CANCEL:RQ-2" in caplog.text


def test_gtd_expiry_cancel_when_answered_command_already_sent_is_sent_again_then_expires() -> None:
    expire_at = NOW + 60 * stubs.SECOND_NS
    manager = _working(time_in_force=TimeInForce.GTD, expire_time_ns=expire_at)
    (expiry,) = _commands(manager.expire_due(expire_at))

    (again,) = _commands(manager.on_report(_already_sent(expiry.command_id), expire_at))
    # A restart's reconciliation resends the cancel the order waits on, not the old one.
    reconciled = [c.command_id for c in _commands(manager.reconcile("S2", expire_at))]
    manager.on_report(
        stubs.order_accepted(
            report_id="R-cx", exec_type=ExecType.CANCELED, order_status=OrderStatus.CANCELED
        ),
        expire_at,
    )

    assert expiry.command_id == "O-1:CANCEL:EXPIRE"
    assert again.command_id == "O-1:CANCEL:EXPIRE:RESEND1"
    assert reconciled == ["O-1:QUERY:S2", "O-1:CANCEL:EXPIRE:RESEND1"]
    assert manager.get("O-1").status is OrderStatus.EXPIRED  # type: ignore[union-attr]


@pytest.mark.parametrize("cancel_pending", [False, True])
def test_replace_when_answered_command_already_sent_is_rejected_with_old_terms_kept(
    cancel_pending: bool,
) -> None:
    manager = _working()
    replace = stubs.order_request(
        request_id="RQ-r", action=OrderRequestAction.REPLACE, new_limit_price=Decimal("48000")
    )
    (command,) = _commands(manager.on_request(replace, NOW))
    if cancel_pending:
        manager.on_request(stubs.order_request(request_id="RQ-c"), NOW)
    manager.take_changes()

    emits = manager.on_report(_already_sent(command.command_id), NOW)

    assert _commands(emits) == []
    order = manager.get("O-1")
    assert order is not None
    assert order.limit_price == Decimal("49000.00")  # the intent's price
    assert order.status is (OrderStatus.CANCEL_PENDING if cancel_pending else OrderStatus.ACCEPTED)
    assert manager.orders["O-1"].pending_replace is None
    assert [c.event_type for c in manager.take_changes()] == ["REPLACE_REJECTED"]
    if cancel_pending:  # the cancel sent after the replace still waits for its own answer
        waiting = manager.waiting_commands(manager.orders["O-1"], NOW)
        assert [c.command_id for c in waiting] == ["O-1:CANCEL:RQ-c"]


def test_cancel_rejected_when_another_reason_restores_the_order_and_sends_nothing() -> None:
    manager = _working()
    manager.on_request(stubs.order_request(), NOW)

    emits = manager.on_report(
        stubs.order_accepted(
            report_id="O-1:CANCEL:RQ-1-R",
            exec_type=ExecType.CANCEL_REJECTED,
            order_status=OrderStatus.ACCEPTED,
            reason="ORDER_NOT_OPEN",
        ),
        NOW,
    )

    assert _commands(emits) == []
    assert _statuses(emits) == [OrderStatus.ACCEPTED]
    assert manager.orders["O-1"].cancel_kind is None
    assert manager.take_changes()[-1].event_type == ExecType.CANCEL_REJECTED.value


async def test_cancel_sent_again_when_the_oms_restarts_keeps_its_id_and_the_report_applied() -> (
    None
):
    store = InMemoryOrderStore()
    first = await OmsHarness(store).start()
    await first.send(
        Topic.ORDERS_APPROVED,
        stubs.risk_decision(intent=stubs.limit_order_intent(quantity=Decimal("0.1"))),
    )
    await first.send(Topic.EXEC_REPORTS, stubs.order_accepted(report_id="R-ack"))
    await first.send(Topic.ORDERS_REQUESTS, stubs.order_request())
    report = _already_sent("O-1:CANCEL:RQ-1", client_order_id=stubs.CLIENT_ORDER_ID)
    await first.send(Topic.EXEC_REPORTS, report)
    sent = [c.command_id for c in first.commands()]

    second = await OmsHarness(store).start()
    await second.send(Topic.EXEC_REPORTS, report)

    coid = stubs.CLIENT_ORDER_ID
    assert coid == "O-1"
    assert sent == [f"{coid}:SUBMIT", f"{coid}:CANCEL:RQ-1", f"{coid}:CANCEL:RQ-1:RESEND1"]
    stored = store.event_ids[-1]
    assert stored == f"{coid}:{coid}:CANCEL:RQ-1-R"
    restored = second.service.orders.orders[coid]
    assert restored.order.status is OrderStatus.CANCEL_PENDING
    assert restored.cancel_cause == "RQ-1:RESEND1"
    # The redelivered report is known after the restart: nothing sent, nothing stored.
    assert [c.command_id for c in second.commands() if c.command_type is CommandType.CANCEL] == []
    assert store.event_ids[-1] == stored
