"""The bus contract: every test runs on the in-memory bus and on the Kafka bus, same assertions."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.base import (
    H_DLQ_GROUP,
    H_DLQ_OFFSET,
    H_DLQ_PARTITION,
    H_DLQ_SERVICE,
    H_DLQ_TOPIC,
    H_ERROR,
    H_ERROR_TYPE,
    H_SCHEMA,
    DeadLetter,
    DeliveryOptions,
    Emit,
    RawMessage,
    SubscriptionState,
    partition_of,
)
from quantmesh_common.envelope import Envelope, Event, decode, encode, schemas
from quantmesh_common.topics import dlq

from .conftest import BusHarness


@schemas.register
class Ping(Event):
    """A keyed test event with an exact price."""

    SCHEMA_NAME = "qmtest.contract.ping"
    key: str
    seq: int
    price: Decimal = Decimal("0")


@schemas.register
class Pong(Event):
    """What the test handlers emit in reply to a Ping."""

    SCHEMA_NAME = "qmtest.contract.pong"
    key: str
    seq: int


class Crash(BaseException):
    """Stands for the process dying inside a handler."""


class Recorder:
    """A handler that keeps what it was given."""

    def __init__(self) -> None:
        self.seen: list[Envelope[Any]] = []

    def __call__(self, envelope: Envelope[Any]) -> None:
        self.seen.append(envelope)

    @property
    def seqs(self) -> list[int]:
        return [e.payload.seq for e in self.seen]


async def test_publish_when_consumed_handler_receives_identical_envelope(
    harness: BusHarness,
) -> None:
    # Arrange
    topic = await harness.topic("identity", Ping)
    recorder = Recorder()
    sub = harness.bus.subscribe(harness.group("identity"), [topic], recorder)
    await sub.start()
    price = Decimal("64123.123456789012345678")

    # Act
    sent = await harness.bus.publish(
        topic,
        Ping(key="BTC-USD", seq=1, price=price),
        ts_event=1_700_000_000_123_456_789,
        correlation_id="corr-1",
        causation_id="cause-1",
    )
    await harness.bus.flush()
    await harness.eventually(lambda: len(recorder.seen) == 1)

    # Assert
    got = recorder.seen[0]
    assert got.model_dump() == sent.model_dump()
    assert isinstance(got.payload, Ping)
    assert str(got.payload.price) == "64123.123456789012345678"
    assert (got.event_id, got.correlation_id, got.causation_id) == (
        sent.event_id,
        "corr-1",
        "cause-1",
    )
    assert got.ts_event == 1_700_000_000_123_456_789
    assert got.source == "qmtest-svc"
    assert sub.state is SubscriptionState.RUNNING


async def test_publish_when_many_keys_each_key_arrives_in_order(harness: BusHarness) -> None:
    # Arrange
    topic = await harness.topic("order", Ping, partitions=4)
    recorder = Recorder()
    sub = harness.bus.subscribe(harness.group("order"), [topic], recorder)
    await sub.start()

    # Act
    for seq in range(1_000):
        await harness.bus.publish(topic, Ping(key=f"k{seq % 10}", seq=seq))
    await harness.bus.flush()
    await harness.eventually(lambda: len(recorder.seen) >= 1_000)

    # Assert
    by_key: dict[str, list[int]] = defaultdict(list)
    for env in recorder.seen:
        by_key[env.payload.key].append(env.payload.seq)
    assert len(recorder.seen) == 1_000
    assert sorted(by_key) == [f"k{i}" for i in range(10)]
    for key, seqs in by_key.items():
        assert seqs == sorted(seqs), f"{key} out of order"
        assert len(seqs) == 100


async def test_handler_emits_when_published_are_children_of_input(harness: BusHarness) -> None:
    # Arrange
    pings = await harness.topic("emit-in", Ping)
    pongs = await harness.topic("emit-out", Pong)

    def reply(envelope: Envelope[Any]) -> Sequence[Emit]:
        ping = envelope.payload
        return [Emit(pongs, Pong(key=ping.key, seq=ping.seq * 10))]

    out = Recorder()
    await harness.bus.subscribe(harness.group("emit-stage"), [pings], reply).start()
    await harness.bus.subscribe(harness.group("emit-reader"), [pongs], out).start()

    # Act
    sent = [
        await harness.bus.publish(pings, Ping(key=f"k{i}", seq=i), correlation_id=f"flow-{i}")
        for i in range(5)
    ]
    await harness.bus.flush()
    await harness.eventually(lambda: len(out.seen) == 5)

    # Assert
    by_cause = {e.causation_id: e for e in out.seen}
    assert set(by_cause) == {s.event_id for s in sent}
    for parent in sent:
        child = by_cause[parent.event_id]
        assert child.correlation_id == parent.correlation_id
        assert child.payload == Pong(key=parent.payload.key, seq=parent.payload.seq * 10)
        assert child.source == "qmtest-svc"
        assert child.event_id != parent.event_id


async def test_poison_message_when_consumed_goes_to_dlq_and_consumer_carries_on(
    harness: BusHarness,
) -> None:
    # Arrange
    topic = await harness.topic("poison", Ping, partitions=1)
    group = harness.group("poison")
    handled: list[int] = []

    def handler(envelope: Envelope[Any]) -> None:
        if envelope.payload.seq == 13:
            raise ValueError("unlucky seq 13")
        handled.append(envelope.payload.seq)

    await harness.bus.subscribe(group, [topic], handler).start()

    # Act
    await harness.bus.publish_raw(topic, b"\x00not an envelope", key="k1", headers=[("x", b"1")])
    await harness.bus.publish(topic, Ping(key="k1", seq=13))
    await harness.bus.publish(topic, Ping(key="k1", seq=14))
    await harness.bus.flush()
    await harness.eventually(lambda: handled == [14])
    letters = await harness.eventually_records(dlq(topic), 2)

    # Assert
    garbage, failed = letters
    assert garbage.value == b"\x00not an envelope"
    assert garbage.key == b"k1"
    assert garbage.headers["x"] == b"1"
    assert garbage.headers[H_ERROR_TYPE] == b"decode"
    assert garbage.headers[H_DLQ_OFFSET] == b"0"
    assert failed.headers[H_ERROR_TYPE] == b"handler"
    assert failed.headers[H_ERROR] == b"ValueError: unlucky seq 13"
    assert failed.headers[H_DLQ_OFFSET] == b"1"
    assert failed.headers[H_SCHEMA] == b"qmtest.contract.ping"
    assert failed.key == b"k1"
    for letter in letters:
        assert letter.headers[H_DLQ_TOPIC] == topic.encode()
        assert letter.headers[H_DLQ_PARTITION] == b"0"
        assert letter.headers[H_DLQ_SERVICE] == b"qmtest-svc"
        assert letter.headers[H_DLQ_GROUP] == group.encode()
        assert letter.headers[H_ERROR]
    assert handled == [14]


async def test_raw_subscription_when_reading_dead_letters_gets_each_with_where_and_why_it_failed(
    harness: BusHarness,
) -> None:
    # Arrange: garbage bytes and a Ping its handler refuses go to the dead-letter twin, which
    # a raw subscription reads (an envelope subscription could not: garbage does not decode).
    topic = await harness.topic("rawdlq", Ping, partitions=1)
    group = harness.group("rawdlq")

    def handler(envelope: Envelope[Any]) -> None:
        if envelope.payload.seq == 13:
            raise ValueError("unlucky seq 13")

    seen: list[RawMessage] = []
    await harness.bus.subscribe(group, [topic], handler).start()
    reader = harness.bus.subscribe_raw(harness.group("rawdlq-reader"), [dlq(topic)], seen.append)
    await reader.start()

    # Act
    await harness.bus.publish_raw(topic, b"\x00not an envelope", key="k1")
    await harness.bus.publish(topic, Ping(key="k1", seq=13))
    await harness.bus.publish(topic, Ping(key="k1", seq=14))
    await harness.bus.flush()
    await harness.eventually(lambda: len(seen) == 2)

    # Assert
    garbage, refused = seen
    assert (garbage.topic, garbage.partition, garbage.offset) == (dlq(topic), 0, 0)
    assert (garbage.key, garbage.value) == ("k1", b"\x00not an envelope")
    garbage_letter = DeadLetter.from_headers(garbage.headers)
    assert garbage_letter is not None
    assert (garbage_letter.topic, garbage_letter.partition, garbage_letter.offset) == (topic, 0, 0)
    assert (garbage_letter.kind, garbage_letter.service, garbage_letter.group) == (
        "decode",
        "qmtest-svc",
        group,
    )
    assert garbage_letter.error.startswith("DecodeError: ")
    assert refused.offset == 1
    assert refused.value is not None
    assert decode(refused.value).payload == Ping(key="k1", seq=13)
    assert refused.header(H_SCHEMA) == b"qmtest.contract.ping"
    assert DeadLetter.from_headers(refused.headers) == DeadLetter(
        topic, 0, 1, "qmtest-svc", group, "ValueError: unlucky seq 13", "handler"
    )


async def test_raw_subscription_when_its_handler_raises_dead_letters_the_record_and_carries_on(
    harness: BusHarness,
) -> None:
    # Arrange
    topic = await harness.topic("rawfail", Ping, partitions=1)
    group = harness.group("rawfail")
    seqs: list[int] = []

    async def handler(message: RawMessage) -> None:
        assert message.value is not None
        seq = decode(message.value).payload.seq
        if seq == 1:
            raise ValueError("raw handler refuses seq 1")
        seqs.append(seq)

    await harness.bus.subscribe_raw(group, [topic], handler).start()

    # Act
    for seq in range(3):
        await harness.bus.publish(topic, Ping(key="k1", seq=seq))
    await harness.bus.flush()
    await harness.eventually(lambda: seqs == [0, 2])
    (letter,) = await harness.eventually_records(dlq(topic), 1)

    # Assert
    assert letter.headers[H_ERROR] == b"ValueError: raw handler refuses seq 1"
    assert letter.headers[H_ERROR_TYPE] == b"handler"
    assert letter.headers[H_DLQ_OFFSET] == b"1"
    assert letter.value is not None
    assert decode(letter.value).payload == Ping(key="k1", seq=1)


def test_dead_letter_headers_when_incomplete_are_not_read_as_a_dead_letter() -> None:
    # Arrange
    letter = DeadLetter("md.ticks", 3, 42, "signals", "signals", "DecodeError: x", "decode")
    complete = letter.headers()

    # Act
    read_back = DeadLetter.from_headers(complete)
    partial = DeadLetter.from_headers([h for h in complete if h[0] != H_DLQ_OFFSET])
    garbled = DeadLetter.from_headers([*complete, (H_DLQ_PARTITION, b"three")])

    # Assert
    assert read_back == letter
    assert partial is None
    assert garbled is None
    assert DeadLetter.from_headers(None) is None


async def test_message_when_its_schema_is_not_the_topics_model_is_dead_lettered_unhandled(
    harness: BusHarness,
) -> None:
    # Arrange: the topic carries Pings; a Pong arrives on it, published and as raw bytes.
    topic = await harness.topic("foreign", Ping, partitions=1)
    group = harness.group("foreign")
    recorder = Recorder()
    await harness.bus.subscribe(group, [topic], recorder).start()
    pong = Envelope.wrap(Pong(key="k1", seq=1), source="elsewhere", ts_event=1, ts_init=1)

    # Act
    await harness.bus.publish_envelope(topic, pong, key="k1")
    await harness.bus.publish_raw(topic, encode(pong), key="k1")
    await harness.bus.publish(topic, Ping(key="k1", seq=2))
    await harness.bus.flush()
    await harness.eventually(lambda: recorder.seqs == [2])
    letters = await harness.eventually_records(dlq(topic), 2)

    # Assert
    expected_error = (
        "SchemaMismatchError: schema 'qmtest.contract.pong' is not the model of topic "
        f"'{topic}' ('qmtest.contract.ping')"
    ).encode()
    assert [letter.headers[H_DLQ_OFFSET] for letter in letters] == [b"0", b"1"]
    for letter in letters:
        assert letter.headers[H_ERROR_TYPE] == b"schema"
        assert letter.headers[H_ERROR] == expected_error
        assert letter.headers[H_SCHEMA] == b"qmtest.contract.pong"
        assert letter.headers[H_DLQ_GROUP] == group.encode()
        assert letter.value is not None
        assert decode(letter.value).payload == Pong(key="k1", seq=1)
    await harness.settle()
    assert recorder.seqs == [2]


async def test_consumer_crash_when_uncommitted_message_is_redelivered_to_new_member(
    harness: BusHarness,
) -> None:
    # Arrange
    topic = await harness.topic("crash", Ping, partitions=1)
    group = harness.group("crash")
    first: list[int] = []

    def crashes_on_3(envelope: Envelope[Any]) -> None:
        first.append(envelope.payload.seq)
        if envelope.payload.seq == 3:
            raise Crash("killed while handling seq 3")

    victim = harness.bus.subscribe(group, [topic], crashes_on_3)
    await victim.start()
    for seq in range(3):
        await harness.bus.publish(topic, Ping(key="k", seq=seq))
    await harness.bus.flush()
    await harness.eventually(lambda: first == [0, 1, 2])

    # Act
    await harness.bus.publish(topic, Ping(key="k", seq=3))
    await harness.bus.publish(topic, Ping(key="k", seq=4))
    await harness.bus.flush()
    await harness.eventually(lambda: victim.state is SubscriptionState.FAILED)
    successor = Recorder()
    await harness.bus.subscribe(group, [topic], successor).start()
    await harness.eventually(lambda: successor.seqs[-1:] == [4])

    # Assert
    assert isinstance(victim.error, Crash)
    assert victim.assignment() == []
    assert first == [0, 1, 2, 3]
    assert successor.seqs == [3, 4]


async def test_transaction_when_aborted_is_never_seen_and_committed_one_is(
    harness: BusHarness,
) -> None:
    # Arrange
    topic = await harness.topic("txn", Ping, partitions=1)
    reader = Recorder()
    await harness.bus.subscribe(harness.group("txn-reader"), [topic], reader).start()

    async def abandoned() -> None:
        async with harness.bus.transaction() as tx:
            await tx.publish(topic, Ping(key="k", seq=1))
            await tx.publish(topic, Ping(key="k", seq=2))
            raise RuntimeError("changed my mind")

    # Act
    with pytest.raises(RuntimeError, match="changed my mind"):
        await abandoned()
    async with harness.bus.transaction() as tx:
        await tx.publish(topic, Ping(key="k", seq=3))
        await tx.publish(topic, Ping(key="k", seq=4))
    await harness.eventually(lambda: len(reader.seen) >= 2)
    await harness.settle()

    # Assert
    assert reader.seqs == [3, 4]


class AssignLog:
    """A member's handler and on_assign hook writing one log: what it was told, in order."""

    def __init__(self) -> None:
        self.assigned: set[tuple[str, int]] = set()
        self.handled_before_told: list[tuple[str, int]] = []
        self.calls: list[list[tuple[str, int]]] = []
        self.seqs: list[int] = []

    async def on_assign(self, partitions: Sequence[tuple[str, int]]) -> None:
        self.calls.append(list(partitions))
        self.assigned.update(partitions)

    def __call__(self, envelope: Envelope[Any]) -> None:
        self.seqs.append(envelope.payload.seq)


async def test_on_assign_when_a_member_joins_is_told_its_partitions_before_their_messages(
    harness: BusHarness,
) -> None:
    # Arrange: a member that owns all four partitions and has handled messages of each.
    topic = await harness.topic("assign", Ping, partitions=4)
    group = harness.group("assign")
    first, second = AssignLog(), AssignLog()
    owners = {"first": first, "second": second}

    def handler_of(name: str) -> Any:
        log = owners[name]

        def handle(envelope: Envelope[Any]) -> None:
            member = sub_a if name == "first" else sub_b
            # The partition of this message is one the member owns; it must have been told.
            owned = {tp for tp in member.assignment() if tp[0] == topic}
            if not owned <= log.assigned:
                log.handled_before_told.extend(sorted(owned - log.assigned))
            log(envelope)

        return handle

    sub_a = harness.bus.subscribe(group, [topic], handler_of("first"), on_assign=first.on_assign)
    sub_b = harness.bus.subscribe(group, [topic], handler_of("second"), on_assign=second.on_assign)
    await sub_a.start()
    for seq in range(20):
        await harness.bus.publish(topic, Ping(key=f"k{seq}", seq=seq))
    await harness.bus.flush()
    await harness.eventually(lambda: len(first.seqs) == 20)

    # Act: a second member joins and takes some of the partitions; more messages follow.
    await sub_b.start()
    await harness.eventually(lambda: bool(sub_b.assignment()) and bool(sub_a.assignment()))
    for seq in range(20, 60):
        await harness.bus.publish(topic, Ping(key=f"k{seq % 20}", seq=seq))
    await harness.bus.flush()
    await harness.eventually(lambda: len(set(first.seqs + second.seqs)) == 60)

    # Assert: the first member was told of all four partitions once, before any message; the
    # second of exactly what it took, before its first message; nobody handled a partition
    # it had not been told of.
    all_four = [(topic, p) for p in range(4)]
    assert first.calls[0] == all_four
    assert second.calls
    assert set(second.calls[0]) == set(sub_b.assignment())
    assert second.seqs
    assert first.handled_before_told == []
    assert second.handled_before_told == []


async def test_consumer_group_when_members_share_topics_co_partitions_them(
    harness: BusHarness,
) -> None:
    # Arrange: two topics keyed alike (as a stage's intents and reports are, by account).
    pings = await harness.topic("copart-a", Ping, partitions=4)
    pongs = await harness.topic("copart-b", Pong, partitions=4)
    group = harness.group("copart")
    sub_a = harness.bus.subscribe(group, [pings, pongs], Recorder())
    sub_b = harness.bus.subscribe(group, [pings, pongs], Recorder())

    # Act
    await sub_a.start()
    await sub_b.start()
    await harness.eventually(
        lambda: (
            len(sub_a.assignment()) + len(sub_b.assignment()) == 8
            and bool(sub_a.assignment())
            and bool(sub_b.assignment())
        )
    )

    # Assert: partition i of both topics belongs to the same member.
    for sub in (sub_a, sub_b):
        owned = sub.assignment()
        assert {p for t, p in owned if t == pings} == {p for t, p in owned if t == pongs}


async def test_consumer_group_when_two_members_split_partitions_each_message_once(
    harness: BusHarness,
) -> None:
    # Arrange
    topic = await harness.topic("split", Ping, partitions=4)
    group = harness.group("split")
    a, b = Recorder(), Recorder()
    sub_a = harness.bus.subscribe(group, [topic], a)
    sub_b = harness.bus.subscribe(group, [topic], b)
    await sub_a.start()
    await sub_b.start()
    await harness.eventually(
        lambda: (
            bool(sub_a.assignment())
            and bool(sub_b.assignment())
            and len(sub_a.assignment()) + len(sub_b.assignment()) == 4
        )
    )

    # Act
    for seq in range(200):
        await harness.bus.publish(topic, Ping(key=f"k{seq % 20}", seq=seq))
    await harness.bus.flush()
    await harness.eventually(lambda: len(a.seen) + len(b.seen) >= 200)
    await harness.settle()

    # Assert
    assert set(sub_a.assignment()).isdisjoint(sub_b.assignment())
    assert a.seqs
    assert b.seqs
    assert sorted(a.seqs + b.seqs) == list(range(200))
    keys_a = {e.payload.key for e in a.seen}
    keys_b = {e.payload.key for e in b.seen}
    assert keys_a.isdisjoint(keys_b)


async def test_transactional_stage_when_crashing_after_batches_without_output_loses_none(
    harness: BusHarness,
) -> None:
    # Arrange: pings 0-9 only change the stage's state (no output, like ticks); 10-19 reply.
    pings = await harness.topic("eos-quiet-in", Ping, partitions=1)
    pongs = await harness.topic("eos-quiet-out", Pong, partitions=1)
    group = harness.group("eos-quiet-stage")
    crashed: list[int] = []
    handled: list[int] = []

    def reply(envelope: Envelope[Any]) -> Sequence[Emit]:
        ping = envelope.payload
        if ping.seq == 12 and not crashed:
            crashed.append(ping.seq)
            raise Crash("killed after quiet batches")
        handled.append(ping.seq)
        if ping.seq < 10:
            return []
        return [Emit(pongs, Pong(key=ping.key, seq=ping.seq))]

    reader = Recorder()
    await harness.bus.subscribe(harness.group("eos-quiet-reader"), [pongs], reader).start()
    first = harness.bus.subscribe(group, [pings], reply, transactional=True)
    await first.start()

    # Act: the quiet pings first, handled before the rest arrive, then the replying ones.
    for seq in range(10):
        await harness.bus.publish(pings, Ping(key="k", seq=seq))
    await harness.bus.flush()
    await harness.eventually(lambda: len(handled) >= 10)
    for seq in range(10, 20):
        await harness.bus.publish(pings, Ping(key="k", seq=seq))
    await harness.bus.flush()
    await harness.eventually(lambda: first.state is SubscriptionState.FAILED)
    second = harness.bus.subscribe(group, [pings], reply, transactional=True)
    await second.start()
    await harness.eventually(lambda: len(reader.seen) >= 10)
    await harness.settle()

    # Assert: every reply exactly once; every ping handled, whatever was redelivered.
    assert crashed == [12]
    assert sorted(reader.seqs) == list(range(10, 20))
    assert set(handled) == set(range(20))
    assert second.state is SubscriptionState.RUNNING


async def test_transactional_stage_when_crashing_mid_batch_outputs_exactly_once(
    harness: BusHarness,
) -> None:
    # Arrange
    pings = await harness.topic("eos-in", Ping, partitions=2)
    pongs = await harness.topic("eos-out", Pong, partitions=2)
    group = harness.group("eos-stage")
    crashed: list[int] = []

    def reply(envelope: Envelope[Any]) -> Sequence[Emit]:
        ping = envelope.payload
        if ping.seq == 6 and not crashed:
            crashed.append(ping.seq)
            raise Crash("killed mid-batch")
        return [Emit(pongs, Pong(key=ping.key, seq=ping.seq))]

    sent = [await harness.bus.publish(pings, Ping(key=f"k{i % 4}", seq=i)) for i in range(20)]
    await harness.bus.flush()
    reader = Recorder()
    await harness.bus.subscribe(harness.group("eos-reader"), [pongs], reader).start()

    # Act
    first = harness.bus.subscribe(group, [pings], reply, transactional=True)
    await first.start()
    await harness.eventually(lambda: first.state is SubscriptionState.FAILED)
    second = harness.bus.subscribe(group, [pings], reply, transactional=True)
    await second.start()
    await harness.eventually(lambda: len(reader.seen) >= 20)
    await harness.settle()

    # Assert
    assert crashed == [6]
    assert sorted(reader.seqs) == list(range(20))
    assert sorted(e.causation_id or "" for e in reader.seen) == sorted(s.event_id for s in sent)
    assert second.state is SubscriptionState.RUNNING


async def test_subscription_when_stopped_commits_and_successor_resumes_after_it(
    harness: BusHarness,
) -> None:
    # Arrange
    topic = await harness.topic("stop", Ping, partitions=2)
    group = harness.group("stop")
    before = Recorder()
    sub = harness.bus.subscribe(group, [topic], before)
    await sub.start()
    for seq in range(10):
        await harness.bus.publish(topic, Ping(key=f"k{seq % 2}", seq=seq))
    await harness.bus.flush()
    await harness.eventually(lambda: len(before.seen) == 10)

    # Act
    await sub.stop()
    for seq in range(10, 15):
        await harness.bus.publish(topic, Ping(key=f"k{seq % 2}", seq=seq))
    await harness.bus.flush()
    after = Recorder()
    await harness.bus.subscribe(group, [topic], after).start()
    await harness.eventually(lambda: len(after.seen) >= 5)
    await harness.settle()

    # Assert
    assert sub.state is SubscriptionState.STOPPED
    assert sub.assignment() == []
    assert sorted(before.seqs) == list(range(10))
    assert sorted(after.seqs) == list(range(10, 15))


async def test_consumer_group_when_member_joins_after_work_nothing_is_handled_twice(
    harness: BusHarness,
) -> None:
    # Arrange
    topic = await harness.topic("join", Ping, partitions=4)
    group = harness.group("join")
    a, b = Recorder(), Recorder()
    sub_a = harness.bus.subscribe(group, [topic], a)
    await sub_a.start()
    for seq in range(100):
        await harness.bus.publish(topic, Ping(key=f"k{seq % 20}", seq=seq))
    await harness.bus.flush()
    await harness.eventually(lambda: len(a.seen) == 100)

    # Act
    sub_b = harness.bus.subscribe(group, [topic], b)
    await sub_b.start()
    await harness.eventually(
        lambda: bool(sub_b.assignment()) and len(sub_a.assignment()) + len(sub_b.assignment()) == 4
    )
    for seq in range(100, 200):
        await harness.bus.publish(topic, Ping(key=f"k{seq % 20}", seq=seq))
    await harness.bus.flush()
    await harness.eventually(lambda: len(a.seen) + len(b.seen) >= 200)
    await harness.settle()

    # Assert
    assert sorted(a.seqs + b.seqs) == list(range(200))
    assert b.seqs
    assert min(b.seqs) >= 100


class BufferedStore:
    """A stage that buffers what its handler saw and writes it once per batch, as a DB would."""

    def __init__(self, fail_writes: int = 0) -> None:
        self.buffer: list[int] = []
        self.written: list[list[int]] = []
        self.fail_writes = fail_writes

    def handle(self, envelope: Envelope[Any]) -> None:
        self.buffer.append(envelope.payload.seq)

    async def write(self) -> None:
        if self.fail_writes:
            self.fail_writes -= 1
            self.buffer.clear()  # the failed transaction rolled back
            raise Crash("database down")
        if self.buffer:
            self.written.append(self.buffer)
            self.buffer = []

    @property
    def seqs(self) -> list[int]:
        return [seq for batch in self.written for seq in batch]


async def test_batch_hook_when_batches_consumed_writes_every_message_once_in_order(
    harness: BusHarness,
) -> None:
    # Arrange
    topic = await harness.topic("hook", Ping, partitions=1)
    store = BufferedStore()
    sub = harness.bus.subscribe(harness.group("hook"), [topic], store.handle, on_batch=store.write)
    await sub.start()

    # Act
    for seq in range(300):
        await harness.bus.publish(topic, Ping(key="k", seq=seq))
    await harness.bus.flush()
    await harness.eventually(lambda: len(store.seqs) >= 300)

    # Assert
    assert store.seqs == list(range(300))
    assert store.buffer == []
    assert sub.state is SubscriptionState.RUNNING


#: The two ways a stage makes a batch's output wait for its store (Bus.subscribe).
HELD_OUTPUT = [
    pytest.param({"transactional": True}, id="transactional"),
    pytest.param({"output_after_batch": True}, id="output_after_batch"),
]


@pytest.mark.parametrize("delivery", HELD_OUTPUT)
async def test_batch_hook_when_it_raises_batch_is_redelivered_and_its_output_never_seen(
    harness: BusHarness, delivery: DeliveryOptions
) -> None:
    # Arrange
    pings = await harness.topic("hook-fail-in", Ping, partitions=1)
    pongs = await harness.topic("hook-fail-out", Pong, partitions=1)
    group = harness.group("hook-fail")
    failing = BufferedStore(fail_writes=1)

    def reply_and_buffer(store: BufferedStore) -> Any:
        def reply(envelope: Envelope[Any]) -> Sequence[Emit]:
            store.handle(envelope)
            return [Emit(pongs, Pong(key="k", seq=envelope.payload.seq))]

        return reply

    reader = Recorder()
    await harness.bus.subscribe(harness.group("hook-fail-reader"), [pongs], reader).start()
    for seq in range(5):
        await harness.bus.publish(pings, Ping(key="k", seq=seq))
    await harness.bus.flush()

    # Act
    first = harness.bus.subscribe(
        group, [pings], reply_and_buffer(failing), on_batch=failing.write, **delivery
    )
    await first.start()
    await harness.eventually(lambda: first.state is SubscriptionState.FAILED)
    healthy = BufferedStore()
    second = harness.bus.subscribe(
        group, [pings], reply_and_buffer(healthy), on_batch=healthy.write, **delivery
    )
    await second.start()
    await harness.eventually(lambda: len(healthy.seqs) >= 5 and len(reader.seen) >= 5)
    await harness.settle()

    # Assert
    assert isinstance(first.error, Crash)
    assert failing.written == []
    assert healthy.seqs == [0, 1, 2, 3, 4]
    assert reader.seqs == [0, 1, 2, 3, 4]


async def test_broadcast_members_when_sharing_a_group_each_see_every_later_message(
    harness: BusHarness,
) -> None:
    # Arrange: messages published before anyone reads, then two broadcast members and one
    # ordinary member, all under one group name.
    topic = await harness.topic("broadcast", Ping, partitions=4)
    group = harness.group("broadcast")
    for seq in range(-10, 0):
        await harness.bus.publish(topic, Ping(key=f"k{seq % 20}", seq=seq))
    await harness.bus.flush()
    await harness.pump()
    a, b, member = Recorder(), Recorder(), Recorder()
    sub_a = harness.bus.subscribe(group, [topic], a, broadcast=True)
    sub_b = harness.bus.subscribe(group, [topic], b, broadcast=True)
    sub_m = harness.bus.subscribe(group, [topic], member)
    for sub in (sub_a, sub_b, sub_m):
        await sub.start()
    # No wait for a rebalance or a first fetch: a broadcast member reads every message
    # published after its start() returned.

    # Act
    for seq in range(200):
        await harness.bus.publish(topic, Ping(key=f"k{seq % 20}", seq=seq))
    await harness.bus.flush()
    await harness.eventually(
        lambda: all(len([s for s in r.seqs if s >= 0]) >= 200 for r in (a, b, member)), timeout=60
    )
    await harness.settle()

    # Assert: each broadcast member read all 200 once, in order per key, and none of the
    # earlier ones; the ordinary member kept every partition of its group to itself.
    for recorder in (a, b):
        assert sorted(s for s in recorder.seqs if s >= 0) == list(range(200))
        per_key: dict[str, list[int]] = defaultdict(list)
        for e in recorder.seen:
            if e.payload.seq >= 0:
                per_key[e.payload.key].append(e.payload.seq)
        assert all(seqs == sorted(seqs) for seqs in per_key.values())
        assert not [s for s in recorder.seqs if s < 0]
    assert sorted(s for s in member.seqs if s >= 0) == list(range(200))
    assert len(sub_m.assignment()) == 4


async def test_subscription_when_both_transactional_and_output_after_batch_is_refused(
    harness: BusHarness,
) -> None:
    # Arrange
    topic = await harness.topic("held-twice", Ping)

    # Act / Assert
    with pytest.raises(ValueError, match="alternative to transactional"):
        harness.bus.subscribe(
            harness.group("held-twice"),
            [topic],
            Recorder(),
            transactional=True,
            output_after_batch=True,
        )


async def test_broadcast_subscription_when_transactional_is_refused(harness: BusHarness) -> None:
    # Arrange
    topic = await harness.topic("broadcast-txn", Ping)

    # Act / Assert
    with pytest.raises(ValueError, match="broadcast"):
        harness.bus.subscribe(
            harness.group("broadcast-txn"), [topic], Recorder(), transactional=True, broadcast=True
        )


async def test_keyed_message_when_published_lands_on_the_partition_partition_of_names(
    harness: BusHarness,
) -> None:
    # Arrange: a stage that acts on its own (timers, snapshots) tells its keys by partition_of.
    topic = await harness.topic("partitioner", Ping, partitions=6)
    keys = [f"acc-{n}" for n in range(40)] + ["desk.7@fund/x+y=z", "a" * 120]
    landed: dict[str, int] = {}

    def on_raw(message: RawMessage) -> None:
        assert message.key is not None
        landed[message.key] = message.partition

    await harness.bus.subscribe_raw(harness.group("partitioner"), [topic], on_raw).start()

    # Act
    for seq, key in enumerate(keys):
        await harness.bus.publish(topic, Ping(key=key, seq=seq))
    await harness.bus.flush()
    await harness.eventually(lambda: len(landed) == len(keys))

    # Assert: crc32("acc-1") % 6 == 5 and crc32("acc-4") % 6 == 0, worked out by hand once.
    assert (landed["acc-1"], landed["acc-4"]) == (5, 0)
    assert landed == {key: partition_of(key, 6) for key in keys}


async def test_on_revoke_when_a_member_joins_is_awaited_before_the_new_member_gets_partitions(
    harness: BusHarness,
) -> None:
    # Arrange: a member that owns all four partitions and whose on_revoke is slow (a timer's
    # action in flight), and a second member about to join.
    topic = await harness.topic("revoke", Ping, partitions=4)
    group = harness.group("revoke")
    revoked: list[list[tuple[str, int]]] = []
    joiner_owned_in_hook: list[list[tuple[str, int]]] = []
    release = asyncio.Event()

    async def on_revoke(partitions: Sequence[tuple[str, int]]) -> None:
        revoked.append(list(partitions))
        joiner_owned_in_hook.append(sub_b.assignment())
        await release.wait()

    sub_a = harness.bus.subscribe(group, [topic], Recorder(), on_revoke=on_revoke)
    sub_b = harness.bus.subscribe(group, [topic], Recorder())
    await sub_a.start()
    await harness.eventually(lambda: len(sub_a.assignment()) == 4)

    # Act: the second member joins while the first's hook holds the rebalance.
    joining = asyncio.create_task(sub_b.start())
    try:
        await asyncio.sleep(0)  # the in-memory join runs the hook in this task
        await harness.eventually(lambda: bool(revoked), timeout=60)
        await harness.settle(1.0)
        held = sub_b.assignment()
    finally:
        release.set()  # a failure above must not leave the hook holding the teardown's stop
    await joining
    await harness.eventually(
        lambda: bool(sub_b.assignment()) and len(sub_a.assignment() + sub_b.assignment()) == 4,
        timeout=60,
    )
    before_stop, moved = sub_a.assignment(), sub_b.assignment()
    revoked_on_join = len(revoked)
    await sub_a.stop()

    # Assert: nothing went to the joiner while the hook ran, the hook was given at least what
    # moved (Kafka's eager rebalance revokes everything and gives some back), and a stop
    # revokes what the member still owned.
    assert joiner_owned_in_hook[0] == []
    assert held == []
    assert set(moved) <= set(revoked[0])
    assert set(revoked[revoked_on_join]) == set(before_stop)


def _one_partition_each(*members: Any) -> Callable[[], bool]:
    """A condition: every member holds exactly one partition."""
    return lambda: all(len(member.assignment()) == 1 for member in members)


async def test_consumer_group_when_members_come_and_go_under_load_every_message_is_handled(
    harness: BusHarness,
) -> None:
    # Arrange: one member reads a steady stream; a second joins and leaves three times, each
    # rebalance revoking the first member's partitions and handing some straight back.
    topic = await harness.topic("churn", Ping, partitions=2)
    group = harness.group("churn")
    steady, visitors = Recorder(), Recorder()
    first = harness.bus.subscribe(group, [topic], steady)
    await first.start()
    await harness.eventually(lambda: len(first.assignment()) == 2)
    published = 0

    async def publish(until: int) -> None:
        nonlocal published
        while published < until:
            await harness.bus.publish(topic, Ping(key=f"k{published % 8}", seq=published))
            published += 1
            await harness.pump()

    # Act
    for _ in range(3):
        await publish(published + 40)
        visitor = harness.bus.subscribe(group, [topic], visitors)
        await visitor.start()
        # Publish while the group rebalances, so fetches span the revoke and the assign.
        await publish(published + 40)
        await harness.eventually(_one_partition_each(visitor, first), timeout=60)
        await publish(published + 40)
        await visitor.stop()
        await harness.eventually(lambda: len(first.assignment()) == 2, timeout=60)
    await publish(published + 40)
    await harness.bus.flush()
    await harness.eventually(
        lambda: set(steady.seqs) | set(visitors.seqs) >= set(range(published)), timeout=60
    )

    # Assert: at least once: nothing skipped by a rebalance.
    assert set(steady.seqs) | set(visitors.seqs) == set(range(published))
    assert visitors.seqs
