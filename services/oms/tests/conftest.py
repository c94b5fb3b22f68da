"""Oms test harness: a fresh migrated schema, fills, group members, the oms and venue on Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.base import Emit
from quantmesh_common.bus.kafka import KafkaBus, ensure_topics
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.envelope import Envelope, Event
from quantmesh_common.messages import (
    ExecType,
    ExecutionReport,
    Order,
    OrderCommand,
    OrderStatus,
    RiskDecision,
    Tick,
)
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import GroupMember, StageHarness
from quantmesh_common.testing.kafka import bootstrap_or_skip, delete_topics
from quantmesh_common.testing.postgres import migrated_schema_fixtures
from quantmesh_common.topics import Topic, TopicRegistry, TopicSpec
from quantmesh_execution.service import ExecutionHandler
from quantmesh_execution.simulated import SimulatedVenue, SimulatedVenueConfig
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.service import OmsService
from quantmesh_oms.store import InMemoryOrderStore, PostgresOrderStore

KAFKA_CONSUMER_CONFIG = {"session.timeout.ms": 6_000, "heartbeat.interval.ms": 500}
#: The stages' topics the oms and the simulated venue use between them, with their models.
FLOW_MODELS: dict[str, type[Event]] = {
    Topic.ORDERS_APPROVED: RiskDecision,
    Topic.ORDERS_COMMANDS: OrderCommand,
    Topic.ORDERS_UPDATES: Order,
    Topic.EXEC_REPORTS: ExecutionReport,
    Topic.MD_TICKS: Tick,
}


@pytest.fixture(autouse=True)
def _order_flow_delivery_as_each_test_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read transactional delivery unless a test says otherwise.

    Most tests here check the transactional rules (a duplicate publishes nothing); those of
    idempotent delivery (the default) pass `order_flow_delivery="idempotent"` themselves.
    """
    monkeypatch.setenv("QM_ORDER_FLOW_DELIVERY", "transactional")


oms_dsn, oms_pool = migrated_schema_fixtures("qm_test_oms", dsn="oms_dsn", pool="oms_pool")


class KafkaNames:
    """Topic and group names unique to one test, mapped from the stages' real topics."""

    def __init__(self, prefix: str) -> None:
        suffix = uuid.uuid4().hex[:10]
        self.topics = {t: f"qmtest.{prefix}.{t}.{suffix}" for t in FLOW_MODELS}
        self.oms_group = f"qmtest.{prefix}.oms.{suffix}"
        self.exec_group = f"qmtest.{prefix}.exec.{suffix}"
        self.registry = TopicRegistry(
            [
                TopicSpec(
                    self.topics[t], m, "instrument_id" if t == Topic.MD_TICKS else "account_id", 2
                )
                for t, m in FLOW_MODELS.items()
            ]
        )

    def mapped(self, emits: list[Emit]) -> list[Emit]:
        """The stages' emits, sent to this test's topics instead."""
        return [Emit(self.topics[e.topic], e.payload, e.key, e.ts_event) for e in emits]


@contextlib.asynccontextmanager
async def kafka_names(prefix: str) -> AsyncIterator[KafkaNames]:
    """Create a test's topics on the stack's broker (or skip), and delete them afterwards."""
    bootstrap = bootstrap_or_skip()
    created = KafkaNames(prefix)
    await asyncio.to_thread(ensure_topics, bootstrap, created.registry)
    try:
        yield created
    finally:
        await asyncio.to_thread(delete_topics, bootstrap, created.registry.all_topic_names())


def kafka_bus(names: KafkaNames, name: str) -> KafkaBus:
    """A bus on the stack's broker that knows the test's topics."""
    return KafkaBus(
        f"qmtest-{name}-{uuid.uuid4().hex[:6]}",
        os.environ["QM_KAFKA_BOOTSTRAP"],
        names.registry,
        consumer_config=KAFKA_CONSUMER_CONFIG,
    )


class _MappedTransaction:
    def __init__(self, tx: Any, names: KafkaNames) -> None:
        self._tx, self._names = tx, names

    async def publish(self, topic: str, payload: Event, **kwargs: Any) -> Any:
        return await self._tx.publish(self._names.topics[topic], payload, **kwargs)


class MappedBus:
    """What the oms publishes outside a handler (QUERYs, slices), sent to the test's topics."""

    def __init__(self, bus: KafkaBus, names: KafkaNames) -> None:
        self._bus, self._names = bus, names

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[_MappedTransaction]:
        async with self._bus.transaction() as tx:
            yield _MappedTransaction(tx, self._names)


def partial_fill(report_id: str, trade_id: str, qty: str, cum: str, price: str) -> ExecutionReport:
    """A partial fill of `order()` (0.1): `qty` at `price`, `cum` filled so far."""
    return stubs.execution_report(
        report_id=report_id,
        trade_id=trade_id,
        exec_type=ExecType.PARTIAL_FILL,
        order_status=OrderStatus.PARTIALLY_FILLED,
        last_qty=Decimal(qty),
        last_price=Decimal(price),
        cum_qty=Decimal(cum),
        leaves_qty=Decimal("0.1") - Decimal(cum),
    )


def rest_fill(report_id: str, trade_id: str, qty: str, price: str) -> ExecutionReport:
    """The fill of `qty` at `price` that completes `order()` (0.1 in all)."""
    return stubs.execution_report(
        report_id=report_id, trade_id=trade_id, last_qty=Decimal(qty), last_price=Decimal(price)
    )


def new_oms() -> OmsService:
    """An oms on the in-memory bus."""
    return OmsService(OmsSettings(bus="memory", http_port=0))


#: When the oms tests' stage starts: ten seconds after the stubs' instant.
NOW = stubs.TS + 10 * stubs.SECOND_NS


class OmsHarness(StageHarness[OmsService]):
    """The oms on a retaining in-memory bus with a simulated clock at NOW; its orders kept in
    `store` when one is given."""

    def __init__(self, store: InMemoryOrderStore | None = None) -> None:
        service = new_oms()
        if store is not None:
            service.store = store
        super().__init__(service, now_ns=NOW)

    def updates(self) -> list[Order]:
        return self.payloads(Topic.ORDERS_UPDATES)

    def commands(self) -> list[OrderCommand]:
        return self.payloads(Topic.ORDERS_COMMANDS)


class OmsMember(GroupMember[OmsService]):
    """An oms instance in the stage's groups on an in-memory bus other instances share."""

    def filled(self, client_order_id: str) -> Decimal | None:
        """What this instance holds as filled of the order; None when it holds no such order."""
        order = self.service.orders.get(client_order_id)
        return None if order is None else order.filled_quantity

    async def tick(self, bus: InMemoryBus) -> list[Emit]:
        """One check of the timers (the expiry loop's body), then deliver what it sent."""
        emits = await self.service.run_timers(bus)
        await bus.run_until_idle()
        return emits


class KafkaExecution:
    """The execution stage on a simulated venue, on its own Kafka bus in the test's group."""

    def __init__(self, names: KafkaNames, id_prefix: str) -> None:
        self.names = names
        self.venue = SimulatedVenue(SimulatedVenueConfig(venue="SIM"), id_prefix=id_prefix)
        self.handler = ExecutionHandler(self.venue)
        self.bus = kafka_bus(names, "exec")

    async def start(self) -> None:
        await self.bus.start()
        await self.bus.subscribe(
            self.names.exec_group,
            [self.names.topics[Topic.ORDERS_COMMANDS], self.names.topics[Topic.MD_TICKS]],
            self._handle,
            transactional=True,
        ).start()

    def handle(self, envelope: Envelope[Any]) -> list[Emit]:
        """What the stage answers `envelope` with, on the stages' own topics."""
        return self.handler(envelope)

    def _handle(self, envelope: Envelope[Any]) -> list[Emit]:
        return self.names.mapped(self.handle(envelope))


class KafkaOms:
    """One oms 'process': its service rebuilt from PostgreSQL, on its own Kafka bus."""

    def __init__(self, names: KafkaNames, pool: Any) -> None:
        self.names = names
        self.service = OmsService(OmsSettings(bus="memory", http_port=0))
        self.service.store = PostgresOrderStore(pool)
        self.bus = kafka_bus(names, "oms")

    async def start(self) -> None:
        await self.bus.start()
        await self.service.rebuild()
        await self.bus.subscribe(
            self.names.oms_group,
            [self.names.topics[Topic.ORDERS_APPROVED], self.names.topics[Topic.EXEC_REPORTS]],
            self._handle,
            transactional=True,
        ).start()

    async def _handle(self, envelope: Envelope[Any]) -> list[Emit]:
        return self.names.mapped(await self.service.handle(envelope))


async def eventually(
    predicate: Callable[[], Awaitable[bool]],
    timeout: float = 90.0,
    show: Callable[[], Awaitable[Any]] | None = None,
) -> None:
    """Return once `predicate()` holds; fail after `timeout` s with what `show()` finds then."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            seen = await show() if show is not None else None
            raise AssertionError(f"condition not met within {timeout}s; seen: {seen}")
        await asyncio.sleep(0.2)
