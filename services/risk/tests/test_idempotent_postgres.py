"""Risk's stored decisions on real PostgreSQL (idempotent delivery): an intent redelivered to a
restarted instance gets its stored decision again and changes nothing in the store."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import ControlAction, RiskDecision, Side
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import GroupMember, StageHarness
from quantmesh_common.topics import Topic
from quantmesh_risk.config import RiskSettings
from quantmesh_risk.decisions import StoredDecision
from quantmesh_risk.service import RiskService
from quantmesh_risk.store import PostgresRiskStore

pytestmark = pytest.mark.integration

D = Decimal
S = stubs.SECOND_NS
T0 = stubs.TS
ACC, BTC = stubs.ACCOUNT_ID, stubs.INSTRUMENT_ID
ROWS = (
    "SELECT intent_id, account_id, client_order_id, decision_id, approved, reason, details,"
    " adjusted_quantity, side, ts_event, ts_stored FROM risk_decisions ORDER BY intent_id"
)


class Instance(StageHarness[RiskService]):
    """One risk instance in idempotent delivery on the test schema's pool."""

    def __init__(self, pool: Any, limits: dict[str, Any], now_ns: int) -> None:
        settings = RiskSettings(
            bus="memory",
            http_port=0,
            risk_limits={"default": limits},
            order_flow_delivery="idempotent",
        )
        super().__init__(RiskService(settings), now_ns=now_ns, pg=pool)

    def decisions(self) -> list[RiskDecision]:
        return self.payloads(Topic.ORDERS_APPROVED) + self.payloads(Topic.ORDERS_REJECTED)


def _intent(n: int, quantity: str) -> Any:
    return stubs.order_intent(intent_id=f"I-{n}", client_order_id=f"O-{n}", quantity=D(quantity))


async def test_intents_when_redelivered_to_a_restarted_instance_get_the_stored_decisions(
    risk_pool: Any,
) -> None:
    # Arrange: BUY 0.5 approved and BUY 2 denied (max 1 per order), both stored.
    first = await Instance(risk_pool, {"max_order_quantity": "1"}, T0).start()
    await first.send(Topic.ORDERS_INTENTS, _intent(1, "0.5"), _intent(2, "2"))
    stored = [tuple(r) for r in await risk_pool.fetch(ROWS)]

    # Act: a new instance, a minute later and without the limit, handed both again.
    second = await Instance(risk_pool, {}, T0 + 60 * S).start()
    await second.send(Topic.ORDERS_INTENTS, _intent(1, "0.5"), _intent(2, "2"))

    # Assert: the first decisions, as published (ids, times, the denial's values).
    approval, denial = first.decisions()
    assert (approval.approved, denial.reason) == (True, "QUANTITY_EXCEEDS_MAX_PER_ORDER")
    assert second.decisions() == [approval, denial]
    assert (approval.decision_id, approval.ts_event) == ("D-I-1", T0)
    assert denial.details == {"max_quantity": "1", "quantity": "2"}
    assert [tuple(r) for r in await risk_pool.fetch(ROWS)] == stored
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in stored] == [
        ("I-1", ACC, "O-1", "D-I-1", True),
        ("I-2", ACC, "O-2", "D-I-2", False),
    ]
    # The approval counts as working again (the oms may never have got it), once.
    assert second.service.engine.working(ACC).leaves(BTC, Side.BUY) == D("0.5")
    assert second.service.redecided == 2


async def _member(bus: InMemoryBus, pool: Any, limits: dict[str, Any]) -> tuple[RiskService, Any]:
    """A risk member in idempotent delivery joined to the shared bus's groups."""
    settings = RiskSettings(
        bus="memory", http_port=0, risk_limits={"default": limits}, order_flow_delivery="idempotent"
    )
    service = RiskService(settings)
    member = await GroupMember.join(service, bus, bus.clock, pg=pool)
    return service, member.subscriptions


async def test_intent_when_redelivered_to_the_member_taking_its_account_gets_the_stored_decision(
    risk_pool: Any,
) -> None:
    # Arrange: both members start on an empty store; the owner of the account's partition
    # approves BUY 0.5; then the kill switch goes on (every member reads control) and the
    # owner leaves. Decided anew, the intent would be denied KILL_SWITCH_ENGAGED.
    bus = InMemoryBus("test", clock=SimulatedClock(T0), retain=True)
    members = [await _member(bus, risk_pool, {}), await _member(bus, risk_pool, {})]
    await bus.publish(Topic.ORDERS_INTENTS, _intent(1, "0.5"))
    await bus.run_until_idle()
    [approval] = [e.payload for e in bus.messages(Topic.ORDERS_APPROVED)]
    [(owner, subscriptions)] = [m for m in members if len(m[0].decisions or ())]
    [(heir, _)] = [m for m in members if m[0] is not owner]
    await bus.publish(Topic.CONTROL, stubs.control_command(action=ControlAction.KILL_SWITCH_ON))
    await bus.run_until_idle()
    for subscription in subscriptions:
        await subscription.stop()
    reloads = heir.reloads

    # Act: the intent again, as the group redelivers what the owner had not committed.
    await bus.publish(Topic.ORDERS_INTENTS, _intent(1, "0.5"))
    await bus.run_until_idle()

    # Assert
    assert [e.payload for e in bus.messages(Topic.ORDERS_APPROVED)] == [approval, approval]
    assert bus.messages(Topic.ORDERS_REJECTED) == []
    assert (heir.reloads > reloads, heir.redecided, "*" in heir.engine.kill_switch) == (
        True,
        1,
        True,
    )


async def test_flush_when_a_batch_decided_stores_its_decisions_only_then(risk_pool: Any) -> None:
    # Arrange
    risk = await Instance(risk_pool, {}, T0).start()
    service = risk.service
    for n in (1, 2):
        intent = _intent(n, "0.1")
        service.on_order_flow_held(Envelope.wrap(intent, source="test", ts_event=T0, ts_init=T0))
    before = await risk_pool.fetchval("SELECT count(*) FROM risk_decisions")

    # Act
    await service.flush()

    # Assert
    assert before == 0
    rows = await risk_pool.fetch("SELECT intent_id FROM risk_decisions ORDER BY intent_id")
    assert [r["intent_id"] for r in rows] == ["I-1", "I-2"]


async def test_recent_decisions_when_more_are_stored_returns_the_newest_oldest_first(
    risk_pool: Any,
) -> None:
    # Arrange: stored at 1, 3 and 2 (the store's clock).
    for intent_id, ts_stored in (("I-a", 1), ("I-b", 3), ("I-c", 2)):
        await risk_pool.execute(
            "INSERT INTO risk_decisions (intent_id, account_id, client_order_id, decision_id,"
            " approved, reason, details, adjusted_quantity, side, ts_event, ts_stored)"
            " VALUES ($1, 'acc-1', 'O-' || $1, 'D-' || $1, $2, $3, $4::jsonb, $5, $6, 7, $7)",
            intent_id,
            intent_id != "I-b",
            "KILL_SWITCH_ENGAGED" if intent_id == "I-b" else None,
            '{"target": "*"}' if intent_id == "I-b" else "{}",
            None if intent_id == "I-b" else D("0.5"),
            None if intent_id == "I-b" else "BUY",
            ts_stored,
        )

    # Act
    newest = await PostgresRiskStore(risk_pool).recent_decisions(2)

    # Assert
    assert newest == [
        ((ACC, "I-c"), StoredDecision("O-I-c", "D-I-c", True, None, {}, D("0.5"), Side.BUY, 7)),
        (
            (ACC, "I-b"),
            StoredDecision(
                "O-I-b", "D-I-b", False, "KILL_SWITCH_ENGAGED", {"target": "*"}, None, None, 7
            ),
        ),
    ]


async def test_prune_when_decisions_are_older_than_the_retention_deletes_only_them(
    risk_pool: Any,
) -> None:
    # Arrange: one stored two days ago, one now.
    await risk_pool.execute(
        "INSERT INTO risk_decisions (intent_id, account_id, client_order_id, decision_id,"
        " approved, ts_event, ts_stored) VALUES ('I-old', 'acc-1', 'O-old', 'D-old', true, 1,"
        " qm_now_ns() - 2 * 86400 * 1000000000::bigint)"
    )
    await risk_pool.execute(
        "INSERT INTO risk_decisions (intent_id, account_id, client_order_id, decision_id,"
        " approved, ts_event) VALUES ('I-new', 'acc-1', 'O-new', 'D-new', true, 1)"
    )

    # Act
    pruned = await PostgresRiskStore(risk_pool).prune_decisions(86400 * S)

    # Assert
    assert pruned == 1
    assert await risk_pool.fetchval("SELECT array_agg(intent_id) FROM risk_decisions") == ["I-new"]
