"""What the Kafka bus writes on the wire: no identity headers, the old headers still read."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any, cast

import pytest

from quantmesh_common.bus.base import (
    H_CORRELATION_ID,
    H_ERROR_TYPE,
    H_EVENT_ID,
    H_SCHEMA,
    H_SCHEMA_VERSION,
    H_SOURCE,
)
from quantmesh_common.bus.kafka import KafkaBus, ensure_topics
from quantmesh_common.envelope import Envelope, Event, encode, schemas
from quantmesh_common.topics import TopicRegistry, TopicSpec, dlq

from .conftest import TEST_CONSUMER_CONFIG, _delete_topics, _read_topic, kafka_bootstrap_env


@schemas.register
class Chirp(Event):
    """A keyed test event."""

    SCHEMA_NAME = "qmtest.wire.chirp"
    key: str
    seq: int


_created: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _drop_created_topics() -> Iterator[None]:
    yield
    bootstrap = kafka_bootstrap_env()
    if bootstrap is not None and _created:
        _delete_topics(bootstrap, sorted({*_created, *(dlq(t) for t in _created)}))


async def _bus_with_topic(bootstrap: str) -> tuple[KafkaBus, str, str]:
    suffix = uuid.uuid4().hex[:10]
    topic, group = f"qmtest.wire.{suffix}", f"qmtest.wire.group.{suffix}"
    _created.append(topic)
    registry = TopicRegistry([TopicSpec(topic, Chirp, "key", 1)])
    await asyncio.to_thread(ensure_topics, bootstrap, registry)
    bus = KafkaBus("qmtest-wire", bootstrap, registry, consumer_config=TEST_CONSUMER_CONFIG)
    await bus.start()
    return bus, topic, group


async def _eventually(predicate: Any, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)


async def _eventually_dead_letter(bootstrap: str, topic: str, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(_read_topic, bootstrap, dlq(topic), 2.0):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no dead letter on {dlq(topic)} within {timeout}s")
        await asyncio.sleep(0.2)


@pytest.mark.integration
async def test_publish_when_no_trace_context_writes_no_headers_and_name_leads_json(
    kafka_bootstrap: str,
) -> None:
    # Arrange
    bus, topic, _group = await _bus_with_topic(kafka_bootstrap)

    # Act
    try:
        sent = await bus.publish(topic, Chirp(key="k", seq=1))
        await bus.flush()
    finally:
        await bus.close()
    (record,) = await asyncio.to_thread(_read_topic, kafka_bootstrap, topic)

    # Assert
    assert record.headers == {}
    assert record.key == b"k"
    assert record.value is not None
    assert record.value.startswith(b'{"schema_name":"qmtest.wire.chirp","schema_version":1,')
    body = json.loads(record.value)
    assert body["event_id"] == sent.event_id
    assert body["source"] == "qmtest-wire"
    assert body["payload"] == {"key": "k", "seq": 1}


@pytest.mark.integration
async def test_consume_when_message_has_old_identity_headers_decodes_and_handles_it(
    kafka_bootstrap: str,
) -> None:
    # Arrange: what earlier versions of the bus wrote, five headers first
    bus, topic, group = await _bus_with_topic(kafka_bootstrap)
    envelope = bus.wrap(Chirp(key="k", seq=7))
    old_headers = [
        (H_SCHEMA, b"qmtest.wire.chirp"),
        (H_SCHEMA_VERSION, b"1"),
        (H_EVENT_ID, envelope.event_id.encode()),
        (H_CORRELATION_ID, envelope.correlation_id.encode()),
        (H_SOURCE, b"qmtest-wire"),
    ]
    got: list[Envelope[Any]] = []
    await bus.subscribe(group, [topic], got.append).start()

    # Act
    try:
        await bus.publish_raw(topic, encode(envelope), key="k", headers=old_headers)
        await bus.flush()
        await _eventually(lambda: len(got) == 1)
    finally:
        await bus.close()

    # Assert
    assert got == [envelope]


@pytest.mark.integration
async def test_dead_letter_when_handler_fails_carries_the_envelope_identity_as_headers(
    kafka_bootstrap: str,
) -> None:
    # Arrange
    bus, topic, group = await _bus_with_topic(kafka_bootstrap)

    def fails(envelope: Envelope[Any]) -> None:
        raise ValueError("no")

    await bus.subscribe(group, [topic], fails).start()

    # Act
    try:
        sent = await bus.publish(topic, Chirp(key="k", seq=3))
        await bus.flush()
        await _eventually_dead_letter(kafka_bootstrap, topic)
    finally:
        await bus.close()
    (letter,) = await asyncio.to_thread(_read_topic, kafka_bootstrap, dlq(topic))

    # Assert
    assert letter.headers[H_SCHEMA] == b"qmtest.wire.chirp"
    assert letter.headers[H_SCHEMA_VERSION] == b"1"
    assert letter.headers[H_EVENT_ID] == sent.event_id.encode()
    assert letter.headers[H_CORRELATION_ID] == sent.correlation_id.encode()
    assert letter.headers[H_SOURCE] == b"qmtest-wire"
    assert letter.headers[H_ERROR_TYPE] == b"handler"
    assert letter.value == encode(sent)


@pytest.mark.integration
async def test_dead_letter_when_message_had_old_headers_keeps_them_without_a_second_copy(
    kafka_bootstrap: str,
) -> None:
    # Arrange
    bus, topic, group = await _bus_with_topic(kafka_bootstrap)
    envelope = bus.wrap(Chirp(key="k", seq=4))

    def fails(envelope: Envelope[Any]) -> None:
        raise ValueError("no")

    await bus.subscribe(group, [topic], fails).start()

    # Act
    try:
        await bus.publish_raw(
            topic, encode(envelope), key="k", headers=[(H_SCHEMA, b"qmtest.wire.chirp")]
        )
        await bus.flush()
        await _eventually_dead_letter(kafka_bootstrap, topic)
    finally:
        await bus.close()
    consumer_side = await asyncio.to_thread(_raw_header_names, kafka_bootstrap, dlq(topic))

    # Assert
    assert consumer_side.count(H_SCHEMA) == 1
    assert H_EVENT_ID not in consumer_side
    assert consumer_side[0] == H_SCHEMA


def _raw_header_names(bootstrap: str, topic: str) -> list[str]:
    """The header names of the only record of `topic`, in order, duplicates kept."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"qmtest.reader.{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        msg = consumer.poll(10.0)
        assert msg is not None
        assert msg.error() is None
        headers = cast(list[tuple[str, bytes]], msg.headers() or [])
        return [name for name, _ in headers]
    finally:
        consumer.close()
