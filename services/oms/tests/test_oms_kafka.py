"""The oms on the real broker and PostgreSQL: a crash between the two commits loses nothing."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from quantmesh_common.bus.base import Emit, SubscriptionState
from quantmesh_common.bus.kafka import KafkaBus, ensure_topics
from quantmesh_common.envelope import Envelope, Event, decode
from quantmesh_common.messages import CommandType, Order, OrderCommand, OrderStatus, RiskDecision
from quantmesh_common.testing import stubs
from quantmesh_common.testing.kafka import bootstrap_or_skip, delete_topics
from quantmesh_common.topics import Topic, TopicRegistry, TopicSpec
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.service import OmsService
from quantmesh_oms.store import PostgresOrderStore

pytestmark = pytest.mark.integration

#: Test consumers notice a dead member quickly; 6 s is the broker's minimum session timeout.
CONSUMER_CONFIG = {"session.timeout.ms": 6_000, "heartbeat.interval.ms": 500}


class Crash(BaseException):
    """The process dies: raised after the database commit, before the Kafka commit."""


class Names:
    """Topic and group names unique to one test, mapped from the stage's real topics."""

    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:10]
        self.topics = {
            Topic.ORDERS_APPROVED: f"qmtest.oms.approved.{suffix}",
            Topic.ORDERS_COMMANDS: f"qmtest.oms.commands.{suffix}",
            Topic.ORDERS_UPDATES: f"qmtest.oms.updates.{suffix}",
        }
        self.group = f"qmtest.oms.group.{suffix}"
        models: dict[str, type[Event]] = {
            Topic.ORDERS_APPROVED: RiskDecision,
            Topic.ORDERS_COMMANDS: OrderCommand,
            Topic.ORDERS_UPDATES: Order,
        }
        self.registry = TopicRegistry(
            [TopicSpec(self.topics[t], models[t], "account_id", 2) for t in self.topics]
        )


@pytest.fixture
async def names() -> AsyncIterator[Names]:
    bootstrap = bootstrap_or_skip()
    created = Names()
    await asyncio.to_thread(ensure_topics, bootstrap, created.registry)
    yield created
    await asyncio.to_thread(delete_topics, bootstrap, created.registry.all_topic_names())


def _read_committed(bootstrap: str, topic: str) -> list[Envelope[Any]]:
    """Every committed record of `topic` (read_committed, from the beginning), decoded."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"qmtest.reader.{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
        }
    )
    try:
        partitions = list(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        ends = {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        out: list[Envelope[Any]] = []
        done: set[int] = set()
        deadline = time.monotonic() + 20
        while len(done) < len(ends) and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.2):
                if msg.error() is None and msg.value() is not None:
                    out.append(decode(msg.value()))  # type: ignore[arg-type]
            for p, end in ends.items():
                # The last offset may be a transaction marker, never delivered as a record.
                (pos,) = consumer.position([TopicPartition(topic, p)])
                if pos.offset >= end:
                    done.add(p)
        return out
    finally:
        consumer.close()


async def _eventually(predicate: Callable[[], bool], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.1)


class Process:
    """One oms 'process': its own service (rebuilt from the store) and Kafka bus."""

    def __init__(
        self, names: Names, pool: Any, *, crash_after_store: bool, delivery: str = "transactional"
    ) -> None:
        self.names = names
        self.settings = OmsSettings(bus="memory", http_port=0, order_flow_delivery=delivery)
        self.service = OmsService(self.settings)
        self.service.store = PostgresOrderStore(pool)
        self.crash_after_store = crash_after_store
        self.bus = KafkaBus(
            f"qmtest-oms-{uuid.uuid4().hex[:6]}",
            os.environ["QM_KAFKA_BOOTSTRAP"],
            names.registry,
            consumer_config=CONSUMER_CONFIG,
            commit_interval=600.0,
        )

    async def start(self) -> Any:
        await self.bus.start()
        await self.service.rebuild()
        subscription = self.bus.subscribe(
            self.names.group,
            [self.names.topics[Topic.ORDERS_APPROVED]],
            self._handle,
            **self.settings.order_flow_options(),
        )
        await subscription.start()
        return subscription

    async def _handle(self, envelope: Envelope[Any]) -> list[Emit]:
        emits = await self.service.handle(envelope)
        if self.crash_after_store:
            raise Crash("killed between the database commit and the Kafka commit")
        return [Emit(self.names.topics[e.topic], e.payload, e.key, e.ts_event) for e in emits]


@pytest.mark.parametrize("delivery", ["transactional", "idempotent"])
async def test_decision_when_oms_dies_between_db_and_kafka_commit_is_submitted_exactly_once(
    names: Names, oms_pool: Any, delivery: str
) -> None:
    bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
    commands_topic = names.topics[Topic.ORDERS_COMMANDS]
    first = Process(names, oms_pool, crash_after_store=True, delivery=delivery)
    crashed = await first.start()
    await first.bus.publish(names.topics[Topic.ORDERS_APPROVED], stubs.risk_decision())
    await first.bus.flush()
    await _eventually(lambda: crashed.state is SubscriptionState.FAILED)
    stored_before_restart = await oms_pool.fetchval("SELECT count(*) FROM oms_outbox")
    commands_before_restart = await asyncio.to_thread(_read_committed, bootstrap, commands_topic)
    await first.bus.close()

    second = Process(names, oms_pool, crash_after_store=False, delivery=delivery)
    await second.start()
    try:
        found: list[Envelope[Any]] = []

        async def commands_arrived() -> None:
            while not found:
                found.extend(await asyncio.to_thread(_read_committed, bootstrap, commands_topic))
                await asyncio.sleep(0.5)

        await asyncio.wait_for(commands_arrived(), 90)
        await asyncio.sleep(2)  # give a duplicate the chance to show up
        commands = await asyncio.to_thread(_read_committed, bootstrap, commands_topic)
        updates = await asyncio.to_thread(
            _read_committed, bootstrap, names.topics[Topic.ORDERS_UPDATES]
        )
    finally:
        await second.bus.close()

    assert stored_before_restart == 1
    assert commands_before_restart == []
    [command] = [e.payload for e in commands]
    assert command.command_type is CommandType.SUBMIT
    assert command.command_id == "O-1:SUBMIT"
    assert command.client_order_id == "O-1"
    [update] = [e.payload for e in updates]
    assert update.status is OrderStatus.SUBMITTED
    events = await oms_pool.fetch("SELECT event_id FROM order_events")
    assert [e["event_id"] for e in events] == ["O-1:SUBMIT"]
