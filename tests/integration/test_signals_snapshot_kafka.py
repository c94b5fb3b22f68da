"""Bounded start-up on the real Kafka: restart = snapshot + replay of the tail only.

Three runs of one instance over four parts of the bars (and a halt), with QM_SIGNALS_SNAPSHOT_DIR
set: each restart must replay only what was consumed since the last snapshot, and all the
intents together must equal those of one engine fed everything without interruption.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from quantmesh_common.messages import Bar, ControlAction
from quantmesh_common.topics import Topic
from quantmesh_signals.replay import committed_offsets
from quantmesh_signals.service import SignalsService
from tests.integration import test_signals_kafka as signals_kafka
from tests.integration.test_signals_kafka import (
    INSTRUMENTS,
    Stack,
    _command,
    _engine,
    _reference,
    _until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: The fixtures of the signals Kafka tests: the test's own topics and groups, the seeded bars.
stack = signals_kafka.stack
bars = signals_kafka.bars

#: Bars per part: one per instrument per step; the pair strategy's two instruments are also
#: re-published once each on the joint topic.
STEPS = 15
PART_BARS = STEPS * len(INSTRUMENTS)
PART_JOINT = STEPS * 2


async def _committed(stack: Stack, group: str, topics: list[str], count: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + 90

    while True:
        offsets = await loop.run_in_executor(
            None, committed_offsets, stack.bootstrap, group, topics
        )
        if sum(offsets.values()) >= count:
            return
        assert time.monotonic() < deadline, f"{group} did not commit {count} messages"
        await asyncio.sleep(0.2)


async def test_restart_when_a_snapshot_exists_replays_only_the_tail_and_emits_what_one_run_would(
    stack: Stack, bars: list[Bar], tmp_path: Path
) -> None:
    parts = [bars[i * PART_BARS : (i + 1) * PART_BARS] for i in range(4)]
    halt = _command(ControlAction.HALT_STRATEGY, "rsi")
    expected = _reference([*parts[0], *parts[1], *parts[2], halt, *parts[3]])
    assert sum(expected.values()) > 0
    snapshots = {"signals_snapshot_dir": str(tmp_path), "signals_snapshot_interval_s": 3600.0}
    group = stack.prefix + "signals"
    data_topics = [stack.prefix + t for t in (Topic.MD_BARS, Topic.MD_TICKS, Topic.EXEC_REPORTS)]
    joint_topics = [stack.prefix + t for t in (Topic.SIGNALS_JOINT_BARS, Topic.SIGNALS_JOINT_TICKS)]

    # Run A consumes part 0; its start-up left a snapshot of nothing consumed.
    first = await stack.start("one", **snapshots)
    await stack.publish(*parts[0])
    await stack.wait_intents(sum(_reference(parts[0]).values()))
    await first.stop()

    # Run B restores that snapshot and replays part 0 (all consumed since), consumes part 1,
    # takes a periodic snapshot once part 1 is committed, then consumes part 2 and the halt.
    second = await stack.start("one", **snapshots)
    await stack.publish(*parts[1])
    await _committed(stack, group, data_topics, 2 * PART_BARS)
    await _committed(stack, group + ".joint", joint_topics, 2 * PART_JOINT)
    b_service = second.service
    assert isinstance(b_service, SignalsService)
    advanced = await asyncio.get_running_loop().run_in_executor(
        None, b_service.checkpoint, stack.bootstrap
    )
    await stack.publish(*parts[2])
    # Commands and data travel on different topics: the halt goes once part 2 is handled.
    await stack.wait_intents(sum(_reference([*parts[0], *parts[1], *parts[2]]).values()))
    await stack.publish(halt)
    await _until(lambda: _engine(second).hosts["rsi"].halted, "the halt to reach run B")
    await second.stop()

    # Run C restores B's periodic snapshot: it replays part 2 and the halt only.
    await stack.publish(*parts[3])  # while the stage is down
    third = await stack.start("one", **snapshots)
    await stack.wait_intents(sum(expected.values()))
    await third.stop()
    found = stack.intents()

    c_service = third.service
    assert isinstance(c_service, SignalsService)
    assert b_service.restored
    assert b_service.replayed == PART_BARS + PART_JOINT
    assert advanced == PART_BARS + PART_JOINT  # part 1, into the shadow engine
    assert c_service.restored
    assert c_service.replayed == PART_BARS + PART_JOINT + 1  # part 2 and the halt
    assert _engine(third).hosts["rsi"].halted
    assert found == expected
