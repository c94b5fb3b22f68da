"""On the real Kafka and PostgreSQL: two portfolio instances in one group share a schema; the
instance that takes over an account's partition applies the next fill to the stored book."""

from __future__ import annotations

import os
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import Position, Side
from quantmesh_common.testing import stubs
from quantmesh_common.testing.kafka import stage_topics, start_split, until
from quantmesh_common.testing.postgres import pool_on
from quantmesh_common.topics import Topic, TopicRegistry
from quantmesh_portfolio.service import PortfolioService

from .conftest import KafkaPortfolio, kafka_portfolio, whole_fill

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

D = Decimal
ACC = stubs.ACCOUNT_ID


topics = stage_topics("pfassign", PortfolioService)


@pytest.mark.parametrize("delivery", ["transactional", "idempotent"])
async def test_sell_when_another_instance_takes_over_the_account_is_flat(
    topics: tuple[str, TopicRegistry], portfolio_dsn: str, delivery: str
) -> None:
    # Arrange: two instances start on an empty schema and split the group's partitions; the
    # BUY 2 goes to the one owning the account's partition, which then leaves.
    prefix, names = topics
    bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
    reports = prefix + Topic.EXEC_REPORTS
    partitions = names.partitions(reports)
    # Every partition of every topic of the group is owned by one of the two.
    everything = sum(names.partitions(prefix + t) for t in PortfolioService.subscribed)
    group = prefix + PortfolioService.name
    feed = KafkaBus("pf-assign-feed", bootstrap, registry=names)
    await feed.start()
    positions: list[Position] = []

    def on_position(envelope: Envelope[Any]) -> None:
        positions.append(envelope.payload)

    watch = feed.subscribe(f"{prefix}watch", [prefix + Topic.PORTFOLIO_UPDATES], on_position)
    await watch.start()
    first = KafkaPortfolio(
        "pf-assign-1", kafka_portfolio(prefix, portfolio_dsn, order_flow_delivery=delivery), names
    )
    second = KafkaPortfolio(
        "pf-assign-2", kafka_portfolio(prefix, portfolio_dsn, order_flow_delivery=delivery), names
    )
    try:
        await start_split(
            (first, second), everything, "both instances owning partitions", group=group
        )
        await feed.publish(reports, whole_fill("T-1", Side.BUY, "2", "50000", 1))
        await feed.flush()
        await until(lambda: len(positions) == 1, "the BUY's position")
        owner, heir = (first, second) if first.holds(ACC) else (second, first)
        assert owner.holds(ACC)
        assert not heir.holds(ACC)
        await owner.stop()
        await until(lambda: len(heir.assignment(group, reports)) == partitions, "the takeover")

        # Act
        await feed.publish(reports, whole_fill("T-2", Side.SELL, "2", "51000", 2))
        await feed.flush()
        await until(lambda: len(positions) == 2, "the SELL's position")
    finally:
        await first.stop()
        await second.stop()
        await watch.stop()
        await feed.close()

    # Assert: flat, not -2; realised (51000 - 50000) x 2 = 2000; stored flat with no lot.
    assert [(p.quantity, p.realized_pnl) for p in positions] == [(D(2), D(0)), (D(0), D(2000))]
    async with pool_on(portfolio_dsn, 2) as pool, pool.acquire() as conn:
        stored = await conn.fetchrow(
            "SELECT quantity, realized_pnl FROM positions WHERE account_id = $1", ACC
        )
        lots = await conn.fetchval("SELECT count(*) FROM portfolio_lots WHERE account_id = $1", ACC)
    assert (stored["quantity"], stored["realized_pnl"], lots) == (D(0), D(2000), 0)
    assert heir.service.reloads >= 1
