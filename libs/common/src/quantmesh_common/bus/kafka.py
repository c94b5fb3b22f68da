"""The Kafka bus: the Bus protocol on confluent-kafka, with dead letters and transactions.

Delivery rules, as in the design:

- Producers are idempotent (`enable.idempotence`, `acks=all`); a full local queue makes a
  publish wait, never drop. Delivery failures are collected and raised by `flush()`.
- A subscription consumes in batches on its own thread (the event loop never blocks on
  librdkafka) and runs the handler for each message in order, producing the handler's output
  and any dead letters. Offsets are committed, exactly the processed ones, only after the
  broker has acknowledged that output: every `commit_interval` without waiting for the
  coordinator (a commit on Kafka 4 costs ~5 ms of coordinator linger, which would stall the
  messages behind it), and synchronously before partitions are revoked, at stop, and after a
  crash for the batches that finished. With `transactional=True` every batch's output and
  offsets are committed in one Kafka transaction instead, so read_committed readers see each
  output exactly once.
- A message is its envelope's JSON, keyed by the topic's key field, with no headers unless a
  trace context is active (the schema name, ids and source lead the JSON; headers cost
  microseconds a message). A `qm-schema` header, as earlier versions wrote, is still honoured.
- A message that cannot be decoded, or whose handler raises an Exception, goes to the topic's
  `.dlq` twin with the error and the envelope's identity in its headers, and the consumer
  carries on. A handler raising a BaseException that is not an Exception is a crash: nothing
  of the batch is committed, the member leaves the group, and the group redelivers the batch.
- Batches are processed one after the other, and rebalance callbacks only run while fetching
  between them, so a member never commits offsets of a partition it no longer owns.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import socket
import threading
import time
import uuid
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate
from typing import Any, TypeVar, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import REGISTRY
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from quantmesh_common.bus.base import (
    H_SCHEMA,
    AssignHook,
    BatchHook,
    BusUnavailableError,
    DeadLetter,
    Emit,
    EnvelopeStamping,
    Handler,
    Headers,
    RawHandler,
    RawMessage,
    RevokeHook,
    SubscriptionState,
    check_delivery,
    envelope_headers,
    schema_mismatch,
    topic_model,
)
from quantmesh_common.clock import Clock, WallClock
from quantmesh_common.envelope import DecodeError, Envelope, Event, decode, encode
from quantmesh_common.telemetry import records_spans
from quantmesh_common.topics import TopicRegistry, TopicSpec, dlq, registry
from quantmesh_common.trading_metrics import TRADING_METRICS

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("quantmesh_common.bus.kafka")


# Prometheus metrics of the bus. prometheus_client's Counter and Histogram take a lock on
# every update, a few microseconds a message on the hot path; the bus instead adds to plain
# ints and lists owned by the calling thread and a collector sums them when scraped.
_COUNTERS = (
    (
        "quantmesh_bus_messages_produced",
        "Messages handed to the Kafka producer (publishes, handler output, dead letters).",
    ),
    ("quantmesh_bus_messages_consumed", "Messages a subscription took from Kafka and processed."),
    (
        "quantmesh_bus_dead_letters",
        "Messages sent to a dead-letter topic because they could not be decoded or handled.",
    ),
)
_PRODUCED, _CONSUMED, _DEAD = range(3)
HANDLER_SECONDS_NAME = "quantmesh_bus_handler_seconds"
HANDLER_SECONDS_DOC = "Time to decode and handle one message, output building included."
DELIVERY_SECONDS_NAME = "quantmesh_bus_delivery_seconds"
DELIVERY_SECONDS_DOC = (
    "Time from an envelope's creation (ts_init, by its producer) to its consumer decoding it: "
    "one hop's end-to-end latency, producer batching, broker and fetch included."
)
HANDLER_SECONDS_BUCKETS = (
    *(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05),
    *(0.1, 0.25, 0.5, 1.0, 2.5),
)
_LabelKey = tuple[str, str]
BATCH_PHASE_SECONDS_NAME = "quantmesh_bus_batch_phase_seconds"
BATCH_PHASE_SECONDS_DOC = (
    "Time a subscription's batch spends in each phase of its cycle, one after another, per "
    "consumer group: handle (decode, handlers, produce calls), hook (the stage's on_batch "
    "write), send_offsets (the batch's offsets into its transaction) and commit (the Kafka "
    "transaction's). A message arriving mid-cycle waits for the rest of it."
)
#: Phases of a batch cycle, in order (the `phase` label of BATCH_PHASE_SECONDS_NAME).
PHASE_HANDLE, PHASE_HOOK, PHASE_SEND_OFFSETS, PHASE_COMMIT = (
    "handle",
    "hook",
    "send_offsets",
    "commit",
)
_PhaseKey = tuple[str, str, str]
CONSUMER_LAG_NAME = "quantmesh_bus_consumer_lag"
CONSUMER_LAG_DOC = (
    "Messages a subscription's consumer group is behind the end of each assigned partition "
    "(librdkafka's consumer_lag, refreshed every statistics interval)."
)
#: How often librdkafka reports statistics, and so how fresh the consumer-lag gauge is.
STATISTICS_INTERVAL_MS = 5_000
#: The longest a rebalance waits for a member's on_revoke (the group waits for it meanwhile).
REVOKE_HOOK_TIMEOUT_S = 60.0
#: The longest a broadcast member's start waits for its topics' partitions to have leaders.
BROADCAST_START_TIMEOUT_S = 60.0
#: How far back a restarted broadcast member resumes at most (older messages are skipped).
BROADCAST_RESUME_WINDOW_S = 300.0
_LagKey = tuple[str, str, str, int]


class _Histogram:
    """One label set of the handler-time histogram: bucket counts (the last is +Inf) and sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(HANDLER_SECONDS_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: the first bound >= seconds, Prometheus's "le" (less or equal).
        self.counts[bisect_left(HANDLER_SECONDS_BUCKETS, seconds)] += 1
        self.total += seconds


class _Shard:
    """The metric values one thread has added; only that thread writes them."""

    __slots__ = ("counters", "delivery", "histograms", "phases")

    def __init__(self) -> None:
        self.counters: tuple[dict[_LabelKey, int], ...] = ({}, {}, {})
        self.histograms: dict[_LabelKey, _Histogram] = {}
        self.delivery: dict[_LabelKey, _Histogram] = {}
        self.phases: dict[_PhaseKey, _Histogram] = {}


def _histogram_of(histograms: dict[_K, _Histogram], key: _K) -> _Histogram:
    hist = histograms.get(key)
    if hist is None:
        hist = histograms[key] = _Histogram()
    return hist


class BusMetrics(Collector):
    """The bus's Prometheus metrics, counted without locks and collected on scrape.

    Families (labels `topic`, `service`): `quantmesh_bus_messages_produced_total`,
    `quantmesh_bus_messages_consumed_total`, `quantmesh_bus_dead_letters_total` and the
    histogram `quantmesh_bus_handler_seconds`. Each thread adds to its own shard (shards are
    never dropped, so the totals only grow); a scrape sums the shards.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._shards: list[_Shard] = []
        self._lock = threading.Lock()
        # (service, group, topic, partition) -> lag; written by each consumer's own thread.
        self.lags: dict[_LagKey, int] = {}

    def shard(self) -> _Shard:
        """The calling thread's shard."""
        try:
            return cast(_Shard, self._local.shard)
        except AttributeError:
            shard = self._local.shard = _Shard()
            with self._lock:
                self._shards.append(shard)
            return shard

    def add(self, kind: int, topic: str, service: str, count: int = 1) -> None:
        """Add `count` to counter `kind` (_PRODUCED, _CONSUMED, _DEAD) of (topic, service)."""
        counter = self.shard().counters[kind]
        key = (topic, service)
        counter[key] = counter.get(key, 0) + count

    def histogram(self, topic: str, service: str) -> _Histogram:
        """The calling thread's handler-time histogram of (topic, service)."""
        return _histogram_of(self.shard().histograms, (topic, service))

    def delivery(self, topic: str, service: str) -> _Histogram:
        """The calling thread's delivery-latency histogram of (topic, service)."""
        return _histogram_of(self.shard().delivery, (topic, service))

    def phase(self, group: str, service: str, phase: str) -> _Histogram:
        """The calling thread's histogram of one batch-cycle phase of (group, service)."""
        return _histogram_of(self.shard().phases, (group, service, phase))

    def value(self, kind: int, topic: str, service: str) -> int:
        """The current total of counter `kind` for (topic, service) across threads."""
        with self._lock:
            shards = list(self._shards)
        return sum(shard.counters[kind].get((topic, service), 0) for shard in shards)

    def describe(self) -> Iterable[Metric]:
        """The metric families, without values (registration checks names with these)."""
        for name, doc in _COUNTERS:
            yield CounterMetricFamily(name, doc, labels=("topic", "service"))
        yield HistogramMetricFamily(
            HANDLER_SECONDS_NAME, HANDLER_SECONDS_DOC, labels=("topic", "service")
        )
        yield HistogramMetricFamily(
            DELIVERY_SECONDS_NAME, DELIVERY_SECONDS_DOC, labels=("topic", "service")
        )
        yield HistogramMetricFamily(
            BATCH_PHASE_SECONDS_NAME, BATCH_PHASE_SECONDS_DOC, labels=("group", "service", "phase")
        )
        yield GaugeMetricFamily(
            CONSUMER_LAG_NAME, CONSUMER_LAG_DOC, labels=("service", "group", "topic", "partition")
        )

    def collect(self) -> Iterable[Metric]:
        """Sum every thread's shard into the metric families."""
        with self._lock:
            shards = list(self._shards)
        for kind, (name, doc) in enumerate(_COUNTERS):
            totals: dict[_LabelKey, int] = {}
            for shard in shards:
                # dict.copy is one C call: atomic against the owning thread's updates.
                for key, count in shard.counters[kind].copy().items():
                    totals[key] = totals.get(key, 0) + count
            family = CounterMetricFamily(name, doc, labels=("topic", "service"))
            for (topic, service), count in sorted(totals.items()):
                family.add_metric((topic, service), count)
            yield family
        yield _merged_histogram(HANDLER_SECONDS_NAME, HANDLER_SECONDS_DOC, shards, "histograms")
        yield _merged_histogram(DELIVERY_SECONDS_NAME, DELIVERY_SECONDS_DOC, shards, "delivery")
        yield _merged_histogram(
            BATCH_PHASE_SECONDS_NAME,
            BATCH_PHASE_SECONDS_DOC,
            shards,
            "phases",
            labels=("group", "service", "phase"),
        )
        lag = GaugeMetricFamily(
            CONSUMER_LAG_NAME, CONSUMER_LAG_DOC, labels=("service", "group", "topic", "partition")
        )
        for (service, group, topic, partition), value in sorted(self.lags.copy().items()):
            lag.add_metric((service, group, topic, str(partition)), value)
        yield lag


def _observe_delivery(topic: str, service: str, envelope: Envelope[Any]) -> None:
    delivered = time.time_ns() - envelope.ts_init
    METRICS.delivery(topic, service).observe(delivered / 1e9 if delivered > 0 else 0.0)


def _merged_histogram(
    name: str,
    doc: str,
    shards: list[_Shard],
    field: str,
    labels: tuple[str, ...] = ("topic", "service"),
) -> Metric:
    """One histogram family: the per-thread histograms of every shard summed."""
    merged: dict[tuple[str, ...], tuple[list[int], float]] = {}
    for shard in shards:
        histograms: dict[tuple[str, ...], _Histogram] = getattr(shard, field)
        for key, hist in histograms.copy().items():
            counts, total = list(hist.counts), hist.total
            if key in merged:
                have, have_total = merged[key]
                counts = [a + b for a, b in zip(have, counts, strict=True)]
                total += have_total
            merged[key] = (counts, total)
    family = HistogramMetricFamily(name, doc, labels=labels)
    bounds = [*(repr(b) for b in HANDLER_SECONDS_BUCKETS), "+Inf"]  # as Histogram has them
    for key, (counts, total) in sorted(merged.items()):
        family.add_metric(key, list(zip(bounds, accumulate(counts), strict=True)), total)
    return family


#: The process-wide bus metrics, registered once in prometheus_client's default registry.
METRICS = BusMetrics()
REGISTRY.register(METRICS)

#: Producer settings every bus producer starts from (caller's `producer_config` wins).
DEFAULT_PRODUCER_CONFIG: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    # A couple of milliseconds batch hot topics without a noticeable cost in latency.
    "linger.ms": 2,
    "compression.type": "lz4",
    # Success reports would cost a Python callback per message; failures still arrive.
    "delivery.report.only.error": True,
    # One produce request at a time per broker. With idempotence and librdkafka's default of
    # five, the local broker answered pipelined requests in stalls of 100-200 ms every second
    # or so at 1,000 msg/s (acks 150-160 ms late, the consumer seeing the data only then):
    # produce -> consume p99 28-151 ms in 7 runs of 8, max 79-196 ms; with one, p99 0.8-7 ms,
    # max 23-29 ms (without idempotence no stalls either; docs/benchmarks.md, "Session 10").
    # Order and idempotence are kept either way; a busy producer still batches, since messages
    # gather while a request is out.
    "max.in.flight.requests.per.connection": 1,
}

#: What a transactional producer adds to the bus's producer settings. A transaction begun
#: right after the previous one committed meets CONCURRENT_TRANSACTIONS until the coordinator
#: has written the previous one's markers (3-7 ms on the local broker), and librdkafka retries
#: after `retry.backoff.ms`, doubling up to `retry.backoff.max.ms`. At the defaults (100 ms,
#: 1 s) every batch's `send_offsets_to_transaction` took ~100 ms, the bulk of each
#: transactional hop; at 2 / 50 ms, 4.5 ms at p50 with back-to-back transactions (5 / 1,000:
#: 8 ms). The Java client retries this error after 20 ms (KAFKA-5477). Reconnecting to a
#: broker that is down has its own backoff (`reconnect.backoff.ms`), untouched.
TRANSACTIONAL_PRODUCER_CONFIG: dict[str, Any] = {
    "retry.backoff.ms": 2,
    "retry.backoff.max.ms": 50,
}

#: Consumer settings every subscription starts from (caller's `consumer_config` wins).
DEFAULT_CONSUMER_CONFIG: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "isolation.level": "read_committed",
    # Co-partitioning: the range assignor gives partition i of every topic of a group to one
    # member (same subscriptions, same partition counts), so an account's intents, reports,
    # openings and positions meet in one instance of a stage. cooperative-sticky balances over
    # all the topics' partitions together and split them (an opening applied by one member,
    # the account's fills by another). Its rebalances are eager: every member gives up all its
    # partitions and on_assign hands each one its new set.
    "partition.assignment.strategy": "range",
    "session.timeout.ms": 10_000,
    "heartbeat.interval.ms": 1_000,
}

_T = TypeVar("_T")
_K = TypeVar("_K", bound=tuple[str, ...])
_OutHeaders = list[tuple[str, str | bytes | None]]
_Record = tuple[str, bytes | None, str | bytes | None, _OutHeaders | None]


#: How often a subscription's watchdog looks at its consumer thread, and how far past its own
#: 10 s timeout a blocking transactional call may run before the thread counts as stuck.
_WATCHDOG_PERIOD_S = 2.0
_CALL_STALL_S = 40.0

#: A subscription's batch loop gives the event loop a turn every this many messages plus one.
_YIELD_MASK = 63

#: Consumer threads left blocked in the Kafka client; the process must not wait for them at exit.
ABANDONED_THREADS: list[str] = []


async def _call_revoke(hook: RevokeHook, removed: list[tuple[str, int]]) -> None:
    await hook(removed)


class _AbandonedError(Exception):
    """A consumer thread came back from the Kafka client after its subscription was given up."""


class BusDeliveryError(BusUnavailableError):
    """Messages were not acknowledged by the broker; `errors` holds librdkafka's reasons."""

    def __init__(self, message: str, errors: Sequence[KafkaError] = ()) -> None:
        super().__init__(message)
        self.errors = list(errors)


class BusTransactionError(BusUnavailableError):
    """A transaction could not be committed and was aborted: none of its messages are visible."""


class _Producer:
    """A confluent-kafka producer that never drops on a full queue and keeps delivery errors."""

    # Serve delivery reports every this many produces, so failures surface between flushes.
    POLL_EVERY = 256

    def __init__(self, config: dict[str, Any]) -> None:
        self.errors: list[KafkaError] = []
        conf = dict(config)
        conf["on_delivery"] = self._on_delivery
        conf.setdefault("error_cb", _log_client_error)
        conf.setdefault("logger", log)
        self.producer = Producer(conf)
        self._since_poll = 0

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            # Runs on whichever thread serves the queue; list.append is atomic under the GIL.
            self.errors.append(err)
            log.error(
                "delivery failed",
                extra={"topic": msg.topic(), "partition": msg.partition(), "error": str(err)},
            )

    def produce_nowait(
        self,
        topic: str,
        value: bytes | None,
        key: str | bytes | None,
        headers: _OutHeaders | None,
    ) -> bool:
        """Queue one message; False if the local queue is full (the caller waits and retries)."""
        try:
            self.producer.produce(topic, value, key, headers=headers)
        except BufferError:
            self.producer.poll(0)
            return False
        self._since_poll += 1
        if self._since_poll >= self.POLL_EVERY:
            self._since_poll = 0
            self.producer.poll(0)
        return True

    async def produce(
        self,
        topic: str,
        value: bytes | None,
        key: str | bytes | None,
        headers: _OutHeaders | None,
    ) -> None:
        """Queue one message, waiting while the local queue is full (never drops)."""
        while True:
            if self.produce_nowait(topic, value, key, headers):
                return
            # The broker drains the queue on librdkafka's threads; give it a moment.
            await asyncio.sleep(0.001)

    def take_errors(self) -> list[KafkaError]:
        """Return and forget the delivery errors collected so far."""
        errors, self.errors = self.errors, []
        return errors

    def close(self) -> None:
        """Release the client (blocks: aborts an open transaction, sends what is queued)."""
        self.producer.close()

    def flush_through_outage(self, timeout: float, patience: float, group: str) -> None:
        """Block until everything queued is acknowledged, waiting out a broker outage.

        librdkafka keeps retrying every queued message (until its message.timeout.ms), so
        messages still in flight are not lost: wait for them, up to `patience` seconds, and
        fail only on a real delivery error or when the broker stays away that long.
        """
        deadline = time.monotonic() + patience
        while True:
            remaining = self.producer.flush(timeout)
            errors = self.take_errors()
            if errors:
                raise BusDeliveryError(
                    f"{len(errors)} messages failed delivery; first: {errors[0]}", errors
                )
            if not remaining:
                return
            if time.monotonic() >= deadline:
                raise BusDeliveryError(
                    f"{remaining} messages not acknowledged within {patience:.0f}s"
                )
            log.warning(
                "waiting for the broker to acknowledge %d messages",
                remaining,
                extra={"group": group, "remaining": remaining},
            )


def _log_client_error(err: KafkaError) -> None:
    # librdkafka reports transient broker trouble here and retries by itself.
    level = logging.ERROR if err.fatal() else logging.WARNING
    log.log(level, "kafka client error: %s", err, extra={"error": str(err)})


def _retrying(fn: Callable[[], _T], attempts: int = 5) -> _T:
    """Call a blocking transactional API, repeating it while librdkafka says it is retriable."""
    for attempt in range(attempts):
        try:
            return fn()
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if attempt + 1 < attempts and isinstance(err, KafkaError) and err.retriable():
                time.sleep(0.05 * (attempt + 1))
                continue
            raise
    raise AssertionError("unreachable")


def _until_done(fn: Callable[[], _T], deadline: float, what: str) -> _T:
    """Call a blocking transactional API again while librdkafka says retry, until `deadline`.

    A broker outage makes these calls time out (retriable) for as long as it lasts; anything
    else (an abortable or fatal error, or the deadline) fails the transaction.
    """
    attempt = 0
    while True:
        try:
            return fn()
        except KafkaException as exc:
            err = _kafka_error(exc)
            retriable = err is not None and err.retriable() and not err.fatal()
            if not retriable or time.monotonic() >= deadline:
                raise BusTransactionError(f"{what} failed: {exc}") from exc
            attempt += 1
            log.warning("%s: retrying (attempt %d): %s", what, attempt, err)
            time.sleep(min(0.05 * 2**attempt, 1.0))


#: Errors of a partition whose leader, or a group whose coordinator, is not settled yet (a
#: topic just created, a broker that just restarted, a new cluster still creating
#: `__consumer_offsets`): asked again until a deadline.
_SETTLING = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    }
)


def while_settling(fn: Callable[[], _T], deadline: float, what: str) -> _T:
    """Call a metadata or offset query again while the partition's leader or the group's
    coordinator settles, until `deadline`; BusUnavailableError (from the client's error) then."""
    while True:
        try:
            return fn()
        except KafkaException as exc:
            err = _kafka_error(exc)
            settling = err is not None and (err.code() in _SETTLING or err.retriable())
            if not settling or time.monotonic() >= deadline:
                raise BusUnavailableError(f"reading {what} failed: {exc}") from exc
            time.sleep(0.2)


def _kafka_error(exc: BaseException) -> KafkaError | None:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return None


def _tracing_enabled() -> bool:
    """Whether a tracer provider that keeps spans is installed (else they would be dropped)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return False
    return records_spans(provider)


def _trace_headers() -> _OutHeaders | None:
    """The current OpenTelemetry context (traceparent, ...) as headers; None if there is none."""
    # An empty context (no span, no baggage: the common case without a tracer, or outside any
    # span) has nothing to carry; one context-variable read finds that out, where asking for
    # the current span and baggage costs microseconds on every publish.
    if not otel_context.get_current():
        return None
    if not trace.get_current_span().get_span_context().is_valid and not baggage.get_all():
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items()) if carrier else None


def _resolve_threadsafe(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[_T],
    result: _T | None,
    exc: BaseException | None,
) -> None:
    """Complete `future` from another thread (nothing to do if it was cancelled meanwhile)."""

    def resolve() -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(cast(_T, result))

    with suppress(RuntimeError):  # the loop closed while the consumer thread worked
        loop.call_soon_threadsafe(resolve)


class KafkaTransaction:
    """Publishes inside one Kafka transaction of a bus."""

    def __init__(self, bus: KafkaBus, producer: _Producer) -> None:
        self._bus = bus
        self._producer = producer

    async def publish(
        self, topic: str, payload: Event, *, key: str | None = None, ts_event: int | None = None
    ) -> Envelope[Any]:
        """Publish inside the transaction: visible to read_committed readers only on commit."""
        envelope = self._bus.wrap(payload, ts_event=ts_event)
        await self._bus._send(self._producer, topic, envelope, key)
        return envelope


@dataclass(slots=True)
class _Batch:
    """One fetched batch: its messages, what to commit, where to rewind on abort, counts."""

    messages: list[Message] = field(default_factory=list)
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    first_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    per_topic: dict[str, int] = field(default_factory=dict)

    def commit_list(self) -> list[TopicPartition]:
        return [TopicPartition(t, p, o) for (t, p), o in self.next_offsets.items()]


class KafkaSubscription:
    """One consumer-group member: a consumer, its batch loop, and (if needed) its producer."""

    def __init__(
        self,
        bus: KafkaBus,
        group: str,
        topics: Sequence[str],
        handler: Handler | RawHandler,
        *,
        transactional: bool,
        output_after_batch: bool = False,
        on_batch: BatchHook | None = None,
        on_assign: AssignHook | None = None,
        on_revoke: RevokeHook | None = None,
        consumer_config: dict[str, Any],
        batch_size: int,
        poll_timeout: float,
        commit_interval: float,
        raw: bool = False,
        broadcast: bool = False,
    ) -> None:
        if not topics:
            raise ValueError("a subscription needs at least one topic")
        self._bus = bus
        self._group = group
        self.topics = tuple(topics)
        self._handler = cast(Handler, handler)
        #: The same callable when the member is raw: it gets RawMessage, not envelopes.
        self._raw_handler = cast(RawHandler, handler) if raw else None
        self._is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 - async callable objects
        )
        self.transactional = transactional
        #: True: a batch's output is produced only once its `on_batch` hook returned (see
        #: `KafkaBus.subscribe`).
        self.output_after_batch = output_after_batch
        #: True: every partition assigned by hand, no group membership; offsets committed under
        #: a group of this instance's own, so a restart resumes and a new instance starts at
        #: the end.
        self.broadcast = broadcast
        self._group_id = f"{group}.{bus.instance}" if broadcast else group
        self._on_batch = on_batch
        self._on_assign_hook = on_assign
        self._on_revoke_hook = on_revoke
        # The event loop the subscription runs on: the consumer thread awaits on_revoke there.
        self._loop: asyncio.AbstractEventLoop | None = None
        # Assigned by the consumer thread's rebalance callbacks, not yet told to on_assign
        # (replaced, never mutated; read between fetches on the event loop).
        self._newly_assigned: frozenset[tuple[str, int]] = frozenset()
        self._consumer_config = consumer_config
        self._batch_size = batch_size
        self._poll_timeout = poll_timeout
        self._state = SubscriptionState.CREATED
        self._error: BaseException | None = None
        # Every consumer call happens on this one thread: librdkafka's consumer (and
        # confluent-kafka's reentrancy guard) want one caller, and the event loop never blocks.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"qm-consumer-{group}")
        self._consumer: Consumer | None = None
        self._producer: _Producer | None = None
        self._in_txn = False
        # The open transaction's batch's offsets (consumer thread only).
        self._txn_offsets: dict[tuple[str, int], int] = {}
        # What the watchdog looks at (see _watch_consumer_thread): the consumer thread's step in
        # flight, since when, and since when it is inside a blocking transactional call.
        self._stuck = False
        self._inflight: asyncio.Future[_Batch | None] | None = None
        self._inflight_since = 0.0
        self._blocked_since: float | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Replaced (never mutated) on the consumer thread, read from the event loop.
        self._assigned: frozenset[tuple[str, int]] = frozenset()
        self._revoked_in_fetch: set[tuple[str, int]] = set()
        # Offsets of finished non-transactional batches not yet committed (consumer thread only).
        self._pending: dict[tuple[str, int], int] = {}
        self._commit_interval = commit_interval
        self._last_commit = 0.0
        self._trace_fields: frozenset[str] = frozenset()
        self._tracing = False
        # The model each input topic carries (None: not checked), filled at start.
        self._models: dict[str, type[Event] | None] = {}

    # -- Subscription protocol ---------------------------------------------------------------

    @property
    def group(self) -> str:
        """The consumer group this member belongs to."""
        return self._group

    @property
    def state(self) -> SubscriptionState:
        """Where the subscription is in its life cycle."""
        return self._state

    @property
    def error(self) -> BaseException | None:
        """The crash that failed this subscription, if any."""
        return self._error

    def assignment(self) -> list[tuple[str, int]]:
        """The (topic, partition) pairs currently assigned to this member."""
        return sorted(self._assigned)

    async def start(self) -> None:
        """Create the consumer, join the group and start the batch loop."""
        if self._state is not SubscriptionState.CREATED:
            raise RuntimeError(f"subscription of group {self._group!r} is {self._state.value}")
        loop = self._loop = asyncio.get_running_loop()
        self._models = {topic: topic_model(self._bus.topics, topic) for topic in self.topics}
        self._consumer = await loop.run_in_executor(self._executor, self._create_consumer)
        if self.transactional:
            self._producer = _Producer(
                {
                    **TRANSACTIONAL_PRODUCER_CONFIG,
                    **self._bus.producer_config,
                    "transactional.id": f"{self._group}.{self._bus.source}.{uuid.uuid4().hex}",
                }
            )
            producer = self._producer.producer
            await loop.run_in_executor(self._executor, producer.init_transactions, 30.0)
        else:
            self._producer = _Producer(self._bus.producer_config)
        # Dead letters of every input start at 0, so the first one is an increase Prometheus
        # sees (a series born at 1 has no earlier sample to rise from).
        for topic in self.topics:
            METRICS.add(_DEAD, topic, self._bus.source, 0)
        self._state = SubscriptionState.RUNNING
        self._task = asyncio.create_task(self._run(), name=f"qm-subscription-{self._group}")
        self._watchdog = asyncio.create_task(
            self._watch_consumer_thread(), name=f"qm-watchdog-{self._group}"
        )
        self._task.add_done_callback(lambda _task: self._stop_watchdog())

    async def stop(self) -> None:
        """Finish the in-flight batch, commit it, leave the group and close the consumer."""
        if self._state is SubscriptionState.CREATED:
            self._state = SubscriptionState.STOPPED
            self._executor.shutdown(wait=False)
            return
        self._stopping = True
        if self._task is not None and not self._task.done():
            await asyncio.wait([self._task])

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    async def wait(self) -> None:
        """Wait until the subscription has stopped or failed."""
        if self._task is not None:
            await asyncio.wait([self._task])

    # -- consumer thread ---------------------------------------------------------------------

    def _create_consumer(self) -> Consumer:
        conf = {
            "bootstrap.servers": self._bus.bootstrap,
            "group.id": self._group_id,
            "client.id": f"{self._bus.source}.{self._group}",
            "error_cb": _log_client_error,
            "on_commit": self._on_commit,
            "logger": log,
            "stats_cb": self._on_stats,
            "statistics.interval.ms": STATISTICS_INTERVAL_MS,
            **DEFAULT_CONSUMER_CONFIG,
            **self._consumer_config,
        }
        if self.broadcast:
            # A resumed position the log no longer holds (retention) skips to the end.
            conf["auto.offset.reset"] = "latest"
        consumer = Consumer(conf)
        if self.broadcast:
            self._assign_every_partition(consumer)
            return consumer
        consumer.subscribe(
            list(self.topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        return consumer

    def _assign_every_partition(self, consumer: Consumer) -> None:
        """Take every partition of the topics without joining a group.

        Each from where this instance's group committed (a restart resumes), else from where
        it ends now (a new instance). Resolved here, before `start()` returns, rather than left
        to `auto.offset.reset`, which librdkafka resolves at the first fetch: a message
        published between the two would be missed. The end is the last stable offset for a
        read_committed member, so a transaction still open now is read once it commits.
        """
        deadline = time.monotonic() + BROADCAST_START_TIMEOUT_S
        wanted = [
            TopicPartition(topic, partition)
            for topic in self.topics
            for partition in self._partitions_of(consumer, topic, deadline)
        ]
        committed = while_settling(
            partial(consumer.committed, wanted, timeout=10), deadline, "the committed offsets"
        )
        # A long outage is not caught up message by message: what is older than the resume
        # window is skipped (prices that old are superseded by the ones after them).
        since_ms = int(time.time() * 1000) - int(BROADCAST_RESUME_WINDOW_S * 1000)
        recent = while_settling(
            partial(
                consumer.offsets_for_times,
                [TopicPartition(tp.topic, tp.partition, since_ms) for tp in wanted],
                timeout=10,
            ),
            deadline,
            "the offsets of the resume window",
        )
        partitions: list[TopicPartition] = []
        first_seen: list[TopicPartition] = []
        for done, window in zip(committed, recent, strict=True):
            query = partial(
                consumer.get_watermark_offsets,
                TopicPartition(done.topic, done.partition),
                timeout=10,
                cached=False,
            )
            where = f"the end of {done.topic}[{done.partition}]"
            _low, end = while_settling(query, deadline, where)
            # offsets_for_times answers -1 when nothing is that recent: start at the end.
            oldest = window.offset if window.offset >= 0 else end
            start = max(done.offset, oldest) if done.offset >= 0 else end
            partitions.append(TopicPartition(done.topic, done.partition, start))
            if done.offset < 0:
                first_seen.append(TopicPartition(done.topic, done.partition, start))
        if first_seen:
            # Where a new instance starts is its first commit: killed before it read anything
            # of a partition, it resumes there, not at the end of the moment it restarts.
            self._commit(consumer, first_seen)
        consumer.assign(partitions)
        self._on_assign(consumer, partitions)

    def _partitions_of(self, consumer: Consumer, topic: str, deadline: float) -> list[int]:
        """The partition ids of `topic`, waiting while a new topic's metadata settles."""
        while True:
            found = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if found is not None and found.error is None and found.partitions:
                return sorted(found.partitions)
            if time.monotonic() >= deadline:
                raise BusUnavailableError(
                    f"broadcast subscription of group {self._group!r}: topic {topic!r} not "
                    f"found ({found.error if found is not None else 'no metadata'})"
                )
            time.sleep(0.2)

    # With the cooperative protocol the callbacks carry only the partitions that move; with
    # the eager one a full revoke precedes every full assign. Either way set arithmetic holds.
    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        added = {(tp.topic, tp.partition) for tp in partitions}
        self._assigned = self._assigned | added
        self._newly_assigned = self._newly_assigned | added
        log.info("partitions assigned", extra={"group": self._group, "partitions": sorted(added)})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        removed = {(tp.topic, tp.partition) for tp in partitions}
        if removed and self._on_revoke_hook is not None:
            self._await_revoke_hook(sorted(removed))
        # Batches run one at a time and this callback only runs while fetching between them,
        # so every pending offset here belongs to a finished batch: make it durable while the
        # partitions are still ours.
        revoked = {tp: off for tp, off in self._pending.items() if tp in removed}
        if revoked:
            self._flush_and_commit(consumer, revoked)
            for tp in revoked:
                del self._pending[tp]
        self._drop(removed)
        log.info("partitions revoked", extra={"group": self._group, "partitions": sorted(removed)})

    def _await_revoke_hook(self, removed: list[tuple[str, int]]) -> None:
        """Run on_revoke on the event loop and wait for it (consumer thread, inside a poll).

        The group's rebalance waits for this callback, so the next owner is assigned only
        after the hook returned. The loop is free meanwhile: it awaits this thread's fetch (or,
        at a stop, the close that revokes).
        """
        loop = self._loop
        hook = self._on_revoke_hook
        assert hook is not None
        if loop is None or loop.is_closed():
            log.warning("on_revoke skipped: no event loop", extra={"group": self._group})
            return
        future = asyncio.run_coroutine_threadsafe(_call_revoke(hook, removed), loop)
        future.result(REVOKE_HOOK_TIMEOUT_S)

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        removed = {(tp.topic, tp.partition) for tp in partitions}
        # Lost, not revoked: another member may own them already; committing would be wrong.
        # Their uncommitted messages are redelivered to the new owner.
        for tp in removed:
            self._pending.pop(tp, None)
        self._drop(removed)
        log.warning("partitions lost", extra={"group": self._group, "partitions": sorted(removed)})

    def _drop(self, removed: set[tuple[str, int]]) -> None:
        self._newly_assigned = self._newly_assigned - removed
        self._assigned = self._assigned - removed
        self._revoked_in_fetch |= removed
        # A partition that moved to another member is its lag now, not ours.
        for topic, partition in removed:
            METRICS.lags.pop((self._bus.source, self._group, topic, partition), None)

    def _on_stats(self, stats_json: str) -> None:
        """Record librdkafka's consumer lag of every assigned partition (consumer thread)."""
        try:
            topics = json.loads(stats_json).get("topics", {})
        except ValueError:
            log.warning("unparseable librdkafka statistics", extra={"group": self._group})
            return
        assigned = self._assigned
        for topic, stats in topics.items():
            for partition_id, partition in stats.get("partitions", {}).items():
                key = (topic, int(partition_id))
                lag = partition.get("consumer_lag", -1)
                # -1: unknown yet (no committed or fetched offset); partition -1 is internal.
                if key in assigned and lag >= 0:
                    METRICS.lags[(self._bus.source, self._group, *key)] = lag

    def _fetch(self) -> _Batch | None:
        """Take what is already buffered, else wait for a first message then take the rest.

        `consume(n, timeout)` waits for n messages or the timeout, which would add the whole
        timeout to every message's latency at low rates; polling for one message first returns
        as soon as anything arrives. The batch's offsets are noted here, in the one pass that
        checks each message, so the event loop's pass only decodes and handles.
        """
        consumer = self._consumer
        assert consumer is not None
        revoked = self._revoked_in_fetch
        revoked.clear()
        messages = consumer.consume(self._batch_size, 0)
        if not messages:
            first = consumer.poll(self._poll_timeout)
            if first is None:
                return None
            messages = [first]
            if self._batch_size > 1:
                messages += consumer.consume(self._batch_size - 1, 0)
        batch = _Batch()
        good = batch.messages
        firsts = batch.first_offsets
        nexts = batch.next_offsets
        per_topic = batch.per_topic
        # The lowest offset skipped per revoked partition (see below).
        skipped: dict[tuple[str, int], int] = {}
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                log.warning("consumer error: %s", err, extra={"group": self._group})
                continue
            topic: str = msg.topic()  # type: ignore[assignment]
            partition: int = msg.partition()  # type: ignore[assignment]
            tp = (topic, partition)
            offset: int = msg.offset()  # type: ignore[assignment]
            # A partition revoked while this fetch ran belongs to another member now: it
            # re-reads these from the last commit, so they must be neither handled nor committed.
            if revoked and tp in revoked:
                if offset < skipped.get(tp, offset + 1):
                    skipped[tp] = offset
                continue
            if tp not in nexts:
                firsts[tp] = offset
            nexts[tp] = offset + 1
            per_topic[topic] = per_topic.get(topic, 0) + 1
            good.append(msg)
        if skipped:
            self._rewind_reassigned(consumer, skipped)
        if not good:
            return None
        if self.transactional and not self._in_txn:
            assert self._producer is not None
            self._producer.producer.begin_transaction()
            self._in_txn = True
        return batch

    def _rewind_reassigned(self, consumer: Consumer, skipped: dict[tuple[str, int], int]) -> None:
        """Read again what was skipped of partitions revoked and given back in one fetch.

        An eager rebalance revokes every partition and may hand some straight back: the fetch
        then holds messages from before the revoke and, from the committed offset on, after the
        assign, all skipped above. The consumer's position is past them, so without a seek they
        would never be handled while later offsets commit. Each goes back to its committed
        offset, where a fresh assignment starts: after a revoke that is the lowest skipped one
        (the revoke committed what was handled); after a loss it may be lower (the group
        redelivers what was handled but not committed). With no commit, the lowest skipped.
        """
        assigned = self._assigned
        back = [TopicPartition(t, p, o) for (t, p), o in skipped.items() if (t, p) in assigned]
        if not back:
            return
        committed = {
            (tp.topic, tp.partition): tp.offset
            for tp in consumer.committed([TopicPartition(t.topic, t.partition) for t in back], 10)
        }
        for tp in back:
            at = committed.get((tp.topic, tp.partition), -1)
            if at >= 0:
                tp.offset = at
            consumer.seek(tp)
        log.info(
            "partitions given back in the fetch that revoked them: read again",
            extra={"group": self._group, "from": [(t.topic, t.partition, t.offset) for t in back]},
        )

    def _finish(self, batch: _Batch) -> None:
        """Make a processed batch durable: output acknowledged first, then its offsets.

        Every transactional batch commits its own transaction, its offsets sent into it after
        its handlers and hook. (Tried in session 6 and taken out again, each with a broker-outage
        e2e run failing in CI: batches that produce nothing sharing one transaction, and
        sending a batch's offsets from the consumer thread while the event loop handled it.)
        """
        if not self.transactional:
            self._pending.update(batch.next_offsets)
            return
        self._txn_offsets.update(batch.next_offsets)
        self._commit_transaction()

    def _commit_transaction(self) -> None:
        """Commit the open transaction: the output of its batches and their offsets."""
        consumer = self._consumer
        producer = self._producer
        # Abandoned (the consumer is gone, the producer blocked): its successor redoes them.
        if not self._in_txn or not self._txn_offsets or self._stuck or consumer is None:
            return
        assert producer is not None
        # Retry through an outage, but never abort and re-run the batches here: their handlers
        # (and the batch hook) already changed the stage's state, so running them again in
        # this process would apply them twice. A transaction that cannot commit fails the
        # subscription; the restarted service rebuilds from what was committed.
        deadline = time.monotonic() + self._bus.outage_timeout
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._txn_offsets.items()]
        metadata = consumer.consumer_group_metadata()
        txn = producer.producer
        try:
            started = time.perf_counter()
            _until_done(
                self._blocking(lambda: txn.send_offsets_to_transaction(offsets, metadata, 10)),
                deadline,
                "sending the batch's offsets to its transaction",
            )
            sent = time.perf_counter()
            METRICS.phase(self._group, self._bus.source, PHASE_SEND_OFFSETS).observe(sent - started)
            started = sent
            _until_done(
                self._blocking(lambda: txn.commit_transaction(10)),
                deadline,
                "committing the transaction",
            )
            METRICS.phase(self._group, self._bus.source, PHASE_COMMIT).observe(
                time.perf_counter() - started
            )
        except _AbandonedError:
            # Abort rather than leave the transaction open until the broker times it out:
            # read_committed readers of its partitions wait for open transactions.
            with suppress(KafkaException):
                txn.abort_transaction(10)
            raise
        self._in_txn = False
        self._txn_offsets = {}
        errors = producer.take_errors()
        if errors:
            log.warning(
                "delivery errors reported for a committed transaction",
                extra={"group": self._group, "errors": [str(e) for e in errors]},
            )

    def _flush_and_commit(
        self,
        consumer: Consumer,
        offsets: dict[tuple[str, int], int],
        *,
        asynchronous: bool = False,
    ) -> None:
        """Wait for every output and dead letter to be acknowledged, then commit `offsets`."""
        assert self._producer is not None
        try:
            self._producer.flush_through_outage(
                self._bus.flush_timeout, self._bus.outage_timeout, self._group
            )
        except BaseException:
            # Some output is lost: none of the pending offsets may ever be committed, so the
            # group redelivers their messages after this member fails.
            self._pending.clear()
            raise
        commit = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        if asynchronous:
            self._commit_async(consumer, commit)
        else:
            self._commit(consumer, commit)
        self._last_commit = time.monotonic()

    def _commit_pending(self, *, asynchronous: bool = False) -> None:
        if self._pending and self._consumer is not None:
            self._flush_and_commit(self._consumer, self._pending, asynchronous=asynchronous)
            self._pending.clear()

    def _commit_async(self, consumer: Consumer, offsets: list[TopicPartition]) -> None:
        """Send a commit without waiting for it; `_on_commit` reports how it went.

        The periodic commit of a running member: waiting for the group coordinator (several
        ms) would stall every message fetched behind it. Commits leave in order, and a later
        synchronous one (revoke, stop, crash) covers any that failed.
        """
        try:
            consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            err = _kafka_error(exc)
            if err is not None and err.fatal():
                raise
            log.warning(
                "offset commit failed; messages may be redelivered",
                extra={"group": self._group, "error": str(exc)},
            )

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        # Served on the consumer thread while it fetches. A failed commit only widens
        # redelivery (the next commit, or the new owner after a rebalance, moves on).
        failed = [tp for tp in partitions if tp.error is not None]
        if err is not None or failed:
            log.warning(
                "offset commit failed; messages may be redelivered",
                extra={
                    "group": self._group,
                    "error": str(err if err is not None else failed[0].error),
                },
            )

    def _commit(self, consumer: Consumer, offsets: list[TopicPartition]) -> None:
        for attempt in range(3):
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
                return
            except KafkaException as exc:
                err = _kafka_error(exc)
                if err is not None and err.fatal():
                    raise
                if err is not None and err.retriable() and attempt < 2:
                    time.sleep(0.05)
                    continue
                # The group moved on (rebalance): the new owner re-reads from the last commit,
                # so this batch is delivered again — at least once, never lost.
                log.warning(
                    "offset commit failed; messages may be redelivered",
                    extra={"group": self._group, "error": str(exc)},
                )
                return

    def _finish_and_fetch(self, batch: _Batch | None, fetch: bool) -> _Batch | None:
        # One executor hop per batch: make the previous batch durable, then fetch the next.
        if batch is not None:
            self._finish(batch)
        if not fetch:
            self._commit_pending()
        elif time.monotonic() - self._last_commit >= self._commit_interval:
            self._commit_pending(asynchronous=True)
        return self._fetch() if fetch else None

    def _after_crash(self) -> None:
        """Commit the batches finished before the crash; abort the crashed batch's transaction."""
        if self.transactional:
            self._abort_open_transaction()
            return
        try:
            self._commit_pending()
        except Exception as exc:  # the crash is what gets reported; this only widens redelivery
            log.warning("commit after crash failed: %s", exc, extra={"group": self._group})

    def _abort_open_transaction(self) -> None:
        self._txn_offsets = {}
        if self._in_txn and self._producer is not None:
            self._in_txn = False
            try:
                self._producer.producer.abort_transaction(10)
            except KafkaException as exc:
                log.warning("abort after crash failed: %s", exc, extra={"group": self._group})

    def _close_clients(self) -> None:
        # enable.auto.commit is off, so closing leaves the group without committing anything.
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            try:
                consumer.close()  # serves a last revoke, which commits what is pending
            except Exception as exc:  # leaving the group late only delays the rebalance
                log.error("consumer close failed: %s", exc, extra={"group": self._group})
        self._assigned = frozenset()
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                producer.close()
            except KafkaException as exc:
                log.warning("producer close failed: %s", exc, extra={"group": self._group})

    # -- event loop --------------------------------------------------------------------------

    def _fetch_next(
        self, loop: asyncio.AbstractEventLoop, batch: _Batch | None
    ) -> asyncio.Future[_Batch | None]:
        """Run `_finish_and_fetch(batch, True)` on the consumer thread; resolve on the loop.

        run_in_executor would chain a concurrent future into an asyncio one (two extra
        callbacks and a state copy); resolving the loop's future directly takes tens of
        microseconds off the latency of every message that arrives on its own.
        """
        future: asyncio.Future[_Batch | None] = loop.create_future()

        def work() -> None:
            try:
                result = self._finish_and_fetch(batch, True)
            except BaseException as exc:
                _resolve_threadsafe(loop, future, None, exc)
                return
            _resolve_threadsafe(loop, future, result, None)

        self._inflight = future
        self._inflight_since = time.monotonic()
        self._executor.submit(work)
        return future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        executor = self._executor
        pending: _Batch | None = None
        try:
            while True:
                if self._stopping:
                    # Commits what is pending even with no batch in hand: a broadcast member has
                    # no revoke at close to do it.
                    await loop.run_in_executor(executor, self._finish_and_fetch, pending, False)
                    break
                fetched = await self._fetch_next(loop, pending)
                pending = None
                if fetched is not None:
                    pending = await self._process(fetched)
        except BaseException as exc:
            self._state = SubscriptionState.FAILED
            self._error = exc
            log.error(
                "subscription crashed; its uncommitted messages will be redelivered to the group",
                exc_info=exc,
                extra={"group": self._group, "service": self._bus.source},
            )
            if self._stuck:
                await self._abandon_clients()
            else:
                await loop.run_in_executor(executor, self._after_crash)
                await loop.run_in_executor(executor, self._close_clients)
            self._executor.shutdown(wait=False)
            if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError):
                raise
            return
        await loop.run_in_executor(executor, self._close_clients)
        self._executor.shutdown(wait=False)
        self._state = SubscriptionState.STOPPED

    async def _watch_consumer_thread(self) -> None:
        """Fail the subscription if the consumer thread never comes back from the Kafka client.

        Every call there has a timeout, but librdkafka can block a transactional call for good
        after losing its coordinator (confluentinc/librdkafka#4420, #5511); a subscription
        stuck like that would hold its partitions without ever consuming them. A call blocked
        well past its own timeout, or a step longer than the outage wait allows, is that.
        """
        while True:
            await asyncio.sleep(_WATCHDOG_PERIOD_S)
            future = self._inflight
            if future is None or future.done():
                continue
            now = time.monotonic()
            since = self._blocked_since
            blocked = since is not None and now - since > _CALL_STALL_S
            if blocked or now - self._inflight_since > self._bus.stall_timeout:
                self._stuck = True
                future.set_exception(
                    BusUnavailableError(
                        f"the consumer thread of group {self._group!r} is blocked in the Kafka "
                        f"client (for {now - (since or self._inflight_since):.0f}s)"
                    )
                )

    def _blocking(self, fn: Callable[[], _T]) -> Callable[[], _T]:
        """`fn`, noting while it runs that the consumer thread is inside a blocking call."""

        def call() -> _T:
            self._blocked_since = time.monotonic()
            try:
                result = fn()
            finally:
                self._blocked_since = None
            if self._stuck:
                # The watchdog gave this subscription up and the service restarted meanwhile:
                # this late thread must not commit a batch its successor processes again.
                raise _AbandonedError(self._group)
            return result

        return call

    async def _abandon_clients(self) -> None:
        """Leave the group although the consumer thread is blocked; leave that thread behind.

        The consumer itself is idle (its thread is blocked in a producer call), so closing it
        from another thread is safe, and it hands the partitions to the group at once instead
        of after max.poll.interval.ms. The blocked producer is left to its fate.
        """
        consumer, self._consumer = self._consumer, None
        self._assigned = frozenset()
        self._pending.clear()
        if consumer is None:
            return
        ABANDONED_THREADS.append(self._group)
        closer = threading.Thread(target=consumer.close, name="qm-abandon", daemon=True)
        closer.start()
        await asyncio.get_running_loop().run_in_executor(None, closer.join, 10.0)

    async def _process(self, batch: _Batch) -> _Batch:
        """Handle a batch in order; produce output and dead letters; return it for commit."""
        producer = self._producer
        assert producer is not None
        produce_nowait = producer.produce_nowait
        self._trace_fields = frozenset(propagate.get_global_textmap().fields)
        self._tracing = _tracing_enabled()
        # The common case runs inline below, without a call per step: a sync handler, no
        # tracer, and a message without a trace context to carry on (a message from this bus
        # has no headers then). Anything else goes through _handle_sync or _handle_async.
        inline = not (self._is_async or self._tracing or self._raw_handler)
        handler = cast(Callable[[Envelope[Any]], Sequence[Emit] | None], self._handler)
        child_records = self._bus._child_records
        source = self._bus.source
        perf_counter = time.perf_counter
        histograms: dict[str, _Histogram] = {}
        deliveries: dict[str, _Histogram] = {}
        time_ns = time.time_ns
        models = self._models
        produced: dict[str, int] = {}
        records: list[_Record] | None
        held: list[_Record] | None = [] if self.output_after_batch else None
        if self._on_assign_hook is not None and self._newly_assigned:
            # Between fetches: the consumer thread's callbacks cannot run meanwhile.
            added, self._newly_assigned = sorted(self._newly_assigned), frozenset()
            await self._on_assign_hook(added)
        batch_started = perf_counter()
        for handled, msg in enumerate(batch.messages, 1):
            if not handled & _YIELD_MASK:
                # A long batch of synchronous handling would hold the event loop: let the
                # process's other subscriptions and tasks (a stage's order flow beside its
                # market data, health checks) run between every few dozen messages.
                await asyncio.sleep(0)
            topic: str = msg.topic()  # type: ignore[assignment]
            raw_headers = msg.headers()
            if raw_headers is None:
                headers, schema, parent = None, None, None
            else:
                headers, schema, parent = self._scan_headers(raw_headers)
            if inline and parent is None:
                started = perf_counter()
                envelope = None
                try:
                    value = msg.value()
                    if value is None:
                        raise DecodeError("empty message (no value)")
                    envelope = decode(value, schema)
                    delivered = time_ns() - envelope.ts_init
                    dhist = deliveries.get(topic)
                    if dhist is None:
                        dhist = deliveries[topic] = METRICS.delivery(topic, source)
                    dhist.observe(delivered / 1e9 if delivered > 0 else 0.0)
                    model = models.get(topic)
                    if model is not None and envelope.payload.__class__ is not model:
                        schema_mismatch(topic, envelope, model)
                    out = handler(envelope)
                    records = child_records(envelope, out) if out else None
                except Exception as exc:
                    records = self._failed(msg, topic, headers, None, exc, envelope)
                finally:
                    hist = histograms.get(topic)
                    if hist is None:
                        hist = histograms[topic] = METRICS.histogram(topic, source)
                    hist.observe(perf_counter() - started)
            elif self._raw_handler is not None:
                records = await self._handle_raw(msg, topic, headers)
            elif self._is_async:
                records = await self._handle_async(msg, topic, headers, schema, parent)
            else:
                records = self._handle_sync(msg, topic, headers, schema, parent)
            if records:
                if held is not None:
                    held += records
                    continue
                for record in records:
                    if not produce_nowait(*record):
                        await producer.produce(*record)
                    out_topic = record[0]
                    produced[out_topic] = produced.get(out_topic, 0) + 1
        handled_at = perf_counter()
        METRICS.phase(self._group, source, PHASE_HANDLE).observe(handled_at - batch_started)
        if self._on_batch is not None:
            # Before _finish: a hook that raises crashes the subscription with the batch's
            # transaction open (aborted) or its offsets not yet pending, so it is redelivered.
            await self._on_batch()
            METRICS.phase(self._group, source, PHASE_HOOK).observe(perf_counter() - handled_at)
        if held:
            # The stage stored the batch's effects first: what it publishes can be re-derived
            # from its store if this process dies before the output is acknowledged.
            for record in held:
                if not produce_nowait(*record):
                    await producer.produce(*record)
                out_topic = record[0]
                produced[out_topic] = produced.get(out_topic, 0) + 1
        for topic, count in produced.items():
            METRICS.add(_PRODUCED, topic, source, count)
        for topic, count in batch.per_topic.items():
            METRICS.add(_CONSUMED, topic, source, count)
        return batch

    def _scan_headers(self, raw: Any) -> tuple[_OutHeaders, str | None, Any]:
        """The headers as given, the schema name they carry, and their trace context (or None).

        A `qm-schema` header (written by earlier versions of the bus, and by tools) names the
        schema; the bus itself now leaves the name in the JSON.
        """
        schema: str | None = None
        carrier: dict[str, str] | None = None
        headers = cast(_OutHeaders, raw)
        trace_fields = self._trace_fields
        for name, value in headers:
            if name == H_SCHEMA:
                schema = value.decode() if isinstance(value, bytes) else value
            elif name in trace_fields and value is not None:
                if carrier is None:
                    carrier = {}
                carrier[name] = value.decode() if isinstance(value, bytes) else value
        return headers, schema, (propagate.extract(carrier) if carrier else None)

    def _start_span(self, topic: str, msg: Message, parent: Any) -> Any:
        """A context manager: the consumer span of one message, current while it runs."""
        return _tracer.start_as_current_span(
            f"{topic} process",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.destination.name": topic,
                "messaging.destination.partition.id": str(msg.partition()),
                "messaging.consumer.group.name": self._group,
                "messaging.kafka.offset": cast(int, msg.offset()),
                "quantmesh.service": self._bus.source,
            },
        )

    def _handle_sync(
        self,
        msg: Message,
        topic: str,
        headers: _OutHeaders | None,
        schema: str | None,
        parent: Any,
    ) -> list[_Record] | None:
        """Decode and handle one message with a sync handler; return its output or dead letter."""
        if self._tracing:
            with self._start_span(topic, msg, parent) as span:
                return self._invoke_sync(msg, topic, headers, schema, span)
        if parent is None:
            return self._invoke_sync(msg, topic, headers, schema, None)
        # No tracer is installed: skip the span (several microseconds a message) but keep the
        # caller's context current, so the handler's output still carries its traceparent.
        token = otel_context.attach(parent)
        try:
            return self._invoke_sync(msg, topic, headers, schema, None)
        finally:
            otel_context.detach(token)

    async def _handle_async(
        self,
        msg: Message,
        topic: str,
        headers: _OutHeaders | None,
        schema: str | None,
        parent: Any,
    ) -> list[_Record] | None:
        """Decode and handle one message with an async handler; the same as `_handle_sync`."""
        if self._tracing:
            with self._start_span(topic, msg, parent) as span:
                return await self._invoke_async(msg, topic, headers, schema, span)
        if parent is None:
            return await self._invoke_async(msg, topic, headers, schema, None)
        token = otel_context.attach(parent)
        try:
            return await self._invoke_async(msg, topic, headers, schema, None)
        finally:
            otel_context.detach(token)

    async def _handle_raw(
        self, msg: Message, topic: str, headers: _OutHeaders | None
    ) -> list[_Record] | None:
        """Hand one record undecoded to a raw handler; nothing it returns is published."""
        handler = self._raw_handler
        assert handler is not None
        key = msg.key()
        message = RawMessage(
            topic,
            cast(int, msg.partition()),
            cast(int, msg.offset()),
            key.decode(errors="replace") if isinstance(key, bytes) else key,
            msg.value(),
            [(n, v if isinstance(v, bytes) else (v or "").encode()) for n, v in headers or ()],
        )
        started = time.perf_counter()
        try:
            out = handler(message)
            if self._is_async:
                await out  # type: ignore[misc]
        except Exception as exc:
            return self._failed(msg, topic, headers, None, exc, None)
        finally:
            METRICS.histogram(topic, self._bus.source).observe(time.perf_counter() - started)
        return None

    def _decode(self, msg: Message, schema: str | None, span: trace.Span | None) -> Envelope[Any]:
        value = msg.value()
        if value is None:
            raise DecodeError("empty message (no value)")
        envelope = decode(value, schema)
        if span is not None and span.is_recording():
            span.set_attribute("messaging.message.id", envelope.event_id)
            span.set_attribute("quantmesh.correlation_id", envelope.correlation_id)
        return envelope

    def _failed(
        self,
        msg: Message,
        topic: str,
        headers: _OutHeaders | None,
        span: trace.Span | None,
        exc: Exception,
        envelope: Envelope[Any] | None,
    ) -> list[_Record] | None:
        if span is not None:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        letter = self._dead_letter(msg, topic, headers, exc, envelope)
        return None if letter is None else [letter]

    def _invoke_sync(
        self,
        msg: Message,
        topic: str,
        headers: _OutHeaders | None,
        schema: str | None,
        span: trace.Span | None,
    ) -> list[_Record] | None:
        started = time.perf_counter()
        envelope = None
        try:
            envelope = self._decode(msg, schema, span)
            _observe_delivery(topic, self._bus.source, envelope)
            model = self._models.get(topic)
            if model is not None and envelope.payload.__class__ is not model:
                schema_mismatch(topic, envelope, model)
            out = self._handler(envelope)
            records = self._bus._child_records(envelope, out)  # type: ignore[arg-type]
        except Exception as exc:
            return self._failed(msg, topic, headers, span, exc, envelope)
        finally:
            METRICS.histogram(topic, self._bus.source).observe(time.perf_counter() - started)
        return records

    async def _invoke_async(
        self,
        msg: Message,
        topic: str,
        headers: _OutHeaders | None,
        schema: str | None,
        span: trace.Span | None,
    ) -> list[_Record] | None:
        started = time.perf_counter()
        envelope = None
        try:
            envelope = self._decode(msg, schema, span)
            _observe_delivery(topic, self._bus.source, envelope)
            model = self._models.get(topic)
            if model is not None and envelope.payload.__class__ is not model:
                schema_mismatch(topic, envelope, model)
            out = await self._handler(envelope)  # type: ignore[misc]
            records = self._bus._child_records(envelope, out)
        except Exception as exc:
            return self._failed(msg, topic, headers, span, exc, envelope)
        finally:
            METRICS.histogram(topic, self._bus.source).observe(time.perf_counter() - started)
        return records

    def _dead_letter(
        self,
        msg: Message,
        topic: str,
        headers: _OutHeaders | None,
        exc: Exception,
        envelope: Envelope[Any] | None,
    ) -> _Record | None:
        letter = DeadLetter.of(
            exc,
            topic=topic,
            partition=cast(int, msg.partition()),
            offset=cast(int, msg.offset()),
            service=self._bus.source,
            group=self._group,
        )
        letter.log(exc)
        if letter.loops:
            return None
        out: _OutHeaders = list(headers or ())
        if envelope is not None and not any(name == H_SCHEMA for name, _ in out):
            # The message carried its identity only in the JSON: put it where tools look.
            out += envelope_headers(envelope)
        out += letter.headers()
        METRICS.add(_DEAD, topic, self._bus.source)
        return (dlq(topic), msg.value(), msg.key(), out)


class KafkaBus(EnvelopeStamping):
    """The Bus on Apache Kafka (confluent-kafka / librdkafka).

    One idempotent producer serves `publish`; each subscription has its own consumer, its own
    consumer thread and its own producer (transactional if asked), so one member's commit never
    waits for another's traffic.

    `batch_size` caps the messages handled between two fetches; `commit_interval` (seconds)
    spaces the offset commits of non-transactional subscriptions (0 commits after every batch):
    a process killed outright redelivers at most that much finished work. `outage_timeout`
    (seconds) is how long a subscription waits out a broker outage (librdkafka reconnects and
    retries meanwhile) before it fails with BusUnavailableError for the runtime to restart the
    service in place.
    """

    def __init__(
        self,
        source: str,
        bootstrap: str,
        registry: TopicRegistry | None = None,
        clock: Clock | None = None,
        producer_config: dict[str, Any] | None = None,
        consumer_config: dict[str, Any] | None = None,
        *,
        batch_size: int = 1000,
        poll_timeout: float = 0.1,
        flush_timeout: float = 30.0,
        commit_interval: float = 1.0,
        outage_timeout: float = 90.0,
        instance: str | None = None,
        broadcast_wait_ms: int = 0,
    ) -> None:
        self.source = source
        #: Stable across restarts of this instance: names its broadcast members' groups.
        self.instance = instance or socket.gethostname()
        self.bootstrap = bootstrap
        self.clock: Clock = clock or WallClock()
        self._registry = registry
        self.producer_config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "client.id": source,
            **DEFAULT_PRODUCER_CONFIG,
            **(producer_config or {}),
        }
        self.consumer_config: dict[str, Any] = dict(consumer_config or {})
        #: How long the broker may hold a broadcast member's fetch to fill it (0: answer at
        #: once). Broadcast members read everything everywhere (marks, reference data): at
        #: 1,000 ticks/s each fetch brought 1-3 ticks, and the batch cycle around them cost
        #: risk and portfolio ~18 % of a CPU each; 10 ms batches halved it.
        self.broadcast_config: dict[str, Any] = (
            {"fetch.wait.max.ms": broadcast_wait_ms, "fetch.min.bytes": 1 << 20}
            if broadcast_wait_ms > 0
            else {}
        )
        self.batch_size = batch_size
        self.commit_interval = commit_interval
        self.poll_timeout = poll_timeout
        self.flush_timeout = flush_timeout
        self.outage_timeout = outage_timeout
        # Beyond the outage wait, the longest a consumer-thread step may take (each Kafka call
        # there is bounded by 10-30 s) before the subscription is declared stuck.
        self.stall_timeout = outage_timeout + 60.0
        self._producer: _Producer | None = None
        self._tx_producer: _Producer | None = None
        self._tx_lock = asyncio.Lock()
        self._subscriptions: list[KafkaSubscription] = []
        self._executor = ThreadPoolExecutor(2, thread_name_prefix=f"qm-bus-{source}")
        self._keys: dict[str, TopicSpec | None] = {}

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def topics(self) -> TopicRegistry:
        """The topic registry: the one given, else the platform's."""
        if self._registry is None:
            self._registry = registry()
        return self._registry

    async def start(self) -> None:
        """Create the producer (subscriptions connect when they start)."""
        self._main_producer()

    async def close(self) -> None:
        """Stop every subscription, flush pending publishes, release the clients."""
        await asyncio.gather(*(s.stop() for s in self._subscriptions))
        self._subscriptions.clear()
        try:
            if self._producer is not None:
                await self.flush(self.flush_timeout)
        finally:
            for producer in (self._producer, self._tx_producer):
                if producer is not None:
                    await self._call(producer.close)
            self._producer = self._tx_producer = None
            self._executor.shutdown(wait=False)

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _main_producer(self) -> _Producer:
        if self._producer is None:
            self._producer = _Producer(self.producer_config)
        return self._producer

    # -- publishing ----------------------------------------------------------------------------

    def _key(self, topic: str, payload: Event) -> str | None:
        try:
            spec = self._keys[topic]
        except KeyError:
            spec = self._keys[topic] = self.topics.get(topic)
        return spec.key_of(payload) if spec is not None else None

    def _record(self, topic: str, envelope: Envelope[Any], key: str | None) -> _Record:
        # No identity headers: the schema name, ids and source lead the JSON itself, where
        # decode reads the name, and every header costs librdkafka and both Python sides
        # several microseconds a message (half the raw client's throughput for five of them).
        # A trace context, when there is one, is the only header; dead letters get the rest.
        if key is None:
            key = self._key(topic, envelope.payload)
        TRADING_METRICS.observe(envelope.payload, envelope.source)
        return (topic, encode(envelope), key, _trace_headers())

    def _child_records(self, parent: Envelope[Any], out: Sequence[Emit] | None) -> list[_Record]:
        if not out:
            return []
        return [
            self._record(item.topic, child, item.key) for item, child in self.children(parent, out)
        ]

    async def _send(
        self, producer: _Producer, topic: str, envelope: Envelope[Any], key: str | None
    ) -> None:
        record = self._record(topic, envelope, key)
        if not producer.produce_nowait(*record):
            await producer.produce(*record)
        self._count_produced(topic)

    def _count_produced(self, topic: str, count: int = 1) -> None:
        METRICS.add(_PRODUCED, topic, self.source, count)

    async def publish(
        self,
        topic: str,
        payload: Event,
        *,
        key: str | None = None,
        ts_event: int | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> Envelope[Any]:
        """Wrap `payload` in a new envelope and queue it for `topic`; returns the envelope."""
        queued = self.publish_nowait(
            topic,
            payload,
            key=key,
            ts_event=ts_event,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )
        if queued is not None:
            return queued
        # The producer's queue is full: wait for room (a new envelope, none was sent).
        now = self.clock.now_ns()
        envelope = Envelope.wrap(
            payload,
            source=self.source,
            ts_event=now if ts_event is None else ts_event,
            ts_init=now,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )
        producer = self._producer or self._main_producer()
        record = self._record(topic, envelope, key)
        if not producer.produce_nowait(*record):
            await producer.produce(*record)
        METRICS.add(_PRODUCED, topic, self.source)
        return envelope

    def publish_nowait(
        self,
        topic: str,
        payload: Event,
        *,
        key: str | None = None,
        ts_event: int | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> Envelope[Any] | None:
        """`publish` without a coroutine, for loops that publish many events: queue the new
        envelope if the producer's local queue has room and return it; None when the queue is
        full, with nothing queued or counted (the caller then awaits `publish`, which waits).
        """
        now = self.clock.now_ns()
        envelope = Envelope.wrap(
            payload,
            source=self.source,
            ts_event=now if ts_event is None else ts_event,
            ts_init=now,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )
        value = encode(envelope)
        if key is None:
            key = self._key(topic, payload)
        producer = self._producer or self._main_producer()
        if not producer.produce_nowait(topic, value, key, _trace_headers()):
            return None
        TRADING_METRICS.observe(payload, self.source)
        METRICS.add(_PRODUCED, topic, self.source)
        return envelope

    async def publish_envelope(
        self, topic: str, envelope: Envelope[Any], *, key: str | None = None
    ) -> None:
        """Publish an already-wrapped envelope as it is (replay, forwarding)."""
        await self._send(self._main_producer(), topic, envelope, key)

    async def publish_raw(
        self, topic: str, value: bytes, *, key: str | None = None, headers: Headers | None = None
    ) -> None:
        """Publish bytes as they are (tools, tests of malformed input)."""
        out: _OutHeaders = list(headers or [])
        await self._main_producer().produce(topic, value, key, out)
        self._count_produced(topic)

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait until every publish so far is acknowledged; raise BusDeliveryError if any failed.

        Messages still in flight when `timeout` runs out are waited for through a broker
        outage, up to `outage_timeout` in all: librdkafka is still retrying them.
        """
        if self._producer is not None:
            await self._call(
                self._producer.flush_through_outage,
                min(timeout, self.flush_timeout),
                max(timeout, self.outage_timeout),
                self.source,
            )

    # -- transactions --------------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[KafkaTransaction]:
        """Publish atomically: committed on normal exit, aborted if the block raises.

        Transactions of one bus run one at a time on its transactional producer.
        """
        async with self._tx_lock:
            producer = await self._transactional_producer()
            await self._call(producer.producer.begin_transaction)
            try:
                yield KafkaTransaction(self, producer)
            except BaseException:
                await self._call(self._abort, producer)
                raise
            await self._call(self._commit_transaction, producer)

    async def _transactional_producer(self) -> _Producer:
        if self._tx_producer is None:
            producer = _Producer(
                {
                    **TRANSACTIONAL_PRODUCER_CONFIG,
                    **self.producer_config,
                    "transactional.id": f"{self.source}.bus.{uuid.uuid4().hex}",
                }
            )
            await self._call(producer.producer.init_transactions, 30.0)
            self._tx_producer = producer
        return self._tx_producer

    def _abort(self, producer: _Producer) -> None:
        try:
            _retrying(lambda: producer.producer.abort_transaction(30))
        except KafkaException:
            # A producer that cannot abort is unusable; the next transaction gets a new one.
            self._tx_producer = None
            raise
        finally:
            producer.take_errors()

    def _commit_transaction(self, producer: _Producer) -> None:
        try:
            _retrying(lambda: producer.producer.commit_transaction(30))
        except KafkaException as exc:
            err = _kafka_error(exc)
            if err is not None and err.txn_requires_abort():
                self._abort(producer)
                raise BusTransactionError(f"transaction aborted: {err}") from exc
            self._tx_producer = None
            raise
        errors = producer.take_errors()
        if errors:
            raise BusDeliveryError(f"transaction committed with {len(errors)} failures", errors)

    # -- consuming -----------------------------------------------------------------------------

    def subscribe(
        self,
        group: str,
        topics: Sequence[str],
        handler: Handler,
        *,
        transactional: bool = False,
        output_after_batch: bool = False,
        on_batch: BatchHook | None = None,
        on_assign: AssignHook | None = None,
        on_revoke: RevokeHook | None = None,
        broadcast: bool = False,
    ) -> KafkaSubscription:
        """Create a consumer-group member over `topics`; `start()` it to run.

        Offsets are committed only after the handler's output and dead letters are acknowledged;
        `transactional=True` commits output and offsets in one Kafka transaction. `on_batch` is
        awaited after each consumed batch's handlers, before that commit; `on_assign` with the
        partitions a rebalance gave this member, before the first batch that follows it;
        `on_revoke` with those it gives up, before the rebalance completes.
        `broadcast=True`: every partition, no group membership; resumes where this instance
        (`instance`) committed, else from where each partition ends at `start()`.
        `output_after_batch=True` holds a batch's output until `on_batch` has returned.
        """
        check_delivery(transactional, output_after_batch, broadcast)
        subscription = KafkaSubscription(
            self,
            group,
            topics,
            handler,
            transactional=transactional,
            output_after_batch=output_after_batch,
            on_batch=on_batch,
            on_assign=on_assign,
            on_revoke=on_revoke,
            consumer_config=(
                {**self.consumer_config, **self.broadcast_config}
                if broadcast
                else self.consumer_config
            ),
            batch_size=self.batch_size,
            poll_timeout=self.poll_timeout,
            commit_interval=self.commit_interval,
            broadcast=broadcast,
        )
        self._subscriptions.append(subscription)
        return subscription

    def subscribe_raw(
        self,
        group: str,
        topics: Sequence[str],
        handler: RawHandler,
        *,
        on_batch: BatchHook | None = None,
    ) -> KafkaSubscription:
        """Create a consumer-group member whose handler gets every record undecoded."""
        subscription = KafkaSubscription(
            self,
            group,
            topics,
            handler,
            transactional=False,
            on_batch=on_batch,
            consumer_config=self.consumer_config,
            batch_size=self.batch_size,
            poll_timeout=self.poll_timeout,
            commit_interval=self.commit_interval,
            raw=True,
        )
        self._subscriptions.append(subscription)
        return subscription


def ensure_topics(
    bootstrap: str,
    registry: TopicRegistry,
    extra: list[TopicSpec] | None = None,
    *,
    replication_factor: int = 1,
    timeout: float = 30.0,
) -> list[str]:
    """Create every topic of `registry` (and `extra`) with its `.dlq` twin; return those created.

    A dead-letter twin gets the same partitions as its topic. Topics that exist are left alone
    (a different partition count is logged, not changed). Blocks until the broker's metadata
    shows every topic, so producers and consumers can use them at once.
    """
    specs: dict[str, TopicSpec] = {}
    for spec in [*registry, *(extra or [])]:
        specs[spec.name] = spec
        specs[dlq(spec.name)] = spec
    if not specs:
        return []
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [
            NewTopic(
                name,
                num_partitions=spec.partitions,
                replication_factor=replication_factor,
                config=dict(spec.config),
            )
            for name, spec in specs.items()
        ],
        request_timeout=timeout,
    )
    created: list[str] = []
    for name, future in futures.items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            err = _kafka_error(exc)
            if err is None or err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    deadline = time.monotonic() + timeout
    while True:
        metadata = admin.list_topics(timeout=timeout)
        missing = [n for n in specs if n not in metadata.topics]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics not visible after {timeout}s: {missing}")
        time.sleep(0.05)
    for name, spec in specs.items():
        have = len(metadata.topics[name].partitions)
        if have != spec.partitions:
            log.warning(
                "topic %s has %d partitions, the registry says %d", name, have, spec.partitions
            )
    return sorted(created)
