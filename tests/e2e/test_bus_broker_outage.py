"""A stage across a broker outage: it keeps running, nothing is lost, nothing doubled.

A minimal stage (tests/e2e/outage_stage.py) runs as a process on a private broker
(tests/e2e/faults.py's PrivateStack) and replies to a paced stream of pings through a
transactional subscription (exactly once) and a plain one (at least once). The test stops the
broker for longer than the consumers' session timeout, then starts it again. The process must
still be running afterwards (the bus waits the outage out, or the runtime restarts the stage in
place when a transaction could not survive it) and every ping must have its replies: once from
the transactional path, at least once from the plain one.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from quantmesh_common.bus.kafka import KafkaBus, ensure_topics
from quantmesh_common.envelope import decode
from tests.e2e.conftest import START_TIMEOUT_S, free_port
from tests.e2e.faults import PrivateStack
from tests.e2e.orderflow import RawReader
from tests.e2e.outage_stage import OutagePing, OutagePong, outage_registry

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PINGS = 1_500
PACE_S = 0.01  # about 100 pings/s: the stream spans the outage
OUTAGE_AT_S = 4.0
OUTAGE_S = 15.0
STAGE = Path(__file__).with_name("outage_stage.py")
PATHS = ("txn", "plain")
#: How long the stage may take to stop on SIGTERM (it takes well under a second when healthy).
STOP_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def stack() -> Iterator[PrivateStack]:
    """The private stack; its broker is stopped and started by the test."""
    private = PrivateStack.from_env()
    private.up()
    try:
        yield private
    finally:
        if os.environ.get("QM_FAULTS_KEEP_STACK") != "1":
            private.down()


@pytest.fixture
async def stage(
    stack: PrivateStack, tmp_path: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, str, Path]]:
    """The stage process on this run's own topics; its log file is the last item."""
    suffix = uuid.uuid4().hex[:8]
    pings, pongs = f"qmtest.outage.pings.{suffix}", f"qmtest.outage.pongs.{suffix}"
    await asyncio.to_thread(ensure_topics, stack.bootstrap, outage_registry(pings, pongs))
    log_path = tmp_path / "outage-stage.log"
    port = free_port()
    env = {
        **os.environ,
        "QM_BUS": "kafka",
        "QM_KAFKA_BOOTSTRAP": stack.bootstrap,
        "QM_HTTP_PORT": str(port),
        "QM_OUTAGE_PINGS": pings,
        "QM_OUTAGE_PONGS": pongs,
        "QM_OUTAGE_GROUP": f"qmtest.outage.{suffix}",
        "PYTHONPATH": str(STAGE.parents[2]),
    }
    env.pop("QM_DATABASE_URL", None)
    env.pop("QM_REDIS_URL", None)
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(STAGE), env=env, stdout=log, stderr=log
        )
        try:
            # The outage must meet a running stage: on a loaded machine its first connection
            # can take longer than the feed's lead before the broker stops.
            await _wait_ready(process, port, log_path)
            yield process, pings, pongs, log_path
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
                except TimeoutError:
                    process.kill()
                    await process.wait()
                    raise AssertionError(
                        f"the stage did not stop within {STOP_TIMEOUT_S:.0f} s of SIGTERM:\n"
                        f"{_log_tail(log_path)}"
                    ) from None


async def _wait_ready(process: asyncio.subprocess.Process, port: int, log_path: Path) -> None:
    """Return once the stage answers /readyz with 200; fail if it exits or never does."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last: object = None
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise AssertionError(f"the stage exited first:\n{_log_tail(log_path)}")
            try:
                url = f"http://127.0.0.1:{port}/readyz"
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=3)) as response:
                    if response.status == 200:
                        return
                    last = response.status
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = exc  # not listening yet: asked again below
            await asyncio.sleep(0.2)
    raise AssertionError(
        f"the stage was not ready in {START_TIMEOUT_S} s (last: {last!r}):\n{_log_tail(log_path)}"
    )


def _log_tail(log_path: Path) -> str:
    """The end of the stage's own log (librdkafka's retry lines left out)."""
    lines = log_path.read_text(errors="replace").splitlines()
    return "\n".join(line for line in lines if not line.startswith("%"))[-3000:]


async def _feed(bus: KafkaBus, pings: str) -> None:
    for seq in range(PINGS):
        await bus.publish(pings, OutagePing(key=f"k{seq % 8}", seq=seq))
        # Pacing, not synchronisation: the stream must still be flowing when the broker stops.
        await asyncio.sleep(PACE_S)
    await bus.flush(timeout=300.0)


def _replies(stack: PrivateStack, pongs: str) -> Counter[tuple[str, int]]:
    records = RawReader(stack.bootstrap, (pongs,)).read_all(idle_s=3.0, timeout=120.0)
    counts: Counter[tuple[str, int]] = Counter()
    for record in records:
        assert record.value is not None
        pong = decode(record.value).payload
        assert isinstance(pong, OutagePong)
        counts[(pong.path, pong.seq)] += 1
    return counts


async def _wait_for_replies(
    stack: PrivateStack, pongs: str, timeout: float
) -> Counter[tuple[str, int]]:
    deadline = time.monotonic() + timeout
    while True:
        counts = await asyncio.to_thread(_replies, stack, pongs)
        seen = Counter(path for (path, _seq) in counts)
        if all(seen[path] >= PINGS for path in PATHS) or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(2.0)


async def test_broker_outage_when_broker_returns_stage_runs_on_and_replies_to_every_ping(
    stack: PrivateStack, stage: tuple[asyncio.subprocess.Process, str, str, Path]
) -> None:
    # Arrange
    process, pings, pongs, log_path = stage
    feeder = KafkaBus("qmtest-outage-feeder", stack.bootstrap, outage_registry(pings, pongs))
    await feeder.start()
    feeding = asyncio.create_task(_feed(feeder, pings))

    # Act
    await asyncio.sleep(OUTAGE_AT_S)  # the outage lands mid-stream, at a moment, not an event
    await asyncio.to_thread(stack.stop_broker)
    await asyncio.sleep(OUTAGE_S)
    await asyncio.to_thread(stack.start_broker)
    await asyncio.wait_for(feeding, timeout=300.0)
    await feeder.close()
    counts = await _wait_for_replies(stack, pongs, timeout=300.0)

    # Assert
    log_tail = _log_tail(log_path)
    assert process.returncode is None, log_tail
    txn = {seq: n for (path, seq), n in counts.items() if path == "txn"}
    plain = {seq for (path, seq) in counts if path == "plain"}
    assert sorted(txn) == list(range(PINGS)), log_tail
    assert [seq for seq, n in txn.items() if n != 1] == []
    assert sorted(plain) == list(range(PINGS)), log_tail
