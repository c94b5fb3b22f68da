"""Tests of UUIDv7 identifiers: layout, ordering and embedded time."""

from __future__ import annotations

import itertools
import time
import types
import uuid

import pytest

from quantmesh_common import ids
from quantmesh_common.ids import event_id, new_id, uuid7, uuid7_int, uuid7_time_ms


def test_uuid7_when_made_has_version_7_and_rfc_variant() -> None:
    # Act
    u = uuid7()

    # Assert
    assert u.version == 7
    assert u.variant == uuid.RFC_4122
    assert (u.int >> 76) & 0xF == 7


def test_new_id_when_made_is_canonical_uuid_text() -> None:
    # Act
    value = new_id()

    # Assert
    assert str(uuid.UUID(value)) == value
    assert uuid.UUID(value).version == 7


def test_new_id_when_100k_made_strictly_increase() -> None:
    # Act
    ids = [new_id() for _ in range(100_000)]

    # Assert: as text, the way stores and logs sort them
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert len(set(ids)) == len(ids)


def test_uuid7_when_clock_goes_backwards_still_increases() -> None:
    # Arrange
    before = uuid7_int()

    # Act: a wall clock stepped back to the epoch must not reorder ids
    after = uuid7_int(now_ns=0)

    # Assert
    assert after > before


def test_uuid7_when_counter_exhausted_in_one_millisecond_still_increases() -> None:
    # Arrange: far more ids than the 12-bit counter holds, all in one (frozen) millisecond
    now = time.time_ns()

    # Act
    values = [uuid7_int(now_ns=now) for _ in range(10_000)]

    # Assert
    assert all(a < b for a, b in itertools.pairwise(values))


def test_uuid7_time_ms_when_extracted_is_creation_time() -> None:
    # Arrange
    before_ms = time.time_ns() // 1_000_000

    # Act
    value = new_id()
    after_ms = time.time_ns() // 1_000_000

    # Assert: a few ms of slack, because earlier tests may have borrowed future milliseconds
    # when they exhausted the per-millisecond counter
    assert before_ms <= uuid7_time_ms(value) <= after_ms + 10
    assert uuid7_time_ms(uuid.UUID(value)) == uuid7_time_ms(value)


def test_event_id_when_made_is_canonical_uuid7_text_with_rfc_variant() -> None:
    # Act
    value = event_id()

    # Assert
    parsed = uuid.UUID(value)
    assert str(parsed) == value
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122


def test_event_id_when_made_between_new_ids_all_strictly_increase() -> None:
    # Act: one sequence for both kinds, as envelopes and orders interleave in a process
    values = [event_id() if i % 3 else new_id() for i in range(100_000)]

    # Assert
    assert all(a < b for a, b in itertools.pairwise(values))
    assert all(a < b for a, b in itertools.pairwise(uuid.UUID(v).int for v in values))


def test_event_id_when_counter_exhausted_in_one_frozen_millisecond_still_increases(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange: a clock stuck in one millisecond (now, or just past the last one used), so
    # 10,000 ids must go past the 4,096 values of its counter into the next milliseconds
    frozen = max(time.time_ns(), (ids._last_ms + 1) * 1_000_000)
    monkeypatch.setattr(ids, "time", types.SimpleNamespace(time_ns=lambda: frozen))

    # Act
    values = [event_id() for _ in range(10_000)]

    # Assert: unique, increasing, and from the frozen millisecond on (borrowing at most 3 more)
    assert all(a < b for a, b in itertools.pairwise(values))
    first_ms = frozen // 1_000_000
    assert uuid7_time_ms(values[0]) == first_ms
    assert first_ms < uuid7_time_ms(values[-1]) <= first_ms + 3


def test_event_id_when_made_in_the_same_millisecond_differs_only_in_the_counter() -> None:
    # Arrange / Act: two ids in a row are almost always in one millisecond; retry if not
    for _ in range(100):
        a, b = event_id(), event_id()
        if uuid7_time_ms(a) == uuid7_time_ms(b):
            break

    # Assert: the layout "tttttttt-tttt-7ccc-rrrr-rrrrrrrrrrrr": counter one up, same random bits
    assert int(b[15:18], 16) == int(a[15:18], 16) + 1
    assert a[18:] == b[18:]
