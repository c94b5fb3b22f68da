"""The in-memory bus: the Kafka bus's semantics in one process, deterministic and without threads.

Backtests, event replay, the embedded mode and unit tests run the very handlers that run as
services, on this bus. It keeps Kafka's observable rules — topics with partitions, keys that pin
a partition, consumer groups that split partitions among their members, offsets committed only
after a handler's output is published, dead letters, transactions — so a stage that behaves here
behaves on the broker. Delivery is explicit: `run_until_idle()` hands out every pending message in
publish order (then group order) and returns when nothing is left, so a run is reproducible to
the byte.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

from quantmesh_common.bus.base import (
    H_CORRELATION_ID,
    H_EVENT_ID,
    H_SCHEMA,
    H_SCHEMA_VERSION,
    H_SOURCE,
    AssignHook,
    BatchHook,
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
    partition_of,
    schema_mismatch,
    topic_model,
)
from quantmesh_common.clock import Clock, WallClock
from quantmesh_common.envelope import Envelope, Event, decode, encode
from quantmesh_common.topics import TopicRegistry, dlq, registry

log = logging.getLogger(__name__)


#: A message in the log, kept as a plain tuple because it is made and read on every hop:
#: ((topic, partition), offset, key, envelope or None, raw bytes or None, headers or None).
_Slot = tuple[tuple[str, int], list[int]]
Entry = tuple[tuple[str, int], int, str | None, Envelope[Any] | None, bytes | None, Headers | None]


@dataclass(frozen=True, slots=True)
class Record:
    """One message in a partition of the in-memory log, as `records()` shows it."""

    topic: str
    partition: int
    offset: int
    key: str | None
    envelope: Envelope[Any] | None
    raw: bytes | None = None
    headers: Headers | None = None

    @classmethod
    def of(cls, entry: Entry) -> Record:
        """The record view of a log entry."""
        (topic, partition), offset, key, envelope, raw, headers = entry
        return cls(topic, partition, offset, key, envelope, raw, headers)

    def value(self) -> bytes:
        """The message bytes as they would be on Kafka."""
        return _value(self.envelope, self.raw)

    def header(self, name: str) -> bytes | None:
        """The last value of header `name`, or None."""
        return _header(self.headers, name)


def _value(envelope: Envelope[Any] | None, raw: bytes | None) -> bytes:
    if raw is not None:
        return raw
    assert envelope is not None
    return encode(envelope)


def _header(headers: Headers | None, name: str) -> bytes | None:
    for key, value in reversed(headers or ()):
        if key == name:
            return value
    return None


class _Group:
    """A consumer group: members, partition owners, committed offsets and held-back records."""

    __slots__ = ("backlog", "committed", "members", "name", "owners", "topics")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: list[InMemorySubscription] = []
        self.owners: dict[tuple[str, int], InMemorySubscription] = {}
        self.committed: dict[tuple[str, int], int] = {}
        # Records this group must see before anything newer: redeliveries after a crash and
        # records of partitions that had no owner when they arrived.
        self.backlog: deque[Entry] = deque()
        self.topics: set[str] = set()


class InMemorySubscription:
    """A consumer-group member on the in-memory bus."""

    def __init__(
        self,
        bus: InMemoryBus,
        group: str,
        topics: Sequence[str],
        handler: Handler | RawHandler,
        transactional: bool,
        on_batch: BatchHook | None = None,
        *,
        raw: bool = False,
        on_assign: AssignHook | None = None,
        group_id: str | None = None,
        on_revoke: RevokeHook | None = None,
    ) -> None:
        self._bus = bus
        self._group = group
        #: The group this member joins on the bus: `group`, or one of its own if broadcast.
        self.group_id = group if group_id is None else group_id
        self.topics = tuple(topics)
        self.handler = cast(Handler, handler)
        #: The same callable when the member is raw: it gets RawMessage, not envelopes.
        self.raw_handler = cast(RawHandler, handler) if raw else None
        self.is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 - async callable objects
        )
        self.transactional = transactional
        self.on_batch = on_batch
        self.on_assign = on_assign
        self.on_revoke = on_revoke
        #: Partitions the last rebalances gave this member that on_assign has not been told of.
        self.newly_assigned: set[tuple[str, int]] = set()
        #: True: the handler gets each record undecoded, as a RawMessage.
        self.raw = raw
        # The synchronous fast path of run_until_idle cannot await a handler or a hook, and
        # decodes what it delivers.
        self.awaits = self.is_async or on_batch is not None or raw or on_assign is not None
        self._state = SubscriptionState.CREATED
        self._error: BaseException | None = None

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
        """The (topic, partition) pairs currently owned by this member."""
        group = self._bus._groups.get(self.group_id)
        if group is None:
            return []
        return sorted(tp for tp, owner in group.owners.items() if owner is self)

    async def start(self) -> None:
        """Join the group; partitions are rebalanced across its members at once."""
        if self._state is not SubscriptionState.CREATED:
            raise RuntimeError(f"subscription of group {self._group!r} is {self._state.value}")
        await self._bus._revoke_before(self, joining=True)
        self._bus._join(self)
        self._state = SubscriptionState.RUNNING

    async def stop(self) -> None:
        """Leave the group. Every delivered message was already committed on this bus."""
        if self._state is SubscriptionState.RUNNING:
            await self._bus._revoke_before(self, joining=False)
            self._bus._leave(self)
            self._state = SubscriptionState.STOPPED

    def _fail(self, exc: BaseException) -> None:
        self._bus._leave(self)
        self._state = SubscriptionState.FAILED
        self._error = exc


class _BufferedTransaction:
    """Publishes held back until the transaction commits."""

    def __init__(self, bus: InMemoryBus) -> None:
        self._bus = bus
        self.pending: list[tuple[str, Envelope[Any], str | None]] = []

    async def publish(
        self, topic: str, payload: Event, *, key: str | None = None, ts_event: int | None = None
    ) -> Envelope[Any]:
        """Publish inside the transaction: visible only once it commits."""
        envelope = self._bus.wrap(payload, ts_event=ts_event)
        self.pending.append((topic, envelope, key))
        return envelope


class InMemoryBus(EnvelopeStamping):
    """A Bus in one process: deterministic, thread-free, and faithful to the Kafka semantics.

    `retain=True` keeps every record of every topic for inspection with `records(topic)`
    (tests, reports); without it a record is dropped once every group has consumed it, so a
    backtest over millions of events runs in bounded memory.
    """

    def __init__(
        self,
        source: str,
        registry: TopicRegistry | None = None,
        clock: Clock | None = None,
        *,
        retain: bool = False,
    ) -> None:
        self.source = source
        self.clock: Clock = clock or WallClock()
        self._registry = registry
        self._retain = retain
        self._queue: deque[Entry] = deque()
        self._groups: dict[str, _Group] = {}
        self._groups_by_topic: dict[str, list[_Group]] = {}
        self._broadcasts = 0
        # Per partition, one shared (topic, partition) tuple and its next offset in a cell, so
        # an append costs two dictionary reads; topic -> key -> slot caches the partitioner.
        self._slots: dict[tuple[str, int], _Slot] = {}
        self._slot_of_key: dict[str, dict[str, _Slot]] = {}
        self._round_robin: dict[str, int] = {}
        self._retained: dict[str, list[Entry]] = {}
        self._backlogged: set[str] = set()
        # Set when a held-back record may have become deliverable: after a rebalance, or when
        # a record was held only to keep order behind older held records.
        self._drain_needed = False
        # (topic, partition) -> who gets its next message: (group, owner or None when the
        # group must hold it back). Rebuilt lazily whenever membership or backlogs change.
        self._routes: dict[tuple[str, int], list[tuple[_Group, InMemorySubscription | None]]] = {}
        self._delivering = False
        self.delivered = 0
        # topic -> the model its messages must carry (None: not checked), cached.
        self._models: dict[str, type[Event] | None] = {}

    # -- configuration ---------------------------------------------------------------------

    @property
    def topics(self) -> TopicRegistry:
        """The topic registry: the one given, else the platform's."""
        if self._registry is None:
            self._registry = registry()
        return self._registry

    async def start(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Stop every subscription."""
        for group in list(self._groups.values()):
            for member in list(group.members):
                await member.stop()

    # -- publishing ------------------------------------------------------------------------

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
        """Wrap `payload` and append it to `topic`."""
        envelope = self.wrap(
            payload, ts_event=ts_event, correlation_id=correlation_id, causation_id=causation_id
        )
        self.append(topic, envelope, key)
        return envelope

    async def publish_envelope(
        self, topic: str, envelope: Envelope[Any], *, key: str | None = None
    ) -> None:
        """Append an already-wrapped envelope to `topic`."""
        self.append(topic, envelope, key)

    async def publish_raw(
        self, topic: str, value: bytes, *, key: str | None = None, headers: Headers | None = None
    ) -> None:
        """Append bytes as they are; they are decoded (or dead-lettered) on delivery."""
        self._enqueue(self._slot(topic, key)[0], key, None, value, list(headers or []))

    async def flush(self, timeout: float = 30.0) -> None:
        """Nothing is in flight: an append is acknowledged when it returns."""

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_BufferedTransaction]:
        """Publish atomically: everything on normal exit, nothing if the block raises."""
        tx = _BufferedTransaction(self)
        yield tx
        for topic, envelope, key in tx.pending:
            self.append(topic, envelope, key)

    def append(self, topic: str, envelope: Envelope[Any], key: str | None = None) -> None:
        """Append an envelope to `topic` now: the synchronous core of every publish."""
        if key is None:
            spec = self.topics.get(topic)
            if spec is not None and spec.key_field is not None:
                key = spec.key_of(envelope.payload)
        slot = self._slot_of_key.get(topic, _EMPTY).get(key) if key is not None else None
        if slot is None:
            slot = self._slot(topic, key)
        tp, next_offset = slot
        offset = next_offset[0]
        next_offset[0] = offset + 1
        entry: Entry = (tp, offset, key, envelope, None, None)
        self._queue.append(entry)
        if self._retain:
            self._retained.setdefault(topic, []).append(entry)

    def _enqueue(
        self,
        tp: tuple[str, int],
        key: str | None,
        envelope: Envelope[Any] | None,
        raw: bytes | None,
        headers: Headers | None,
    ) -> None:
        tp, next_offset = self._partition_slot(tp)
        offset = next_offset[0]
        next_offset[0] = offset + 1
        entry: Entry = (tp, offset, key, envelope, raw, headers)
        self._queue.append(entry)
        if self._retain:
            self._retained.setdefault(tp[0], []).append(entry)

    def _partition_slot(self, tp: tuple[str, int]) -> _Slot:
        """The one shared (topic, partition) tuple and next-offset cell of a partition."""
        slot = self._slots.get(tp)
        if slot is None:
            slot = self._slots[tp] = (tp, [0])
        return slot

    def _slot(self, topic: str, key: str | None) -> _Slot:
        """The partition slot a key maps to; round-robin for unkeyed messages."""
        count = self.topics.partitions(topic)
        if key is None:
            turn = self._round_robin.get(topic, 0)
            self._round_robin[topic] = turn + 1
            return self._partition_slot((topic, turn % count))
        by_key = self._slot_of_key.setdefault(topic, {})
        slot = by_key.get(key)
        if slot is None:
            # crc32 is stable across processes and runs, unlike hash() on str.
            slot = by_key[key] = self._partition_slot((topic, partition_of(key, count)))
        return slot

    # -- consuming -------------------------------------------------------------------------

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
    ) -> InMemorySubscription:
        """Create a member of `group` over `topics`; `start()` it to join.

        Every delivery here is a batch of one: `on_batch` is awaited after each, before its
        output is published and its offset committed. `on_assign` is awaited with the
        partitions a rebalance gave the member before it is given any of their messages, and
        `on_revoke` with those a member gives up, before the rebalance that moves them.
        `broadcast=True` joins a group of its own, which sees what is delivered after it joins.
        Output always follows the hook here, so `output_after_batch` changes nothing.
        """
        if not topics:
            raise ValueError("a subscription needs at least one topic")
        check_delivery(transactional, output_after_batch, broadcast)
        group_id = None
        if broadcast:
            self._broadcasts += 1
            group_id = f"{group}#{self._broadcasts}"
        return InMemorySubscription(
            self,
            group,
            topics,
            handler,
            transactional,
            on_batch,
            on_assign=on_assign,
            group_id=group_id,
            on_revoke=on_revoke,
        )

    def subscribe_raw(
        self,
        group: str,
        topics: Sequence[str],
        handler: RawHandler,
        *,
        on_batch: BatchHook | None = None,
    ) -> InMemorySubscription:
        """Create a member of `group` whose handler gets every record undecoded (RawMessage)."""
        if not topics:
            raise ValueError("a subscription needs at least one topic")
        return InMemorySubscription(self, group, topics, handler, False, on_batch, raw=True)

    def _join(self, member: InMemorySubscription) -> None:
        group = self._groups.get(member.group_id)
        if group is None:
            group = self._groups[member.group_id] = _Group(member.group_id)
        group.members.append(member)
        for topic in member.topics:
            if topic not in group.topics:
                group.topics.add(topic)
                self._groups_by_topic.setdefault(topic, []).append(group)
        self._rebalance(group)

    def _leave(self, member: InMemorySubscription) -> None:
        group = self._groups[member.group_id]
        if member in group.members:
            group.members.remove(member)
            if member.group_id != member.group:
                # A broadcast member's group ends with it; kept, it would hold every record
                # published later for an owner that never comes.
                self._forget(group)
                return
            self._rebalance(group)

    def _forget(self, group: _Group) -> None:
        del self._groups[group.name]
        for topic in group.topics:
            self._groups_by_topic[topic].remove(group)
        self._routes.clear()

    def _model(self, topic: str) -> type[Event] | None:
        try:
            return self._models[topic]
        except KeyError:
            model = self._models[topic] = topic_model(self.topics, topic)
            return model

    def _route(self, tp: tuple[str, int]) -> list[tuple[_Group, InMemorySubscription | None]]:
        route = [
            (group, None if group.backlog else group.owners.get(tp))
            for group in self._groups_by_topic.get(tp[0], ())
        ]
        self._routes[tp] = route
        return route

    def _rebalance(self, group: _Group) -> None:
        """Assign each topic's partitions in ranges over its members, in join order.

        As Kafka's range assignor (the Kafka bus's): partition i of every topic with the same
        count goes to the same member, so what is keyed alike meets in one member.
        """
        self._routes.clear()
        before = dict(group.owners)
        group.owners.clear()
        if group.backlog:
            self._drain_needed = True
        group.owners.update(self._ranges(group.topics, group.members))
        for tp, owner in group.owners.items():
            if before.get(tp) is not owner:
                owner.newly_assigned.add(tp)
        for member in group.members:
            member.newly_assigned &= {tp for tp, o in group.owners.items() if o is member}

    def _ranges(
        self, topics: set[str], members: list[InMemorySubscription]
    ) -> dict[tuple[str, int], InMemorySubscription]:
        """Each topic's partitions in ranges over the members that read it, in join order."""
        owners: dict[tuple[str, int], InMemorySubscription] = {}
        for topic in sorted(topics):
            readers = [m for m in members if topic in m.topics]
            if not readers:
                continue
            count = self.topics.partitions(topic)
            for partition in range(count):
                owners[(topic, partition)] = readers[partition * len(readers) // count]
        return owners

    async def _revoke_before(self, member: InMemorySubscription, *, joining: bool) -> None:
        """Await on_revoke of every member that gives partitions up when `member` joins/leaves."""
        group = self._groups.get(member.group_id)
        if group is None or not any(m.on_revoke is not None for m in group.members):
            return
        if joining:
            after = self._ranges(group.topics | set(member.topics), [*group.members, member])
        else:
            after = self._ranges(group.topics, [m for m in group.members if m is not member])
        for owner in list(group.members):
            if owner.on_revoke is None:
                continue
            lost = sorted(
                tp for tp, o in group.owners.items() if o is owner and after.get(tp) is not owner
            )
            if lost:
                await owner.on_revoke(lost)

    async def run_until_idle(self, max_messages: int | None = None) -> int:
        """Deliver pending messages, and the messages their handlers emit, until none is left.

        Order is deterministic: publish order, then group join order. Returns the number of
        deliveries. Re-raises KeyboardInterrupt, SystemExit and CancelledError from a handler
        after failing its subscription; other crashes only fail the subscription.
        """
        if self._delivering:
            raise RuntimeError("run_until_idle is already running (called from a handler?)")
        self._delivering = True
        delivered = 0
        limit = -1 if max_messages is None else max_messages
        queue = self._queue
        routes = self._routes
        models = self._models
        try:
            while delivered != limit:
                if self._drain_needed:
                    delivered += await self._drain_backlogs()
                if not queue:
                    break
                entry = queue.popleft()
                tp = entry[0]
                route = routes.get(tp)
                if route is None:
                    route = self._route(tp)
                model = models.get(tp[0], _UNKNOWN)
                if model is _UNKNOWN:
                    model = self._model(tp[0])
                for group, member in route:
                    if member is None:
                        self._hold(group, entry)
                        continue
                    delivered += 1
                    if member.awaits:
                        await self._deliver_async(group, member, entry)
                        continue
                    # The synchronous delivery, inlined: this is every backtest's hot path.
                    envelope = entry[3]
                    try:
                        if envelope is None:
                            envelope = _decode(entry)
                        if model is not None and envelope.payload.__class__ is not model:
                            schema_mismatch(tp[0], envelope, model)
                        out = member.handler(envelope)
                    except Exception as exc:  # a poison message: dead-letter it, carry on
                        self._dead_letter(group, entry, exc, envelope)
                    except BaseException as exc:
                        self._crash(group, member, entry, exc)
                        continue
                    else:
                        if out:
                            self._emit(envelope, out)  # type: ignore[arg-type]
                    group.committed[tp] = entry[1] + 1
        finally:
            self._delivering = False
            self.delivered += delivered
        return delivered

    def pending(self) -> int:
        """Messages not yet delivered to every group (queued plus held back)."""
        return len(self._queue) + sum(len(g.backlog) for g in self._groups.values())

    def _hold(self, group: _Group, entry: Entry, *, front: bool = False) -> None:
        if not group.backlog:
            self._routes.clear()  # the group now holds everything back until it drains
        self._backlogged.add(group.name)
        if entry[0] in group.owners:
            self._drain_needed = True
        if front:
            group.backlog.appendleft(entry)
        else:
            group.backlog.append(entry)

    async def _drain_backlogs(self) -> int:
        self._drain_needed = False
        delivered = 0
        order = list(self._groups)
        for name in sorted(self._backlogged, key=order.index):
            group = self._groups[name]
            kept: deque[Entry] = deque()
            stuck: set[tuple[str, int]] = set()
            while group.backlog:
                entry = group.backlog.popleft()
                member = group.owners.get(entry[0])
                # A partition without an owner keeps its records, in order, for later.
                if member is None or entry[0] in stuck:
                    stuck.add(entry[0])
                    kept.append(entry)
                    continue
                delivered += 1
                await self._deliver_async(group, member, entry)
            group.backlog = kept
            if not kept:
                self._backlogged.discard(name)
                self._routes.clear()
        return delivered

    async def _deliver_async(
        self, group: _Group, member: InMemorySubscription, entry: Entry
    ) -> None:
        """Deliver one entry to a member, awaiting its handler if it is a coroutine function.

        A raw member gets the entry undecoded, as a RawMessage, and publishes nothing.
        """
        envelope = entry[3]
        out: Any = None
        if member.on_assign is not None and member.newly_assigned:
            added = sorted(member.newly_assigned)
            member.newly_assigned.clear()
            try:
                await member.on_assign(added)
            except BaseException as exc:
                self._crash(group, member, entry, exc)
                return
        try:
            if member.raw_handler is not None:
                result = member.raw_handler(_raw_message(entry))
                if member.is_async:
                    await result  # type: ignore[misc]
            else:
                if envelope is None:
                    envelope = _decode(entry)
                model = self._model(entry[0][0])
                if model is not None and envelope.payload.__class__ is not model:
                    schema_mismatch(entry[0][0], envelope, model)
                out = member.handler(envelope)
                if member.is_async:
                    out = await out
        except Exception as exc:
            if not await self._after_batch(group, member, entry):
                return
            self._dead_letter(group, entry, exc, envelope)
        except BaseException as exc:
            self._crash(group, member, entry, exc)
            return
        else:
            if not await self._after_batch(group, member, entry):
                return
            if out:
                self._emit(envelope, out)  # type: ignore[arg-type]
        group.committed[entry[0]] = entry[1] + 1

    async def _after_batch(self, group: _Group, member: InMemorySubscription, entry: Entry) -> bool:
        """Await the member's batch hook; False (the member crashed) if it raised."""
        if member.on_batch is None:
            return True
        try:
            await member.on_batch()
        except BaseException as exc:
            # As on Kafka: the batch's output never appears and its offset stays uncommitted.
            self._crash(group, member, entry, exc)
            return False
        return True

    def _crash(
        self, group: _Group, member: InMemorySubscription, entry: Entry, exc: BaseException
    ) -> None:
        """The consumer died mid-message: nothing of it is committed, the group gets it again."""
        log.error(
            "subscription crashed; message will be redelivered",
            extra={"group": group.name, "topic": entry[0][0], "offset": entry[1]},
        )
        member._fail(exc)
        self._hold(group, entry, front=True)
        if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError):
            raise exc

    def _emit(self, parent: Envelope[Any], emits: Sequence[Emit]) -> None:
        for item, child in self.children(parent, emits):
            self.append(item.topic, child, item.key)

    def _dead_letter(
        self, group: _Group, entry: Entry, exc: Exception, decoded: Envelope[Any] | None = None
    ) -> None:
        (topic, partition), offset, key, envelope, raw, original_headers = entry
        if envelope is None:
            envelope = decoded  # raw bytes that decoded: their identity goes on the letter too
        letter = DeadLetter.of(
            exc,
            topic=topic,
            partition=partition,
            offset=offset,
            service=self.source,
            group=group.name,
        )
        letter.log(exc)
        if letter.loops:
            return
        headers = list(original_headers or ())
        if envelope is not None and _header(original_headers, H_SCHEMA) is None:
            # Kafka messages carry these from their producer; an in-memory record does not.
            headers += [
                (H_SCHEMA, envelope.schema_name.encode()),
                (H_SCHEMA_VERSION, str(envelope.schema_version).encode()),
                (H_EVENT_ID, envelope.event_id.encode()),
                (H_CORRELATION_ID, envelope.correlation_id.encode()),
                (H_SOURCE, envelope.source.encode()),
            ]
        headers += letter.headers()
        # Same partition as the source, so a dead letter sits beside its neighbours' order.
        self._enqueue((dlq(topic), partition), key, None, _value(envelope, raw), headers)

    # -- inspection ------------------------------------------------------------------------

    def records(self, topic: str) -> list[Record]:
        """Every record published to `topic`, in publish order (needs `retain=True`)."""
        if not self._retain:
            raise RuntimeError("records() needs InMemoryBus(retain=True)")
        return [Record.of(entry) for entry in self._retained.get(topic, [])]

    def messages(self, topic: str) -> list[Envelope[Any]]:
        """The envelopes published to `topic`, in order (needs `retain=True`)."""
        return [r.envelope for r in self.records(topic) if r.envelope is not None]

    def committed(self, group: str) -> dict[tuple[str, int], int]:
        """The committed offsets (next offset to read) of `group` per topic-partition."""
        found = self._groups.get(group)
        return dict(found.committed) if found else {}


_EMPTY: dict[str, _Slot] = {}
#: Not yet looked up in the bus's model cache (None means "not checked").
_UNKNOWN: Any = object()


def _raw_message(entry: Entry) -> RawMessage:
    (topic, partition), offset, key, envelope, raw, headers = entry
    return RawMessage(topic, partition, offset, key, _value(envelope, raw), list(headers or ()))


def _decode(entry: Entry) -> Envelope[Any]:
    raw = entry[4]
    assert raw is not None
    schema = _header(entry[5], H_SCHEMA)
    return decode(raw, schema.decode() if schema else None)
