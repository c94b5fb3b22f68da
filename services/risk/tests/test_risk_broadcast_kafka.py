"""On the real Kafka: two risk instances each read the ticks of every instrument (the market
data is a broadcast subscription, not split between the instances like the order flow)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from quantmesh_common.testing.harness import MARKS, mark_every_instance
from quantmesh_common.testing.kafka import KafkaMember, stage_topics
from quantmesh_common.topics import Topic, TopicRegistry
from quantmesh_risk.service import GROUP, MARKET_DATA_GROUP, RiskService

from .conftest import kafka_risk

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


topics = stage_topics("riskbcast", RiskService)


class Instance(KafkaMember[RiskService]):
    """One risk service on its own Kafka bus, in the test's groups, state in memory."""

    def price(self, instrument_id: str) -> Decimal | None:
        return self.service.engine.last_price(instrument_id)


async def test_ticks_when_two_instances_run_reach_both_for_every_instrument(
    topics: tuple[str, TopicRegistry],
) -> None:
    # Arrange: two instances split the order flow's partitions (by account, not by instrument).
    prefix, names = topics
    both = (
        Instance("risk-bcast-1", kafka_risk(prefix, None), names),
        Instance("risk-bcast-2", kafka_risk(prefix, None), names),
    )
    intents = prefix + Topic.ORDERS_INTENTS

    # Act: one tick per instrument of MARKS, at its mark, on partitions of both halves.
    await mark_every_instance(
        both,
        Instance.price,
        topics,
        group=prefix + GROUP,
        total=5 * names.partitions(intents),
        what="both instances owning order-flow partitions",
        broadcast=prefix + MARKET_DATA_GROUP,
        partitions=24,
        feed="risk-bcast-feed",
    )

    # Assert
    for instance in both:
        assert {x: instance.price(x) for x in MARKS} == MARKS
