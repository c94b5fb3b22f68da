"""On the real Kafka: two risk instances each read the ticks of every instrument (the market
data is a broadcast subscription, not split between the instances like the order flow)."""

from __future__ import annotations

import os
import zlib
from decimal import Decimal

import pytest

from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.testing import stubs
from quantmesh_common.testing.kafka import (
    KafkaMember,
    publish_until,
    stage_topics,
    start_split,
    until,
)
from quantmesh_common.topics import Topic, TopicRegistry
from quantmesh_risk.service import GROUP, MARKET_DATA_GROUP, RiskService

from .conftest import kafka_risk

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

D = Decimal
BASES = ("BTC", "ETH", "SOL", "XRP", "ADA", "DOGE", "LTC", "DOT", "AVAX", "LINK", "BNB", "TRX")
INSTRUMENTS = tuple(f"{base}-USDT.SIM" for base in BASES)
#: Ticked until both instances read it: "latest" is resolved at a member's first fetch.
PROBE = "PRB-USDT.SIM"
PROBE_ROUNDS = 120


topics = stage_topics("riskbcast", RiskService)


class Instance(KafkaMember[RiskService]):
    """One risk service on its own Kafka bus, in the test's groups, state in memory."""

    def price(self, instrument_id: str) -> Decimal | None:
        return self.service.engine.last_price(instrument_id)


async def test_ticks_when_two_instances_run_reach_both_for_every_instrument(
    topics: tuple[str, TopicRegistry],
) -> None:
    # Arrange: two instances split the order flow's partitions; the instruments' ticks fall on
    # partitions of both halves (crc32 % 12, librdkafka's default partitioner).
    prefix, names = topics
    bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
    ticks = prefix + Topic.MD_TICKS
    halves = {zlib.crc32(i.encode()) % names.partitions(ticks) < 6 for i in INSTRUMENTS}
    assert halves == {True, False}
    intents = prefix + Topic.ORDERS_INTENTS
    feed = KafkaBus("risk-bcast-feed", bootstrap, registry=names)
    await feed.start()
    first = Instance("risk-bcast-1", kafka_risk(prefix, None), names)
    second = Instance("risk-bcast-2", kafka_risk(prefix, None), names)
    both = (first, second)
    try:
        await start_split(
            both,
            5 * names.partitions(intents),
            "both instances owning order-flow partitions",
            group=prefix + GROUP,
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
