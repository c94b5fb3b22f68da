"""Orders and commands built without validating again: the same objects validation builds."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.messages import (
    Order,
    OrderCommand,
    OrderStatus,
    OrderType,
    Side,
    TimeInForce,
)
from quantmesh_common.testing import stubs
from quantmesh_oms.orders import OrderManager, submit_command, submit_command_id

NOW = stubs.TS + 5_000

#: Intent terms of every order type and time in force the OMS builds from a decision.
TERMS: list[dict[str, Any]] = [
    {},
    {"order_type": OrderType.LIMIT, "limit_price": Decimal("49000.10")},
    {"order_type": OrderType.STOP, "stop_price": Decimal("51000")},
    {
        "order_type": OrderType.STOP_LIMIT,
        "stop_price": Decimal("51000"),
        "limit_price": Decimal("51010.5"),
        "time_in_force": TimeInForce.GTD,
        "expire_time_ns": NOW + 60_000_000_000,
    },
    {"side": Side.SELL, "quantity": Decimal("0.00100"), "post_only": True, "tag": "t-1"},
    {"reduce_only": True, "time_in_force": TimeInForce.IOC},
]


def _same(built: Any, validated: Any) -> None:
    """Equal values, equal JSON, the same field order (what serialisation follows)."""
    assert built == validated
    assert built.model_dump_json() == validated.model_dump_json()
    assert list(built.__dict__) == list(validated.__dict__)


@pytest.mark.parametrize("terms", TERMS)
def test_decision_when_approved_builds_the_order_and_submit_validation_would(
    terms: dict[str, Any],
) -> None:
    # Arrange
    intent = stubs.order_intent(**terms)
    decision = stubs.risk_decision(intent=intent)
    manager = OrderManager()

    # Act
    command_emit, update_emit = manager.on_decision(decision, NOW)

    # Assert: the same objects as validated construction from the decision's values
    expected_order = Order(
        client_order_id=intent.client_order_id,
        account_id=intent.account_id,
        strategy_id=intent.strategy_id,
        instrument_id=intent.instrument_id,
        intent_id=intent.intent_id,
        side=intent.side,
        order_type=intent.order_type,
        quantity=intent.quantity,
        limit_price=intent.limit_price,
        stop_price=intent.stop_price,
        time_in_force=intent.time_in_force,
        expire_time_ns=intent.expire_time_ns,
        post_only=intent.post_only,
        reduce_only=intent.reduce_only,
        status=OrderStatus.SUBMITTED,
        tag=intent.tag,
        ts_init=NOW,
        ts_last=NOW,
    )
    _same(update_emit.payload, expected_order)
    expected_command = OrderCommand.for_submit(
        expected_order, command_id=f"{intent.client_order_id}:SUBMIT", ts_event=NOW
    )
    _same(command_emit.payload, expected_command)
    assert expected_command.venue == "SIM"


def test_submit_command_when_the_order_is_a_child_equals_for_submit() -> None:
    # Arrange
    order = stubs.order(
        client_order_id="P-1:1",
        parent_order_id="P-1",
        venue_order_id=None,
        status=OrderStatus.INITIALIZED,
    )

    # Act
    command = submit_command(order, submit_command_id(order.client_order_id), NOW)

    # Assert
    expected = OrderCommand.for_submit(order, command_id="P-1:1:SUBMIT", ts_event=NOW)
    _same(command, expected)
