"""Tests of UUIDv7 identifiers: layout, ordering and embedded time."""

from __future__ import annotations

import itertools
import time
import uuid

from quantmesh_common.ids import new_id, uuid7, uuid7_int, uuid7_time_ms


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
