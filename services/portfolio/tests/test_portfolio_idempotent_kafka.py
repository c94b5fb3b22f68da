"""On the real Kafka and PostgreSQL, idempotent order-flow delivery: a portfolio whose batch was
stored but whose output never went out (killed in between) is restarted and gets the batch's
messages again; it publishes their positions and changes nothing in the store."""

from __future__ import annotations

import os
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import Position, Side
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.testing.kafka import stage_topics, until
from quantmesh_common.topics import Topic, TopicRegistry
from quantmesh_portfolio.config import PortfolioSettings
from quantmesh_portfolio.service import PortfolioService

from .conftest import T0, whole_fill

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

D = Decimal
ACC = stubs.ACCOUNT_ID


topics = stage_topics("pfidem", PortfolioService)


FILLS = [
    whole_fill("T-1", Side.BUY, "2", "50000", 1, fee="1"),
    whole_fill("T-2", Side.SELL, "0.5", "51000", 2, fee="1"),
]


def _settings(**kwargs: Any) -> PortfolioSettings:
    return PortfolioSettings(
        http_host="127.0.0.1",
        http_port=0,
        starting_cash={"USDT": "100000"},
        order_flow_delivery="idempotent",
        **kwargs,
    )


async def _stored(pool: Any) -> list[tuple[Any, ...]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT f.fill_id, f.event_id, p.quantity, p.realized_pnl, p.version"
            " FROM portfolio_applied_fills f JOIN positions p USING (account_id, instrument_id)"
            " ORDER BY f.fill_id"
        )
    return [tuple(r) for r in rows]


async def test_batch_when_stored_but_never_published_is_published_by_the_restarted_instance(
    topics: tuple[str, TopicRegistry], portfolio_dsn: str, portfolio_pool: Any
) -> None:
    # Arrange: the killed instance stored the batch of two fills (its output went nowhere);
    # their messages are still uncommitted on exec.reports, after a copy of the BUY that
    # execution re-sent under another envelope.
    prefix, names = topics
    bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
    killed = StageHarness(PortfolioService(_settings(bus="memory")), now_ns=T0, pg=portfolio_pool)
    await killed.start()
    messages = await killed.send(Topic.EXEC_REPORTS, *FILLS)
    lost: list[Position] = killed.payloads(Topic.PORTFOLIO_UPDATES)
    stored = await _stored(portfolio_pool)
    feed = KafkaBus("pf-idem-feed", bootstrap, registry=names)
    await feed.start()
    positions: list[Envelope[Any]] = []
    watch = feed.subscribe(f"{prefix}watch", [prefix + Topic.PORTFOLIO_UPDATES], positions.append)
    await watch.start()
    reports = prefix + Topic.EXEC_REPORTS
    await feed.publish(reports, FILLS[0])
    for envelope in messages:
        await feed.publish_envelope(reports, envelope)
    await feed.flush()
    settings = _settings(
        bus="kafka",
        kafka_bootstrap=bootstrap,
        database_url=portfolio_dsn,
        portfolio_topic_prefix=prefix,
    )
    bus = KafkaBus("pf-idem-restarted", bootstrap, registry=names)
    restarted = ServiceRunner(PortfolioService(settings), settings, bus=bus)

    # Act
    await restarted.start()
    try:
        await until(lambda: len(positions) >= 2, "the batch's positions")
    finally:
        await restarted.stop()
        await bus.close()
        await watch.stop()
        await feed.close()

    # Assert: the two positions the killed instance never published, as it computed them
    # (2 @ 50000 with fee 1; then 1.5 left, 0.5 x 1000 - fees 2 = 498 realised), each
    # answering its own message; the copy answered nothing; the store as it was.
    assert [e.payload for e in positions] == lost
    assert [(p.quantity, p.realized_pnl) for p in lost] == [(D(2), D(-1)), (D("1.5"), D(498))]
    assert [e.causation_id for e in positions] == [m.event_id for m in messages]
    assert await _stored(portfolio_pool) == stored
    assert [(row[0], row[1]) for row in stored] == [
        ("T-1", messages[0].event_id),
        ("T-2", messages[1].event_id),
    ]
