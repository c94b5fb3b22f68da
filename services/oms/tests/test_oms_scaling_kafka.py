"""On the real Kafka and PostgreSQL: the account -> partition mapping the oms's timers rely on is
the producer's, and two oms instances in one group expire each GTD order once."""

from __future__ import annotations

import os
import time
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.base import Emit, RawMessage, partition_of
from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import (
    CommandType,
    ExecType,
    Order,
    OrderCommand,
    OrderStatus,
    TimeInForce,
)
from quantmesh_common.testing import stubs
from quantmesh_common.testing.kafka import (
    KafkaMember,
    kafka_settings,
    stage_topics,
    until,
    until_split,
)
from quantmesh_common.topics import Topic, TopicRegistry
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.service import OmsService

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

D = Decimal
S = stubs.SECOND_NS
ACCOUNTS = [f"acc-{n}" for n in range(1, 7)]
#: How long after the decisions the GTD orders expire: time enough for the second instance
#: to join and the group to split the partitions first (a few seconds on the local broker).
EXPIRE_AFTER_S = 30


topics = stage_topics("omsscale", OmsService)


async def test_keyed_publishes_when_on_the_broker_land_on_crc32_of_the_key(
    topics: tuple[str, TopicRegistry],
) -> None:
    # Arrange: the bus's own producer (its default config: librdkafka's default partitioner).
    prefix, names = topics
    topic = prefix + Topic.ORDERS_APPROVED
    accounts = [f"acc-{n}" for n in range(60)] + ["desk.7@fund/x+y=z", "a" * 120]
    bus = KafkaBus("oms-partitioner", os.environ["QM_KAFKA_BOOTSTRAP"], registry=names)
    await bus.start()
    landed: dict[str, int] = {}

    def on_raw(message: RawMessage) -> None:
        assert message.key is not None
        landed[message.key] = message.partition

    watch = bus.subscribe_raw(f"{prefix}partitioner", [topic], on_raw)
    await watch.start()
    try:
        # Act
        for account in accounts:
            intent = stubs.order_intent(account_id=account, client_order_id=f"O-{account}")
            await bus.publish(topic, stubs.risk_decision(intent=intent))
        await bus.flush()
        await until(lambda: len(landed) == len(accounts), "every decision consumed")
    finally:
        await watch.stop()
        await bus.close()

    # Assert: e.g. crc32("acc-1") % 6 = 5, crc32("acc-4") % 6 = 0.
    assert (landed["acc-1"], landed["acc-4"]) == (5, 0)
    assert landed == {a: partition_of(a, 6) for a in accounts}
    assert names.partitions(topic) == 6


def _oms(prefix: str, dsn: str) -> OmsService:
    """An oms on the stack's broker, on the topics (and in the groups) under `prefix`."""
    return OmsService(OmsSettings(**kafka_settings(dsn), oms_topic_prefix=prefix))


def _gtd(account_id: str, expire_time_ns: int) -> Any:
    intent = stubs.limit_order_intent(
        intent_id=f"I-{account_id}",
        client_order_id=f"G-{account_id}",
        account_id=account_id,
        time_in_force=TimeInForce.GTD,
        expire_time_ns=expire_time_ns,
    )
    return stubs.risk_decision(decision_id=f"D-{account_id}", intent=intent)


async def test_gtd_orders_when_two_instances_split_the_accounts_expire_once_each(
    topics: tuple[str, TopicRegistry], oms_dsn: str, oms_pool: Any
) -> None:
    # Arrange: a venue stand-in acknowledges every SUBMIT and answers every CANCEL with
    # CANCELED, noting which instance sent each command. The first instance alone opens a
    # GTD order in each of six accounts (partitions 5, 3, 5, 0, 0, 4); the second starts
    # (loading all six open orders) and the group splits the partitions between them.
    prefix, names = topics
    bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
    approved = prefix + Topic.ORDERS_APPROVED
    reports = prefix + Topic.EXEC_REPORTS
    venue = KafkaBus("oms-scale-venue", bootstrap, registry=names)
    await venue.start()
    commands: list[tuple[OrderCommand, str]] = []
    updates: list[Order] = []

    def on_command(envelope: Envelope[Any]) -> list[Emit]:
        command: OrderCommand = envelope.payload
        commands.append((command, envelope.source))
        if command.command_type is CommandType.QUERY:
            return []
        accepted = command.command_type is CommandType.SUBMIT
        report = stubs.order_accepted(
            report_id=f"R-{command.command_id}",
            client_order_id=command.client_order_id,
            venue_order_id=f"V-{command.client_order_id}",
            account_id=command.account_id,
            exec_type=ExecType.ACCEPTED if accepted else ExecType.CANCELED,
            order_status=OrderStatus.ACCEPTED if accepted else OrderStatus.CANCELED,
        )
        return [Emit(reports, report)]

    def on_update(envelope: Envelope[Any]) -> None:
        updates.append(envelope.payload)

    subscriptions = [
        venue.subscribe(f"{prefix}venue", [prefix + Topic.ORDERS_COMMANDS], on_command),
        venue.subscribe(f"{prefix}watch", [prefix + Topic.ORDERS_UPDATES], on_update),
    ]
    for subscription in subscriptions:
        await subscription.start()
    first = KafkaMember("oms-scale-1", _oms(prefix, oms_dsn), names)
    second = KafkaMember("oms-scale-2", _oms(prefix, oms_dsn), names)

    def statuses(status: OrderStatus) -> list[str]:
        return [o.client_order_id for o in updates if o.status is status]

    try:
        await first.runner.start()
        await until(lambda: len(first.partitions(approved)) == 6, "the first instance joined")
        expire = time.time_ns() + EXPIRE_AFTER_S * S
        for account in ACCOUNTS:
            await venue.publish(approved, _gtd(account, expire))
        await venue.flush()
        await until(lambda: len(statuses(OrderStatus.ACCEPTED)) == 6, "six orders accepted")
        await second.runner.start()
        await until_split((first, second), 6, "both instances owning partitions", topic=approved)
        split_before_expiry = time.time_ns() < expire

        # Act: the orders expire; wait for six EXPIRED, then for two more timer checks of
        # each instance (a second CANCEL would be sent by then), then for a marker command
        # on every partition (everything sent before it has been consumed).
        await until(lambda: len(statuses(OrderStatus.EXPIRED)) == 6, "six orders expired")
        runs = (first.service.timer_runs, second.service.timer_runs)
        await until(
            lambda: (
                first.service.timer_runs >= runs[0] + 2 and second.service.timer_runs >= runs[1] + 2
            ),
            "two more timer checks in each instance",
        )
        owners = {
            a: (first if partition_of(a, 6) in first.partitions(approved) else second)
            for a in ACCOUNTS
        }
        markers = {f"mark-{n}" for n in range(40)}
        marked = {partition_of(m, 6): m for m in sorted(markers)}
        assert sorted(marked) == list(range(6))
        for marker in marked.values():
            await venue.publish(
                prefix + Topic.ORDERS_COMMANDS,
                stubs.order_command(
                    command_id=f"Q-{marker}",
                    command_type=CommandType.QUERY,
                    account_id=marker,
                    client_order_id=f"Q-{marker}",
                ),
            )
        await venue.flush()
        await until(
            lambda: (
                sum(
                    c.command_type is CommandType.QUERY and c.client_order_id.startswith("Q-mark")
                    for c, _ in commands
                )
                == 6
            ),
            "the markers consumed",
        )
    finally:
        await second.stop()
        await first.stop()
        for subscription in subscriptions:
            await subscription.stop()
        await venue.close()

    # Assert: one CANCEL and one EXPIRED per order, each CANCEL from its account's owner.
    assert split_before_expiry
    cancels = sorted(
        (c.command_id, source) for c, source in commands if c.command_type is CommandType.CANCEL
    )
    assert cancels == sorted((f"G-{a}:CANCEL:EXPIRE", owners[a].name) for a in ACCOUNTS)
    assert sorted(statuses(OrderStatus.EXPIRED)) == sorted(f"G-{a}" for a in ACCOUNTS)
    assert {o.name for o in owners.values()} == {"oms-scale-1", "oms-scale-2"}
    rows = await oms_pool.fetch("SELECT status, count(*) AS n FROM orders GROUP BY status")
    assert [(r["status"], r["n"]) for r in rows] == [("EXPIRED", 6)]
