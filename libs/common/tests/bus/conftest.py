"""Bus test harness: one fixture that runs a test on the in-memory bus and on the Kafka bus."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from quantmesh_common.bus.base import Bus
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.envelope import Event
from quantmesh_common.topics import TopicRegistry, TopicSpec

NO_KAFKA = "QM_KAFKA_BOOTSTRAP is not set (start the broker: deploy/local/stack.sh up)"

#: Test consumers notice rebalances quickly; 6 s is the broker's minimum session timeout.
TEST_CONSUMER_CONFIG: dict[str, Any] = {
    "session.timeout.ms": 6_000,
    "heartbeat.interval.ms": 500,
}


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A message as stored on a topic: bytes, key and headers, without decoding."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes] = field(default_factory=dict)


@dataclass
class BusHarness:
    """A bus under test plus what a contract test needs to drive it on either implementation.

    `pump()` lets deliveries happen (the in-memory bus delivers deterministically, Kafka needs
    time); `eventually()` pumps until a condition holds; `settle()` lets anything still in
    flight arrive, to assert that nothing more does.
    """

    kind: str
    bus: Bus
    registry: TopicRegistry
    bootstrap: str | None = None
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    @property
    def is_kafka(self) -> bool:
        return self.kind == "kafka"

    async def topic(
        self, name: str, model: type[Event], key_field: str | None = "key", partitions: int = 4
    ) -> str:
        """Register a test topic unique to this test (created on Kafka with its .dlq twin)."""
        full = f"qmtest.{name}.{self.suffix}"
        self.registry.register(TopicSpec(full, model, key_field, partitions))
        if self.is_kafka:
            from quantmesh_common.bus.kafka import ensure_topics

            assert self.bootstrap is not None
            await asyncio.to_thread(ensure_topics, self.bootstrap, self.registry)
        return full

    def group(self, name: str) -> str:
        """A consumer group name unique to this test."""
        return f"qmtest.{name}.{self.suffix}"

    async def pump(self) -> int:
        """Let pending messages be delivered; returns deliveries (in-memory) or 0 (Kafka)."""
        if isinstance(self.bus, InMemoryBus):
            return await self.bus.run_until_idle()
        await asyncio.sleep(0.02)
        return 0

    async def eventually(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Pump until `predicate()` holds; fail after `timeout` (at once if in-memory is idle)."""
        deadline = time.monotonic() + timeout
        while True:
            delivered = await self.pump()
            if predicate():
                return
            if isinstance(self.bus, InMemoryBus) and delivered == 0:
                raise AssertionError("condition not met and the in-memory bus is idle")
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s")

    async def settle(self, seconds: float = 1.5) -> None:
        """Give late or duplicate deliveries the chance to show up."""
        if isinstance(self.bus, InMemoryBus):
            await self.bus.run_until_idle()
        else:
            await asyncio.sleep(seconds)

    async def raw_records(self, topic: str) -> list[RawRecord]:
        """Every committed record of `topic`, as bytes and headers, in partition/offset order."""
        if isinstance(self.bus, InMemoryBus):
            records = [
                RawRecord(
                    r.partition,
                    r.offset,
                    r.key.encode() if r.key is not None else None,
                    r.value(),
                    dict(r.headers or []),
                )
                for r in self.bus.records(topic)
            ]
        else:
            records = await asyncio.to_thread(_read_topic, self.bootstrap or "", topic)
        return sorted(records, key=lambda r: (r.partition, r.offset))

    async def eventually_records(
        self, topic: str, count: int, timeout: float = 30.0
    ) -> list[RawRecord]:
        """Wait until `topic` holds at least `count` records; return them."""
        deadline = time.monotonic() + timeout
        while True:
            await self.pump()
            records = await self.raw_records(topic)
            if len(records) >= count:
                return records
            if time.monotonic() > deadline or (
                isinstance(self.bus, InMemoryBus) and self.bus.pending() == 0
            ):
                raise AssertionError(f"{topic}: {len(records)} records, expected {count}")
            await asyncio.sleep(0.1)


def _read_topic(bootstrap: str, topic: str, timeout: float = 10.0) -> list[RawRecord]:
    """Read a whole topic with a throw-away read_committed consumer (no group commits)."""
    from confluent_kafka import Consumer, TopicPartition

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
        metadata = consumer.list_topics(topic, timeout=timeout)
        partitions = list(metadata.topics[topic].partitions)
        ends: dict[int, int] = {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        records: list[RawRecord] = []
        deadline = time.monotonic() + timeout
        done: set[int] = set()
        while len(done) < len(ends) and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.2):
                if msg.error():
                    continue
                p, off = msg.partition(), msg.offset()
                assert p is not None
                assert off is not None
                raw_headers = cast(list[tuple[str, bytes | None]], msg.headers() or [])
                headers = {k: v for k, v in raw_headers if v is not None}
                records.append(RawRecord(p, off, msg.key(), msg.value(), headers))
            for p, end in ends.items():
                # The last offset may be a transaction marker, never delivered as a record.
                (pos,) = consumer.position([TopicPartition(topic, p)])
                if pos.offset >= end:
                    done.add(p)
        return records
    finally:
        consumer.close()


def _delete_topics(bootstrap: str, names: list[str]) -> None:
    """Remove a test's topics so repeated runs do not pile them up on the shared broker."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    if names:
        admin = AdminClient({"bootstrap.servers": bootstrap})  # must outlive its futures
        for future in admin.delete_topics(names).values():
            with contextlib.suppress(KafkaException):  # e.g. a topic the test never created
                future.result()


def kafka_bootstrap_env() -> str | None:
    """The broker address (read late: the root conftest may set it while configuring)."""
    return os.environ.get("QM_KAFKA_BOOTSTRAP")


def _kafka_param() -> Any:
    return pytest.param(
        "kafka",
        marks=[
            pytest.mark.integration,
            pytest.mark.skipif(kafka_bootstrap_env() is None, reason=NO_KAFKA),
        ],
    )


@pytest.fixture(params=["memory", _kafka_param()])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[BusHarness]:
    """The bus under test, once in memory and once on the local Kafka broker."""
    registry = TopicRegistry()
    bootstrap = kafka_bootstrap_env()
    bus: Bus
    if request.param == "memory":
        bus = InMemoryBus("qmtest-svc", registry, retain=True)
    else:
        from quantmesh_common.bus.kafka import KafkaBus

        if bootstrap is None:
            pytest.skip(NO_KAFKA)
        # Periodic commits never come due in a test, so every commit the contract relies on
        # is one the bus makes on revoke, stop or crash.
        bus = KafkaBus(
            "qmtest-svc",
            bootstrap,
            registry,
            consumer_config=TEST_CONSUMER_CONFIG,
            commit_interval=600.0,
        )
    await bus.start()
    harness = BusHarness(request.param, bus, registry, bootstrap)
    try:
        yield harness
    finally:
        await bus.close()
        if bootstrap is not None and request.param == "kafka":
            await asyncio.to_thread(_delete_topics, bootstrap, registry.all_topic_names())


@pytest.fixture
def kafka_bootstrap() -> str:
    """The local broker's address; skips the test when it is not configured."""
    bootstrap = kafka_bootstrap_env()
    if bootstrap is None:
        pytest.skip(NO_KAFKA)
    return bootstrap
