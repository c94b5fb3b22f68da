"""On the real Kafka: two portfolio instances each read the ticks of every instrument (the
market data is a broadcast subscription; the fills stay split between them by account)."""

from __future__ import annotations

import pytest

from quantmesh_common.testing.harness import MARKS, mark_every_instance
from quantmesh_common.testing.kafka import stage_topics
from quantmesh_common.topics import TopicRegistry
from quantmesh_portfolio.service import MARKET_DATA_GROUP, PortfolioService

from .conftest import KafkaPortfolio, kafka_portfolio

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


topics = stage_topics("pfbcast", PortfolioService)


async def test_ticks_when_two_instances_run_reach_both_for_every_instrument(
    topics: tuple[str, TopicRegistry],
) -> None:
    # Arrange: two instances split the group's partitions (by account, not by instrument).
    prefix, names = topics
    both = (
        KafkaPortfolio("pf-bcast-1", kafka_portfolio(prefix, None), names),
        KafkaPortfolio("pf-bcast-2", kafka_portfolio(prefix, None), names),
    )
    in_group = sum(names.partitions(prefix + t) for t in PortfolioService.subscribed)

    # Act: one tick per instrument of MARKS, at its mark, on partitions of both halves.
    await mark_every_instance(
        both,
        KafkaPortfolio.price,
        topics,
        group=prefix + PortfolioService.name,
        total=in_group,
        what="both instances owning partitions of the group",
        broadcast=prefix + MARKET_DATA_GROUP,
        partitions=24,
        feed="pf-bcast-feed",
    )

    # Assert
    for instance in both:
        assert {x: instance.price(x) for x in MARKS} == MARKS
