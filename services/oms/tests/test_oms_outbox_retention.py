"""The oms outbox on real PostgreSQL: rows past their retention are pruned, recent ones kept and
still published again when their input is redelivered."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.runtime import ServiceContext
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import GroupMember
from quantmesh_common.topics import Topic
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.service import OUTBOX_RETENTION_NS, OmsService
from quantmesh_oms.store import OutboxEntry, PendingSave, PostgresOrderStore

pytestmark = pytest.mark.integration

NOW = stubs.TS + 10 * stubs.SECOND_NS
#: What the oms publishes for a decision.
FLOW_OUT = (Topic.ORDERS_COMMANDS, Topic.ORDERS_UPDATES)
#: Makes a row look stored two days ago.
AGE_ROW = (
    "UPDATE oms_outbox SET ts_stored = qm_now_ns() - 2 * 86400 * 1000000000::bigint"
    " WHERE input_id = $1"
)


async def _outbox_ids(pool: Any) -> list[str]:
    rows = await pool.fetch("SELECT input_id FROM oms_outbox ORDER BY input_id")
    return [r["input_id"] for r in rows]


async def _started(pool: Any) -> tuple[OmsService, InMemoryBus, ServiceContext[OmsSettings]]:
    """A fresh oms process on the test schema and its own in-memory bus (its context kept, so
    a test can run its background tasks)."""
    service = OmsService(OmsSettings(bus="memory", http_port=0))
    bus = InMemoryBus("test", clock=SimulatedClock(NOW), retain=True)
    member = await GroupMember.join(service, bus, bus.clock, pg=pool)
    return service, bus, member.ctx


async def test_prune_outbox_when_rows_are_older_than_the_retention_deletes_only_them(
    oms_pool: Any,
) -> None:
    # Arrange: two inputs' outboxes, one stored two days ago.
    store = PostgresOrderStore(oms_pool)
    await store.save_many(
        [
            PendingSave((), None, None, OutboxEntry(input_id, "RiskDecision", (), NOW))
            for input_id in ("E-new", "E-old")
        ]
    )
    await oms_pool.execute(AGE_ROW, "E-old")

    # Act
    pruned = await store.prune_outbox(OUTBOX_RETENTION_NS)

    # Assert
    assert pruned == 1
    assert await _outbox_ids(oms_pool) == ["E-new"]
    assert await store.load_outbox("E-old") is None
    assert await store.load_outbox("E-new") == []


async def test_decision_when_redelivered_after_the_prune_task_ran_gets_its_stored_outputs(
    oms_pool: Any,
) -> None:
    # Arrange: a decision handled (its SUBMIT stored in the outbox), an old row beside it.
    _, bus, ctx = await _started(oms_pool)
    decision = await bus.publish(Topic.ORDERS_APPROVED, stubs.risk_decision())
    await bus.run_until_idle()
    published = {t: [e.payload for e in bus.messages(t)] for t in FLOW_OUT}
    await oms_pool.execute(
        "INSERT INTO oms_outbox (input_id, input_schema, emits, ts_init)"
        " VALUES ('E-old', 'RiskDecision', '[]', 0)"
    )
    await oms_pool.execute(AGE_ROW, "E-old")

    # Act: the stage's own prune task, until it has run once; then a restarted process gets
    # the decision again (the crash came between the database commit and the bus commit).
    [prune] = [factory for name, factory in ctx.tasks if name == "oms.outbox.prune"]
    task = asyncio.create_task(prune())
    for _ in range(500):  # its first run, within 10 s
        if "E-old" not in await _outbox_ids(oms_pool):
            break
        await asyncio.sleep(0.02)
    task.cancel()
    second, _, _ = await _started(oms_pool)
    again = await second.handle(decision)

    # Assert: the recent row kept, and what it stored published again as it was.
    assert await _outbox_ids(oms_pool) == [decision.event_id]
    assert {t: [e.payload for e in again if e.topic == t] for t in FLOW_OUT} == published
    assert [c.command_id for c in published[Topic.ORDERS_COMMANDS]] == ["O-1:SUBMIT"]
