"""The latency floor of Kafka hops on this host: plain confluent-kafka relays, no quantmesh code.

The stages' latency targets are end to end over several topics: signals' tick -> intent is
two hops (ticks -> signals -> intents -> reader), the order flow's tick -> venue five
(ticks -> signals -> risk -> oms -> execution), fill -> position two. This measures the same
chains with nothing in them but the client: a publisher process sends a message every
1/rate s carrying its send time, N relay processes each consume one topic and produce every
message's bytes unread to the next (the bus's client settings: idempotent, acks=all, one
request in flight, read_committed; linger.ms 0), and a reader process notes when each arrives. Every
process stamps CLOCK_MONOTONIC, one clock across processes. No envelope, no decode, no
handler: a stage cannot beat these figures on the same host and broker, so they say how much
of a stage's latency is its own.

Usage: `python bench/bench_hops.py [--hops 1,2,5] [--rate 1000] [--seconds 10]` with the
stack up (QM_KAFKA_BOOTSTRAP); prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import struct
import time
import uuid
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from quantmesh_common.testing.kafka import (
    PLAIN_PRODUCER_CONFIG,
    delete_topics,
    plain_consumer,
    plain_relay,
)

#: Overrides (JSON) of the chain's producers and consumers: the bus's client settings
#: otherwise, e.g. HOPS_PRODUCER='{"max.in.flight.requests.per.connection": 5}' for
#: librdkafka's default.
PRODUCER_OVERRIDES: dict[str, Any] = json.loads(os.environ.get("HOPS_PRODUCER", "{}"))
CONSUMER_OVERRIDES: dict[str, Any] = json.loads(os.environ.get("HOPS_CONSUMER", "{}"))
PRODUCER = {**PLAIN_PRODUCER_CONFIG, **PRODUCER_OVERRIDES}
#: About a Tick envelope's size on the wire.
PAYLOAD_BYTES = 320
_STAMP = struct.Struct("<dq")


def _relay(bootstrap: str, source: str, target: str, ready: Any, stop: Any) -> None:
    plain_relay(bootstrap, source, target, ready, stop, PRODUCER_OVERRIDES, CONSUMER_OVERRIDES)


def _read(bootstrap: str, topic: str, expected: int, ready: Any, results: Any) -> None:
    consumer = plain_consumer(bootstrap, f"{topic}.reader", topic, CONSUMER_OVERRIDES)
    ready.set()
    latencies: dict[int, float] = {}
    deadline = None
    while len(latencies) < expected:
        msg = consumer.poll(0.1)
        now = time.perf_counter()
        if msg is not None and msg.error() is None:
            sent, seq = _STAMP.unpack_from(msg.value() or b"")
            latencies.setdefault(seq, (now - sent) * 1000)
            deadline = now + 30
        elif deadline is not None and now > deadline:
            break
    consumer.close()
    results.put(latencies)


def _publish(bootstrap: str, topic: str, rate: int, count: int, ready: Any) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER})
    pad = b"x" * (PAYLOAD_BYTES - _STAMP.size)
    ready.wait(120)
    start = time.perf_counter()
    for seq in range(count):
        due = start + seq / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        producer.produce(topic, _STAMP.pack(time.perf_counter(), seq) + pad, b"k%d" % (seq % 10))
        producer.poll(0)
    producer.flush(30)


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": round(ordered[len(ordered) // 2], 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
        "max_ms": round(ordered[-1], 3),
    }


def _loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def chain(bootstrap: str, hops: int, rate: int, seconds: float, warmup: int) -> dict[str, Any]:
    """p50/p99/max of publisher -> `hops` relays -> reader at `rate` messages/s."""
    prefix = f"bench.hops.{uuid.uuid4().hex[:8]}."
    topics = [f"{prefix}{i}" for i in range(hops + 1)]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(t, 1, 1) for t in topics]).values():
        future.result(30)
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    count = int(rate * seconds) + warmup
    readies = [ctx.Event() for _ in range(hops + 1)]
    results = ctx.Queue()
    relays = [
        ctx.Process(target=_relay, args=(bootstrap, topics[i], topics[i + 1], readies[i], stop))
        for i in range(hops)
    ]
    reader = ctx.Process(target=_read, args=(bootstrap, topics[-1], count, readies[-1], results))
    all_ready = ctx.Event()
    publisher = ctx.Process(target=_publish, args=(bootstrap, topics[0], rate, count, all_ready))
    try:
        for process in [*relays, reader, publisher]:
            process.start()
        for event in readies:
            event.wait(120)
        load_before = _loadavg()
        all_ready.set()
        latencies: dict[int, float] = results.get(True, seconds + 120)
        load_after = _loadavg()
        stop.set()
        measured = [ms for seq, ms in latencies.items() if seq >= warmup]
        return {
            "hops": hops,
            "rate_per_s": rate,
            "messages": len(measured),
            "lost": count - len(latencies),
            **_percentiles(measured),
            "over_5ms_percent": round(100 * sum(ms > 5 for ms in measured) / len(measured), 2),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        }
    finally:
        stop.set()
        for process in [*relays, reader, publisher]:
            process.join(15)
            if process.is_alive():
                process.kill()
        delete_topics(bootstrap, topics)


def main() -> None:
    """Parse the arguments, run each chain, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hops", default="1,2,5", help="chain lengths to measure, comma-separated")
    parser.add_argument("--rate", type=int, default=1_000, help="messages/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--warmup", type=int, default=1_000, help="first messages not measured")
    args = parser.parse_args()
    bootstrap = os.environ.get("QM_KAFKA_BOOTSTRAP")
    result: dict[str, Any] = {
        "benchmark": "hops",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "producer": PRODUCER,
        "payload_bytes": PAYLOAD_BYTES,
    }
    if not bootstrap:
        result["skipped"] = "QM_KAFKA_BOOTSTRAP is not set (make up)"
    else:
        result["chains"] = [
            chain(bootstrap, int(h), args.rate, args.seconds, args.warmup)
            for h in args.hops.split(",")
        ]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
