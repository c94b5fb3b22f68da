"""Execution's stored reports on real PostgreSQL: rows past their retention are pruned (this
venue's only), recent ones kept and still published again when their input is redelivered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.runtime import ServiceContext
from quantmesh_common.storage.postgres import create_pool
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import GroupMember
from quantmesh_common.testing.postgres import fresh_schema, server_dsn_for_tests
from quantmesh_common.testing.stubs import TS
from quantmesh_common.topics import Topic
from quantmesh_execution.config import ExecutionSettings
from quantmesh_execution.guarded import GuardedExecutionHandler
from quantmesh_execution.outputs import OutputLog, command_cause
from quantmesh_execution.service import OUTPUT_RETENTION_NS, ExecutionService

pytestmark = pytest.mark.integration

#: Makes a cause's rows look recorded two days ago.
AGE_ROWS = (
    "UPDATE execution_outputs SET recorded_at = now() - interval '2 days'"
    " WHERE venue = $1 AND cause = $2"
)


@pytest.fixture
async def pool() -> AsyncIterator[Any]:
    """An asyncpg pool on a fresh migrated schema."""
    server = server_dsn_for_tests()
    if server is None:
        pytest.skip("QM_DATABASE_URL is not set (start the stack: deploy/local/stack.sh up)")
    with fresh_schema(server, "qm_exec_retention", migrate=True) as dsn:
        created = await create_pool(dsn)
        try:
            yield created
        finally:
            await created.close()


async def _causes(pool: Any) -> list[tuple[str, str]]:
    rows = await pool.fetch("SELECT venue, cause FROM execution_outputs ORDER BY venue, cause")
    return [(r["venue"], r["cause"]) for r in rows]


async def _started(
    pool: Any,
) -> tuple[ExecutionService, InMemoryBus, ServiceContext[ExecutionSettings]]:
    """A fresh execution process in idempotent delivery with the sent-log, on its own bus (its
    context kept, so a test can run its background tasks)."""
    settings = ExecutionSettings(
        bus="memory",
        http_port=0,
        database_url="postgresql://unused",
        redis_url=None,
        order_flow_delivery="idempotent",
    )
    service = ExecutionService(settings)
    bus = InMemoryBus("test", clock=SimulatedClock(TS), retain=True)
    member = await GroupMember.join(service, bus, bus.clock, pg=pool)
    return service, bus, member.ctx


async def test_prune_when_rows_are_older_than_the_retention_deletes_only_this_venues_old_ones(
    pool: Any,
) -> None:
    # Arrange: SIM's C-old and C-new, OTHER's C-old; both C-old recorded two days ago.
    report = stubs.order_accepted()
    for venue, cause in (("SIM", "C-new"), ("SIM", "C-old"), ("OTHER", "C-old")):
        log = OutputLog(venue, pool)
        log.record(command_cause(cause), TS, [report])
        await log.flush()
    for venue in ("SIM", "OTHER"):
        await pool.execute(AGE_ROWS, venue, command_cause("C-old"))
    sim = OutputLog("SIM", pool)

    # Act
    pruned = await sim.prune(OUTPUT_RETENTION_NS)

    # Assert
    assert pruned == 1
    assert await _causes(pool) == [("OTHER", "command:C-old"), ("SIM", "command:C-new")]


async def test_command_when_redelivered_after_the_prune_task_ran_gets_its_stored_reports(
    pool: Any,
) -> None:
    # Arrange: a resting buy handled and stored, an old row of the same venue beside it.
    _, bus, ctx = await _started(pool)
    order = stubs.order_command(limit_price=Decimal("49990"))
    submit = await bus.publish(Topic.ORDERS_COMMANDS, order)
    await bus.run_until_idle()
    reports = [e.payload for e in bus.messages(Topic.EXEC_REPORTS)]
    old = OutputLog("SIM", pool)
    old.record(command_cause("C-old"), TS, [stubs.order_accepted(report_id="R-old")])
    await old.flush()
    await pool.execute(AGE_ROWS, "SIM", command_cause("C-old"))

    # Act: the stage's own prune task, until it has run once; then a restarted process (its
    # simulated venue empty) gets the SUBMIT again.
    [prune] = [factory for name, factory in ctx.tasks if name == "execution.outputs.prune"]
    task = asyncio.create_task(prune())
    for _ in range(500):  # its first run, within 10 s
        if ("SIM", "command:C-old") not in await _causes(pool):
            break
        await asyncio.sleep(0.02)
    task.cancel()
    second, _, _ = await _started(pool)
    assert isinstance(second.handler, GuardedExecutionHandler)
    again = await second.handler(submit)

    # Assert: the recent row kept and its reports published again (without it, the restarted
    # venue knowing nothing, the claimed SUBMIT would be rejected ORDER_NOT_FOUND_AT_VENUE).
    assert await _causes(pool) == [("SIM", command_cause(order.command_id))]
    assert [e.payload for e in again] == reports
    assert [r.exec_type.value for r in reports] == ["ACCEPTED"]
