"""A broadcast member on Kafka: a restarted instance resumes, a new one starts at the end."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from quantmesh_common.bus.kafka import KafkaBus, ensure_topics
from quantmesh_common.envelope import Envelope
from quantmesh_common.testing.kafka import until
from quantmesh_common.topics import TopicRegistry, TopicSpec

from .conftest import _delete_topics
from .test_contract import Ping

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
async def topic(kafka_bootstrap: str) -> AsyncIterator[tuple[str, TopicRegistry]]:
    name = f"qmtest.bcastresume.{uuid.uuid4().hex[:10]}"
    registry = TopicRegistry([TopicSpec(name, Ping, "key", 4)])
    await asyncio.to_thread(ensure_topics, kafka_bootstrap, registry)
    try:
        yield name, registry
    finally:
        await asyncio.to_thread(_delete_topics, kafka_bootstrap, registry.all_topic_names())


class Member:
    """One process's broadcast member: its own bus, as a service instance has."""

    def __init__(self, bootstrap: str, registry: TopicRegistry, topic: str, instance: str) -> None:
        self.bus = KafkaBus("qmtest-bcast", bootstrap, registry, instance=instance)
        self.topic = topic
        self.seqs: list[int] = []

    def handle(self, envelope: Envelope[Any]) -> None:
        self.seqs.append(envelope.payload.seq)

    async def start(self, group: str) -> None:
        await self.bus.start()
        await self.bus.subscribe(group, [self.topic], self.handle, broadcast=True).start()

    async def stop(self) -> None:
        await self.bus.close()


async def test_broadcast_member_when_its_instance_restarts_resumes_and_a_new_one_starts_at_end(
    kafka_bootstrap: str, topic: tuple[str, TopicRegistry]
) -> None:
    # Arrange: instance "a" reads 0-9 and stops (a graceful stop commits where it is).
    name, registry = topic
    group = f"qmtest.bcastresume.{uuid.uuid4().hex[:6]}"
    publisher = KafkaBus("qmtest-pub", kafka_bootstrap, registry)
    await publisher.start()

    async def publish(seqs: range) -> None:
        for seq in seqs:
            await publisher.publish(name, Ping(key=f"k{seq % 8}", seq=seq))
        await publisher.flush()

    first = Member(kafka_bootstrap, registry, name, instance="a")
    await first.start(group)
    await publish(range(10))
    await until(lambda: len(first.seqs) == 10, "a read 0-9")
    await first.stop()

    # Act: 10-14 are published while "a" is down; then "a" restarts and a new "b" starts.
    await publish(range(10, 15))
    again = Member(kafka_bootstrap, registry, name, instance="a")
    newcomer = Member(kafka_bootstrap, registry, name, instance="b")
    await again.start(group)
    await newcomer.start(group)
    await publish(range(15, 20))
    await until(lambda: len(again.seqs) >= 10 and len(newcomer.seqs) >= 5, "both read")
    await asyncio.sleep(1.0)  # room for a wrong redelivery to show up
    await again.stop()
    await newcomer.stop()
    await publisher.close()

    # Assert: the restarted instance read what it missed and what followed, once each; the
    # new one only what was published after it started.
    assert sorted(again.seqs) == list(range(10, 20))
    assert sorted(newcomer.seqs) == list(range(15, 20))


async def test_broadcast_member_when_restarted_before_reading_anything_resumes_from_its_start(
    kafka_bootstrap: str, topic: tuple[str, TopicRegistry]
) -> None:
    # Arrange: instance "a" starts and is gone before a message is published (killed before
    # it read anything: no offset of its own committed after its start's).
    name, registry = topic
    group = f"qmtest.bcastfirst.{uuid.uuid4().hex[:6]}"
    publisher = KafkaBus("qmtest-pub", kafka_bootstrap, registry)
    await publisher.start()
    first = Member(kafka_bootstrap, registry, name, instance="a")
    await first.start(group)
    await first.stop()

    # Act: 0-7 are published while it is down; then it restarts.
    for seq in range(8):
        await publisher.publish(name, Ping(key=f"k{seq}", seq=seq))
    await publisher.flush()
    again = Member(kafka_bootstrap, registry, name, instance="a")
    await again.start(group)
    await until(lambda: len(again.seqs) >= 8, "the restarted instance read 0-7")
    await again.stop()
    await publisher.close()

    # Assert: it read what was published after its first start, once each.
    assert sorted(again.seqs) == list(range(8))


async def test_broadcast_member_when_the_bus_lets_fetches_wait_reads_a_trickle_in_few_batches(
    kafka_bootstrap: str, topic: tuple[str, TopicRegistry]
) -> None:
    # Arrange: the broker may hold a broadcast member's fetch for 300 ms to fill it; a group
    # member of the same bus (no wait) reads the same topic beside it.
    name, registry = topic
    token = uuid.uuid4().hex[:6]
    bus = KafkaBus("qmtest-bcast", kafka_bootstrap, registry, instance="w", broadcast_wait_ms=300)
    seen: dict[str, list[int]] = {"broadcast": [], "group": []}
    batches = {"broadcast": 0, "group": 0}

    def reader(kind: str) -> tuple[Any, Any]:
        def handle(envelope: Envelope[Any]) -> None:
            seen[kind].append(envelope.payload.seq)

        async def on_batch() -> None:
            batches[kind] += 1

        return handle, on_batch

    await bus.start()
    handle, on_batch = reader("broadcast")
    wide = bus.subscribe(
        f"qmtest.bcastwait.{token}", [name], handle, on_batch=on_batch, broadcast=True
    )
    handle, on_batch = reader("group")
    narrow = bus.subscribe(f"qmtest.groupwait.{token}", [name], handle, on_batch=on_batch)
    await wide.start()
    await narrow.start()
    await until(lambda: bool(narrow.assignment()), "the group member is assigned")
    publisher = KafkaBus("qmtest-pub", kafka_bootstrap, registry)
    await publisher.start()

    # Act: 20 messages, 10 ms apart.
    for seq in range(20):
        await publisher.publish(name, Ping(key=f"k{seq % 8}", seq=seq))
        await publisher.flush()
        await asyncio.sleep(0.01)
    await until(lambda: len(seen["broadcast"]) == 20 and len(seen["group"]) == 20, "all read")
    await publisher.close()
    await bus.close()

    # Assert: everything arrived, the broadcast member's in a few batches (a fetch waits up to
    # 300 ms for the trickle of ~200 ms); only broadcast members wait.
    assert sorted(seen["broadcast"]) == list(range(20))
    assert batches["broadcast"] <= 4
    assert wide._consumer_config["fetch.wait.max.ms"] == 300
    assert "fetch.wait.max.ms" not in narrow._consumer_config
