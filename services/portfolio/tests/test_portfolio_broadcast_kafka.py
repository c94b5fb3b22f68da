"""On the real Kafka: two portfolio instances each read the ticks of every instrument (the
market data is a broadcast subscription; the fills stay split between them by account)."""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.testing import stubs
from quantmesh_common.testing.kafka import prefixed_topics, until
from quantmesh_common.topics import Topic, TopicRegistry
from quantmesh_portfolio.config import PortfolioSettings
from quantmesh_portfolio.service import MARKET_DATA_GROUP, PortfolioService

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

D = Decimal
BASES = ("BTC", "ETH", "SOL", "XRP", "ADA", "DOGE", "LTC", "DOT", "AVAX", "LINK", "BNB", "TRX")
INSTRUMENTS = tuple(f"{base}-USDT.SIM" for base in BASES)
#: Ticked until both instances read it: "latest" is resolved at a member's first fetch.
PROBE = "PRB-USDT.SIM"
PROBE_ROUNDS = 120


@pytest.fixture
async def topics() -> AsyncIterator[tuple[str, TopicRegistry]]:
    bootstrap = os.environ.get("QM_KAFKA_BOOTSTRAP")
    if not bootstrap:
        pytest.skip("QM_KAFKA_BOOTSTRAP is not set (start the stack: deploy/local/stack.sh up)")
    async with prefixed_topics(
        bootstrap, "pfbcast", (*PortfolioService.consumes, *PortfolioService.produces)
    ) as made:
        yield made


class Instance:
    """One portfolio service on its own Kafka bus, in the test's groups, state in memory."""

    def __init__(self, name: str, prefix: str, names: TopicRegistry) -> None:
        settings = PortfolioSettings(
            bus="kafka",
            kafka_bootstrap=os.environ["QM_KAFKA_BOOTSTRAP"],
            database_url=None,
            http_host="127.0.0.1",
            http_port=0,
            starting_cash={"USDT": "100000"},
            portfolio_topic_prefix=prefix,
        )
        self.prefix = prefix
        self.service = PortfolioService(settings)
        self.bus = KafkaBus(name, settings.kafka_bootstrap or "", registry=names)
        self.runner = ServiceRunner(self.service, settings, bus=self.bus)

    def assignment(self, group: str) -> list[tuple[str, int]]:
        ctx = self.runner.ctx
        if ctx is None:
            return []
        return [
            tp for s in ctx.subscriptions if s.group == self.prefix + group for tp in s.assignment()
        ]

    def price(self, instrument_id: str) -> Decimal | None:
        """The instrument's last mark, as the portfolio converts its base into its quote."""
        handlers = self.service.handlers
        if handlers is None:
            return None
        base, quote = instrument_id.split(".")[0].split("-")
        return handlers.portfolio.rate(base, quote)

    async def stop(self) -> None:
        await self.runner.stop()
        await self.bus.close()


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
    first = Instance("pf-bcast-1", prefix, names)
    second = Instance("pf-bcast-2", prefix, names)
    both = (first, second)
    group = PortfolioService.name
    try:
        await first.runner.start()
        await second.runner.start()
        await until(
            lambda: (
                all(i.assignment(group) for i in both)
                and len(first.assignment(group)) + len(second.assignment(group)) == in_group
            ),
            "both instances owning partitions of the group",
        )
        await until(
            lambda: all(len(i.assignment(MARKET_DATA_GROUP)) == 24 for i in both),
            "each instance assigned every market-data partition",
        )
        for n in range(PROBE_ROUNDS):
            await feed.publish(ticks, stubs.tick(instrument_id=PROBE, price=D(n + 1)))
            await feed.flush()
            with contextlib.suppress(AssertionError):
                await until(lambda: all(i.price(PROBE) is not None for i in both), "probe", 0.5)
                break
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
