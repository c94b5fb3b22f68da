"""One transactional hop with raw confluent-kafka, the yardstick of the bus's transactional cycle.

A relay consumes each message of topic A (read_committed) and, in a transaction of its own,
produces it to topic B, puts its offset in the transaction (`send_offsets_to_transaction`) and
commits; a sink reads B (read_committed). A producer sends `--rate` messages a second, each
carrying its send time. Prints one JSON line: the hop's end-to-end latency (send -> sink) over
the second half of the messages (the first half covers the coordinator's start), and the
relay's `send_offsets_to_transaction` and `commit_transaction` times, for the transactional
producer's `retry.backoff.ms` / `retry.backoff.max.ms` given (default: the bus's 2 / 50,
quantmesh_common.bus.kafka.TRANSACTIONAL_PRODUCER_CONFIG; librdkafka's own are 100 / 1,000).
A transaction begun soon after the previous one committed meets CONCURRENT_TRANSACTIONS in
`send_offsets` until the coordinator has finished that one, and waits the backoff.

Usage: `python bench/bench_txn_hop.py [--messages 400] [--rate 50] [--backoff-ms 2]
[--backoff-max-ms 50]` with QM_KAFKA_BOOTSTRAP set (deploy/local/stack.sh up).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from typing import cast

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "n": len(values),
        "p50_ms": round(_quantile(values, 0.5) * 1e3, 2),
        "p99_ms": round(_quantile(values, 0.99) * 1e3, 2),
        "max_ms": round(max(values) * 1e3, 2),
    }


class Hop:
    """The relay and the sink of one run, each on its own thread."""

    def __init__(self, bootstrap: str, source: str, sink: str, backoff: int, cap: int) -> None:
        self.bootstrap = bootstrap
        self.source, self.sink = source, sink
        self.backoff, self.cap = backoff, cap
        self.tag = uuid.uuid4().hex[:8]
        self.send_offsets: list[float] = []
        self.commit: list[float] = []
        self.latency: list[float] = []
        self.expected = 0
        self.stopping = False

    def _consumer(self, name: str, topic: str) -> Consumer:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"bench-txn-{name}-{self.tag}",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        consumer.subscribe([topic])
        return consumer

    def relay(self) -> None:
        consumer = self._consumer("relay", self.source)
        producer = Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "transactional.id": f"bench-txn-{self.tag}",
                "linger.ms": 0,
                "retry.backoff.ms": self.backoff,
                "retry.backoff.max.ms": self.cap,
            }
        )
        producer.init_transactions(30)
        while not self.stopping:
            msg = consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            producer.begin_transaction()
            producer.produce(self.sink, msg.value())
            started = time.perf_counter()
            partition, offset = cast(int, msg.partition()), cast(int, msg.offset())
            position = TopicPartition(self.source, partition, offset + 1)
            producer.send_offsets_to_transaction([position], consumer.consumer_group_metadata())
            sent = time.perf_counter()
            producer.commit_transaction()
            self.send_offsets.append(sent - started)
            self.commit.append(time.perf_counter() - sent)
        consumer.close()

    def drain(self) -> None:
        consumer = self._consumer("sink", self.sink)
        deadline = time.monotonic() + 300
        while len(self.latency) < self.expected and time.monotonic() < deadline:
            msg = consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            self.latency.append((time.time_ns() - int(cast(bytes, msg.value()))) / 1e9)
        consumer.close()


def main() -> None:
    """Run the hop, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--rate", type=float, default=50.0, help="messages per second")
    parser.add_argument("--backoff-ms", type=int, default=2, help="retry.backoff.ms")
    parser.add_argument("--backoff-max-ms", type=int, default=50, help="retry.backoff.max.ms")
    args = parser.parse_args()
    bootstrap = os.environ.get("QM_KAFKA_BOOTSTRAP")
    if not bootstrap:
        raise SystemExit("set QM_KAFKA_BOOTSTRAP (deploy/local/stack.sh up)")
    tag = uuid.uuid4().hex[:8]
    source, sink = f"bench.txn.a.{tag}", f"bench.txn.b.{tag}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(source, 1, 1), NewTopic(sink, 1, 1)]).values():
        future.result()
    hop = Hop(bootstrap, source, sink, args.backoff_ms, args.backoff_max_ms)
    hop.expected = args.messages
    relay = threading.Thread(target=hop.relay, name="relay")
    drain = threading.Thread(target=hop.drain, name="sink")
    try:
        relay.start()
        drain.start()
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
        started = time.perf_counter()
        for n in range(args.messages):
            while (delay := started + n / args.rate - time.perf_counter()) > 0:
                time.sleep(min(delay, 0.001))
            producer.produce(source, str(time.time_ns()).encode())
            producer.poll(0)
        producer.flush(30)
        drain.join()
    finally:
        hop.stopping = True
        relay.join(30)
        admin.delete_topics([source, sink])
    half = len(hop.latency) // 2
    out = {
        "benchmark": "transactional_hop_raw_confluent_kafka",
        "messages": args.messages,
        "received": len(hop.latency),
        "rate_per_s": args.rate,
        "retry_backoff_ms": args.backoff_ms,
        "retry_backoff_max_ms": args.backoff_max_ms,
        "hop_latency_second_half": _summary_ms(hop.latency[half:]),
        "send_offsets_to_transaction": _summary_ms(hop.send_offsets[half:]),
        "commit_transaction": _summary_ms(hop.commit[half:]),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
