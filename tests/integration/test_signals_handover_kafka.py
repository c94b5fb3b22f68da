"""Partitions moving between running signals instances on the real Kafka: the state hand-over.

Instance "one" runs alone over the first part of the bars, "two" joins the group for the
second part, then leaves (stopped, or killed), and "one" takes its partitions back for the third
part. The partitions "one" gets back were handled by "two" meanwhile, so "one" must rebuild the
strategies they carry before it handles them: all the intents together must be those of one
engine fed every bar without interruption. Each test has its own topics and groups (the
fixtures of test_signals_kafka).
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

from quantmesh_common.messages import Bar
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.topics import Topic
from quantmesh_signals.config import SignalsSettings
from quantmesh_signals.service import SignalsService
from tests.integration import test_signals_kafka as signals_kafka
from tests.integration.test_signals_kafka import (
    STRATEGIES,
    WAIT_S,
    IntentKey,
    Stack,
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
    await stack.publish(*parts[1])
    await stack.wait_intents(sum(_reference([*parts[0], *parts[1]]).values()))
    await two.stop()
    await _until(lambda: _owned(one) == everything, "one to get every partition back")
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
