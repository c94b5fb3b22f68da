"""The Kafka bus's own Python cost per message, as CPU time of the calling thread; prints JSON.

`bench_bus.py` measures wall-clock rates, which on a shared two-vCPU machine move by a factor
of two between runs. This one measures what the bus code itself costs, and keeps the least of
several rounds, so a comparison between two versions of the bus holds on a loaded machine:

- publish: `KafkaBus.publish` of a Tick to a real topic (wrap, encode, metrics, produce call),
  and `publish_nowait` (the same without a coroutine) where the bus has it;
- consume: the consumer's batch pass (`_fetch`'s bookkeeping and `_process`: decode,
  validation, a trivial handler, metrics) over 1,000 real messages of that topic, the fetch
  from librdkafka replaced by the same list each round so only the bus's Python is timed.

Usage: `python bench/bench_bus_cpu.py [--rounds 40]` with the stack up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from quantmesh_common.bus.kafka import DEFAULT_PRODUCER_CONFIG, KafkaBus, ensure_topics
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import Tick
from quantmesh_common.testing import stubs
from quantmesh_common.topics import TopicRegistry, TopicSpec

BATCH = 1_000


class _NoProducer:
    """Stands in for a subscription's producer: the trivial handler emits nothing."""

    def produce_nowait(self, *_args: Any) -> bool:
        return True


class _Replay:
    """Stands in for the consumer: every fetch returns the same messages."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages

    def consume(self, _n: int, _timeout: float) -> list[Message]:
        return list(self.messages)


def _read(bootstrap: str, topic: str, count: int) -> list[Message]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench.cpu.{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        messages: list[Message] = []
        deadline = time.monotonic() + 60
        while len(messages) < count and time.monotonic() < deadline:
            messages += [m for m in consumer.consume(500, 1.0) if m.error() is None]
        if len(messages) < count:
            raise TimeoutError(f"read {len(messages)} of {count} messages")
        return messages[:count]
    finally:
        consumer.close()


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"min_us": round(ordered[0], 2), "median_us": round(ordered[len(ordered) // 2], 2)}


async def measure(bootstrap: str, topic: str, registry: TopicRegistry, rounds: int) -> Any:
    """CPU microseconds per message of publish and of the consumer's batch pass."""
    bus = KafkaBus("bench", bootstrap, registry, producer_config=dict(DEFAULT_PRODUCER_CONFIG))
    await bus.start()
    ticks = [stubs.tick(instrument_id=f"I{i}-USDT.SIM") for i in range(64)]
    publish: list[float] = []
    for _ in range(max(3, rounds // 3)):
        started = time.thread_time()
        for i in range(BATCH):
            await bus.publish(topic, ticks[i % len(ticks)])
        publish.append((time.thread_time() - started) / BATCH * 1e6)
        await bus.flush()
    # The coroutine-free publish where the bus has one (a full queue falls back to publish).
    nowait: list[float] = []
    publish_nowait: Any = getattr(bus, "publish_nowait", None)  # absent in older buses
    for _ in range(max(3, rounds // 3) if publish_nowait is not None else 0):
        started = time.thread_time()
        for i in range(BATCH):
            tick = ticks[i % len(ticks)]
            if publish_nowait(topic, tick) is None:
                await bus.publish(topic, tick)
        nowait.append((time.thread_time() - started) / BATCH * 1e6)
        await bus.flush()
    messages = await asyncio.to_thread(_read, bootstrap, topic, BATCH)
    handled = 0

    def handler(_envelope: Envelope[Any]) -> None:
        nonlocal handled
        handled += 1

    sub = bus.subscribe(f"bench.cpu.{uuid.uuid4().hex}", [topic], handler)
    sub._producer = _NoProducer()  # type: ignore[assignment]
    sub._consumer = _Replay(messages)  # type: ignore[assignment]
    consume: list[float] = []
    try:
        for _ in range(rounds):
            started = time.thread_time()
            batch = sub._fetch()
            assert batch is not None
            await sub._process(batch)
            consume.append((time.thread_time() - started) / BATCH * 1e6)
    finally:
        sub._consumer = sub._producer = None
        await bus.close()
    assert handled == rounds * BATCH
    return {
        "publish": _summary(publish),
        **({"publish_nowait": _summary(nowait)} if nowait else {}),
        "consume": _summary(consume),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=40, help="consumer rounds of 1,000")
    parser.add_argument(
        "--bootstrap", default=os.environ.get("QM_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
    )
    args = parser.parse_args()
    topic = f"bench.cpu.{uuid.uuid4().hex[:8]}"
    registry = TopicRegistry([TopicSpec(topic, Tick, "instrument_id", 1)])
    ensure_topics(args.bootstrap, registry)
    try:
        result = asyncio.run(measure(args.bootstrap, topic, registry, args.rounds))
    finally:
        admin = AdminClient({"bootstrap.servers": args.bootstrap})  # must outlive its futures
        for future in admin.delete_topics(registry.all_topic_names()).values():
            future.result()
    print(
        json.dumps(
            {
                "benchmark": "kafka_bus_cpu_per_message",
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "message": "md.tick",
                "batch": BATCH,
                **result,
            }
        )
    )


if __name__ == "__main__":
    main()
