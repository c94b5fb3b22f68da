"""On the real Kafka: risk reads the venue's instrument rules from `ref.instruments` at start and
decides with them; a malformed instrument is dead-lettered."""

from __future__ import annotations

import json
import os
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.base import RawMessage
from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.envelope import Envelope, encode
from quantmesh_common.messages import RiskDecision, Side
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.testing import stubs
from quantmesh_common.testing.kafka import publish_until, stage_topics, until
from quantmesh_common.topics import Topic, TopicRegistry, dlq
from quantmesh_risk.service import RiskService

from .conftest import kafka_risk

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

D = Decimal
#: The venue's rules: tick 0.5, lot 0.001, min notional 10.
VENUE = stubs.instrument(
    tick_size=D("0.5"), lot_size=D("0.001"), min_notional=D("10"), min_quantity=D("0.001")
)


topics = stage_topics("riskref", RiskService)


def _malformed_instrument() -> bytes:
    """An Instrument whose lot size is negative: it decodes as JSON, not as the model."""
    envelope = Envelope.wrap(VENUE, source="test", ts_event=stubs.TS, ts_init=stubs.TS)
    document = json.loads(encode(envelope))
    document["payload"]["lot_size"] = "-0.001"
    return json.dumps(document).encode()


async def test_risk_when_the_venue_published_rules_before_it_started_decides_with_them(
    topics: tuple[str, TopicRegistry],
) -> None:
    # Arrange: the venue's rules (and two bad records) sit on the compacted topic before risk
    # starts, as marketdata left them.
    prefix, names = topics
    bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
    feed = KafkaBus("risk-ref-test", bootstrap, registry=names)
    await feed.start()
    instruments = prefix + Topic.REF_INSTRUMENTS
    await feed.publish_raw(instruments, _malformed_instrument(), key=stubs.INSTRUMENT_ID)
    await feed.publish(instruments, stubs.tick(), key=stubs.INSTRUMENT_ID)
    await feed.publish(instruments, VENUE)
    await feed.flush()
    decisions: list[RiskDecision] = []
    dead: list[RawMessage] = []

    def on_decision(envelope: Envelope[Any]) -> None:
        decisions.append(envelope.payload)

    def on_dead(message: RawMessage) -> None:
        dead.append(message)

    watch = [
        feed.subscribe(
            f"{prefix}watch",
            [prefix + Topic.ORDERS_REJECTED, prefix + Topic.ORDERS_APPROVED],
            on_decision,
        ),
        feed.subscribe_raw(f"{prefix}watch.dlq", [dlq(instruments)], on_dead),
    ]
    for subscription in watch:
        await subscription.start()
    # State in memory: the shared database holds other runs' rows (their stored decisions on
    # the same intent ids, in idempotent delivery), and no rule comes from it.
    service = kafka_risk(prefix, None)
    risk_bus = KafkaBus("risk-ref-risk", bootstrap, registry=names)
    runner = ServiceRunner(service, service.settings, bus=risk_bus)
    await runner.start()
    try:
        await until(lambda: stubs.INSTRUMENT_ID in service.engine.instruments, "the rules")
        # Market data is read from the latest offsets once risk's member first fetches (a
        # broadcast subscription): tick until it has read one.
        await publish_until(
            feed,
            prefix + Topic.MD_TICKS,
            lambda _: stubs.tick(price=D("50000")),
            lambda: stubs.INSTRUMENT_ID in service.engine.last_trade,
        )
        await until(lambda: stubs.INSTRUMENT_ID in service.engine.last_trade, "the tick", 0.1)

        # Act: one intent off the lot, one off the tick, one worth too little.
        intents = [
            stubs.order_intent(intent_id="I-lot", client_order_id="C-lot", quantity=D("0.0005")),
            stubs.limit_order_intent(
                intent_id="I-tick", client_order_id="C-tick", limit_price=D("49000.25")
            ),
            stubs.limit_order_intent(
                intent_id="I-notional",
                client_order_id="C-notional",
                side=Side.SELL,
                quantity=D("0.001"),
                limit_price=D("9000.5"),
            ),
        ]
        for intent in intents:
            await feed.publish(prefix + Topic.ORDERS_INTENTS, intent)
        await feed.flush()
        await until(lambda: len(decisions) == len(intents), "three decisions")
        await until(lambda: len(dead) == 2, "two dead letters")
    finally:
        await runner.stop()
        for subscription in watch:
            await subscription.stop()
        await risk_bus.close()
        await feed.close()

    # Assert
    found = {d.intent.intent_id: (d.approved, d.reason, d.details) for d in decisions}
    assert found == {
        "I-lot": (False, "QUANTITY_BELOW_LOT", {"quantity": "0.0005", "lot_size": "0.001"}),
        "I-tick": (
            False,
            "PRICE_NOT_ON_TICK",
            {"field": "limit_price", "price": "49000.25", "tick_size": "0.5"},
        ),
        # 0.001 x 9000.5 = 9.0005 < 10
        "I-notional": (
            False,
            "NOTIONAL_BELOW_MIN",
            {"notional": "9.0005", "min_notional": "10"},
        ),
    }
    assert service.engine.instruments[stubs.INSTRUMENT_ID] == VENUE
