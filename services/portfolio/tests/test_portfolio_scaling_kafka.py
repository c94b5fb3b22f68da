"""On the real Kafka and PostgreSQL: two portfolio instances in one group, one schema; every
instance crosses every snapshot boundary (market data is broadcast), yet each account's
snapshots come from exactly one instance, the owner of its `exec.reports` partition."""

from __future__ import annotations

import os
import time
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from quantmesh_common.bus.base import partition_of
from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.envelope import Envelope, decode
from quantmesh_common.messages import PortfolioSnapshot
from quantmesh_common.testing import stubs
from quantmesh_common.testing.kafka import stage_topics, until, until_split
from quantmesh_common.testing.postgres import pool_on
from quantmesh_common.topics import Topic, TopicRegistry
from quantmesh_portfolio.service import MARKET_DATA_GROUP, PortfolioService

from .conftest import T0, KafkaPortfolio, account_buy, kafka_portfolio

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

D = Decimal
S = stubs.SECOND_NS
BTC = stubs.INSTRUMENT_ID
READ_TIMEOUT_S = 60.0


topics = stage_topics("pfscale", PortfolioService)


def _one_account_per_partition(partitions: int) -> dict[int, str]:
    """`acc-<n>` ids, the first found on each partition (crc32, as both buses place keys)."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < partitions:
        account_id = f"acc-{n}"
        found.setdefault(partition_of(account_id, partitions), account_id)
        n += 1
    return found


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
    first, second = (
        KafkaPortfolio(
            name,
            kafka_portfolio(
                prefix, portfolio_dsn, snapshot_interval_s=60, order_flow_delivery=delivery
            ),
            names,
        )
        for name in ("pf-scale-1", "pf-scale-2")
    )
    both = (first, second)
    group = prefix + PortfolioService.name
    owner_of: dict[int, str] = {}
    try:
        # The first instance alone applies every fill and stores it; then the second joins
        # and takes half of the partitions, with no fill of them to come. Both hold every
        # account then (the second loaded the store at its start).
        await first.runner.start()
        await until(lambda: len(first.assignment(group)) == in_group, "the first owning all")
        for account_id in accounts.values():
            await feed.publish(reports, account_buy(account_id, "1", "50000", 1))
        await feed.flush()
        await until(lambda: positions == count, "every account's position")
        await second.runner.start()
        await until_split(
            both, in_group, "both instances owning partitions of the group", group=group
        )
        await until(
            lambda: all(len(i.assignment(prefix + MARKET_DATA_GROUP)) == 24 for i in both),
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
    async with pool_on(portfolio_dsn, 2) as pool, pool.acquire() as conn:
        stored = await conn.fetch(
            "SELECT account_id, ts_event, count(*) AS n FROM equity_snapshots"
            " GROUP BY account_id, ts_event"
        )
    assert {(r["account_id"], r["ts_event"]): r["n"] for r in stored} == per_boundary
