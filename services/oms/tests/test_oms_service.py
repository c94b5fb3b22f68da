"""The oms stage's handlers on the in-memory bus; what every stage must do is in tests/stages/."""

from __future__ import annotations

import logging
from decimal import Decimal

import pytest

from quantmesh_common.bus.base import H_ERROR
from quantmesh_common.messages import (
    CommandType,
    ExecType,
    Order,
    OrderCommand,
    OrderStatus,
    OrderType,
    Side,
    TimeInForce,
)
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.topics import Topic, dlq
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.service import HANDLERS_ISSUE, OmsService

from .conftest import partial_fill

NOW = stubs.TS + 10 * stubs.SECOND_NS


class Harness(StageHarness[OmsService]):
    """The oms service's handlers wired to a retaining in-memory bus with a simulated clock."""

    def __init__(self) -> None:
        super().__init__(OmsService(OmsSettings(bus="memory", http_port=0)), now_ns=NOW)

    def updates(self) -> list[Order]:
        return self.payloads(Topic.ORDERS_UPDATES)

    def commands(self) -> list[OrderCommand]:
        return self.payloads(Topic.ORDERS_COMMANDS)


@pytest.fixture
async def oms() -> Harness:
    return await Harness().start()


def test_declared_topics_are_what_the_handlers_use() -> None:
    assert OmsService.consumes == (
        Topic.ORDERS_APPROVED,
        Topic.EXEC_REPORTS,
        Topic.ORDERS_REQUESTS,
        Topic.CONTROL,
    )
    assert OmsService.produces == (Topic.ORDERS_COMMANDS, Topic.ORDERS_UPDATES)


def test_handlers_issue_when_handlers_exist_is_none() -> None:
    assert HANDLERS_ISSUE is None


async def test_approved_decision_when_new_submits_once_and_publishes_submitted(
    oms: Harness,
) -> None:
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())

    [command] = oms.commands()
    [order] = oms.updates()
    assert command.command_type is CommandType.SUBMIT
    assert command.command_id == "O-1:SUBMIT"
    assert command.client_order_id == "O-1"
    assert (command.account_id, command.venue, command.instrument_id) == (
        "acc-1",
        "SIM",
        "BTC-USDT.SIM",
    )
    assert (command.side, command.order_type, command.quantity) == (
        Side.BUY,
        OrderType.MARKET,
        Decimal("0.1"),
    )
    assert command.time_in_force is TimeInForce.GTC
    assert command.ts_event == NOW
    assert order.status is OrderStatus.SUBMITTED
    assert order.client_order_id == "O-1"
    assert order.intent_id == "I-1"
    assert order.filled_quantity == 0
    assert order.ts_init == order.ts_last == NOW


async def test_approved_decision_when_published_keeps_the_flow_correlation(
    oms: Harness,
) -> None:
    parent = await oms.bus.publish(Topic.ORDERS_APPROVED, stubs.risk_decision())
    await oms.bus.run_until_idle()

    [command_env] = oms.bus.messages(Topic.ORDERS_COMMANDS)
    [update_env] = oms.bus.messages(Topic.ORDERS_UPDATES)
    assert command_env.correlation_id == parent.correlation_id
    assert command_env.causation_id == parent.event_id
    assert update_env.causation_id == parent.event_id
    assert oms.bus.records(Topic.ORDERS_COMMANDS)[0].key == "acc-1"


async def test_approved_target_position_decision_submits_the_side_and_size_risk_derived(
    oms: Harness,
) -> None:
    intent = stubs.order_intent(side=None, quantity=None, target_position=Decimal("-0.5"))
    decision = stubs.risk_decision(intent=intent, side=Side.SELL, adjusted_quantity=Decimal("0.6"))

    await oms.send(Topic.ORDERS_APPROVED, decision)

    [command] = oms.commands()
    [order] = oms.updates()
    assert (command.side, command.quantity) == (Side.SELL, Decimal("0.6"))
    assert (order.side, order.quantity) == (Side.SELL, Decimal("0.6"))


async def test_approved_decision_when_redelivered_creates_nothing_new(oms: Harness) -> None:
    decision = stubs.risk_decision()

    await oms.send(Topic.ORDERS_APPROVED, decision, decision)
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision(decision_id="D-2"))

    assert len(oms.commands()) == 1
    assert len(oms.updates()) == 1


async def test_approved_decision_when_risk_resized_uses_the_adjusted_quantity(
    oms: Harness,
) -> None:
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision(adjusted_quantity=Decimal("0.07")))

    [command] = oms.commands()
    [order] = oms.updates()
    assert command.quantity == Decimal("0.07")
    assert order.quantity == Decimal("0.07")


async def test_approved_decision_when_gtd_already_expired_is_denied_and_not_sent(
    oms: Harness,
) -> None:
    intent = stubs.limit_order_intent(time_in_force=TimeInForce.GTD, expire_time_ns=NOW)

    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision(intent=intent))

    [order] = oms.updates()
    assert oms.commands() == []
    assert order.status is OrderStatus.DENIED
    assert order.reason == f"EXPIRE_TIME_IN_PAST: expire_time_ns={NOW}, now_ns={NOW}"


async def test_rejection_when_found_on_orders_approved_is_dead_lettered(oms: Harness) -> None:
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_rejection())

    [dead] = oms.bus.records(dlq(Topic.ORDERS_APPROVED))
    assert oms.commands() == []
    assert b"is a rejection" in (dead.header(H_ERROR) or b"")


async def test_reports_when_accepted_then_filled_in_two_parts_track_quantity_and_average(
    oms: Harness,
) -> None:
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())

    await oms.send(
        Topic.EXEC_REPORTS,
        stubs.order_accepted(),
        partial_fill("R-1", "T-1", "0.04", "0.04", "49000.00"),
        stubs.execution_report(
            report_id="R-2",
            trade_id="T-2",
            last_qty=Decimal("0.06"),
            last_price=Decimal("49010.00"),
            cum_qty=Decimal("0.1"),
            avg_price=Decimal("49006"),
        ),
    )

    submitted, accepted, partial, filled = oms.updates()
    assert submitted.status is OrderStatus.SUBMITTED
    assert accepted.status is OrderStatus.ACCEPTED
    assert accepted.venue_order_id == "V-1"
    assert partial.status is OrderStatus.PARTIALLY_FILLED
    assert partial.filled_quantity == Decimal("0.04")
    assert partial.avg_fill_price == Decimal("49000.00")
    # (0.04 x 49000 + 0.06 x 49010) / 0.1 = 4900.6 / 0.1 = 49006
    assert filled.status is OrderStatus.FILLED
    assert filled.filled_quantity == Decimal("0.1")
    assert filled.avg_fill_price == Decimal("49006")
    assert filled.leaves_quantity == 0


async def test_report_when_redelivered_or_same_trade_again_is_applied_once(oms: Harness) -> None:
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    first = partial_fill("R-1", "T-1", "0.04", "0.04", "49000.00")

    await oms.send(
        Topic.EXEC_REPORTS, first, first, partial_fill("R-9", "T-1", "0.04", "0.08", "1")
    )

    updates = oms.updates()
    assert len(updates) == 2
    assert updates[-1].filled_quantity == Decimal("0.04")
    assert oms.service.orders.get("O-1") == updates[-1]


async def test_report_when_client_order_id_unknown_is_dead_lettered(oms: Harness) -> None:
    await oms.send(Topic.EXEC_REPORTS, stubs.order_accepted(client_order_id="O-404"))

    [dead] = oms.bus.records(dlq(Topic.EXEC_REPORTS))
    assert oms.updates() == []
    assert b"unknown client order id 'O-404'" in (dead.header(H_ERROR) or b"")


async def test_report_when_account_differs_from_the_order_is_dead_lettered(oms: Harness) -> None:
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())

    await oms.send(Topic.EXEC_REPORTS, stubs.order_accepted(account_id="acc-2"))

    assert len(oms.bus.records(dlq(Topic.EXEC_REPORTS))) == 1
    assert [o.status for o in oms.updates()] == [OrderStatus.SUBMITTED]


async def test_report_when_transition_illegal_is_refused_logged_and_not_applied(
    oms: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    await oms.send(Topic.EXEC_REPORTS, stubs.execution_report())  # filled 0.1: terminal
    caplog.set_level(logging.ERROR, logger="quantmesh_oms")

    await oms.send(
        Topic.EXEC_REPORTS,
        stubs.order_accepted(report_id="R-late"),
        stubs.execution_report(
            report_id="R-cx",
            exec_type=ExecType.CANCELED,
            order_status=OrderStatus.CANCELED,
            last_qty=Decimal(0),
            last_price=None,
            trade_id=None,
        ),
    )

    assert [o.status for o in oms.updates()] == [OrderStatus.SUBMITTED, OrderStatus.FILLED]
    assert oms.bus.records(dlq(Topic.EXEC_REPORTS)) == []
    assert caplog.text.count("ILLEGAL_TRANSITION") == 2
    assert "status=FILLED, event=CANCELED" in caplog.text


async def test_report_when_fill_exceeds_the_order_is_refused_as_overfill(
    oms: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())
    await oms.send(Topic.EXEC_REPORTS, partial_fill("R-1", "T-1", "0.04", "0.04", "49000.00"))
    caplog.set_level(logging.ERROR, logger="quantmesh_oms")

    await oms.send(
        Topic.EXEC_REPORTS,
        stubs.execution_report(report_id="R-2", trade_id="T-2", last_qty=Decimal("0.07")),
    )

    assert oms.updates()[-1].filled_quantity == Decimal("0.04")
    assert oms.updates()[-1].status is OrderStatus.PARTIALLY_FILLED
    assert "OVERFILL: quantity=0.1, filled_quantity=0.04, fill_quantity=0.07" in caplog.text


async def test_report_when_venue_rejects_records_the_reason(oms: Harness) -> None:
    await oms.send(Topic.ORDERS_APPROVED, stubs.risk_decision())

    await oms.send(
        Topic.EXEC_REPORTS,
        stubs.order_accepted(
            exec_type=ExecType.REJECTED,
            order_status=OrderStatus.REJECTED,
            venue_order_id=None,
            leaves_qty=Decimal(0),
            reason="INSUFFICIENT_BALANCE",
        ),
    )

    rejected = oms.updates()[-1]
    assert rejected.status is OrderStatus.REJECTED
    assert rejected.reason == "INSUFFICIENT_BALANCE"
    assert rejected.leaves_quantity == 0
