"""Cancel and replace requests, CANCEL_ALL_ORDERS from control and GTD expiry by the oms clock."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.messages import (
    CommandType,
    ControlAction,
    ExecType,
    OrderRequestAction,
    OrderStatus,
    OrderType,
    TimeInForce,
)
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic, dlq
from quantmesh_oms.store import InMemoryOrderStore

from .conftest import NOW, OmsHarness


def _limit_decision(client_order_id: str = "O-1", **intent: Any) -> Any:
    fields: dict[str, Any] = {
        "client_order_id": client_order_id,
        "intent_id": f"I-{client_order_id}",
        "quantity": Decimal("0.1"),
    }
    fields.update(intent)
    return stubs.risk_decision(
        decision_id=f"D-{client_order_id}", intent=stubs.limit_order_intent(**fields)
    )


def _report(exec_type: ExecType, status: OrderStatus, report_id: str, **kw: Any) -> Any:
    return stubs.order_accepted(exec_type=exec_type, order_status=status, report_id=report_id, **kw)


async def _working(oms: OmsHarness, client_order_id: str = "O-1", **intent: Any) -> None:
    await oms.send(Topic.ORDERS_APPROVED, _limit_decision(client_order_id, **intent))
    await oms.send(
        Topic.EXEC_REPORTS,
        stubs.order_accepted(client_order_id=client_order_id, report_id=f"R-{client_order_id}"),
    )


async def test_cancel_request_when_order_working_sends_cancel_and_goes_cancel_pending() -> None:
    oms = await OmsHarness().start()
    await _working(oms)

    await oms.send(Topic.ORDERS_REQUESTS, stubs.order_request())

    command = oms.commands()[-1]
    assert command.command_type is CommandType.CANCEL
    assert command.command_id == "O-1:CANCEL:RQ-1"
    assert command.venue_order_id == "V-1"
    assert oms.updates()[-1].status is OrderStatus.CANCEL_PENDING


async def test_cancel_request_when_repeated_or_order_pending_sends_one_cancel() -> None:
    oms = await OmsHarness().start()
    await _working(oms)

    await oms.send(
        Topic.ORDERS_REQUESTS, stubs.order_request(), stubs.order_request(request_id="RQ-2")
    )

    cancels = [c for c in oms.commands() if c.command_type is CommandType.CANCEL]
    assert [c.command_id for c in cancels] == ["O-1:CANCEL:RQ-1"]


async def test_cancel_when_venue_confirms_order_is_canceled_with_partial_fill_kept() -> None:
    oms = await OmsHarness().start()
    await _working(oms)
    await oms.send(
        Topic.EXEC_REPORTS,
        stubs.execution_report(
            report_id="R-f",
            trade_id="T-1",
            exec_type=ExecType.PARTIAL_FILL,
            order_status=OrderStatus.PARTIALLY_FILLED,
            last_qty=Decimal("0.03"),
            last_price=Decimal("50000"),
            cum_qty=Decimal("0.03"),
        ),
    )
    await oms.send(Topic.ORDERS_REQUESTS, stubs.order_request())

    await oms.send(Topic.EXEC_REPORTS, _report(ExecType.CANCELED, OrderStatus.CANCELED, "R-cx"))

    final = oms.updates()[-1]
    assert final.status is OrderStatus.CANCELED
    assert final.filled_quantity == Decimal("0.03")
    assert final.leaves_quantity == 0


async def test_cancel_when_venue_refuses_restores_the_status_before_the_request() -> None:
    oms = await OmsHarness().start()
    await _working(oms)
    await oms.send(Topic.ORDERS_REQUESTS, stubs.order_request())

    await oms.send(
        Topic.EXEC_REPORTS,
        _report(ExecType.CANCEL_REJECTED, OrderStatus.ACCEPTED, "R-cr", reason="TOO_LATE"),
    )

    assert oms.updates()[-1].status is OrderStatus.ACCEPTED


async def test_cancel_request_when_order_unknown_is_dead_lettered() -> None:
    oms = await OmsHarness().start()

    await oms.send(Topic.ORDERS_REQUESTS, stubs.order_request(client_order_id="O-404"))

    assert len(oms.bus.records(dlq(Topic.ORDERS_REQUESTS))) == 1
    assert oms.commands() == []


async def test_replace_request_when_venue_confirms_updates_quantity_and_price() -> None:
    oms = await OmsHarness().start()
    await _working(oms)
    request = stubs.order_request(
        request_id="RQ-r",
        action=OrderRequestAction.REPLACE,
        new_quantity=Decimal("0.2"),
        new_limit_price=Decimal("48000"),
    )

    await oms.send(Topic.ORDERS_REQUESTS, request)
    command = oms.commands()[-1]
    await oms.send(Topic.EXEC_REPORTS, _report(ExecType.REPLACED, OrderStatus.ACCEPTED, "R-rp"))

    assert command.command_type is CommandType.REPLACE
    assert command.command_id == "O-1:REPLACE:RQ-r"
    assert (command.new_quantity, command.new_limit_price) == (Decimal("0.2"), Decimal("48000"))
    assert command.new_stop_price is None
    final = oms.updates()[-1]
    assert (final.quantity, final.limit_price) == (Decimal("0.2"), Decimal("48000"))
    assert final.status is OrderStatus.ACCEPTED
    # The new quantity counts for later fills: 0.2 fills completely only at 0.2.
    await oms.send(
        Topic.EXEC_REPORTS,
        stubs.execution_report(
            report_id="R-f",
            trade_id="T-1",
            last_qty=Decimal("0.2"),
            last_price=Decimal("48000"),
            cum_qty=Decimal("0.2"),
        ),
    )
    assert oms.updates()[-1].status is OrderStatus.FILLED


async def test_replace_when_venue_refuses_keeps_the_old_terms_and_status() -> None:
    oms = await OmsHarness().start()
    await _working(oms)
    request = stubs.order_request(
        request_id="RQ-r", action=OrderRequestAction.REPLACE, new_limit_price=Decimal("48000")
    )
    await oms.send(Topic.ORDERS_REQUESTS, request)

    await oms.send(
        Topic.EXEC_REPORTS, _report(ExecType.CANCEL_REJECTED, OrderStatus.ACCEPTED, "R-rr")
    )

    final = oms.updates()[-1]
    assert final.status is OrderStatus.ACCEPTED
    assert final.limit_price == Decimal("49000.00")  # the intent's price
    assert oms.service.orders.orders["O-1"].pending_replace is None


async def test_replace_request_when_price_does_not_fit_the_order_type_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    oms = await OmsHarness().start()
    await _working(oms)
    request = stubs.order_request(
        request_id="RQ-r", action=OrderRequestAction.REPLACE, new_stop_price=Decimal("1")
    )
    sent_before = len(oms.commands())

    with caplog.at_level(logging.WARNING, logger="quantmesh_oms"):
        await oms.send(Topic.ORDERS_REQUESTS, request)

    assert len(oms.commands()) == sent_before
    assert "NO_STOP_PRICE_TO_REPLACE: order_type=LIMIT" in caplog.text


async def test_replace_then_cancel_when_both_answered_in_order_end_canceled_with_new_price() -> (
    None
):
    oms = await OmsHarness().start()
    await _working(oms)
    await oms.send(
        Topic.ORDERS_REQUESTS,
        stubs.order_request(
            request_id="RQ-r", action=OrderRequestAction.REPLACE, new_limit_price=Decimal("1")
        ),
        stubs.order_request(request_id="RQ-c"),
    )

    await oms.send(
        Topic.EXEC_REPORTS,
        _report(ExecType.REPLACED, OrderStatus.ACCEPTED, "R-rp"),
        _report(ExecType.CANCELED, OrderStatus.CANCELED, "R-cx"),
    )

    final = oms.updates()[-1]
    assert final.status is OrderStatus.CANCELED
    assert final.limit_price == Decimal("1")


async def test_cancel_all_when_issued_cancels_open_orders_created_before_it_only() -> None:
    oms = await OmsHarness().start()
    await _working(oms, "O-1")
    await _working(oms, "O-2", account_id="acc-2")
    await oms.send(Topic.ORDERS_APPROVED, _limit_decision("O-3"))
    await oms.send(Topic.EXEC_REPORTS, stubs.execution_report(client_order_id="O-3"))  # filled
    command = stubs.control_command(
        command_id="CX-ALL", action=ControlAction.CANCEL_ALL_ORDERS, target="acc-1", ts_event=NOW
    )
    oms.clock.advance(1)
    await oms.send(Topic.ORDERS_APPROVED, _limit_decision("O-4"))  # after the command

    await oms.send(Topic.CONTROL, command, command)

    cancels = [c for c in oms.commands() if c.command_type is CommandType.CANCEL]
    assert [c.command_id for c in cancels] == ["O-1:CANCEL:CX-ALL"]
    assert oms.service.orders.get("O-1").status is OrderStatus.CANCEL_PENDING  # type: ignore[union-attr]
    assert oms.service.orders.get("O-4").status is OrderStatus.SUBMITTED  # type: ignore[union-attr]


async def test_cancel_rejected_when_order_already_canceled_is_ignored_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    oms = await OmsHarness().start()
    await _working(oms)
    await oms.send(Topic.ORDERS_REQUESTS, stubs.order_request())
    await oms.send(Topic.EXEC_REPORTS, _report(ExecType.CANCELED, OrderStatus.CANCELED, "R-cx"))

    with caplog.at_level(logging.ERROR, logger="quantmesh_oms"):
        await oms.send(
            Topic.EXEC_REPORTS,
            _report(
                ExecType.CANCEL_REJECTED, OrderStatus.CANCELED, "R-cr", reason="ORDER_NOT_OPEN"
            ),
        )

    assert oms.updates()[-1].status is OrderStatus.CANCELED
    assert caplog.text == ""


async def test_gtd_order_when_its_time_passes_on_the_oms_clock_is_canceled_then_expired() -> None:
    oms = await OmsHarness().start()
    expire_at = NOW + 60 * stubs.SECOND_NS
    await _working(oms, time_in_force=TimeInForce.GTD, expire_time_ns=expire_at)
    early = await oms.service.publish_expiries(oms.bus)

    oms.clock.advance_to(expire_at)
    due = await oms.service.publish_expiries(oms.bus)
    await oms.bus.run_until_idle()
    command = oms.commands()[-1]
    await oms.send(Topic.EXEC_REPORTS, _report(ExecType.CANCELED, OrderStatus.CANCELED, "R-cx"))

    assert early == []
    assert len(due) == 2
    assert command.command_type is CommandType.CANCEL
    assert command.command_id == "O-1:CANCEL:EXPIRE"
    assert command.ts_event == expire_at
    final = oms.updates()[-1]
    assert final.status is OrderStatus.EXPIRED
    assert final.reason == f"GTD_EXPIRED: expire_time_ns={expire_at}"


async def test_restart_when_replace_and_expiry_pending_rebuilds_both() -> None:
    store = InMemoryOrderStore()
    first = await OmsHarness(store).start()
    expire_at = NOW + 60 * stubs.SECOND_NS
    await _working(first, time_in_force=TimeInForce.GTD, expire_time_ns=expire_at)
    await first.send(
        Topic.ORDERS_REQUESTS,
        stubs.order_request(
            request_id="RQ-r", action=OrderRequestAction.REPLACE, new_quantity=Decimal("0.3")
        ),
    )
    first.clock.advance_to(expire_at)
    await first.service.publish_expiries(first.bus)

    second = await OmsHarness(store).start()
    await second.send(
        Topic.EXEC_REPORTS,
        _report(ExecType.REPLACED, OrderStatus.ACCEPTED, "R-rp"),
        _report(ExecType.CANCELED, OrderStatus.CANCELED, "R-cx"),
    )

    replaced, expired = second.updates()
    assert replaced.quantity == Decimal("0.3")
    assert replaced.status is OrderStatus.CANCEL_PENDING
    assert expired.status is OrderStatus.EXPIRED


@pytest.mark.parametrize(
    ("order_type", "limit", "stop", "tif"),
    [
        (OrderType.MARKET, None, None, TimeInForce.IOC),
        (OrderType.LIMIT, Decimal("49000"), None, TimeInForce.FOK),
        (OrderType.STOP, None, Decimal("51000"), TimeInForce.GTC),
        (OrderType.STOP_LIMIT, Decimal("51500"), Decimal("51000"), TimeInForce.IOC),
    ],
)
async def test_submit_when_order_type_and_tif_given_carries_them_to_the_venue(
    order_type: OrderType, limit: Decimal | None, stop: Decimal | None, tif: TimeInForce
) -> None:
    oms = await OmsHarness().start()
    intent = stubs.order_intent(
        order_type=order_type, limit_price=limit, stop_price=stop, time_in_force=tif
    )

    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision(intent=intent))

    [command] = oms.commands()
    assert (command.order_type, command.limit_price, command.stop_price) == (
        order_type,
        limit,
        stop,
    )
    assert command.time_in_force is tif


async def test_cancel_all_when_applied_again_after_its_cancel_was_refused_sends_nothing() -> None:
    # Arrange: CX-ALL cancels O-1; the venue refuses (TOO_LATE), so O-1 is ACCEPTED again.
    oms = await OmsHarness().start()
    await _working(oms, "O-1")
    command = stubs.control_command(
        command_id="CX-ALL", action=ControlAction.CANCEL_ALL_ORDERS, target="*", ts_event=NOW
    )
    await oms.send(Topic.CONTROL, command)
    await oms.send(
        Topic.EXEC_REPORTS,
        _report(ExecType.CANCEL_REJECTED, OrderStatus.ACCEPTED, "R-cr", reason="TOO_LATE"),
    )

    # Act: the same command again (a reload of the order applies the commands seen again).
    await oms.send(Topic.CONTROL, command)

    # Assert: one CANCEL in all; the order keeps working.
    cancels = [c for c in oms.commands() if c.command_type is CommandType.CANCEL]
    assert [c.command_id for c in cancels] == ["O-1:CANCEL:CX-ALL"]
    assert oms.updates()[-1].status is OrderStatus.ACCEPTED
