"""The bus protocol shared by the Kafka and in-memory implementations, and its message types."""

from __future__ import annotations

import enum
import logging
import zlib
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict

from quantmesh_common.clock import Clock
from quantmesh_common.envelope import DecodeError, Envelope, Event
from quantmesh_common.topics import DLQ_SUFFIX, TopicRegistry

#: Message headers as on Kafka: ordered (name, value) pairs.
Headers = list[tuple[str, bytes]]

# Header names, set on every message and on dead letters.
H_SCHEMA = "qm-schema"
H_SCHEMA_VERSION = "qm-schema-version"
H_EVENT_ID = "qm-event-id"
H_CORRELATION_ID = "qm-correlation-id"
H_SOURCE = "qm-source"
H_ERROR = "qm-error"
H_ERROR_TYPE = "qm-error-type"
H_DLQ_TOPIC = "qm-dlq-topic"
H_DLQ_PARTITION = "qm-dlq-partition"
H_DLQ_OFFSET = "qm-dlq-offset"
H_DLQ_SERVICE = "qm-dlq-service"
H_DLQ_GROUP = "qm-dlq-group"

#: Longest error text kept in a dead letter's headers.
MAX_ERROR_CHARS = 4_000

_dlq_log = logging.getLogger("quantmesh_common.bus")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Why and where a message failed: what both buses write on its dead letter and log.

    `kind` is "decode" when the bytes were not a valid envelope, "schema" when they were one
    of a schema the topic does not carry, "handler" when the stage's handler raised.
    """

    topic: str
    partition: int
    offset: int
    service: str
    group: str
    error: str
    kind: str

    @classmethod
    def of(
        cls, exc: Exception, *, topic: str, partition: int, offset: int, service: str, group: str
    ) -> DeadLetter:
        """Describe the failure `exc` of the message at topic/partition/offset."""
        if isinstance(exc, SchemaMismatchError):
            kind = "schema"
        else:
            kind = "decode" if isinstance(exc, DecodeError) else "handler"
        error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        return cls(topic, partition, offset, service, group, error, kind)

    @property
    def loops(self) -> bool:
        """True for a failure on a dead-letter topic, whose own twin is itself: skip, not send."""
        return self.topic.endswith(DLQ_SUFFIX)

    @classmethod
    def from_headers(cls, headers: Headers | None) -> DeadLetter | None:
        """Read back what `headers()` wrote on a dead letter; None if they are not all there."""
        found = {name: value for name, value in headers or () if name.startswith("qm-")}
        try:
            return cls(
                topic=found[H_DLQ_TOPIC].decode(),
                partition=int(found[H_DLQ_PARTITION]),
                offset=int(found[H_DLQ_OFFSET]),
                service=found[H_DLQ_SERVICE].decode(),
                group=found[H_DLQ_GROUP].decode(),
                error=found[H_ERROR].decode(errors="replace"),
                kind=found[H_ERROR_TYPE].decode(),
            )
        except (KeyError, ValueError, AttributeError):
            return None

    def headers(self) -> list[tuple[str, bytes]]:
        """The headers added to the original message's on its dead letter."""
        return [
            (H_ERROR, self.error.encode()),
            (H_ERROR_TYPE, self.kind.encode()),
            (H_DLQ_TOPIC, self.topic.encode()),
            (H_DLQ_PARTITION, str(self.partition).encode()),
            (H_DLQ_OFFSET, str(self.offset).encode()),
            (H_DLQ_SERVICE, self.service.encode()),
            (H_DLQ_GROUP, self.group.encode()),
        ]

    def log(self, exc: Exception) -> None:
        """Log the failure at ERROR, with the handler's traceback when it raised."""
        fields = {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "group": self.group,
            "service": self.service,
            "error_type": self.kind,
            "error": self.error,
        }
        message = (
            "dead letter could not be processed; skipped"
            if self.loops
            else ("message dead-lettered")
        )
        _dlq_log.error(message, exc_info=exc if self.kind == "handler" else None, extra=fields)


def partition_of(key: str, partitions: int) -> int:
    """The partition a message keyed `key` lands on among a topic's `partitions`.

    Both buses place keyed messages this way: the Kafka bus's producers keep librdkafka's
    default partitioner (consistent_random: CRC-32 of the key's bytes modulo the partition
    count; the contract test checks it on the broker), and the in-memory bus calls this. A
    stage that acts on its own (timers, snapshots) tells its accounts from another member's by
    it, against its subscription's `assignment()`.
    """
    return zlib.crc32(key.encode()) % partitions


class BusUnavailableError(RuntimeError):
    """The broker did not complete what a subscription needed in time (an outage).

    The subscription fails without committing its batch; the runtime then restarts the service
    in place, rebuilding its state from what was committed, as a new process would.
    """


class SchemaMismatchError(DecodeError):
    """A valid envelope whose schema is not the model of the (registered) topic it came on."""


def topic_model(registry: TopicRegistry, topic: str) -> type[Event] | None:
    """The model every message on `topic` must carry; None when the bus does not check.

    Only registered topics are checked; a `.dlq` twin carries whatever failed on its topic.
    """
    if topic.endswith(DLQ_SUFFIX):
        return None
    spec = registry.get(topic)
    return None if spec is None else spec.model


def schema_mismatch(topic: str, envelope: Envelope[Any], model: type[Event]) -> None:
    """Raise SchemaMismatchError unless `envelope`'s payload is `model` (or a subclass of it).

    Both buses call it once they see a payload that is not exactly `model`, so a handler
    never sees another topic's event (it would take it for its own, or drop it silently).
    """
    if isinstance(envelope.payload, model):
        return
    raise SchemaMismatchError(
        f"schema {envelope.schema_name!r} is not the model of topic {topic!r} "
        f"({model.SCHEMA_NAME!r})"
    )


def envelope_headers(envelope: Envelope[Any]) -> Headers:
    """The envelope's identity as headers (schema, version, ids, source), for dead letters.

    The same values lead the envelope's JSON; a message on Kafka carries no copy of them
    (headers are costly per message), so a dead letter adds them for whoever inspects it.
    """
    return [
        (H_SCHEMA, envelope.schema_name.encode()),
        (H_SCHEMA_VERSION, str(envelope.schema_version).encode()),
        (H_EVENT_ID, envelope.event_id.encode()),
        (H_CORRELATION_ID, envelope.correlation_id.encode()),
        (H_SOURCE, envelope.source.encode()),
    ]


@dataclass(frozen=True, slots=True)
class Emit:
    """An event a handler asks the bus to publish after it returns.

    The bus wraps it as a child of the envelope being handled (same correlation id, causation
    = that envelope's event id). `key` defaults to the topic's key field; `ts_event` to now.
    """

    topic: str
    payload: Event
    key: str | None = None
    ts_event: int | None = None


#: A handler takes an envelope and returns the events to emit.
#: It may be a plain function or a coroutine function. Raising an Exception sends the message
#: to the topic's `.dlq` twin and the consumer carries on; raising a BaseException that is not
#: an Exception (a crash) stops the subscription without committing, so the message is
#: redelivered to the group.
Handler = Callable[
    [Envelope[Any]],
    Sequence[Emit] | Awaitable[Sequence[Emit] | None] | None,
]

#: Awaited once per consumed batch, after its handlers ran and before its output and offsets
#: are committed: a stage writes what its handlers buffered (one database transaction per
#: batch instead of one per message). Raising crashes the subscription like a handler's
#: BaseException: nothing of the batch is committed and the group gets it again, so what the
#: handlers and the hook did must be idempotent under redelivery.
BatchHook = Callable[[], Awaitable[None]]

#: Awaited with the (topic, partition) pairs newly assigned to a member, the first assignment
#: included, before the member handles any message of them: with the first batch after the
#: assignment, not at the assignment itself (so a member's first call may already hold
#: partitions another member owned before). A stage whose state is keyed like
#: its input (positions by account) reloads what it holds for them from its store: the member
#: that owned them before wrote it there before committing (its batch hooks run before its
#: commits). Raising crashes the subscription like a handler's BaseException.
AssignHook = Callable[[Sequence[tuple[str, int]]], Awaitable[None]]

#: Awaited with the (topic, partition) pairs a member is about to give up, on the event loop,
#: before any other member is given them: when another member joins, and when this one stops.
#: A stage whose own tasks act for the partitions it owns (timers) lets a running action finish
#: and stops acting for these, so the next owner, which reloads from the store, never meets an
#: action of the old owner stored after its reload. Not awaited for partitions lost without a
#: rebalance (the member failed, or the group dropped it): another member may own them already.
#: Raising crashes the subscription like a handler's BaseException.
RevokeHook = Callable[[Sequence[tuple[str, int]]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A consumed record as it is on the topic: where it sits, its bytes and its headers.

    What a raw subscription (`Bus.subscribe_raw`) hands its handler, undecoded: for readers
    of records that may not be envelopes at all, such as dead letters of malformed bytes.
    """

    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes | None
    headers: Headers

    def header(self, name: str) -> bytes | None:
        """The value of the last header called `name` (a later one overrides), or None."""
        return next((value for n, value in reversed(self.headers) if n == name), None)


#: A raw subscription's handler: a plain or coroutine function of one RawMessage. It emits
#: nothing (it may publish through the bus itself). Raising an Exception dead-letters the
#: record as for `Handler` (on a dead-letter topic: logged and skipped); a BaseException
#: crashes the subscription and the record is redelivered.
RawHandler = Callable[[RawMessage], Awaitable[None] | None]


class EnvelopeStamping:
    """How a bus stamps what it publishes: its service as `source`, its clock for the times.

    Both buses inherit it, so an envelope, and a handler output's child envelope, are made
    the same way on Kafka and in memory.
    """

    source: str
    clock: Clock

    def wrap(
        self,
        payload: Event,
        *,
        ts_event: int | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> Envelope[Any]:
        """Wrap `payload` in a new envelope from this bus's source, stamped by its clock."""
        now = self.clock.now_ns()
        return Envelope.wrap(
            payload,
            source=self.source,
            ts_event=now if ts_event is None else ts_event,
            ts_init=now,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )

    def children(
        self, parent: Envelope[Any], emits: Sequence[Emit]
    ) -> list[tuple[Emit, Envelope[Any]]]:
        """A handler's outputs as envelopes caused by `parent`, all stamped with one `now`."""
        now = self.clock.now_ns()
        return [
            (
                item,
                parent.child(
                    item.payload,
                    source=self.source,
                    ts_event=now if item.ts_event is None else item.ts_event,
                    ts_init=now,
                ),
            )
            for item in emits
        ]


class DeliveryOptions(TypedDict, total=False):
    """How a subscription holds a batch's output until its store is written (Bus.subscribe)."""

    transactional: bool
    output_after_batch: bool


def check_delivery(transactional: bool, output_after_batch: bool, broadcast: bool) -> None:
    """Refuse the delivery options that contradict each other (Bus.subscribe)."""
    if broadcast and transactional:
        raise ValueError("a broadcast subscription cannot be transactional")
    if transactional and output_after_batch:
        raise ValueError(
            "output_after_batch is the alternative to transactional: a transaction already"
            " holds the output until the batch hook returned"
        )


class SubscriptionState(enum.Enum):
    """Life cycle of a subscription."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"


class Subscription(Protocol):
    """One consumer-group member running a handler over some topics."""

    @property
    def group(self) -> str:
        """The consumer group this member belongs to."""
        ...

    @property
    def state(self) -> SubscriptionState:
        """Where the subscription is in its life cycle."""
        ...

    @property
    def error(self) -> BaseException | None:
        """The crash that failed this subscription, if any."""
        ...

    def assignment(self) -> list[tuple[str, int]]:
        """The (topic, partition) pairs currently assigned to this member."""
        ...

    async def start(self) -> None:
        """Join the group and begin consuming; returns once the member is running."""
        ...

    async def stop(self) -> None:
        """Finish the in-flight batch, commit, leave the group."""
        ...


class Transaction(Protocol):
    """Publishes that become visible together on commit, or never on abort."""

    async def publish(
        self, topic: str, payload: Event, *, key: str | None = None, ts_event: int | None = None
    ) -> Envelope[Any]:
        """Publish inside the transaction."""
        ...


class Bus(Protocol):
    """Publish events and run handlers over topics, with at-least-once or transactional delivery.

    `source` is the service name written on every envelope this bus wraps.
    """

    source: str

    async def start(self) -> None:
        """Connect (a no-op for the in-memory bus)."""
        ...

    async def close(self) -> None:
        """Stop every subscription, flush pending publishes, disconnect."""
        ...

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
        """Wrap `payload` in a new envelope and publish it; returns the envelope."""
        ...

    async def publish_envelope(
        self, topic: str, envelope: Envelope[Any], *, key: str | None = None
    ) -> None:
        """Publish an already-wrapped envelope (replay, forwarding)."""
        ...

    async def publish_raw(
        self, topic: str, value: bytes, *, key: str | None = None, headers: Headers | None = None
    ) -> None:
        """Publish bytes as they are (tools, tests of malformed input)."""
        ...

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait until every publish so far is acknowledged by the broker (acks=all)."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """Group publishes atomically: committed on normal exit, aborted if the block raises."""
        ...

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
    ) -> Subscription:
        """Create a consumer-group member; call `start()` on the result to run it.

        Offsets are committed only after the handler's output (and any dead letter) is
        acknowledged. `transactional=True` produces the output and commits the offsets in one
        Kafka transaction (consume-transform-produce, exactly once for read_committed readers).
        `on_batch` is awaited after each batch's handlers and before that commit; `on_assign`
        with newly assigned partitions before any of their messages is handled (AssignHook);
        `on_revoke` with the partitions it gives up before another member gets them (RevokeHook).

        `output_after_batch=True` is the other way to exactly-once effects, without a
        transaction's cost per batch: a batch's output is produced only after `on_batch` has
        returned, then acknowledged before its offsets commit. A stage that stores its effects
        in the hook, recognises a redelivered input by a key in its store and publishes the
        same output again for it, and whose readers drop what they already applied (by client
        order id, fill id, intent id) has every input applied once and none of its output
        lost. Not with `transactional`.

        `broadcast=True` makes a member that shares nothing with the other members of `group`:
        it reads every partition. A new instance starts from the messages published after its
        `start()` returned (on the in-memory bus: delivered after); on Kafka a restarted one
        resumes where it left off, up to five minutes back (its offsets are committed under a
        group named for the instance, `<group>.<instance id>`, at least once). For state
        every instance needs whole (the last prices a price collar checks against), not for
        work split between instances. It cannot be transactional.
        """
        ...

    def subscribe_raw(
        self,
        group: str,
        topics: Sequence[str],
        handler: RawHandler,
        *,
        on_batch: BatchHook | None = None,
    ) -> Subscription:
        """Create a consumer-group member whose handler gets each record undecoded.

        No envelope is decoded and no schema checked: every record reaches the handler, as
        bytes with its headers. Offsets are committed at least once, as for `subscribe`.
        """
        ...
