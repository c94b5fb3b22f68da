"""KafkaBus.publish_nowait: the coroutine-free publish, its wire output and its backpressure."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from quantmesh_common import envelope as envelope_module
from quantmesh_common.bus.kafka import _PRODUCED, METRICS, KafkaBus, ensure_topics
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.envelope import decode
from quantmesh_common.messages import Tick
from quantmesh_common.testing import stubs
from quantmesh_common.topics import TopicRegistry, TopicSpec
from quantmesh_common.trading_metrics import TRADING_METRICS

from .conftest import RawRecord, _delete_topics, _read_topic

_NOW = 1_700_000_000_000_000_000


class _Recording:
    """Stands in for the bus's producer: keeps what is queued; refuses while `full`."""

    def __init__(self) -> None:
        self.full = False
        self.queued: list[tuple[str, bytes | None, str | bytes | None, Any]] = []

    def produce_nowait(
        self, topic: str, value: bytes | None, key: str | bytes | None, headers: Any
    ) -> bool:
        if self.full:
            return False
        self.queued.append((topic, value, key, headers))
        return True


def _bus(source: str) -> tuple[KafkaBus, _Recording, str]:
    topic = f"qmtest.nowait.{uuid.uuid4().hex[:10]}"
    registry = TopicRegistry([TopicSpec(topic, Tick, "instrument_id", 1)])
    bus = KafkaBus(source, "127.0.0.1:1", registry, clock=SimulatedClock(_NOW))
    producer = _Recording()
    bus._producer = producer  # type: ignore[assignment]
    return bus, producer, topic


def _tick_count(source: str, tick: Tick) -> float:
    labels = (source, tick.venue, tick.instrument_id, "TRADE")
    return TRADING_METRICS.value("quantmesh_ticks", labels)


def test_publish_nowait_when_queue_has_room_queues_what_publish_would_and_counts_it() -> None:
    # Arrange: a source of its own, so the process-wide counters start at 0 for it
    source = f"qmtest-nowait-{uuid.uuid4().hex[:8]}"
    bus, producer, topic = _bus(source)
    tick = stubs.tick()

    # Act
    envelope = bus.publish_nowait(topic, tick, ts_event=tick.ts_event)

    # Assert: keyed by the topic's key field, the envelope's own bytes, no headers
    assert envelope is not None
    assert envelope.source == source
    assert envelope.ts_init == _NOW
    assert envelope.ts_event == tick.ts_event
    assert envelope.correlation_id == envelope.event_id
    ((queued_topic, value, key, headers),) = producer.queued
    assert (queued_topic, key, headers) == (topic, tick.instrument_id, None)
    assert value is not None
    assert decode(value) == envelope
    assert METRICS.value(_PRODUCED, topic, source) == 1
    assert _tick_count(source, tick) == 1


async def test_publish_nowait_when_queue_has_room_writes_the_bytes_publish_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange: one event id for both envelopes, so the two paths' output can be compared whole
    bus, producer, topic = _bus("qmtest-nowait")
    monkeypatch.setattr(
        envelope_module, "_event_id", lambda: "0190a0b0-c0d0-7000-8000-00000000000a"
    )
    tick = stubs.tick()

    # Act
    bus.publish_nowait(topic, tick, key="k1", ts_event=5, causation_id="c-1")
    await bus.publish(topic, tick, key="k1", ts_event=5, causation_id="c-1")

    # Assert
    first, second = producer.queued
    assert first == second
    assert first[2] == "k1"


def test_publish_nowait_when_queue_is_full_returns_none_and_counts_nothing() -> None:
    # Arrange
    source = f"qmtest-nowait-{uuid.uuid4().hex[:8]}"
    bus, producer, topic = _bus(source)
    producer.full = True
    tick = stubs.tick()

    # Act
    envelope = bus.publish_nowait(topic, tick)

    # Assert: nothing queued, nothing counted, so the caller's awaited publish counts it once
    assert envelope is None
    assert producer.queued == []
    assert METRICS.value(_PRODUCED, topic, source) == 0
    assert _tick_count(source, tick) == 0


@pytest.mark.integration
async def test_publish_nowait_when_local_queue_fills_falling_back_to_publish_loses_nothing(
    kafka_bootstrap: str,
) -> None:
    # Arrange: a producer queue of 5 messages, so most of 300 publishes find it full
    topic = f"qmtest.nowait.{uuid.uuid4().hex[:10]}"
    registry = TopicRegistry([TopicSpec(topic, Tick, "instrument_id", 1)])
    await asyncio.to_thread(ensure_topics, kafka_bootstrap, registry)
    bus = KafkaBus(
        "qmtest-nowait",
        kafka_bootstrap,
        registry,
        producer_config={"queue.buffering.max.messages": 5},
    )
    await bus.start()
    refused = 0
    try:
        # Act
        for n in range(300):
            tick = stubs.tick(ts_event=stubs.TS + n, trade_id=f"T-{n}")
            if bus.publish_nowait(topic, tick, ts_event=tick.ts_event) is None:
                refused += 1
                await bus.publish(topic, tick, ts_event=tick.ts_event)
        await bus.close()
        records: list[RawRecord] = await asyncio.to_thread(_read_topic, kafka_bootstrap, topic)
    finally:
        await asyncio.to_thread(_delete_topics, kafka_bootstrap, [topic, f"{topic}.dlq"])

    # Assert: every tick once, in order, and the queue really was full at times
    assert refused > 0
    trade_ids = [decode(r.value or b"").payload.trade_id for r in records]
    assert trade_ids == [f"T-{n}" for n in range(300)]
