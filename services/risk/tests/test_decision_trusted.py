"""Risk's approvals built without validating again: what validated construction builds."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.messages import RiskDecision, Side
from quantmesh_common.testing import stubs
from quantmesh_risk.engine import RiskEngine
from quantmesh_risk.limits import RiskConfig

D = Decimal
NOW = stubs.TS + 5_000


def _validated(decision: RiskDecision) -> RiskDecision:
    """The same decision through pydantic's validation, from the fields a caller would pass."""
    values: dict[str, Any] = {
        "decision_id": decision.decision_id,
        "account_id": decision.account_id,
        "intent": decision.intent,
        "approved": decision.approved,
        "ts_event": decision.ts_event,
    }
    if decision.adjusted_quantity is not None:
        values["adjusted_quantity"] = decision.adjusted_quantity
    if decision.side is not None:
        values["side"] = decision.side
    return RiskDecision(**values)


@pytest.mark.parametrize(
    ("intent", "adjusted", "side"),
    [
        (stubs.order_intent(), None, None),
        (stubs.limit_order_intent(quantity=D("0.10")), None, None),
        # Lot-rounded (lot 0.001): 0.1234 becomes 0.123.
        (stubs.order_intent(quantity=D("0.1234")), D("0.123"), None),
        # A target position from flat: buy the whole target.
        (
            stubs.order_intent(side=None, quantity=None, target_position=D("0.5")),
            D("0.5"),
            Side.BUY,
        ),
        (stubs.order_intent(intent_id="I-" + "x" * 126), None, None),
    ],
)
def test_evaluate_when_approved_makes_what_validation_would(
    intent: Any, adjusted: Decimal | None, side: Side | None
) -> None:
    # Arrange: lots of 0.001, and a last trade to value market orders at
    engine = RiskEngine(RiskConfig(), [stubs.instrument(lot_size=D("0.001"))])
    engine.on_tick(stubs.tick())

    # Act
    decision = engine.evaluate(intent, NOW)

    # Assert
    assert decision.approved
    assert (decision.adjusted_quantity, decision.side) == (adjusted, side)
    expected = _validated(decision)
    assert decision == expected
    assert decision.model_dump_json() == expected.model_dump_json()
    assert list(decision.__dict__) == list(expected.__dict__)
    assert decision.details == {}
    other = engine.evaluate(stubs.order_intent(intent_id="I-2", client_order_id="O-2"), NOW)
    assert decision.details is not other.details  # each decision has a dict of its own
