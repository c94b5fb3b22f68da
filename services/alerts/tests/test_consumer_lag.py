"""Consumer lag measured on the stack's real Kafka, with a group that really lags."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from quantmesh_alerts.config import AlertsSettings
from quantmesh_alerts.probes import KafkaLagReader
from quantmesh_alerts.service import AlertsService
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.testing import stubs

from .conftest import WaitingChannel, settle

pytestmark = pytest.mark.integration


@dataclass
class LaggingGroup:
    bootstrap: str
    topic: str
    group: str

    def commit(self, offsets: dict[int, int]) -> None:
        """Commit `offsets` (partition -> next offset to read) as a member of the group would."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": self.group,
                "enable.auto.commit": False,
            }
        )
        try:
            consumer.commit(
                offsets=[TopicPartition(self.topic, p, o) for p, o in offsets.items()],
                asynchronous=False,
            )
        finally:
            consumer.close()


@pytest.fixture
def lagging(kafka_bootstrap: str) -> Iterator[LaggingGroup]:
    """A fresh 2-partition topic: 6 records on partition 0, 4 on partition 1; nothing committed."""
    tag = uuid.uuid4().hex[:10]
    topic, group = f"test.alerts.lag.{tag}", f"test-alerts-lag-{tag}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "acks": "all"})
    for partition, count in ((0, 6), (1, 4)):
        for i in range(count):
            producer.produce(topic, f"m{i}".encode(), partition=partition)
    assert producer.flush(30) == 0
    try:
        yield LaggingGroup(kafka_bootstrap, topic, group)
    finally:
        admin.delete_consumer_groups([group])[group].exception(30)
        admin.delete_topics([topic])[topic].exception(30)


@pytest.fixture
def kafka_bootstrap() -> str:
    bootstrap = os.environ.get("QM_KAFKA_BOOTSTRAP")
    if not bootstrap:
        pytest.skip("QM_KAFKA_BOOTSTRAP is not set (start the stack: deploy/local/stack.sh up)")
    return bootstrap


def test_lag_reader_when_group_committed_fewer_than_produced_sums_the_partitions(
    lagging: LaggingGroup,
) -> None:
    lagging.commit({0: 2, 1: 1})  # 6 - 2 + 4 - 1 = 7 behind
    reader = KafkaLagReader(lagging.bootstrap)
    try:
        lags = reader.measure([lagging.group])
    finally:
        reader.close()

    assert lags == {(lagging.group, lagging.topic): 7}


def test_lag_reader_when_a_partition_has_no_commit_leaves_it_out(lagging: LaggingGroup) -> None:
    lagging.commit({1: 1})  # partition 0 never committed: its lag is unknown, not counted
    reader = KafkaLagReader(lagging.bootstrap)
    try:
        lags = reader.measure([lagging.group])
    finally:
        reader.close()

    assert lags == {(lagging.group, lagging.topic): 3}


def test_lag_reader_when_given_a_pattern_measures_every_group_it_matches(
    lagging: LaggingGroup,
) -> None:
    lagging.commit({0: 2, 1: 1})  # 7 behind
    reader = KafkaLagReader(lagging.bootstrap)
    try:
        by_prefix = reader.measure([lagging.group[:-3] + "*"])
        everything = reader.measure(["*"])
    finally:
        reader.close()

    assert by_prefix == {(lagging.group, lagging.topic): 7}
    assert everything[(lagging.group, lagging.topic)] == 7
    assert not any(group == "alerts.lag-probe" for group, _ in everything)


def test_lag_reader_when_group_does_not_exist_reports_nothing(kafka_bootstrap: str) -> None:
    reader = KafkaLagReader(kafka_bootstrap)
    try:
        lags = reader.measure([f"test-alerts-no-such-group-{uuid.uuid4().hex[:10]}"])
    finally:
        reader.close()

    assert lags == {}


async def test_stage_when_group_lags_beyond_max_lag_alerts_then_clears_when_it_catches_up(
    lagging: LaggingGroup,
) -> None:
    # Arrange: the stage's lag timer on a simulated clock, measuring the real broker.
    lagging.commit({0: 2, 1: 1})
    settings = AlertsSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        database_url=None,
        alert_lag_interval_s=30,
        alert_rules=(
            f"rules: [{{name: lag, kind: consumer_lag, groups: [{lagging.group}], max_lag: 5,"
            " throttle_s: 0}]"
        ),
    )
    clock = SimulatedClock(stubs.TS)
    channel = WaitingChannel()
    service = AlertsService(
        settings, channels={"log": channel}, lag_reader=KafkaLagReader(lagging.bootstrap)
    )
    runner = ServiceRunner(
        service, settings, bus=InMemoryBus("test", clock=clock), clock=clock, pump=False
    )
    await runner.start()
    try:
        # Act: one interval with 7 behind, then one after the group committed everything.
        await settle()
        clock.advance(30)
        [behind] = await channel.wait_for(1)
        lagging.commit({0: 6, 1: 4})
        await settle()
        clock.advance(30)
        sent = await channel.wait_for(2)
    finally:
        await runner.stop()

    # Assert
    assert behind.code == "CONSUMER_LAG"
    assert behind.details == {
        "group": lagging.group,
        "topic": lagging.topic,
        "lag": "7",
        "max_lag": "5",
    }
    assert (sent[1].code, sent[1].details["lag"]) == ("CONSUMER_LAG_CLEARED", "0")


async def test_stage_on_the_memory_bus_when_a_lag_rule_exists_does_not_evaluate_it() -> None:
    settings = AlertsSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        database_url=None,
        alert_rules="rules: [{name: lag, kind: consumer_lag, groups: [oms], max_lag: 5}]",
    )
    service = AlertsService(settings)
    runner = ServiceRunner(service, settings, bus=InMemoryBus("test"), pump=False)
    await runner.start()
    try:
        tasks = [name for name, _ in runner.ctx.tasks] if runner.ctx else []
    finally:
        await runner.stop()

    assert service.lag_reader is None
    assert "alerts-consumer-lag" not in tasks


class UnreachableBroker(KafkaLagReader):
    """A lag reader whose broker is away."""

    def measure(self, groups: Sequence[str]) -> dict[tuple[str, str], int]:
        raise KafkaException("Local: Broker transport failure")


async def test_lag_check_when_the_broker_is_away_logs_and_notifies_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = AlertsSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        database_url=None,
        alert_rules="rules: [{name: lag, kind: consumer_lag, groups: [oms], max_lag: 5}]",
    )
    channel = WaitingChannel()
    service = AlertsService(
        settings, channels={"log": channel}, lag_reader=UnreachableBroker("127.0.0.1:9")
    )

    await service.check_consumer_lag()

    assert channel.sent == []
    assert "cannot measure consumer lag" in caplog.text
