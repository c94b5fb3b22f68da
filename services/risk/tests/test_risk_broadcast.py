"""Two risk instances on one in-memory bus: each judges its accounts' orders against the last
prices of every instrument, whichever half of the market-data partitions a shared group would
have given it (the market data is a broadcast subscription)."""

from __future__ import annotations

import zlib
from decimal import Decimal
from typing import Any

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.messages import OrderType, RiskDecision
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import GroupMember
from quantmesh_common.topics import Topic, registry
from quantmesh_risk.service import GROUP, MARKET_DATA_GROUP, RiskService

from .conftest import new_risk

D = Decimal
NOW = stubs.TS + 10 * stubs.SECOND_NS
BTC, ETH = "BTC-USDT.SIM", "ETH-USDT.SIM"
#: Intents partition 3 (the second member's half of 6 in a group of two).
ACC_SECOND = "acc-2"
#: Intents partition 0 (the first member's half).
ACC_FIRST = "acc-4"


def _risk() -> RiskService:
    return new_risk(risk_limits={"default": {"price_collar_bps": "100"}})


def _partition(topic: str, key: str) -> int:
    """The partition the in-memory bus gives `key` (crc32; Kafka hashes otherwise)."""
    return zlib.crc32(key.encode()) % registry().partitions(topic)


def _decision(bus: InMemoryBus, client_order_id: str) -> RiskDecision:
    found: list[RiskDecision] = [
        e.payload
        for topic in (Topic.ORDERS_APPROVED, Topic.ORDERS_REJECTED)
        for e in bus.messages(topic)
        if e.payload.intent.client_order_id == client_order_id
    ]
    assert len(found) == 1
    return found[0]


async def test_intents_when_two_instances_split_accounts_each_collars_every_instrument() -> None:
    # Arrange: two instances; in a shared group of two, BTC's market-data partition (1 of 12)
    # would go to the first and ETH's (9) to the second, while ACC_SECOND's intents go to the
    # second and ACC_FIRST's to the first: each account trades the other half's instrument.
    assert (_partition(Topic.MD_TICKS, BTC), _partition(Topic.MD_TICKS, ETH)) == (1, 9)
    assert _partition(Topic.ORDERS_INTENTS, ACC_SECOND) == 3
    assert _partition(Topic.ORDERS_INTENTS, ACC_FIRST) == 0
    clock = SimulatedClock(NOW)
    bus = InMemoryBus("test", clock=clock, retain=True)
    first = await GroupMember.join(_risk(), bus, clock)
    second = await GroupMember.join(_risk(), bus, clock)
    assert (Topic.ORDERS_INTENTS, 3) in second.subscription(GROUP).assignment()
    assert (Topic.ORDERS_INTENTS, 0) in first.subscription(GROUP).assignment()
    await bus.publish(Topic.MD_TICKS, stubs.tick(instrument_id=BTC, price=D("50000")))
    await bus.publish(Topic.MD_TICKS, stubs.tick(instrument_id=ETH, price=D("3000")))
    await bus.run_until_idle()

    # Act: ACC_SECOND buys BTC 1.2 % above its last trade; ACC_FIRST buys ETH exactly 1 % above.
    await bus.publish(
        Topic.ORDERS_INTENTS,
        stubs.order_intent(
            intent_id="I-1",
            client_order_id="O-1",
            account_id=ACC_SECOND,
            instrument_id=BTC,
            order_type=OrderType.LIMIT,
            limit_price=D("50600"),
        ),
    )
    await bus.publish(
        Topic.ORDERS_INTENTS,
        stubs.order_intent(
            intent_id="I-2",
            client_order_id="O-2",
            account_id=ACC_FIRST,
            instrument_id=ETH,
            order_type=OrderType.LIMIT,
            limit_price=D("3030"),
        ),
    )
    await bus.run_until_idle()

    # Assert: 600 / 50000 = 120 bps beyond the 100 allowed; 30 / 3000 = 100 bps, on the
    # boundary, passes. Both instances hold both prices, every market-data partition each.
    denied, approved = _decision(bus, "O-1"), _decision(bus, "O-2")
    assert (denied.approved, denied.reason) == (False, "PRICE_OUTSIDE_COLLAR")
    assert (denied.details["last_price"], denied.details["deviation_bps"]) == ("50000", "120.0000")
    assert (approved.approved, approved.reason) == (True, None)
    for instance in (first, second):
        engine = instance.service.engine
        assert (engine.last_price(BTC), engine.last_price(ETH)) == (D("50000"), D("3000"))
        assert len(instance.subscription(MARKET_DATA_GROUP).assignment()) == 24


async def test_instance_when_started_after_a_tick_has_no_price_until_the_next_one() -> None:
    # Arrange: a tick, then a second instance joins (a restart reads from the latest offsets).
    clock = SimulatedClock(NOW)
    bus = InMemoryBus("test", clock=clock, retain=True)
    first = await GroupMember.join(_risk(), bus, clock)
    await bus.publish(Topic.MD_TICKS, stubs.tick(instrument_id=BTC, price=D("50000")))
    await bus.run_until_idle()
    late = await GroupMember.join(_risk(), bus, clock)
    intent: dict[str, Any] = {
        "account_id": ACC_SECOND,
        "instrument_id": BTC,
        "order_type": OrderType.LIMIT,
        "limit_price": D("50100"),
    }

    # Act: an intent before BTC ticks again, and one after.
    await bus.publish(
        Topic.ORDERS_INTENTS, stubs.order_intent(intent_id="I-1", client_order_id="O-1", **intent)
    )
    await bus.run_until_idle()
    await bus.publish(Topic.MD_TICKS, stubs.tick(instrument_id=BTC, price=D("50050")))
    await bus.publish(
        Topic.ORDERS_INTENTS, stubs.order_intent(intent_id="I-2", client_order_id="O-2", **intent)
    )
    await bus.run_until_idle()

    # Assert: the late instance owns ACC_SECOND; it denied for want of a price, then approved.
    assert (Topic.ORDERS_INTENTS, 3) in late.subscription(GROUP).assignment()
    before, after = _decision(bus, "O-1"), _decision(bus, "O-2")
    assert (before.approved, before.reason) == (False, "NO_REFERENCE_PRICE")
    assert before.details == {"instrument_id": BTC, "needed_for": "price_collar"}
    assert (after.approved, after.reason) == (True, None)
    assert first.service.engine.last_price(BTC) == D("50050")
