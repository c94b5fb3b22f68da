"""The signals stage on the real Kafka: halt/resume by control, restart, two instances.

Each test has its own topics (a fresh prefix, QM_SIGNALS_TOPIC_PREFIX) and consumer groups, so
it shares nothing with other runs on the broker. The expected intents are what the engine
produces when fed the same bars and commands directly, in one process, without interruption.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from quantmesh_common.bus.kafka import KafkaBus, ensure_topics
from quantmesh_common.envelope import DecodeError, decode
from quantmesh_common.messages import Bar, ControlAction, ControlCommand, OrderIntent
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.testing import stubs
from quantmesh_common.testing.kafka import delete_topics
from quantmesh_common.topics import Topic, TopicRegistry, registry
from quantmesh_signals.config import SignalsSettings
from quantmesh_signals.engine import SignalsEngine, StrategySpec
from quantmesh_signals.service import SignalsService

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

INSTRUMENTS = [f"{c * 3}-USDT.SIM" for c in "ABCDEFGHIJ"]
MINUTE = 60 * stubs.SECOND_NS
BARS = 60
WAIT_S = 90.0
STRATEGIES: list[dict[str, Any]] = [
    {
        "id": "sma",
        "name": "sma_cross",
        "account_id": "acc-sma",
        "instruments": INSTRUMENTS,
        "params": {"fast": 3, "slow": 8, "allow_short": True},
    },
    {
        "id": "rsi",
        "name": "rsi_reversion",
        "account_id": "acc-rsi",
        "instruments": INSTRUMENTS,
        "params": {"period": 5, "oversold": 35, "overbought": 65},
    },
    {
        "id": "pair",
        "name": "pairs_spread",
        "account_id": "acc-pair",
        "instruments": INSTRUMENTS[:2],
        "params": {"lookback": 10, "entry_z": 1.0, "exit_z": 0.3},
    },
]
TOPICS = (
    Topic.MD_BARS,
    Topic.MD_TICKS,
    Topic.EXEC_REPORTS,
    Topic.CONTROL,
    Topic.SIGNALS,
    Topic.ORDERS_INTENTS,
    Topic.SIGNALS_JOINT_BARS,
    Topic.SIGNALS_JOINT_TICKS,
)
IntentKey = tuple[str, str, str, str, Decimal | None]


def _bars() -> list[Bar]:
    """Seeded random walks, one bar per minute per instrument, published time by time."""
    rng = random.Random(7)
    prices = {i: 100.0 for i in INSTRUMENTS}
    out: list[Bar] = []
    for n in range(BARS):
        for instrument in INSTRUMENTS:
            prices[instrument] *= 1 + rng.gauss(0, 0.02)
            close = Decimal(f"{prices[instrument]:.2f}")
            out.append(
                stubs.bar(
                    instrument_id=instrument,
                    open=close,
                    high=close,
                    low=close,
                    close=close,
                    ts_open=stubs.TS + n * MINUTE,
                    ts_close=stubs.TS + (n + 1) * MINUTE,
                )
            )
    return out


def _key(intent: OrderIntent) -> IntentKey:
    return (
        intent.client_order_id,
        intent.strategy_id,
        intent.account_id,
        intent.instrument_id,
        intent.target_position,
    )


def _command(action: ControlAction, target: str) -> ControlCommand:
    return stubs.control_command(command_id=uuid.uuid4().hex, action=action, target=target)


def _reference(steps: Sequence[Bar | ControlCommand]) -> Counter[IntentKey]:
    """What one uninterrupted engine emits for these bars and commands, in this order."""
    engine = SignalsEngine.from_specs([StrategySpec(**s) for s in STRATEGIES])
    engine.start(stubs.TS)
    out: Counter[IntentKey] = Counter()
    for step in steps:
        events = engine.on_bar(step) if isinstance(step, Bar) else engine.on_control(step)
        out.update(_key(e) for e in events if isinstance(e, OrderIntent))
    return out


@dataclass
class Stack:
    """One test's topics and groups on the session's broker."""

    bootstrap: str
    prefix: str
    topics: TopicRegistry
    bus: KafkaBus
    runners: list[ServiceRunner[SignalsSettings]]

    def settings(self, instance: str, **extra: Any) -> SignalsSettings:
        return SignalsSettings(
            bus="kafka",
            kafka_bootstrap=self.bootstrap,
            http_host="127.0.0.1",
            http_port=0,
            strategies=json.dumps(STRATEGIES),
            signals_group=self.prefix + "signals",
            signals_instance=instance,
            signals_topic_prefix=self.prefix,
            shutdown_timeout_s=30.0,
            **extra,
        )

    async def start(self, instance: str, **extra: Any) -> ServiceRunner[SignalsSettings]:
        settings = self.settings(instance, **extra)
        runner = ServiceRunner(SignalsService(settings), settings)
        self.runners.append(runner)
        await runner.start()
        return runner

    async def publish(self, *events: Bar | ControlCommand) -> None:
        for event in events:
            topic = Topic.MD_BARS if isinstance(event, Bar) else Topic.CONTROL
            await self.bus.publish(self.prefix + topic, event)
        await self.bus.flush()

    def intents(self) -> Counter[IntentKey]:
        """Every intent on this test's orders.intents, read from the beginning to the end."""
        topic = self.prefix + Topic.ORDERS_INTENTS
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"{self.prefix}reader.{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        try:
            parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            ends = {}
            for p in parts:
                high = _high_watermark(consumer, TopicPartition(topic, p))
                if high > 0:
                    ends[p] = high
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
            found: Counter[IntentKey] = Counter()
            deadline = time.monotonic() + 30
            while ends and time.monotonic() < deadline:
                for msg in consumer.consume(1000, 0.5):
                    if msg.error() is None:
                        try:
                            payload = decode(msg.value() or b"").payload
                        except DecodeError:
                            continue
                        if isinstance(payload, OrderIntent):
                            found[_key(payload)] += 1
                positions = consumer.position([TopicPartition(topic, p) for p in ends])
                for tp in positions:
                    if tp.offset >= ends[tp.partition]:
                        del ends[tp.partition]
            assert not ends, f"{topic} not read to its end: {ends}"
            return found
        finally:
            consumer.close()

    async def wait_intents(self, expected: int) -> Counter[IntentKey]:
        """Wait until at least `expected` intents are on the topic; return them."""
        deadline = time.monotonic() + WAIT_S
        loop = asyncio.get_running_loop()
        while True:
            found = await loop.run_in_executor(None, self.intents)
            if sum(found.values()) >= expected or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.5)


def _high_watermark(consumer: Consumer, tp: TopicPartition) -> int:
    # Right after the topics are made, a partition's leader may not be known yet.
    for attempt in range(20):
        try:
            return int(consumer.get_watermark_offsets(tp, timeout=10)[1])
        except KafkaException:
            if attempt == 19:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
    prefix = f"qmtest.sig.{uuid.uuid4().hex[:10]}."
    topics = registry().prefixed(prefix, TOPICS)
    await asyncio.get_running_loop().run_in_executor(None, ensure_topics, bootstrap, topics)
    bus = KafkaBus("signals-test", bootstrap, registry=topics)
    await bus.start()
    made = Stack(bootstrap, prefix, topics, bus, [])
    try:
        yield made
    finally:
        for runner in made.runners:
            await runner.stop()
        await bus.close()
        delete_topics(bootstrap, topics.all_topic_names())


def _engine(runner: ServiceRunner[SignalsSettings]) -> SignalsEngine:
    service = runner.service
    assert isinstance(service, SignalsService)
    return service.engine


@pytest.fixture(scope="module")
def bars() -> list[Bar]:
    return _bars()


async def test_restart_when_state_is_replayed_emits_exactly_what_an_uninterrupted_run_would(
    stack: Stack, bars: list[Bar]
) -> None:
    half = len(bars) // 2
    halt = _command(ControlAction.HALT_STRATEGY, "rsi")
    first, second = bars[:half], bars[half:]
    expected = _reference([*first, halt, *second])
    assert sum(_reference(first).values()) > 0
    assert sum(expected.values()) > 0
    runner = await stack.start("one")
    await stack.publish(*first)
    await stack.wait_intents(sum(_reference(first).values()))
    await stack.publish(halt)
    await _until(lambda: _engine(runner).hosts["rsi"].halted, "the halt to reach the instance")
    await runner.stop()

    await stack.publish(*second)  # while the stage is down
    restarted = await stack.start("one")
    found = await stack.wait_intents(sum(expected.values()))
    await restarted.stop()
    found = stack.intents()

    service = restarted.service
    assert isinstance(service, SignalsService)
    assert service.replayed >= len(first) + 1
    assert _engine(restarted).hosts["rsi"].halted
    assert found == expected


async def test_two_instances_in_one_group_split_instruments_and_emit_what_one_would(
    stack: Stack, bars: list[Bar]
) -> None:
    half = len(bars) // 2
    halt = _command(ControlAction.HALT_STRATEGY, "sma")
    resume = _command(ControlAction.RESUME_STRATEGY, "sma")
    expected = _reference([halt, *bars[:half], resume, *bars[half:]])
    one = await stack.start("one")
    two = await stack.start("two")
    data_topics = {stack.prefix + t for t in (Topic.MD_BARS, Topic.MD_TICKS, Topic.EXEC_REPORTS)}
    all_parts = sum(stack.topics.partitions(t) for t in data_topics)

    def split() -> bool:
        owned = [set(r.ctx.subscriptions[0].assignment()) for r in (one, two) if r.ctx]
        return len(owned) == 2 and all(owned) and len(owned[0] | owned[1]) == all_parts

    await _until(split, "both instances to own data partitions")
    await stack.publish(halt)
    await _until(
        lambda: all(_engine(r).hosts["sma"].halted for r in (one, two)),
        "the halt to reach both instances",
    )
    await stack.publish(*bars[:half])
    await stack.wait_intents(sum(_reference([halt, *bars[:half]]).values()))
    await stack.publish(resume)
    await _until(
        lambda: not any(_engine(r).hosts["sma"].halted for r in (one, two)),
        "the resume to reach both instances",
    )
    await stack.publish(*bars[half:])
    await stack.wait_intents(sum(expected.values()))
    await one.stop()
    await two.stop()
    found = stack.intents()

    seen = [{i for i, _ in _engine(r)._direct._bars} for r in (one, two)]
    assert seen[0]
    assert seen[1]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(INSTRUMENTS)
    assert found == expected
