"""On the real Kafka and PostgreSQL: two portfolio instances in one group share a schema; the
instance that takes over an account's partition applies the next fill to the stored book."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import ExecutionReport, OrderStatus, Position, Side
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.storage.postgres import create_pool
from quantmesh_common.testing import stubs
from quantmesh_common.testing.kafka import prefixed_topics, until
from quantmesh_common.topics import Topic, TopicRegistry
from quantmesh_portfolio.config import PortfolioSettings
from quantmesh_portfolio.service import PortfolioService

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

D = Decimal
S = stubs.SECOND_NS
T0 = stubs.TS + 40 * S  # a minute boundary: no snapshot within the test's minute
ACC = stubs.ACCOUNT_ID


@pytest.fixture
async def topics() -> AsyncIterator[tuple[str, TopicRegistry]]:
    bootstrap = os.environ.get("QM_KAFKA_BOOTSTRAP")
    if not bootstrap:
        pytest.skip("QM_KAFKA_BOOTSTRAP is not set (start the stack: deploy/local/stack.sh up)")
    async with prefixed_topics(
        bootstrap, "pfassign", (*PortfolioService.consumes, *PortfolioService.produces)
    ) as made:
        yield made


def _fill(trade_id: str, side: Side, qty: str, price: str, second: int) -> ExecutionReport:
    return stubs.execution_report(
        report_id=f"R-{trade_id}",
        client_order_id=f"O-{trade_id}",
        trade_id=trade_id,
        side=side,
        last_qty=D(qty),
        last_price=D(price),
        cum_qty=D(qty),
        avg_price=D(price),
        fee=D(0),
        order_status=OrderStatus.FILLED,
        ts_event=T0 + second * S,
    )


class Instance:
    """One portfolio service on its own Kafka bus, in the test's group, on the test's schema."""

    def __init__(
        self, name: str, prefix: str, names: TopicRegistry, dsn: str, delivery: str
    ) -> None:
        bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
        settings = PortfolioSettings(
            bus="kafka",
            kafka_bootstrap=bootstrap,
            database_url=dsn,
            http_host="127.0.0.1",
            http_port=0,
            starting_cash={"USDT": "100000"},
            portfolio_topic_prefix=prefix,
            order_flow_delivery=delivery,
        )
        self.service = PortfolioService(settings)
        self.bus = KafkaBus(name, bootstrap, registry=names)
        self.runner = ServiceRunner(self.service, settings, bus=self.bus)
        self.stopped = False

    def assignment(self, topic: str | None = None) -> list[tuple[str, int]]:
        """What this instance owns in the group `portfolio` (its market data is broadcast)."""
        ctx = self.runner.ctx
        if ctx is None or self.stopped:
            return []
        group = self.service.settings.portfolio_topic_prefix + PortfolioService.name
        return [
            (t, p)
            for s in ctx.subscriptions
            if s.group == group
            for t, p in s.assignment()
            if topic in (None, t)
        ]

    def holds(self, account_id: str) -> bool:
        handlers = self.service.handlers
        return handlers is not None and account_id in handlers.portfolio.accounts

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.runner.stop()
            await self.bus.close()


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
    feed = KafkaBus("pf-assign-feed", bootstrap, registry=names)
    await feed.start()
    positions: list[Position] = []

    def on_position(envelope: Envelope[Any]) -> None:
        positions.append(envelope.payload)

    watch = feed.subscribe(f"{prefix}watch", [prefix + Topic.PORTFOLIO_UPDATES], on_position)
    await watch.start()
    first = Instance("pf-assign-1", prefix, names, portfolio_dsn, delivery)
    second = Instance("pf-assign-2", prefix, names, portfolio_dsn, delivery)
    try:
        await first.runner.start()
        await second.runner.start()
        await until(
            lambda: (
                bool(first.assignment())
                and bool(second.assignment())
                and len(first.assignment()) + len(second.assignment()) == everything
            ),
            "both instances owning partitions",
        )
        await feed.publish(reports, _fill("T-1", Side.BUY, "2", "50000", 1))
        await feed.flush()
        await until(lambda: len(positions) == 1, "the BUY's position")
        owner, heir = (first, second) if first.holds(ACC) else (second, first)
        assert owner.holds(ACC)
        assert not heir.holds(ACC)
        await owner.stop()
        await until(lambda: len(heir.assignment(reports)) == partitions, "the takeover")

        # Act
        await feed.publish(reports, _fill("T-2", Side.SELL, "2", "51000", 2))
        await feed.flush()
        await until(lambda: len(positions) == 2, "the SELL's position")
    finally:
        await first.stop()
        await second.stop()
        await watch.stop()
        await feed.close()

    # Assert: flat, not -2; realised (51000 - 50000) x 2 = 2000; stored flat with no lot.
    assert [(p.quantity, p.realized_pnl) for p in positions] == [(D(2), D(0)), (D(0), D(2000))]
    pool = await create_pool(portfolio_dsn, 1, 2, timeout_s=10)
    try:
        async with pool.acquire() as conn:
            stored = await conn.fetchrow(
                "SELECT quantity, realized_pnl FROM positions WHERE account_id = $1", ACC
            )
            lots = await conn.fetchval(
                "SELECT count(*) FROM portfolio_lots WHERE account_id = $1", ACC
            )
    finally:
        await pool.close()
    assert (stored["quantity"], stored["realized_pnl"], lots) == (D(0), D(2000), 0)
    assert heir.service.reloads >= 1
