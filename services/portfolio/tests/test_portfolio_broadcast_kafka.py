"""On the real Kafka: two portfolio instances each read the ticks of every instrument (the
market data is a broadcast subscription; the fills stay split between them by account)."""

from __future__ import annotations

import os
import zlib
from decimal import Decimal

import pytest

from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.testing import stubs
from quantmesh_common.testing.kafka import publish_until, stage_topics, start_split, until
from quantmesh_common.topics import Topic, TopicRegistry
from quantmesh_portfolio.service import MARKET_DATA_GROUP, PortfolioService

from .conftest import KafkaPortfolio, kafka_portfolio

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

D = Decimal
BASES = ("BTC", "ETH", "SOL", "XRP", "ADA", "DOGE", "LTC", "DOT", "AVAX", "LINK", "BNB", "TRX")
INSTRUMENTS = tuple(f"{base}-USDT.SIM" for base in BASES)
#: Ticked until both instances read it: "latest" is resolved at a member's first fetch.
PROBE = "PRB-USDT.SIM"
PROBE_ROUNDS = 120


topics = stage_topics("pfbcast", PortfolioService)


async def test_ticks_when_two_instances_run_reach_both_for_every_instrument(
    topics: tuple[str, TopicRegistry],
) -> None:
    # Arrange: two instances split the group's partitions; the instruments' ticks fall on
    # partitions of both halves (crc32 % 12, librdkafka's default partitioner).
    prefix, names = topics
    bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
    ticks = prefix + Topic.MD_TICKS
    halves = {zlib.crc32(i.encode()) % names.partitions(ticks) < 6 for i in INSTRUMENTS}
    assert halves == {True, False}
    in_group = sum(names.partitions(prefix + t) for t in PortfolioService.subscribed)
    feed = KafkaBus("pf-bcast-feed", bootstrap, registry=names)
    await feed.start()
    first = KafkaPortfolio("pf-bcast-1", kafka_portfolio(prefix, None), names)
    second = KafkaPortfolio("pf-bcast-2", kafka_portfolio(prefix, None), names)
    both = (first, second)
    try:
        await start_split(
            both,
            in_group,
            "both instances owning partitions of the group",
            group=prefix + PortfolioService.name,
        )
        await until(
            lambda: all(len(i.assignment(prefix + MARKET_DATA_GROUP)) == 24 for i in both),
            "each instance assigned every market-data partition",
        )
        await publish_until(
            feed,
            ticks,
            lambda n: stubs.tick(instrument_id=PROBE, price=D(n + 1)),
            lambda: all(i.price(PROBE) is not None for i in both),
            PROBE_ROUNDS,
        )
        assert all(i.price(PROBE) is not None for i in both), "an instance never read a tick"

        # Act: one tick per instrument, priced 101, 102, ...
        for n, instrument_id in enumerate(INSTRUMENTS, start=101):
            await feed.publish(ticks, stubs.tick(instrument_id=instrument_id, price=D(n)))
        await feed.flush()
        await until(
            lambda: all(i.price(x) is not None for i in both for x in INSTRUMENTS),
            "every tick in both instances",
        )
    finally:
        for instance in both:
            await instance.stop()
        await feed.close()

    # Assert
    expected = {x: D(n) for n, x in enumerate(INSTRUMENTS, start=101)}
    for instance in both:
        assert {x: instance.price(x) for x in INSTRUMENTS} == expected
