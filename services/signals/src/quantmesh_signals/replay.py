"""Rebuild state at start: read what a consumer group already consumed, from the beginning.

A restarted signals instance has lost its indicators, targets, positions and switches. Its
consumer group will resume at its committed offsets, so feeding the engine every message
before those offsets (output discarded: it was published by the run that consumed them)
leaves the strategies exactly where an uninterrupted run would be when live input resumes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from quantmesh_common.bus.kafka import while_settling
from quantmesh_common.envelope import DecodeError, Envelope, decode

log = logging.getLogger(__name__)

#: Messages taken per fetch while replaying.
REPLAY_BATCH = 5_000


def committed_offsets(
    bootstrap: str, group: str, topics: Sequence[str], timeout_s: float = 30.0
) -> dict[tuple[str, int], int]:
    """The offsets `group` committed on each partition of `topics` (partitions without one
    are left out). Reads them without joining the group."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    try:
        metadata = consumer.list_topics(timeout=timeout_s)
        partitions = []
        for topic in topics:
            found = metadata.topics.get(topic)
            if found is None or found.error is not None:
                raise RuntimeError(f"topic {topic!r} does not exist: run quantmesh-topics create")
            partitions += [TopicPartition(topic, p) for p in sorted(found.partitions)]
        # A new cluster answers NOT_COORDINATOR until the group's coordinator is elected.
        committed = while_settling(
            partial(consumer.committed, partitions, timeout=10),
            time.monotonic() + timeout_s,
            f"the offsets group {group} committed",
        )
        return {(tp.topic, tp.partition): tp.offset for tp in committed if tp.offset > 0}
    finally:
        consumer.close()


def replay_consumed(
    bootstrap: str,
    group: str,
    topics: Sequence[str],
    handle: Callable[[Envelope[Any]], object],
    *,
    timeout_s: float = 300.0,
) -> int:
    """Call `handle` for every message `group` consumed on `topics` (read_committed, from the
    start of each partition to its committed offset); return how many were handled.

    Messages that do not decode are skipped (the live run dead-lettered them). Messages
    already deleted by retention cannot be replayed: the state is then rebuilt from what is
    left, which is exact only for indicators whose memory is shorter than the retention.
    """
    ends = committed_offsets(bootstrap, group, topics)
    return replay_range(bootstrap, group, ends, handle, timeout_s=timeout_s)


def replay_range(
    bootstrap: str,
    group: str,
    ends: dict[tuple[str, int], int],
    handle: Callable[[Envelope[Any]], object],
    *,
    start: dict[tuple[str, int], int] | None = None,
    timeout_s: float = 300.0,
) -> int:
    """Call `handle` for each message of the partitions in `ends`, from `start` (default: the
    beginning) up to `ends` (read_committed); return how many were handled.

    Used with the offsets of a snapshot as `start`, it replays only what was consumed since.
    """
    start = start or {}
    ends = {tp: end for tp, end in ends.items() if end > start.get(tp, 0)}
    if not ends:
        return 0
    handled = 0

    def count(envelope: Envelope[Any], _tp: tuple[str, int]) -> None:
        nonlocal handled
        handle(envelope)
        handled += 1

    started = time.monotonic()
    _read(bootstrap, group, start, ends, count, timeout_s)
    log.info(
        "replayed %d messages of group %s",
        handled,
        group,
        extra={"group": group, "messages": handled, "seconds": time.monotonic() - started},
    )
    return handled


#: How far back from a committed offset `last_envelopes` looks for the last message (the
#: offsets just before it may be transaction markers, which are never delivered).
LAST_WINDOW = 32


def last_envelopes(
    bootstrap: str,
    group: str,
    offsets: dict[tuple[str, int], int],
    *,
    timeout_s: float = 60.0,
) -> dict[tuple[str, int], Envelope[Any]]:
    """The last decodable message before each partition's offset in `offsets` (read_committed,
    within the LAST_WINDOW offsets before it); partitions without one are left out."""
    wanted = {tp: end for tp, end in offsets.items() if end > 0}
    if not wanted:
        return {}
    starts = {tp: max(end - LAST_WINDOW, 0) for tp, end in wanted.items()}
    found: dict[tuple[str, int], Envelope[Any]] = {}

    def keep(envelope: Envelope[Any], tp: tuple[str, int]) -> None:
        found[tp] = envelope

    _read(bootstrap, group, starts, wanted, keep, timeout_s)
    return found


def _read(
    bootstrap: str,
    group: str,
    start: dict[tuple[str, int], int],
    ends: dict[tuple[str, int], int],
    handle: Callable[[Envelope[Any], tuple[str, int]], object],
    timeout_s: float,
) -> None:
    """Call `handle(envelope, (topic, partition))` for each message from `start` (default: the
    beginning) up to `ends` (read_committed); messages that do not decode are skipped."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            # Never subscribed nor committed: a throwaway id only satisfies the client.
            "group.id": f"{group}.replay.{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "fetch.max.bytes": 64 * 1024 * 1024,
            # An offset the log no longer holds (retention) moves to the end: nothing is read.
            "auto.offset.reset": "latest",
        }
    )
    try:
        consumer.assign(
            [TopicPartition(t, p, start.get((t, p), OFFSET_BEGINNING)) for (t, p) in ends]
        )
        remaining = dict(ends)
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {group}'s partitions not done in {timeout_s} s")
            for msg in consumer.consume(REPLAY_BATCH, 0.5):
                if msg.error():
                    continue
                tp = (str(msg.topic()), int(msg.partition() or 0))
                end = remaining.get(tp)
                offset = msg.offset()
                if end is None or offset is None or offset >= end:
                    continue
                value = msg.value()
                try:
                    envelope = decode(value if isinstance(value, bytes) else b"")
                except DecodeError:
                    continue
                handle(envelope, tp)
            # The position passes transaction markers that are never delivered as messages.
            positions = consumer.position([TopicPartition(t, p) for (t, p) in remaining])
            for tp_pos in positions:
                key = (tp_pos.topic, tp_pos.partition)
                if tp_pos.offset >= remaining[key]:
                    del remaining[key]
    finally:
        consumer.close()
