"""Parity: one seeded replay through the stages as processes on Kafka and through EmbeddedMesh.

The same ticks and bars go to signals -> risk -> oms -> execution (simulated venue, 1 us of
latency: a decision fills at the next print) -> portfolio, once as five processes on the real
broker and once in one process. The intents, order states, fills and positions must be the
same (ids and wall-clock times aside: those are made where they happen).

The replay is paced: after each step (an opening print; a closing print and its bar) the test
waits until the Kafka run has produced as many of this run's messages on each flow topic as
the embedded run did after the same step, so the venue has every order before the next print,
as it has in one process. A missing or an extra message fails the comparison at the end.
Times are a day ahead of the wall clock so that the OMS's wall-clock command times never move
the venue's market-data time. The run isolates itself by its own account, strategy and
instruments, as the order-flow e2e test does, and its processes get no QM_DATABASE_URL or
QM_REDIS_URL: their state is in memory, as it is in one process.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.envelope import Envelope, Event
from quantmesh_common.messages import Bar, Tick
from quantmesh_common.topics import Topic
from quantmesh_embedded.mesh import DrivenClock, EmbeddedMesh
from quantmesh_execution.config import ExecutionSettings
from quantmesh_execution.service import ExecutionService
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.service import OmsService
from quantmesh_portfolio.config import PortfolioSettings
from quantmesh_portfolio.service import PortfolioService
from quantmesh_risk.config import RiskSettings
from quantmesh_risk.service import RiskService
from quantmesh_signals.config import SignalsSettings
from quantmesh_signals.engine import StrategySpec
from quantmesh_signals.service import SignalsService
from tests.e2e.conftest import Mesh, TopicReader, kafka_bootstrap

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

BARS = 40
SEED = 11
MINUTE_NS = 60 * 1_000_000_000
QUANTITY = "0.5"
STEP_TIMEOUT_S = 60.0
GROUPS_FREE_TIMEOUT_S = 20.0
#: The fixed consumer groups of the five stages (as in test_order_flow).
SHARED_GROUPS = ("signals", "signals.control", "risk", "oms", "execution-sim")
FLOW_TOPICS = (
    Topic.ORDERS_INTENTS,
    Topic.ORDERS_APPROVED,
    Topic.ORDERS_REJECTED,
    Topic.ORDERS_COMMANDS,
    Topic.ORDERS_UPDATES,
    Topic.EXEC_REPORTS,
    Topic.PORTFOLIO_UPDATES,
)
Step = list[tuple[str, Event, int]]


class Run:
    """The ids that make this run's messages its own."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:10]
        self.account_id = f"parity-{tag}"
        self.strategy_id = f"sma-{tag}"
        self.instrument = f"PAR{tag.upper()}-USDT.SIM"

    def owns(self, payload: Any) -> bool:
        """Return True if `payload` belongs to this run's account."""
        return getattr(payload, "account_id", None) == self.account_id

    def spec(self) -> dict[str, Any]:
        """The strategy, as both runs configure it."""
        return {
            "id": self.strategy_id,
            "name": "sma_cross",
            "account_id": self.account_id,
            "instruments": [self.instrument],
            "params": {"fast": 2, "slow": 5, "quantity": QUANTITY, "allow_short": True},
        }


def _steps(run: Run, t0: int) -> list[Step]:
    """Seeded bars as prints and bars: [open print], [close print, bar] per bar."""
    rng = random.Random(SEED)
    price = 100.0
    steps: list[Step] = []
    for i in range(BARS):
        o = Decimal(f"{price:.2f}")
        price *= math.exp(rng.gauss(0.0, 0.01))
        c = Decimal(f"{price:.2f}")
        ts_open, ts_close = t0 + i * MINUTE_NS, t0 + (i + 1) * MINUTE_NS
        bar = Bar(
            instrument_id=run.instrument,
            interval="1m",
            open=o,
            high=max(o, c),
            low=min(o, c),
            close=c,
            volume=Decimal(10),
            ts_open=ts_open,
            ts_close=ts_close,
        )
        steps.append([(Topic.MD_TICKS, _print(run, o, ts_open, 2 * i), ts_open)])
        steps.append(
            [
                (Topic.MD_TICKS, _print(run, c, ts_close, 2 * i + 1), ts_close),
                (Topic.MD_BARS, bar, ts_close),
            ]
        )
    return steps


def _print(run: Run, price: Decimal, ts: int, n: int) -> Tick:
    return Tick(
        instrument_id=run.instrument,
        venue="SIM",
        price=price,
        size=Decimal(1000),
        trade_id=f"P-{n}",
        ts_event=ts,
        ts_init=ts,
    )


def _key(topic: str, p: Any) -> tuple[Any, ...]:
    """What must agree between the runs on each topic (no ids, no wall-clock times)."""
    if topic == Topic.ORDERS_INTENTS:
        return (p.instrument_id, p.side, p.quantity, p.target_position, p.order_type)
    if topic in (Topic.ORDERS_APPROVED, Topic.ORDERS_REJECTED):
        return (p.approved, p.reason, p.side, p.adjusted_quantity)
    if topic == Topic.ORDERS_COMMANDS:
        return (p.command_type, p.side, p.quantity, p.order_type)
    if topic == Topic.ORDERS_UPDATES:
        return (p.side, p.quantity, p.status, p.filled_quantity, p.avg_fill_price)
    if topic == Topic.EXEC_REPORTS:
        return (p.exec_type, p.side, p.last_qty, p.last_price, p.cum_qty, p.fee)
    return (p.quantity, p.avg_entry_price, p.realized_pnl, p.fees)  # portfolio.updates


async def _embedded(
    run: Run, steps: list[Step]
) -> tuple[dict[str, list[Any]], list[dict[str, int]]]:
    """The flow of one in-process run, and each topic's count after each step."""
    clock = DrivenClock(steps[0][0][2])
    mesh = EmbeddedMesh(clock)
    mesh.add(
        SignalsService,
        SignalsSettings(bus="memory", strategies=[StrategySpec.model_validate(run.spec())]),
    )
    mesh.add(RiskService, RiskSettings(bus="memory"))
    mesh.add(OmsService, OmsSettings(bus="memory"))
    mesh.add(
        ExecutionService,
        ExecutionSettings(bus="memory", venue="SIM", sim_latency_ms=Decimal("0.001")),
    )
    mesh.add(
        PortfolioService,
        PortfolioSettings(
            bus="memory", base_currency="USDT", starting_cash={"USDT": Decimal(100000)}
        ),
    )
    seen: dict[str, list[Any]] = {topic: [] for topic in FLOW_TOPICS}
    for topic in FLOW_TOPICS:
        keep = _keeper(seen[topic])
        await mesh.bus.subscribe(f"parity.{topic}", [topic], keep).start()
    await mesh.start()
    counts: list[dict[str, int]] = []
    for step in steps:
        clock.advance_to(step[0][2])
        for topic, payload, ts in step:
            await mesh.bus.publish(topic, payload, ts_event=ts)
        await mesh.settle()
        counts.append({t: len(v) for t, v in seen.items()})
    await mesh.stop()
    return seen, counts


def _keeper(into: list[Any]) -> Callable[[Envelope[Any]], None]:
    def keep(envelope: Envelope[Any]) -> None:
        into.append(envelope.payload)

    return keep


def _busy_shared_groups() -> dict[str, int]:
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap()})
    listed = {g.group_id for g in admin.list_consumer_groups().result().valid}
    wanted = [g for g in SHARED_GROUPS if g in listed]
    if not wanted:
        return {}
    described = admin.describe_consumer_groups(wanted).items()
    return {g: n for g, f in described if (n := len(f.result().members))}


async def _wait_groups_free() -> dict[str, int]:
    deadline = time.monotonic() + GROUPS_FREE_TIMEOUT_S
    busy = await asyncio.to_thread(_busy_shared_groups)
    while busy and time.monotonic() < deadline:
        await asyncio.sleep(2.0)
        busy = await asyncio.to_thread(_busy_shared_groups)
    return busy


def _mine(reader: TopicReader, run: Run) -> dict[str, list[Any]]:
    return {t: [r.payload for r in reader.of(t, run.owns)] for t in FLOW_TOPICS}


def _check_alive(mesh: Mesh) -> None:
    for stage in mesh.stages.values():
        if stage.returncode is not None:
            raise AssertionError(f"{stage.name} exited {stage.returncode}:\n{stage.tail()}")


async def test_parity_when_one_replay_runs_on_kafka_and_embedded_the_flows_are_identical(
    mesh: Mesh, topic_reader: Callable[..., TopicReader], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: the expected flow from one process; then the five stages on the broker
    run = Run()
    t0 = (time.time_ns() // MINUTE_NS + 24 * 60) * MINUTE_NS
    steps = _steps(run, t0)
    expected, counts = await _embedded(run, steps)
    assert expected[Topic.EXEC_REPORTS], "the replay must trade for the test to mean anything"
    busy = await _wait_groups_free()
    assert not busy, f"another mesh uses this broker's consumer groups (members): {busy}"
    env = {
        "signals": {"QM_STRATEGIES": json.dumps([run.spec()])},
        "risk": {"QM_RISK_LIMITS": "{}"},
        "oms": {},
        "execution": {"QM_VENUE": "SIM", "QM_SIM_LATENCY_MS": "0.001"},
        "portfolio": {"QM_STARTING_CASH": '{"USDT": "100000"}'},
    }
    # The stages keep their state in memory, as in one process: the comparison is of the
    # handlers, not of the stores (each stage's own tests cover those).
    monkeypatch.delenv("QM_DATABASE_URL", raising=False)
    monkeypatch.delenv("QM_REDIS_URL", raising=False)
    for stage, stage_env in env.items():
        await mesh.start(stage, stage_env)
    await mesh.wait_ready()
    live = topic_reader(*FLOW_TOPICS)
    bus = KafkaBus("parity-test", kafka_bootstrap())
    await bus.start()

    # Act: each step, then wait for the flow the embedded run had after it
    try:
        for n, step in enumerate(steps):
            for topic, payload, ts in step:
                await bus.publish(topic, payload, ts_event=ts)
            await bus.flush()
            deadline = time.monotonic() + STEP_TIMEOUT_S
            while True:
                have = {t: len(v) for t, v in _mine(live, run).items()}
                if all(have[t] >= counts[n][t] for t in FLOW_TOPICS):
                    break
                _check_alive(mesh)
                assert time.monotonic() < deadline, (
                    f"step {n}: the Kafka run has {have}, the embedded one had {counts[n]}"
                )
                await asyncio.to_thread(live.poll, 0.2)
    finally:
        await bus.close()
    codes = await mesh.stop()
    reader = topic_reader(*FLOW_TOPICS)
    await asyncio.to_thread(reader.read_to_end, 30.0)

    # Assert
    assert all(code == 0 for code in codes.values()), codes
    actual = _mine(reader, run)
    for topic in FLOW_TOPICS:
        want = [_key(topic, p) for p in expected[topic]]
        got = [_key(topic, p) for p in actual[topic]]
        assert got == want, f"{topic} differs between Kafka and embedded"
