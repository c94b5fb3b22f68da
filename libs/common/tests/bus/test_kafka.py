"""Kafka-only bus behaviour: process crashes, trace propagation, delivery failures, topic set-up."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from quantmesh_common.bus.base import Emit, SubscriptionState
from quantmesh_common.bus.kafka import BusDeliveryError, KafkaBus, ensure_topics
from quantmesh_common.envelope import Envelope, Event, schemas
from quantmesh_common.topics import TopicRegistry, TopicSpec, dlq

from .conftest import (
    TEST_CONSUMER_CONFIG,
    RawRecord,
    _delete_topics,
    _read_topic,
    kafka_bootstrap_env,
)

CHILD = Path(__file__).with_name("kafka_child.py")


@schemas.register
class Tock(Event):
    """A keyed test event (kafka_child.py defines the same schema)."""

    SCHEMA_NAME = "qmtest.kafka.tock"
    key: str
    seq: int


#: Topics this module created, deleted when it is done.
_created: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _drop_created_topics() -> Iterator[None]:
    yield
    bootstrap = kafka_bootstrap_env()
    if bootstrap is not None and _created:
        _delete_topics(bootstrap, sorted({*_created, *(dlq(t) for t in _created)}))


def _names() -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:10]
    _created.append(f"qmtest.kafka.{suffix}")
    return f"qmtest.kafka.{suffix}", f"qmtest.kafka.group.{suffix}"


async def _bus_with_topic(
    bootstrap: str, partitions: int = 1, **kwargs: Any
) -> tuple[KafkaBus, str, str]:
    topic, group = _names()
    registry = TopicRegistry([TopicSpec(topic, Tock, "key", partitions)])
    await asyncio.to_thread(ensure_topics, bootstrap, registry)
    bus = KafkaBus(
        "qmtest-kafka", bootstrap, registry, consumer_config=TEST_CONSUMER_CONFIG, **kwargs
    )
    await bus.start()
    return bus, topic, group


async def _eventually(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)


def _committed(bootstrap: str, group: str, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        (tp,) = consumer.committed([TopicPartition(topic, 0)], timeout=10)
        return max(tp.offset, 0)  # -1001: nothing committed yet
    finally:
        consumer.close()


@pytest.mark.integration
async def test_consumer_process_when_sigkilled_mid_batch_uncommitted_messages_are_redelivered(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    # Arrange
    bus, topic, group = await _bus_with_topic(kafka_bootstrap)
    for seq in range(40):
        await bus.publish(topic, Tock(key="k", seq=seq))
    await bus.flush()
    out = tmp_path / "child.txt"
    out.touch()
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), kafka_bootstrap, topic, group, str(out)
    )
    try:
        await _eventually(lambda: len(out.read_text().split()) >= 5, timeout=60)

        # Act
        child.send_signal(signal.SIGKILL)
        await asyncio.wait_for(child.wait(), timeout=10)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    handled_by_child = [int(x) for x in out.read_text().split()]
    committed = await asyncio.to_thread(_committed, kafka_bootstrap, group, topic)
    got: list[int] = []

    def record(envelope: Envelope[Any]) -> None:
        got.append(envelope.payload.seq)

    await bus.subscribe(group, [topic], record).start()
    try:
        await _eventually(lambda: got[-1:] == [39], timeout=60)
    finally:
        await bus.close()

    # Assert
    uncommitted_by_child = {s for s in handled_by_child if s >= committed}
    assert child.returncode == -signal.SIGKILL
    assert uncommitted_by_child, "the child should die with handled but uncommitted messages"
    assert got == list(range(committed, 40))
    assert uncommitted_by_child <= set(got)


@pytest.mark.integration
async def test_publish_when_inside_a_span_consumer_span_continues_the_trace(
    kafka_bootstrap: str,
) -> None:
    # Arrange
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    bus, topic, group = await _bus_with_topic(kafka_bootstrap)
    seen_trace_ids: list[int] = []

    def handler(envelope: Envelope[Any]) -> None:
        seen_trace_ids.append(trace.get_current_span().get_span_context().trace_id)

    await bus.subscribe(group, [topic], handler).start()

    # Act
    with provider.get_tracer("qmtest").start_as_current_span("place order") as parent:
        sent = await bus.publish(topic, Tock(key="k", seq=1))
    trace_id = parent.get_span_context().trace_id
    await bus.flush()
    try:
        await _eventually(lambda: len(seen_trace_ids) == 1, timeout=30)
    finally:
        await bus.close()
    (record,) = await asyncio.to_thread(_read_topic, kafka_bootstrap, topic)

    # Assert
    traceparent = record.headers["traceparent"].decode()
    assert traceparent.split("-")[1] == f"{trace_id:032x}"
    assert seen_trace_ids == [trace_id]
    consumer_spans = [
        s
        for s in exporter.get_finished_spans()
        if s.kind is SpanKind.CONSUMER
        and (s.attributes or {}).get("messaging.destination.name") == topic
    ]
    assert len(consumer_spans) == 1
    span = consumer_spans[0]
    attributes = span.attributes or {}
    assert span.context.trace_id == trace_id
    assert span.parent is not None
    assert span.parent.span_id == parent.get_span_context().span_id
    assert attributes["messaging.system"] == "kafka"
    assert attributes["messaging.consumer.group.name"] == group
    assert attributes["messaging.message.id"] == sent.event_id


async def test_flush_when_broker_unreachable_raises_delivery_error() -> None:
    # Arrange
    bus = KafkaBus(
        "qmtest-kafka",
        "127.0.0.1:1",
        TopicRegistry(),
        producer_config={"message.timeout.ms": 300, "log_level": 0},
    )
    await bus.start()
    await bus.publish("qmtest.nowhere", Tock(key="k", seq=1))

    # Act
    with pytest.raises(BusDeliveryError) as caught:
        await bus.flush(timeout=10)

    # Assert
    assert len(caught.value.errors) == 1
    await bus.flush(timeout=1)  # errors are reported once, then forgotten
    await bus.close()


@pytest.mark.integration
async def test_publish_when_local_queue_is_full_waits_and_drops_nothing(
    kafka_bootstrap: str,
) -> None:
    # Arrange
    bus, topic, _ = await _bus_with_topic(
        kafka_bootstrap, producer_config={"queue.buffering.max.messages": 5}
    )

    # Act
    for seq in range(300):
        await bus.publish(topic, Tock(key="k", seq=seq))
    await bus.close()
    records: list[RawRecord] = await asyncio.to_thread(_read_topic, kafka_bootstrap, topic)

    # Assert
    assert len(records) == 300


@pytest.mark.integration
async def test_dead_letter_topic_when_its_message_fails_skips_instead_of_looping(
    kafka_bootstrap: str,
) -> None:
    # Arrange
    bus, topic, group = await _bus_with_topic(kafka_bootstrap)
    handled: list[int] = []

    def handler(envelope: Envelope[Any]) -> None:
        handled.append(envelope.payload.seq)

    sub = bus.subscribe(group, [dlq(topic)], handler)
    await sub.start()

    # Act
    await bus.publish_raw(dlq(topic), b"not json", key="k")
    await bus.publish(dlq(topic), Tock(key="k", seq=7))
    await bus.flush()
    try:
        await _eventually(lambda: handled == [7], timeout=30)
        await asyncio.sleep(1.0)
        records = await asyncio.to_thread(_read_topic, kafka_bootstrap, dlq(topic))
    finally:
        await bus.close()

    # Assert
    assert len(records) == 2
    assert sub.state is SubscriptionState.STOPPED


@pytest.mark.integration
def test_ensure_topics_when_run_twice_creates_topic_and_dlq_twin_once(kafka_bootstrap: str) -> None:
    # Arrange
    topic, _ = _names()
    registry = TopicRegistry([TopicSpec(topic, Tock, "key", 3)])

    # Act
    first = ensure_topics(kafka_bootstrap, registry)
    second = ensure_topics(kafka_bootstrap, registry)

    # Assert
    assert first == sorted([topic, dlq(topic)])
    assert second == []
    metadata = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10)
    assert len(metadata.topics[topic].partitions) == 3
    assert len(metadata.topics[dlq(topic)].partitions) == 3


@pytest.mark.integration
async def test_subscription_when_commit_interval_passes_commits_without_stopping(
    kafka_bootstrap: str,
) -> None:
    # Arrange
    bus, topic, group = await _bus_with_topic(kafka_bootstrap, commit_interval=0.2)
    seen: list[int] = []

    def handler(envelope: Envelope[Any]) -> None:
        seen.append(envelope.payload.seq)

    sub = bus.subscribe(group, [topic], handler)
    await sub.start()

    # Act
    for seq in range(25):
        await bus.publish(topic, Tock(key="k", seq=seq))
    await bus.flush()
    try:
        await _eventually(lambda: len(seen) == 25, timeout=30)
        await _eventually(lambda: _committed(kafka_bootstrap, group, topic) == 25, timeout=10)

        # Assert
        assert sub.state is SubscriptionState.RUNNING
    finally:
        await bus.close()


@pytest.mark.integration
async def test_subscription_when_output_is_not_acknowledged_fails_without_committing(
    kafka_bootstrap: str,
) -> None:
    # Arrange
    bus, topic, group = await _bus_with_topic(
        kafka_bootstrap, producer_config={"message.timeout.ms": 1_000}, commit_interval=0.0
    )
    nowhere = f"qmtest.kafka.missing.{uuid.uuid4().hex}"  # never created; no auto-creation

    def forward(envelope: Envelope[Any]) -> list[Emit]:
        return [Emit(nowhere, envelope.payload)]

    sub = bus.subscribe(group, [topic], forward)
    await sub.start()

    # Act
    await bus.publish(topic, Tock(key="k", seq=1))
    await bus.flush()
    try:
        await _eventually(lambda: sub.state is SubscriptionState.FAILED, timeout=30)
    finally:
        await bus.close()

    # Assert
    assert isinstance(sub.error, BusDeliveryError)
    assert await asyncio.to_thread(_committed, kafka_bootstrap, group, topic) == 0


@pytest.mark.integration
async def test_consumer_lag_when_group_has_caught_up_is_exported_as_zero(
    kafka_bootstrap: str,
) -> None:
    # Arrange: statistics every 200 ms instead of 5 s, so the gauge refreshes within the test.
    from quantmesh_common.bus.kafka import METRICS

    bus, topic, group = await _bus_with_topic(kafka_bootstrap, commit_interval=0.2)
    bus.consumer_config["statistics.interval.ms"] = 200
    seen: list[int] = []
    sub = bus.subscribe(group, [topic], lambda envelope: seen.append(envelope.payload.seq))
    key = ("qmtest-kafka", group, topic, 0)

    # Act
    for seq in range(25):
        await bus.publish(topic, Tock(key="k", seq=seq))
    await bus.flush()
    await sub.start()
    try:
        await _eventually(lambda: len(seen) == 25, timeout=30)
        await _eventually(lambda: _committed(kafka_bootstrap, group, topic) == 25, timeout=10)
        await _eventually(lambda: METRICS.lags.get(key) == 0, timeout=10)

        # Assert
        exported = {
            tuple(sample.labels.values()): sample.value
            for family in METRICS.collect()
            if family.name == "quantmesh_bus_consumer_lag"
            for sample in family.samples
        }
        assert exported[("qmtest-kafka", group, topic, "0")] == 0
    finally:
        await bus.close()
    # A stopped member's partitions are revoked: its lag series goes with them.
    assert key not in METRICS.lags


@pytest.mark.integration
async def test_dead_letters_when_subscription_starts_are_exported_at_zero_per_input(
    kafka_bootstrap: str,
) -> None:
    # Arrange
    from quantmesh_common.bus.kafka import METRICS

    bus, topic, group = await _bus_with_topic(kafka_bootstrap)
    sub = bus.subscribe(group, [topic], lambda envelope: None)

    # Act
    await sub.start()
    try:
        exported = {
            tuple(sample.labels.values()): sample.value
            for family in METRICS.collect()
            if family.name == "quantmesh_bus_dead_letters"
            for sample in family.samples
            if sample.name == "quantmesh_bus_dead_letters_total"
        }
    finally:
        await bus.close()

    # Assert: a series at 0 before any dead letter, so the first one is a visible increase.
    assert exported[(topic, "qmtest-kafka")] == 0


@pytest.mark.integration
async def test_delivery_latency_when_messages_consumed_is_observed_once_each(
    kafka_bootstrap: str,
) -> None:
    # Arrange
    from quantmesh_common.bus.kafka import METRICS

    bus, topic, group = await _bus_with_topic(kafka_bootstrap)
    seen: list[int] = []
    sub = bus.subscribe(group, [topic], lambda envelope: seen.append(envelope.payload.seq))
    await sub.start()

    # Act
    for seq in range(12):
        await bus.publish(topic, Tock(key="k", seq=seq))
    await bus.flush()
    try:
        await _eventually(lambda: len(seen) == 12, timeout=30)
        samples = {
            sample.name: sample.value
            for family in METRICS.collect()
            if family.name == "quantmesh_bus_delivery_seconds"
            for sample in family.samples
            if sample.labels.get("topic") == topic
        }
    finally:
        await bus.close()

    # Assert: every message timed from its creation; on loopback well under a minute in all.
    assert samples["quantmesh_bus_delivery_seconds_count"] == 12
    assert 0 < samples["quantmesh_bus_delivery_seconds_sum"] < 60


async def _bus_with_relay(bootstrap: str, **kwargs: Any) -> tuple[KafkaBus, str, str, str]:
    """A bus with an input topic and an output topic (both Tock), and a fresh group name."""
    source, group = _names()
    sink = f"{source}.out"
    registry = TopicRegistry([TopicSpec(source, Tock, "key", 1), TopicSpec(sink, Tock, "key", 1)])
    await asyncio.to_thread(ensure_topics, bootstrap, registry)
    bus = KafkaBus(
        "qmtest-kafka", bootstrap, registry, consumer_config=TEST_CONSUMER_CONFIG, **kwargs
    )
    await bus.start()
    return bus, source, sink, group


def _phase_counts(group: str) -> dict[str, float]:
    from quantmesh_common.bus.kafka import METRICS

    return {
        sample.labels["phase"]: sample.value
        for family in METRICS.collect()
        if family.name == "quantmesh_bus_batch_phase_seconds"
        for sample in family.samples
        if sample.name.endswith("_count") and sample.labels.get("group") == group
    }


@pytest.mark.integration
async def test_batch_phases_when_every_batch_has_output_are_observed_once_a_batch(
    kafka_bootstrap: str,
) -> None:
    # Arrange
    bus, source, sink, group = await _bus_with_relay(kafka_bootstrap)
    hooks: list[int] = []

    async def hook() -> None:
        hooks.append(1)

    def relay(envelope: Envelope[Any]) -> list[Emit]:
        return [Emit(sink, Tock(key="k", seq=envelope.payload.seq))]

    sub = bus.subscribe(group, [source], relay, transactional=True, on_batch=hook)
    await sub.start()

    # Act
    for seq in range(5):
        await bus.publish(source, Tock(key="k", seq=seq))
    await bus.flush()
    try:
        await _eventually(lambda: _committed(kafka_bootstrap, group, source) == 5, timeout=30)
        counts = _phase_counts(group)
    finally:
        await bus.close()

    # Assert: each batch was handled, hooked, had its offsets put in its transaction (early or
    # at commit) and committed, once each.
    batches = len(hooks)
    assert batches >= 1
    assert counts == dict.fromkeys(("handle", "hook", "send_offsets", "commit"), batches)
