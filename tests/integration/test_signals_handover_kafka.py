"""Partitions moving between running signals instances on the real Kafka: the state hand-over.

Instance "one" runs alone over the first part of the bars, "two" joins the group for the
second part, then leaves (stopped, or killed), and "one" takes its partitions back for the third
part. The partitions "one" gets back were handled by "two" meanwhile, so "one" must rebuild the
strategies they carry before it handles them: all the intents together must be those of one
engine fed every bar without interruption. Each test has its own topics and groups (the
fixtures of test_signals_kafka).

After each rebalance the tests wait until the members handled new input (`_settle`) before
they publish bars: the Kafka bus drops the messages a member fetches in the same poll as a
rebalance that revoked and gave back the same partitions (reported to the bus's owner), and
bars lost that way would fail the comparison for a reason that is not the hand-over's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from quantmesh_common.envelope import Envelope, encode
from quantmesh_common.messages import Bar
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic
from quantmesh_signals.config import SignalsSettings
from quantmesh_signals.replay import committed_offsets
from quantmesh_signals.service import SignalsService
from tests.integration import test_signals_kafka as signals_kafka
from tests.integration.test_signals_kafka import (
    STRATEGIES,
    WAIT_S,
    IntentKey,
    Stack,
    _high_watermark,
    _reference,
    _until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: The fixtures of the signals Kafka tests: the test's own topics and groups, the seeded bars.
stack = signals_kafka.stack
bars = signals_kafka.bars

#: Bars per part: 20 steps of the ten instruments.
PART = 200


def _service(runner: ServiceRunner[SignalsSettings]) -> SignalsService:
    service = runner.service
    assert isinstance(service, SignalsService)
    return service


def _data_partitions(stack: Stack) -> int:
    return sum(
        stack.topics.partitions(stack.prefix + t)
        for t in (Topic.MD_BARS, Topic.MD_TICKS, Topic.EXEC_REPORTS)
    )


async def _settle(stack: Stack) -> None:
    """Wait until the members of the data and joint groups handled input published after
    their last rebalance: a bar no strategy trades on every partition of md.bars and of the
    joint bars topic, published again until each group committed past all of one round."""
    loop = asyncio.get_running_loop()
    for group, topic in (
        ("signals", Topic.MD_BARS),
        ("signals.joint", Topic.SIGNALS_JOINT_BARS),
    ):
        deadline = time.monotonic() + WAIT_S
        while True:
            ends = await loop.run_in_executor(None, _publish_everywhere, stack, topic)
            if await _committed_past(stack, stack.prefix + group, ends):
                break
            assert time.monotonic() < deadline, f"{group} never settled"


def _publish_everywhere(stack: Stack, topic: str) -> dict[tuple[str, int], int]:
    """A bar of an instrument no strategy trades on each partition of `topic`; the ends."""
    name = stack.prefix + topic
    bar = stubs.bar(instrument_id="ZZZ-USDT.SIM")
    value = encode(Envelope.wrap(bar, source="test", ts_event=bar.ts_close, ts_init=bar.ts_close))
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    partitions = stack.topics.partitions(name)
    for partition in range(partitions):
        producer.produce(name, value=value, key=b"ZZZ-USDT.SIM", partition=partition)
    assert producer.flush(30) == 0
    reader = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": stack.prefix + "ends"})
    try:
        return {
            (name, p): _high_watermark(reader, TopicPartition(name, p)) for p in range(partitions)
        }
    finally:
        reader.close()


async def _committed_past(stack: Stack, group: str, ends: dict[tuple[str, int], int]) -> bool:
    """True once `group` committed `ends` on every partition (False after 10 s)."""
    loop = asyncio.get_running_loop()
    topics = sorted({topic for topic, _ in ends})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done = await loop.run_in_executor(None, committed_offsets, stack.bootstrap, group, topics)
        if all(done.get(tp, 0) >= end for tp, end in ends.items()):
            return True
        await asyncio.sleep(0.2)
    return False


def _owned(runner: ServiceRunner[SignalsSettings]) -> int:
    assert runner.ctx is not None
    return len(runner.ctx.subscriptions[0].assignment())


async def _wait_all_of(stack: Stack, expected: Counter[IntentKey]) -> Counter[IntentKey]:
    """Wait until every expected intent is on the topic (redelivered ones may repeat)."""
    deadline = time.monotonic() + WAIT_S
    loop = asyncio.get_running_loop()
    while True:
        found = await loop.run_in_executor(None, stack.intents)
        if set(found) >= set(expected) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.5)


async def test_instance_stopped_when_its_partitions_move_back_together_emit_what_one_would(
    stack: Stack, bars: list[Bar]
) -> None:
    parts = [bars[:PART], bars[PART : 2 * PART], bars[2 * PART :]]
    expected = _reference(bars)
    everything = _data_partitions(stack)
    one = await stack.start("one")
    await _until(lambda: _owned(one) == everything, "one to own every data partition")
    await stack.publish(*parts[0])
    await stack.wait_intents(sum(_reference(parts[0]).values()))

    two = await stack.start("two")
    await _until(lambda: 0 < _owned(one) < everything and _owned(two) > 0, "two to take partitions")
    await _settle(stack)
    await stack.publish(*parts[1])
    await stack.wait_intents(sum(_reference([*parts[0], *parts[1]]).values()))
    await two.stop()
    await _until(lambda: _owned(one) == everything, "one to get every partition back")
    await _settle(stack)
    await stack.publish(*parts[2])
    await stack.wait_intents(sum(expected.values()))
    await one.stop()
    found = stack.intents()

    assert sum(_reference(parts[2]).values()) > 0
    assert found == expected, (found - expected, expected - found)
    assert "sma" in _service(one).rebuilt_strategies
    assert _service(one).rebuilt >= PART  # every bar of its partitions until part 3


async def test_instance_killed_when_its_partitions_move_the_survivor_emits_what_one_would(
    stack: Stack, bars: list[Bar], tmp_path: Path
) -> None:
    parts = [bars[:PART], bars[PART : 2 * PART], bars[2 * PART :]]
    expected = _reference(bars)
    everything = _data_partitions(stack)
    one = await stack.start("one")
    await _until(lambda: _owned(one) == everything, "one to own every data partition")
    await stack.publish(*parts[0])
    await stack.wait_intents(sum(_reference(parts[0]).values()))

    log = tmp_path / "two.log"
    two = _spawn(stack, "two", log)
    try:
        await _until(lambda: 0 < _owned(one) < everything, "two (a process) to take partitions")
        await _settle(stack)
        await stack.publish(*parts[1])
        await _wait_all_of(stack, _reference([*parts[0], *parts[1]]))
        assert two.poll() is None, log.read_text()[-3000:]
        two.send_signal(signal.SIGKILL)
        two.wait(30)
    finally:
        if two.poll() is None:
            two.kill()
            two.wait(30)
    # The group hands two's partitions over once its session times out (10 s).
    await _until(lambda: _owned(one) == everything, "one to get two's partitions")
    await _settle(stack)
    await stack.publish(*parts[2])
    found = await _wait_all_of(stack, expected)
    await one.stop()
    found = stack.intents()

    # Intents "two" made but had not committed the input of are made again, same ids.
    assert set(found) == set(expected)
    assert all(found[key] >= count for key, count in expected.items())
    assert "sma" in _service(one).rebuilt_strategies


def _spawn(stack: Stack, instance: str, log: Path) -> subprocess.Popen[bytes]:
    """Run a signals instance of the test's group as a process of its own."""
    env = {
        **os.environ,
        "QM_BUS": "kafka",
        "QM_KAFKA_BOOTSTRAP": stack.bootstrap,
        "QM_HTTP_HOST": "127.0.0.1",
        "QM_HTTP_PORT": "0",
        "QM_STRATEGIES": json.dumps(STRATEGIES),
        "QM_SIGNALS_GROUP": stack.prefix + "signals",
        "QM_SIGNALS_INSTANCE": instance,
        "QM_SIGNALS_TOPIC_PREFIX": stack.prefix,
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "quantmesh_signals"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
