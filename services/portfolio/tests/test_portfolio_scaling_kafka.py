"""On the real Kafka and PostgreSQL: two portfolio instances in one group, one schema; every
instance crosses every snapshot boundary (market data is broadcast), yet each account's
snapshots come from exactly one instance, the owner of its `exec.reports` partition."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from quantmesh_common.bus.base import partition_of
from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.envelope import Envelope, decode
from quantmesh_common.messages import ExecutionReport, OrderStatus, PortfolioSnapshot, Side
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.storage.postgres import create_pool
from quantmesh_common.testing import stubs
from quantmesh_common.testing.kafka import prefixed_topics, until
from quantmesh_common.topics import Topic, TopicRegistry
from quantmesh_portfolio.config import PortfolioSettings
from quantmesh_portfolio.service import MARKET_DATA_GROUP, PortfolioService

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

D = Decimal
S = stubs.SECOND_NS
T0 = stubs.TS + 40 * S  # a minute boundary
BTC = stubs.INSTRUMENT_ID
READ_TIMEOUT_S = 60.0


@pytest.fixture
async def topics() -> AsyncIterator[tuple[str, TopicRegistry]]:
    bootstrap = os.environ.get("QM_KAFKA_BOOTSTRAP")
    if not bootstrap:
        pytest.skip("QM_KAFKA_BOOTSTRAP is not set (start the stack: deploy/local/stack.sh up)")
    async with prefixed_topics(
        bootstrap, "pfscale", (*PortfolioService.consumes, *PortfolioService.produces)
    ) as made:
        yield made


def _one_account_per_partition(partitions: int) -> dict[int, str]:
    """`acc-<n>` ids, the first found on each partition (crc32, as both buses place keys)."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < partitions:
        account_id = f"acc-{n}"
        found.setdefault(partition_of(account_id, partitions), account_id)
        n += 1
    return found


def _buy(account_id: str) -> ExecutionReport:
    report: ExecutionReport = stubs.execution_report(
        account_id=account_id,
        report_id=f"R-{account_id}",
        client_order_id=f"O-{account_id}",
        trade_id=f"T-{account_id}",
        side=Side.BUY,
        last_qty=D(1),
        last_price=D(50000),
        cum_qty=D(1),
        avg_price=D(50000),
        fee=D(0),
        order_status=OrderStatus.FILLED,
        ts_event=T0 + 1 * S,
    )
    return report


class Instance:
    """One portfolio service on its own Kafka bus (its name is the envelopes' source)."""

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
            snapshot_interval_s=60,
            portfolio_topic_prefix=prefix,
            order_flow_delivery=delivery,
        )
        self.name = name
        self.prefix = prefix
        self.service = PortfolioService(settings)
        self.bus = KafkaBus(name, bootstrap, registry=names)
        self.runner = ServiceRunner(self.service, settings, bus=self.bus)

    def assignment(self, group: str, topic: str | None = None) -> list[tuple[str, int]]:
        ctx = self.runner.ctx
        if ctx is None:
            return []
        return [
            (t, p)
            for s in ctx.subscriptions
            if s.group == self.prefix + group
            for t, p in s.assignment()
            if topic in (None, t)
        ]

    async def stop(self) -> None:
        await self.runner.stop()
        await self.bus.close()


def _read_to_end(bootstrap: str, topic: str, partitions: int) -> list[Envelope[Any]]:
    """Every committed record of `topic`, from the beginning to the ends it has now."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{topic}.reader",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=30)[1] for tp in tps}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        out: list[Envelope[Any]] = []
        deadline = time.monotonic() + READ_TIMEOUT_S
        while True:
            positions = {tp.partition: tp.offset for tp in consumer.position(tps)}
            if all(positions[p] >= end for p, end in ends.items() if end > 0):
                return out
            assert time.monotonic() < deadline, f"timed out reading {topic} to its end"
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            value = msg.value()
            assert value is not None
            out.append(decode(value))
    finally:
        consumer.close()


@pytest.mark.parametrize("delivery", ["transactional", "idempotent"])
async def test_snapshots_when_two_instances_split_accounts_come_from_the_owner_only(
    topics: tuple[str, TopicRegistry], portfolio_dsn: str, delivery: str
) -> None:
    # Arrange: one account per partition of exec.reports, each long 1 BTC at 50000, applied
    # by the first instance before the second joins and the two split the group.
    prefix, names = topics
    bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
    reports = prefix + Topic.EXEC_REPORTS
    snapshots_topic = prefix + Topic.PORTFOLIO_SNAPSHOTS
    count = names.partitions(reports)
    accounts = _one_account_per_partition(count)
    in_group = sum(names.partitions(prefix + t) for t in PortfolioService.subscribed)
    feed = KafkaBus("pf-scale-feed", bootstrap, registry=names)
    await feed.start()
    seen: list[Envelope[Any]] = []
    positions = 0

    def on_output(envelope: Envelope[Any]) -> None:
        nonlocal positions
        if isinstance(envelope.payload, PortfolioSnapshot):
            seen.append(envelope)
        else:
            positions += 1

    watch = feed.subscribe(
        f"{prefix}watch", [prefix + Topic.PORTFOLIO_UPDATES, snapshots_topic], on_output
    )
    await watch.start()
    first = Instance("pf-scale-1", prefix, names, portfolio_dsn, delivery)
    second = Instance("pf-scale-2", prefix, names, portfolio_dsn, delivery)
    both = (first, second)
    group = PortfolioService.name
    owner_of: dict[int, str] = {}
    try:
        # The first instance alone applies every fill and stores it; then the second joins
        # and takes half of the partitions, with no fill of them to come. Both hold every
        # account then (the second loaded the store at its start).
        await first.runner.start()
        await until(lambda: len(first.assignment(group)) == in_group, "the first owning all")
        for account_id in accounts.values():
            await feed.publish(reports, _buy(account_id))
        await feed.flush()
        await until(lambda: positions == count, "every account's position")
        await second.runner.start()
        await until(
            lambda: (
                all(i.assignment(group) for i in both)
                and sum(len(i.assignment(group)) for i in both) == in_group
            ),
            "both instances owning partitions of the group",
        )
        await until(
            lambda: all(len(i.assignment(MARKET_DATA_GROUP)) == 24 for i in both),
            "each instance assigned every market-data partition",
        )
        owner_of = {p: i.name for i in both for _, p in i.assignment(group, reports)}

        # Act: a tick at 52000 within the minute, then one in each of the next two minutes.
        ticks = prefix + Topic.MD_TICKS
        for second_ in (2, 61, 121):
            await feed.publish(
                ticks, stubs.tick(instrument_id=BTC, price=D(52000), ts_event=T0 + second_ * S)
            )
        await feed.flush()
        await until(
            lambda: (
                {(e.payload.account_id, e.payload.ts_event) for e in seen}
                == {(a, T0 + m * S) for a in accounts.values() for m in (60, 120)}
            ),
            "both boundaries' snapshots of every account",
        )
    finally:
        for instance in both:
            await instance.stop()
        await watch.stop()
        await feed.close()

    # Assert: everything either instance produced is on the topic now (both stopped): one
    # snapshot per account and boundary, from the instance owning the account's partition,
    # equity 100000 + (52000 - 50000) x 1.
    records = _read_to_end(bootstrap, snapshots_topic, names.partitions(snapshots_topic))
    per_boundary = Counter((e.payload.account_id, e.payload.ts_event) for e in records)
    assert per_boundary == {(a, T0 + m * S): 1 for a in accounts.values() for m in (60, 120)}
    sources = {(e.payload.account_id, e.source) for e in records}
    assert sources == {(a, owner_of[p]) for p, a in accounts.items()}
    assert set(owner_of.values()) == {first.name, second.name}
    assert {e.payload.equity for e in records} == {D(102000)}
    pool = await create_pool(portfolio_dsn, 1, 2, timeout_s=10)
    try:
        async with pool.acquire() as conn:
            stored = await conn.fetch(
                "SELECT account_id, ts_event, count(*) AS n FROM equity_snapshots"
                " GROUP BY account_id, ts_event"
            )
    finally:
        await pool.close()
    assert {(r["account_id"], r["ts_event"]): r["n"] for r in stored} == per_boundary
