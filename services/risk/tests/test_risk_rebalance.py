"""Two risk members in one group on the in-memory bus, sharing one PostgreSQL schema: a member
assigned an account's partition after its start judges the account's intents with the state
the store holds, not with the state it loaded at its own start."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.messages import RiskDecision, Side
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import GroupMember, deliver
from quantmesh_common.topics import Topic
from quantmesh_risk.service import RiskService

from .conftest import new_risk

pytestmark = pytest.mark.integration

D = Decimal
T0 = stubs.TS
ACC, BTC = stubs.ACCOUNT_ID, stubs.INSTRUMENT_ID


def _risk(keep_ids: int | None = None, **limits: str) -> RiskService:
    """Max position 1 (and `limits`) an account; `keep_ids` fill keys remembered."""
    return new_risk(
        risk_limits={"default": {"max_position": "1", **limits}}, risk_keep_ids=keep_ids
    )


async def _store_position(pool: Any, quantity: str, *fill_ids: str) -> None:
    """What the portfolio stores once it applied the fills (risk reads, never writes, these);
    the fills at times 1, 2, ..."""
    await pool.execute(
        "INSERT INTO positions (account_id, instrument_id, side, quantity, ts_event)"
        " VALUES ($1, $2, 'LONG', $3, 1)",
        ACC,
        BTC,
        D(quantity),
    )
    for ts, fill_id in enumerate(fill_ids, start=1):
        await pool.execute(
            "INSERT INTO portfolio_applied_fills (account_id, instrument_id, fill_id, ts_event)"
            " VALUES ($1, $2, $3, $4)",
            ACC,
            BTC,
            fill_id,
            ts,
        )


def _decision(bus: InMemoryBus, client_order_id: str) -> RiskDecision:
    decisions = [
        e.payload
        for topic in (Topic.ORDERS_APPROVED, Topic.ORDERS_REJECTED)
        for e in bus.messages(topic)
    ]
    found: RiskDecision = next(d for d in decisions if d.intent.client_order_id == client_order_id)
    return found


async def test_intent_when_its_account_moves_to_a_member_started_before_a_fill_sees_its_position(
    risk_pool: Any,
) -> None:
    # Arrange: both members start on an empty store; the account's fill of 0.6 reaches the one
    # owning its partition (and the portfolio stores it); that one leaves, so the other, which
    # loaded no position at its start, gets the account.
    clock = SimulatedClock(T0)
    bus = InMemoryBus("test", clock=clock, retain=True)
    first = await GroupMember.join(_risk(), bus, clock, risk_pool)
    second = await GroupMember.join(_risk(), bus, clock, risk_pool)
    fill = stubs.execution_report(
        client_order_id="F-1", trade_id="T-1", side=Side.BUY, last_qty=D("0.6"), cum_qty=D("0.6")
    )
    await deliver(bus, Topic.EXEC_REPORTS, fill)
    await _store_position(risk_pool, "0.6", "T-1")
    holders = [m for m in (first, second) if m.service.engine.position(ACC, BTC) == D("0.6")]
    assert len(holders) == 1
    owner = holders[0]
    heir = second if owner is first else first
    await owner.leave()
    reloads_before = heir.service.reloads

    # Act: 0.6 held + 0.5 bought = 1.1, beyond the max position of 1.
    intent = stubs.order_intent(
        intent_id="I-1", client_order_id="O-1", side=Side.BUY, quantity=D("0.5")
    )
    await deliver(bus, Topic.ORDERS_INTENTS, intent)

    # Assert
    decision = _decision(bus, "O-1")
    assert decision.approved is False
    assert decision.reason == "POSITION_EXCEEDS_MAX"
    assert (decision.details["position"], decision.details["max_position"]) == ("0.6", "1")
    assert heir.service.reloads == reloads_before + 1


async def test_reload_when_the_oms_table_lags_keeps_prices_and_finished_orders_from_memory(
    risk_pool: Any,
) -> None:
    # Arrange: the OMS stored W-1 open (BUY 0.5); risk sees a trade at 50000 and W-1's fill of
    # 0.5, which the portfolio stores while the OMS has not yet stored W-1 finished.
    await risk_pool.execute(
        "INSERT INTO orders (client_order_id, account_id, strategy_id, instrument_id, venue,"
        " side, order_type, quantity, filled_quantity, avg_fill_price, limit_price, status,"
        " ts_init, ts_last) VALUES ('W-1', $1, 'strat-1', $2, 'SIM', 'BUY',"
        " 'LIMIT', 0.5, 0, NULL, 50000, 'ACCEPTED', 1, 1)",
        ACC,
        BTC,
    )
    clock = SimulatedClock(T0)
    bus = InMemoryBus("test", clock=clock, retain=True)
    member = await GroupMember.join(_risk(price_collar_bps="100"), bus, clock, risk_pool)
    await deliver(bus, Topic.MD_TICKS, stubs.tick(price=D("50000")))
    fill = stubs.execution_report(
        client_order_id="W-1", trade_id="T-9", last_qty=D("0.5"), cum_qty=D("0.5")
    )
    await deliver(bus, Topic.EXEC_REPORTS, fill)
    await _store_position(risk_pool, "0.5", "T-9")
    reloads_before = member.service.reloads

    # Act
    await member.service.reload([(Topic.ORDERS_INTENTS, 0)])
    intent = stubs.limit_order_intent(
        intent_id="I-2", client_order_id="O-2", quantity=D("0.5"), limit_price=D("50000")
    )
    await deliver(bus, Topic.ORDERS_INTENTS, intent)

    # Assert: the collar has its last price; 0.5 held + 0.5 bought = 1, at the max position
    # (W-1 counted as still working would make it 1.5).
    decision = _decision(bus, "O-2")
    assert (decision.approved, decision.reason) == (True, None)
    assert member.service.reloads == reloads_before + 1
    assert member.service.engine.position(ACC, BTC) == D("0.5")


async def test_reload_when_the_portfolio_and_the_oms_lag_carries_unstored_fills_and_approvals(
    risk_pool: Any,
) -> None:
    # Arrange: risk counts fills T-0 (0.1, which the portfolio stored) and T-1 (0.6, not yet
    # stored), and approves O-1 (BUY 0.2, which the OMS has not stored yet).
    clock = SimulatedClock(T0)
    bus = InMemoryBus("test", clock=clock, retain=True)
    member = await GroupMember.join(_risk(), bus, clock, risk_pool)
    for trade_id, qty in (("T-0", "0.1"), ("T-1", "0.6")):
        fill = stubs.execution_report(
            client_order_id=f"F-{trade_id}", trade_id=trade_id, last_qty=D(qty), cum_qty=D(qty)
        )
        await deliver(bus, Topic.EXEC_REPORTS, fill)
    await _store_position(risk_pool, "0.1", "T-0")
    approval = stubs.order_intent(
        intent_id="I-1", client_order_id="O-1", side=Side.BUY, quantity=D("0.2")
    )
    await deliver(bus, Topic.ORDERS_INTENTS, approval)
    assert _decision(bus, "O-1").approved is True

    # Act
    await member.service.reload([(Topic.ORDERS_INTENTS, 0)])
    intent = stubs.order_intent(
        intent_id="I-2", client_order_id="O-2", side=Side.BUY, quantity=D("0.2")
    )
    await deliver(bus, Topic.ORDERS_INTENTS, intent)

    # Assert: 0.1 stored + 0.6 unstored = 0.7 held (T-0 once), 0.2 of O-1 working; + 0.2 = 1.1.
    decision = _decision(bus, "O-2")
    assert decision.reason == "POSITION_EXCEEDS_MAX"
    assert (decision.details["position"], decision.details["open_quantity"]) == ("0.7", "0.2")


async def test_reload_when_stored_fills_are_beyond_the_loaded_newest_does_not_count_them_twice(
    risk_pool: Any,
) -> None:
    # Arrange: risk remembers 2 fill keys (trimmed past 4); it counts T-a, T-b and T-c (0.1
    # each), which the portfolio stored, so a reload loads the newest 2 (T-b, T-c) only.
    clock = SimulatedClock(T0)
    bus = InMemoryBus("test", clock=clock, retain=True)
    member = await GroupMember.join(_risk(keep_ids=2), bus, clock, risk_pool)
    for trade_id in ("T-a", "T-b", "T-c"):
        fill = stubs.execution_report(
            client_order_id=f"F-{trade_id}", trade_id=trade_id, last_qty=D("0.1"), cum_qty=D("0.1")
        )
        await deliver(bus, Topic.EXEC_REPORTS, fill)
    await _store_position(risk_pool, "0.3", "T-a", "T-b", "T-c")

    # Act
    await member.service.reload([(Topic.ORDERS_INTENTS, 0)])
    intent = stubs.order_intent(
        intent_id="I-1", client_order_id="O-1", side=Side.BUY, quantity=D("0.8")
    )
    await deliver(bus, Topic.ORDERS_INTENTS, intent)

    # Assert: 0.3 held (T-a is in it, not on top of it) + 0.8 = 1.1.
    decision = _decision(bus, "O-1")
    assert decision.reason == "POSITION_EXCEEDS_MAX"
    assert decision.details["position"] == "0.3"
