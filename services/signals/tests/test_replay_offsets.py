"""The start-up replay's offset fetch waits out a coordinator that is not elected yet."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from quantmesh_signals import replay


class _Consumer:
    """Answers `committed` with the queued errors first, then with the offsets."""

    def __init__(self, errors: list[int]) -> None:
        self.errors = errors
        self.calls = 0

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self.calls += 1
        if self.errors:
            raise KafkaException(KafkaError(self.errors.pop(0)))
        return [TopicPartition(tp.topic, tp.partition, 7) for tp in partitions]


def test_not_coordinator_is_asked_again() -> None:
    consumer = _Consumer([KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS])
    got = replay._committed(consumer, [TopicPartition("t", 0)], time.monotonic() + 5)  # type: ignore[arg-type]
    assert [(tp.topic, tp.partition, tp.offset) for tp in got] == [("t", 0, 7)]
    assert consumer.calls == 3


def test_other_errors_are_raised_at_once() -> None:
    consumer = _Consumer([KafkaError.GROUP_AUTHORIZATION_FAILED])
    with pytest.raises(KafkaException) as caught:
        replay._committed(consumer, [TopicPartition("t", 0)], time.monotonic() + 5)  # type: ignore[arg-type]
    assert caught.value.args[0].code() == KafkaError.GROUP_AUTHORIZATION_FAILED
    assert consumer.calls == 1


def test_gives_up_at_the_deadline() -> None:
    consumer = _Consumer([KafkaError.NOT_COORDINATOR] * 100)
    started = time.monotonic()
    with pytest.raises(KafkaException):
        replay._committed(consumer, [TopicPartition("t", 0)], started + 0.3)  # type: ignore[arg-type]
    assert time.monotonic() - started < 1.5
    assert 2 <= consumer.calls < 100
