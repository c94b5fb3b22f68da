"""On the real Kafka and PostgreSQL: two risk instances in one group share a schema; the
instance that takes over an account's partition judges its next intent with the stored
position."""

from __future__ import annotations

import os
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import RiskDecision, Side
from quantmesh_common.testing import stubs
from quantmesh_common.testing.kafka import KafkaMember, stage_topics, start_split, until
from quantmesh_common.topics import Topic, TopicRegistry
from quantmesh_risk.service import RiskService

from .conftest import kafka_risk

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

D = Decimal
ACC, BTC = stubs.ACCOUNT_ID, stubs.INSTRUMENT_ID


topics = stage_topics("riskassign", RiskService)


@pytest.mark.parametrize("delivery", ["transactional", "idempotent"])
async def test_intent_when_another_instance_takes_over_the_account_sees_its_stored_position(
    topics: tuple[str, TopicRegistry], risk_dsn: str, risk_pool: Any, delivery: str
) -> None:
    # Arrange: two instances start on an empty schema and split the group's partitions; the
    # fill of 0.6 goes to the one owning the account's partition (the portfolio stores it),
    # and that one leaves.
    prefix, names = topics
    bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
    intents = prefix + Topic.ORDERS_INTENTS
    partitions = names.partitions(intents)
    feed = KafkaBus("risk-assign-feed", bootstrap, registry=names)
    await feed.start()
    decisions: list[RiskDecision] = []

    def on_decision(envelope: Envelope[Any]) -> None:
        decisions.append(envelope.payload)

    watch = feed.subscribe(
        f"{prefix}watch",
        [prefix + Topic.ORDERS_APPROVED, prefix + Topic.ORDERS_REJECTED],
        on_decision,
    )
    await watch.start()
    first, second = (
        KafkaMember(
            name,
            kafka_risk(
                prefix,
                risk_dsn,
                risk_limits={"default": {"max_position": "1"}},
                order_flow_delivery=delivery,
            ),
            names,
        )
        for name in ("risk-assign-1", "risk-assign-2")
    )
    try:
        await start_split(
            (first, second), partitions, "both instances owning partitions", topic=intents
        )
        fill = stubs.execution_report(
            client_order_id="F-1", trade_id="T-1", last_qty=D("0.6"), cum_qty=D("0.6")
        )
        await feed.publish(prefix + Topic.EXEC_REPORTS, fill)
        await feed.flush()
        await until(
            lambda: any(i.service.engine.position(ACC, BTC) == D("0.6") for i in (first, second)),
            "the fill counted",
        )
        await risk_pool.execute(
            "INSERT INTO positions (account_id, instrument_id, side, quantity, ts_event)"
            " VALUES ($1, $2, 'LONG', 0.6, 1)",
            ACC,
            BTC,
        )
        await risk_pool.execute(
            "INSERT INTO portfolio_applied_fills (account_id, instrument_id, fill_id, ts_event)"
            " VALUES ($1, $2, 'T-1', 1)",
            ACC,
            BTC,
        )
        owner = first if first.service.engine.position(ACC, BTC) == D("0.6") else second
        heir = second if owner is first else first
        await owner.stop()
        await until(lambda: len(heir.assignment(topic=intents)) == partitions, "the takeover")

        # Act: 0.6 held + 0.5 bought = 1.1, beyond the max position of 1.
        intent = stubs.order_intent(
            intent_id="I-1", client_order_id="O-1", side=Side.BUY, quantity=D("0.5")
        )
        await feed.publish(intents, intent)
        await feed.flush()
        await until(lambda: len(decisions) == 1, "the decision")
    finally:
        await first.stop()
        await second.stop()
        await watch.stop()
        await feed.close()

    # Assert
    [decision] = decisions
    assert decision.reason == "POSITION_EXCEEDS_MAX"
    assert (decision.details["position"], decision.details["max_position"]) == ("0.6", "1")
    assert heir.service.reloads >= 1
