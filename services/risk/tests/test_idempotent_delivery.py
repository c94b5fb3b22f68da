"""Risk in idempotent order-flow delivery: a redelivered input is applied once and its
decision (or a trip's alert) published again with the same keys."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.messages import Alert, ControlAction, OrderType, RiskDecision, Side
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.topics import Topic
from quantmesh_risk.config import RiskSettings
from quantmesh_risk.decisions import DecisionLog, StoredDecision, stored_row
from quantmesh_risk.service import RiskService

D = Decimal
S = stubs.SECOND_NS
T0 = stubs.TS
ACC, BTC = stubs.ACCOUNT_ID, stubs.INSTRUMENT_ID


class Risk(StageHarness[RiskService]):
    """A risk service without PostgreSQL on a retaining in-memory bus."""

    def __init__(self, delivery: str, limits: dict[str, Any]) -> None:
        settings = RiskSettings(
            bus="memory",
            http_port=0,
            risk_limits={"default": limits},
            order_flow_delivery=delivery,
        )
        super().__init__(RiskService(settings), now_ns=T0)

    def decisions(self) -> list[RiskDecision]:
        return self.payloads(Topic.ORDERS_APPROVED) + self.payloads(Topic.ORDERS_REJECTED)

    async def control(self, action: ControlAction, command_id: str) -> None:
        await self.send(
            Topic.CONTROL, stubs.control_command(command_id=command_id, action=action, target="*")
        )


def _intent(n: int, **fields: Any) -> Any:
    return stubs.order_intent(intent_id=f"I-{n}", client_order_id=f"O-{n}", **fields)


async def test_intent_when_redelivered_gets_the_same_approval_and_counts_once() -> None:
    # Arrange: two approvals per strategy within a second.
    risk = await Risk(
        "idempotent", {"max_orders_per_strategy": 2, "order_rate_window_s": 1}
    ).start()
    await risk.send(Topic.ORDERS_INTENTS, _intent(1))
    risk.clock.advance(0.1)

    # Act: I-1 again (its batch redelivered), then I-2 and I-3.
    await risk.send(Topic.ORDERS_INTENTS, _intent(1))
    await risk.send(Topic.ORDERS_INTENTS, _intent(2), _intent(3))

    # Assert: I-1 twice with its first decision's id and time; it counted once in the rate
    # (I-2 is the second approval, I-3 the third: denied) and once as working.
    approved = risk.payloads(Topic.ORDERS_APPROVED)
    [denied] = risk.payloads(Topic.ORDERS_REJECTED)
    assert [d.intent.client_order_id for d in approved] == ["O-1", "O-1", "O-2"]
    assert approved[1] == approved[0]
    assert (approved[1].decision_id, approved[1].ts_event) == ("D-I-1", T0)
    assert approved[2].ts_event == T0 + S // 10
    assert (denied.intent.client_order_id, denied.reason) == ("O-3", "ORDER_RATE_EXCEEDS_MAX")
    assert sorted(cid for cid, _ in risk.service.engine.working(ACC).items()) == ["O-1", "O-2"]
    assert risk.service.redecided == 1


async def test_intent_when_redelivered_after_the_kill_switch_went_off_keeps_its_denial() -> None:
    # Arrange
    risk = await Risk("idempotent", {}).start()
    await risk.control(ControlAction.KILL_SWITCH_ON, "K-1")
    await risk.send(Topic.ORDERS_INTENTS, _intent(1))
    await risk.control(ControlAction.KILL_SWITCH_OFF, "K-2")

    # Act
    await risk.send(Topic.ORDERS_INTENTS, _intent(1))

    # Assert: the stored decision, not a new approval.
    assert risk.payloads(Topic.ORDERS_APPROVED) == []
    first, again = risk.payloads(Topic.ORDERS_REJECTED)
    assert again == first
    assert (again.reason, again.details) == ("KILL_SWITCH_ENGAGED", {"target": "*"})
    assert len(risk.service.engine.working(ACC)) == 0


async def test_intent_when_redelivered_in_transactional_delivery_is_decided_again() -> None:
    # Arrange: the transaction aborted the first decision, so it is decided anew (as before).
    risk = await Risk("transactional", {}).start()
    await risk.control(ControlAction.KILL_SWITCH_ON, "K-1")
    await risk.send(Topic.ORDERS_INTENTS, _intent(1))
    await risk.control(ControlAction.KILL_SWITCH_OFF, "K-2")

    # Act
    await risk.send(Topic.ORDERS_INTENTS, _intent(1))

    # Assert
    [denied] = risk.payloads(Topic.ORDERS_REJECTED)
    [approved] = risk.payloads(Topic.ORDERS_APPROVED)
    assert (denied.reason, approved.intent.client_order_id) == ("KILL_SWITCH_ENGAGED", "O-1")
    assert risk.service.decisions is None


async def test_intent_when_its_id_comes_with_another_client_order_id_is_decided_anew() -> None:
    # Arrange
    risk = await Risk("idempotent", {"max_order_quantity": "1"}).start()
    await risk.send(Topic.ORDERS_INTENTS, _intent(1, quantity=D("2")))

    # Act: the same intent id for another order: not a redelivery.
    await risk.send(
        Topic.ORDERS_INTENTS,
        stubs.order_intent(intent_id="I-1", client_order_id="O-9", quantity=D("0.5")),
    )

    # Assert
    [denied] = risk.payloads(Topic.ORDERS_REJECTED)
    [approved] = risk.payloads(Topic.ORDERS_APPROVED)
    assert (denied.intent.client_order_id, denied.reason) == (
        "O-1",
        "QUANTITY_EXCEEDS_MAX_PER_ORDER",
    )
    assert approved.intent.client_order_id == "O-9"


async def test_approval_when_redelivered_after_its_order_finished_is_not_working_again() -> None:
    # Arrange: approved, then filled whole on the venue.
    risk = await Risk("idempotent", {}).start()
    await risk.send(Topic.ORDERS_INTENTS, _intent(1, quantity=D("0.3")))
    await risk.send(
        Topic.EXEC_REPORTS,
        stubs.execution_report(
            client_order_id="O-1", trade_id="T-1", last_qty=D("0.3"), cum_qty=D("0.3")
        ),
    )

    # Act
    await risk.send(Topic.ORDERS_INTENTS, _intent(1, quantity=D("0.3")))

    # Assert: published again, but the filled order does not count as working again.
    assert len(risk.payloads(Topic.ORDERS_APPROVED)) == 2
    assert len(risk.service.engine.working(ACC)) == 0
    assert risk.service.engine.position(ACC, BTC) == D("0.3")


async def test_target_intent_approval_when_restored_counts_its_derived_side_and_size() -> None:
    # Arrange: a decision of a target-position intent (BUY 0.4 derived), unknown to the engine.
    risk = await Risk("idempotent", {}).start()
    intent = stubs.order_intent(
        intent_id="I-7", client_order_id="O-7", side=None, quantity=None, target_position=D("0.4")
    )
    decision = RiskDecision(
        decision_id="D-I-7",
        account_id=ACC,
        intent=intent,
        approved=True,
        adjusted_quantity=D("0.4"),
        side=Side.BUY,
        ts_event=T0,
    )

    # Act
    restored = risk.service.engine.restore_approval(decision)
    again = risk.service.engine.restore_approval(decision)

    # Assert
    assert (restored, again) == (True, False)
    assert risk.service.engine.working(ACC).leaves(BTC, Side.BUY) == D("0.4")


async def test_snapshot_when_redelivered_after_its_trip_publishes_the_same_alert_again() -> None:
    # Arrange: 2000 lost at T0 + 60 s, beyond the daily loss limit of 1000.
    risk = await Risk("idempotent", {"max_daily_loss": "1000"}).start()
    tripping = stubs.portfolio_snapshot(
        equity=D("98000"), positions=[], peak_equity=None, drawdown=D(0), ts_event=T0 + 60 * S
    )
    await _snapshot(risk, "100000", T0)
    await risk.bus.publish(Topic.PORTFOLIO_SNAPSHOTS, tripping, ts_event=T0 + 60 * S)
    await risk.bus.run_until_idle()

    # Act: the tripping snapshot again, then a later one.
    await risk.bus.publish(Topic.PORTFOLIO_SNAPSHOTS, tripping, ts_event=T0 + 60 * S)
    await risk.bus.run_until_idle()
    await _snapshot(risk, "97000", T0 + 120 * S)

    # Assert
    alerts: list[Alert] = risk.payloads(Topic.ALERTS)
    assert [a.alert_id for a in alerts] == [f"CB-{ACC}-{T0 + 60 * S}"] * 2
    assert alerts[1] == alerts[0]
    assert alerts[0].details["daily_loss"] == "2000"


async def _snapshot(risk: Risk, equity: str, ts: int) -> None:
    snap = stubs.portfolio_snapshot(
        equity=D(equity), positions=[], peak_equity=None, drawdown=D(0), ts_event=ts
    )
    await risk.bus.publish(Topic.PORTFOLIO_SNAPSHOTS, snap, ts_event=ts)
    await risk.bus.run_until_idle()


def test_decision_log_when_past_twice_its_size_keeps_the_newest() -> None:
    # Arrange
    log = DecisionLog(keep=2)
    decisions = [
        stubs.risk_decision(intent=_intent(n), decision_id=f"D-I-{n}") for n in range(1, 6)
    ]

    # Act: the fifth trims the oldest three (5 > 2 x 2), leaving two.
    for decision in decisions:
        log.add(decision, store=True)

    # Assert
    assert (len(log), (ACC, "I-3") in log, (ACC, "I-4") in log, (ACC, "I-5") in log) == (
        2,
        False,
        True,
        True,
    )
    assert [d.intent.intent_id for d in log.take_pending()] == ["I-1", "I-2", "I-3", "I-4", "I-5"]
    assert log.pending == []


def test_decision_log_when_loaded_rebuilds_a_stored_decision_around_the_redelivered_intent() -> (
    None
):
    # Arrange: a stored denial of O-1's intent I-1.
    intent = _intent(1, order_type=OrderType.MARKET)
    stored = StoredDecision(
        client_order_id="O-1",
        decision_id="D-I-1",
        approved=False,
        reason="KILL_SWITCH_ENGAGED",
        details={"target": "*"},
        ts_event=T0,
    )
    log = DecisionLog()

    # Act
    added = log.load([((ACC, "I-1"), stored)])
    again = log.load([((ACC, "I-1"), replace(stored, reason="NOT_LOADED"))])
    decision = log.get(intent)
    other = log.get(stubs.order_intent(intent_id="I-1", client_order_id="O-2"))
    elsewhere = log.get(_intent(1, account_id="acc-2"))

    # Assert
    assert (added, again, other, elsewhere) == (1, 0, None, None)
    assert decision == RiskDecision(
        decision_id="D-I-1",
        account_id=ACC,
        intent=intent,
        approved=False,
        reason="KILL_SWITCH_ENGAGED",
        details={"target": "*"},
        ts_event=T0,
    )


def test_stored_row_when_stored_and_loaded_gives_the_same_decision() -> None:
    # Arrange: an approval of a target-position intent (derived side, lot-sized quantity).
    intent = stubs.order_intent(side=None, quantity=None, target_position=D("0.40"))
    decision = RiskDecision(
        decision_id="D-I-1",
        account_id=ACC,
        intent=intent,
        approved=True,
        adjusted_quantity=D("0.40"),
        side=Side.SELL,
        ts_event=T0,
    )

    # Act
    row = stored_row(decision)
    stored = StoredDecision(
        client_order_id=row["client_order_id"],
        decision_id=row["decision_id"],
        approved=row["approved"],
        reason=row["reason"],
        details=row["details"],
        adjusted_quantity=D(row["adjusted_quantity"]),
        side=Side(row["side"]),
        ts_event=row["ts_event"],
    )

    # Assert
    assert (row["intent_id"], row["adjusted_quantity"], row["side"]) == ("I-1", "0.40", "SELL")
    assert stored.decision(intent) == decision


def test_decision_log_when_keep_is_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="keep must be >= 1"):
        DecisionLog(keep=0)
