"""The Kafka bus's waits for a partition's leader or a group's coordinator that is not settled
yet (no broker needed)."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import KafkaError, KafkaException

from quantmesh_common.bus.base import BusUnavailableError
from quantmesh_common.bus.kafka import while_settling


class Flaky:
    """A metadata query that fails with `code` a number of times, then answers."""

    def __init__(self, code: int, failures: int) -> None:
        self.code = code
        self.failures = failures
        self.calls = 0

    def __call__(self) -> tuple[int, int]:
        self.calls += 1
        if self.calls <= self.failures:
            raise KafkaException(KafkaError(self.code))
        return (0, 42)


def test_query_when_the_leader_is_settling_is_asked_again_until_it_answers() -> None:
    # Arrange: a topic just created answers NOT_LEADER_FOR_PARTITION twice.
    query = Flaky(KafkaError.NOT_LEADER_FOR_PARTITION, failures=2)

    # Act
    answer = while_settling(query, time.monotonic() + 10, "the end of t[0]")

    # Assert
    assert answer == (0, 42)
    assert query.calls == 3


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    ],
)
def test_query_when_the_coordinator_is_not_elected_yet_is_asked_again(code: int) -> None:
    # Arrange: a new cluster still creating __consumer_offsets answers an offset fetch so.
    query = Flaky(code, failures=2)

    # Act
    answer = while_settling(query, time.monotonic() + 10, "the committed offsets")

    # Assert
    assert answer == (0, 42)
    assert query.calls == 3


def test_query_when_the_error_is_not_a_settling_one_fails_at_once_naming_what() -> None:
    # Arrange
    query = Flaky(KafkaError.TOPIC_AUTHORIZATION_FAILED, failures=5)

    # Act / Assert
    with pytest.raises(BusUnavailableError, match=r"reading the end of t\[0\] failed"):
        while_settling(query, time.monotonic() + 10, "the end of t[0]")
    assert query.calls == 1


def test_query_when_the_deadline_passes_fails_with_the_last_error() -> None:
    # Arrange: a leader that never settles, and a deadline already reached.
    query = Flaky(KafkaError.LEADER_NOT_AVAILABLE, failures=1_000)

    # Act / Assert
    with pytest.raises(BusUnavailableError, match="LEADER_NOT_AVAILABLE"):
        while_settling(query, time.monotonic(), "the end of t[0]")
    assert query.calls == 1
