"""Benchmark of the Kafka bus against raw confluent-kafka on the local broker; prints one JSON line.

Measured, with the same payload bytes (Tick envelopes) and the same producer/consumer settings:
- throughput of N messages, producer and consumer running together: raw and through the bus;
- one-hop latency (produce -> handler) at a fixed rate, p50/p99: raw and through the bus;
- envelope encode/decode rates for a Tick and an ExecutionReport.

Targets: bus throughput >= half the raw rate; the bus adds < 1 ms to the p99 latency.
Usage: `python bench/bench_bus.py [--n 200000] [--rate 1000] [--seconds 5]` with the stack up.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import threading
import time
import uuid
from decimal import Decimal
from typing import Any, cast

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from quantmesh_common.bus.kafka import (
    DEFAULT_CONSUMER_CONFIG,
    DEFAULT_PRODUCER_CONFIG,
    KafkaBus,
    ensure_topics,
)
from quantmesh_common.envelope import Envelope, decode, encode
from quantmesh_common.messages import Tick
from quantmesh_common.testing import stubs
from quantmesh_common.topics import TopicRegistry, TopicSpec

PARTITIONS = 6
#: Messages sent, and received, before the latency measurement starts: a new producer's first
#: sends wait for its connection and idempotent-producer id (start-up, not steady state).
WARMUP = 500
#: The producer settings of both the raw client and the bus (`--compression` overrides).
PRODUCER_CONFIG: dict[str, Any] = dict(DEFAULT_PRODUCER_CONFIG)
INSTRUMENTS = 64


def _ticks(count: int) -> list[Tick]:
    return [
        stubs.tick(instrument_id=f"I{i % INSTRUMENTS}-USDT.SIM", price=Decimal("64123.45"))
        for i in range(count)
    ]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _latency_summary(values_ns: list[int]) -> dict[str, float]:
    ms = [v / 1e6 for v in values_ns]
    return {
        "messages": len(ms),
        "p50_ms": round(_pct(ms, 0.50), 3),
        "p90_ms": round(_pct(ms, 0.90), 3),
        "p99_ms": round(_pct(ms, 0.99), 3),
        "max_ms": round(max(ms), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


# -- raw confluent-kafka ---------------------------------------------------------------------


def _raw_consumer(bootstrap: str, topic: str) -> Consumer:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench.raw.{uuid.uuid4().hex}",
            **DEFAULT_CONSUMER_CONFIG,
        }
    )
    consumer.subscribe([topic])
    deadline = time.monotonic() + 30
    while not consumer.assignment():  # join the group before the clock starts
        consumer.poll(0.05)
        if time.monotonic() > deadline:
            raise TimeoutError("raw consumer got no assignment")
    return consumer


def _raw_produce(producer: Producer, topic: str, value: bytes, key: str, headers: Any) -> None:
    while True:
        try:
            producer.produce(topic, value, key, headers=headers)
            return
        except BufferError:
            producer.poll(0.001)


def raw_throughput(
    bootstrap: str, topic: str, payloads: list[tuple[bytes, str]], n: int
) -> dict[str, Any]:
    """Produce n messages while a consumer thread reads them; rate from first send to last read."""
    consumer = _raw_consumer(bootstrap, topic)
    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER_CONFIG})
    done = threading.Event()
    last: list[float] = [0.0]

    def consume() -> None:
        seen = 0
        while seen < n:
            seen += sum(1 for m in consumer.consume(500, 0.1) if m.error() is None)
        last[0] = time.perf_counter()
        done.set()

    thread = threading.Thread(target=consume)
    thread.start()
    gc.collect()
    start = time.perf_counter()
    for i in range(n):
        value, key = payloads[i % len(payloads)]
        _raw_produce(producer, topic, value, key, None)
        if i % 1000 == 0:
            producer.poll(0)
    producer.flush(60)
    produced = time.perf_counter()
    done.wait(300)
    thread.join()
    consumer.close()
    return {
        "messages": n,
        "produce_msg_per_s": round(n / (produced - start)),
        "msg_per_s": round(n / (last[0] - start)),
    }


def raw_latency(
    bootstrap: str, topic: str, value: bytes, key: str, rate: float, count: int
) -> dict[str, Any]:
    """Send count messages at a fixed rate; a consumer thread polling one at a time measures."""
    consumer = _raw_consumer(bootstrap, topic)
    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER_CONFIG})
    latencies: list[int] = []
    total = count + WARMUP

    def consume() -> None:
        received = 0
        while received < total:
            msg = consumer.poll(0.1)
            if msg is None or msg.error() is not None:
                continue
            now = time.time_ns()
            for name, sent in cast(list[tuple[str, bytes]], msg.headers() or []):
                if name == "t" and isinstance(sent, bytes):
                    latencies.append(now - int(sent))
                    received += 1

    def send(n: int) -> None:
        start = time.perf_counter()
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            _raw_produce(producer, topic, value, key, [("t", str(time.time_ns()))])
            producer.poll(0)

    thread = threading.Thread(target=consume)
    thread.start()
    send(WARMUP)
    while len(latencies) < WARMUP:
        time.sleep(0.01)
    latencies.clear()
    send(count)
    producer.flush(30)
    thread.join(60)
    consumer.close()
    return _latency_summary(latencies)


# -- the bus -----------------------------------------------------------------------------------


async def _started(bus: KafkaBus, group: str, topic: str, handler: Any) -> Any:
    sub = bus.subscribe(group, [topic], handler)
    await sub.start()
    deadline = time.monotonic() + 30
    while len(sub.assignment()) < PARTITIONS:
        await asyncio.sleep(0.02)
        if time.monotonic() > deadline:
            raise TimeoutError("bus subscription got no assignment")
    return sub


async def bus_throughput(
    bootstrap: str,
    registry: TopicRegistry,
    topic: str,
    ticks: list[Tick],
    n: int,
    **bus_options: Any,
) -> dict[str, Any]:
    """Publish n ticks (new envelope each) while a subscription handles them."""
    bus = KafkaBus("bench", bootstrap, registry, **bus_options)
    await bus.start()
    seen = 0
    done = asyncio.Event()
    last = 0.0

    def handler(envelope: Envelope[Any]) -> None:
        nonlocal seen, last
        seen += 1
        if seen == n:
            last = time.perf_counter()
            done.set()

    await _started(bus, f"bench.bus.{uuid.uuid4().hex}", topic, handler)
    gc.collect()
    start = time.perf_counter()
    for i in range(n):
        await bus.publish(topic, ticks[i % len(ticks)])
        if i % 2000 == 0:
            await asyncio.sleep(0)  # let the subscription interleave, as in a real service
    await bus.flush(60)
    produced = time.perf_counter()
    await asyncio.wait_for(done.wait(), 300)
    await bus.close()
    return {
        "messages": n,
        "produce_msg_per_s": round(n / (produced - start)),
        "msg_per_s": round(n / (last - start)),
    }


async def bus_latency(
    bootstrap: str,
    registry: TopicRegistry,
    topic: str,
    tick: Tick,
    rate: float,
    count: int,
    **bus_options: Any,
) -> dict[str, Any]:
    """Publish at a fixed rate; the handler measures now - ts_init (set at publish)."""
    bus = KafkaBus("bench", bootstrap, registry, **bus_options)
    await bus.start()
    latencies: list[int] = []

    def handler(envelope: Envelope[Any]) -> None:
        latencies.append(time.time_ns() - envelope.ts_init)

    async def send(n: int) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(n):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await bus.publish(topic, tick)

    async def received(n: int) -> None:
        deadline = time.monotonic() + 60
        while True:
            if len(latencies) >= n or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.01)

    await _started(bus, f"bench.bus.{uuid.uuid4().hex}", topic, handler)
    await send(WARMUP)
    await received(WARMUP)
    latencies.clear()
    await send(count)
    await received(count)
    await bus.close()
    return _latency_summary(latencies)


# -- codec -------------------------------------------------------------------------------------


def codec_rate(envelope: Envelope[Any], n: int) -> dict[str, Any]:
    """Encode and decode rates of one envelope, decoded as the Kafka bus does (no header name)."""
    raw = encode(envelope)
    start = time.perf_counter()
    for _ in range(n):
        encode(envelope)
    enc = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        decode(raw)
    dec = time.perf_counter() - start
    return {
        "bytes": len(raw),
        "encode_msg_per_s": round(n / enc),
        "decode_msg_per_s": round(n / dec),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200_000, help="messages for the throughput runs")
    parser.add_argument("--rate", type=float, default=1_000.0, help="msg/s for the latency runs")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each latency run")
    parser.add_argument("--codec-n", type=int, default=50_000)
    parser.add_argument(
        "--bootstrap", default=os.environ.get("QM_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
    )
    parser.add_argument("--compression", default=None, help="override compression.type")
    args = parser.parse_args()
    if args.compression:
        PRODUCER_CONFIG["compression.type"] = args.compression
    bus_options: dict[str, Any] = {"producer_config": PRODUCER_CONFIG}

    suffix = uuid.uuid4().hex[:8]
    names = {kind: f"bench.{kind}.{suffix}" for kind in ("raw_tp", "bus_tp", "raw_lat", "bus_lat")}
    registry = TopicRegistry(
        [TopicSpec(name, Tick, "instrument_id", PARTITIONS) for name in names.values()]
    )
    ensure_topics(args.bootstrap, registry)

    helper = KafkaBus("bench", args.bootstrap, registry)
    ticks = _ticks(INSTRUMENTS * 4)
    envelopes = [helper.wrap(t) for t in ticks]
    payloads = [(encode(e), e.payload.instrument_id) for e in envelopes]
    latency_count = int(args.rate * args.seconds)

    try:
        raw_tp = raw_throughput(args.bootstrap, names["raw_tp"], payloads, args.n)
        bus_tp = asyncio.run(
            bus_throughput(args.bootstrap, registry, names["bus_tp"], ticks, args.n, **bus_options)
        )
        raw_lat = raw_latency(
            args.bootstrap,
            names["raw_lat"],
            payloads[0][0],
            payloads[0][1],
            args.rate,
            latency_count,
        )
        bus_lat = asyncio.run(
            bus_latency(
                args.bootstrap,
                registry,
                names["bus_lat"],
                ticks[0],
                args.rate,
                latency_count,
                **bus_options,
            )
        )
    finally:
        admin = AdminClient({"bootstrap.servers": args.bootstrap})  # must outlive its futures
        for future in admin.delete_topics(registry.all_topic_names()).values():
            future.result()

    report = stubs.execution_report()
    result = {
        "benchmark": "kafka_bus",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "bootstrap": args.bootstrap,
        "payload_bytes": len(payloads[0][0]),
        "producer_config": PRODUCER_CONFIG,
        "commit_interval_s": KafkaBus("bench", args.bootstrap).commit_interval,
        "partitions": PARTITIONS,
        "throughput": {
            "raw": raw_tp,
            "bus": bus_tp,
            "bus_over_raw": round(bus_tp["msg_per_s"] / raw_tp["msg_per_s"], 3),
            "target_bus_over_raw": 0.5,
        },
        "latency": {
            "rate_msg_per_s": args.rate,
            "raw": raw_lat,
            "bus": bus_lat,
            "bus_added_p99_ms": round(bus_lat["p99_ms"] - raw_lat["p99_ms"], 3),
            "target_bus_added_p99_ms": 1.0,
        },
        "codec": {
            "tick": codec_rate(helper.wrap(ticks[0]), args.codec_n),
            "execution_report": codec_rate(helper.wrap(report), args.codec_n),
        },
    }
    result["targets_met"] = (
        result["throughput"]["bus_over_raw"] >= 0.5 and result["latency"]["bus_added_p99_ms"] < 1.0
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
