"""Fixtures of the oms integration tests: a fresh migrated schema per test, and Kafka topics
of its own for a test that runs the oms and the simulated venue on the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from quantmesh_common.bus.base import Emit
from quantmesh_common.bus.kafka import KafkaBus, ensure_topics
from quantmesh_common.envelope import Event
from quantmesh_common.messages import ExecutionReport, Order, OrderCommand, RiskDecision, Tick
from quantmesh_common.storage.postgres import create_pool
from quantmesh_common.testing.postgres import fresh_schema, server_dsn_for_tests
from quantmesh_common.topics import Topic, TopicRegistry, TopicSpec

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


@pytest.fixture(scope="session")
def oms_server_dsn() -> str:
    """The quantmesh_test database of QM_DATABASE_URL's server (else that database); or skip."""
    dsn = server_dsn_for_tests()
    if dsn is None:
        pytest.skip("QM_DATABASE_URL is not set (start the stack: deploy/local/stack.sh up)")
    return dsn


@pytest.fixture
def oms_dsn(oms_server_dsn: str) -> Iterator[str]:
    """A DSN whose search_path is a new schema with every migration applied; dropped after."""
    with fresh_schema(oms_server_dsn, "qm_test_oms", migrate=True) as dsn:
        yield dsn


@pytest.fixture
async def oms_pool(oms_dsn: str) -> AsyncIterator[Any]:
    """An asyncpg pool on the test schema."""
    pool = await create_pool(oms_dsn, 1, 4, timeout_s=10)
    try:
        yield pool
    finally:
        await pool.close()


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
    bootstrap = os.environ.get("QM_KAFKA_BOOTSTRAP")
    if not bootstrap:
        pytest.skip("QM_KAFKA_BOOTSTRAP is not set (start the stack: deploy/local/stack.sh up)")
    created = KafkaNames(prefix)
    await asyncio.to_thread(ensure_topics, bootstrap, created.registry)
    try:
        yield created
    finally:
        await asyncio.to_thread(_delete_topics, bootstrap, created.registry.all_topic_names())


def _delete_topics(bootstrap: str, topics: list[str]) -> None:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics(topics).values():
        with contextlib.suppress(KafkaException):
            future.result()


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
