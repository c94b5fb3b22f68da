"""On the real Kafka: a strategy's new parameters survive a restart of the signals stage."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from quantmesh_common.bus.kafka import KafkaBus, ensure_topics
from quantmesh_common.envelope import decode
from quantmesh_common.messages import ControlAction, StrategyStatus
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.testing import stubs
from quantmesh_common.testing.kafka import delete_topics
from quantmesh_common.topics import Topic, registry
from quantmesh_signals.config import SignalsSettings
from quantmesh_signals.service import SignalsService

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WAIT_S = 90.0
SPEC: dict[str, Any] = {
    "id": "sma-btc",
    "name": "sma_cross",
    "account_id": "paper-1",
    "instruments": ["BTC-USDT.SIM"],
    "params": {"fast": 2, "slow": 3},
}
TOPICS = (
    Topic.MD_BARS,
    Topic.MD_TICKS,
    Topic.EXEC_REPORTS,
    Topic.CONTROL,
    Topic.SIGNALS,
    Topic.ORDERS_INTENTS,
    Topic.STRATEGIES,
)


def _statuses(bootstrap: str, topic: str) -> list[StrategyStatus]:
    """Every status on `topic` from its beginning to its end, in order."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader.{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in parts
        }
        ends = {p: high for p, high in ends.items() if high > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        found: list[StrategyStatus] = []
        deadline = time.monotonic() + 30
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(100, 0.5):
                if msg.error() is None:
                    payload = decode(msg.value() or b"").payload
                    if isinstance(payload, StrategyStatus):
                        found.append(payload)
            for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                if tp.offset >= ends[tp.partition]:
                    del ends[tp.partition]
        return found
    finally:
        consumer.close()


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def prefixed() -> AsyncIterator[tuple[str, str, KafkaBus]]:
    bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
    prefix = f"qmtest.sigcfg.{uuid.uuid4().hex[:10]}."
    topics = registry().prefixed(prefix, TOPICS)
    await asyncio.get_running_loop().run_in_executor(None, ensure_topics, bootstrap, topics)
    bus = KafkaBus("signals-config-test", bootstrap, registry=topics)
    await bus.start()
    try:
        yield bootstrap, prefix, bus
    finally:
        await bus.close()
        delete_topics(bootstrap, topics.all_topic_names())


@pytest.mark.parametrize("snapshots", [False, True], ids=["replay", "snapshot"])
async def test_configure_when_the_stage_restarts_keeps_the_new_params(
    prefixed: tuple[str, str, KafkaBus], tmp_path: Path, snapshots: bool
) -> None:
    bootstrap, prefix, bus = prefixed
    settings = SignalsSettings(
        bus="kafka",
        kafka_bootstrap=bootstrap,
        http_host="127.0.0.1",
        http_port=0,
        strategies=json.dumps([SPEC]),
        signals_group=prefix + "signals",
        signals_instance="one",
        signals_topic_prefix=prefix,
        signals_snapshot_dir=str(tmp_path) if snapshots else "",
        shutdown_timeout_s=30.0,
    )
    runner = ServiceRunner(SignalsService(settings), settings)
    await runner.start()
    service = runner.service
    assert isinstance(service, SignalsService)
    command = stubs.control_command(
        command_id=f"C-{uuid.uuid4().hex[:8]}",
        action=ControlAction.CONFIGURE_STRATEGY,
        target="sma-btc",
        params={"params": json.dumps({"fast": 4, "slow": 9, "quantity": "0.5"})},
    )
    try:
        await bus.publish(prefix + Topic.CONTROL, command)
        await bus.flush()
        await _until(
            lambda: service.engine.hosts["sma-btc"].config_version == 1, "the configuration"
        )
    finally:
        await runner.stop()

    restarted = ServiceRunner(SignalsService(settings), settings)
    await restarted.start()
    await restarted.stop()

    again = restarted.service
    assert isinstance(again, SignalsService)
    assert again.engine.hosts["sma-btc"].spec.params == {"fast": 4, "slow": 9, "quantity": "0.5"}
    assert again.restored is snapshots
    loop = asyncio.get_running_loop()
    statuses = await loop.run_in_executor(None, _statuses, bootstrap, prefix + Topic.STRATEGIES)
    # Start, the configuration's answer, the restarted stage's start.
    assert [(s.last_command_id, s.config_version) for s in statuses] == [
        (None, 0),
        (command.command_id, 1),
        (None, 1),
    ]
    assert statuses[-1].params == {"fast": 4, "slow": 9, "quantity": "0.5", "allow_short": False}
