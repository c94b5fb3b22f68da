"""A live venue's CANCEL and REPLACE, claimed by command id before the call: redelivered after a
kill before the batch hook, they reach the venue once (real PostgreSQL)."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal
from typing import Any, cast

import pytest

from quantmesh_common.bus.base import Emit
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import (
    BookLevel,
    CommandType,
    ExecType,
    ExecutionReport,
    OrderCommand,
    OrderStatus,
)
from quantmesh_common.testing import stubs
from quantmesh_common.testing.postgres import migrated_schema_fixtures
from quantmesh_common.testing.stubs import TS
from quantmesh_execution.claims import PostgresCommandClaims
from quantmesh_execution.guarded import GuardedExecutionHandler
from quantmesh_execution.outputs import OutputLog
from quantmesh_execution.sentlog import PostgresSentLog
from quantmesh_execution.service import OUTPUT_RETENTION_NS
from quantmesh_execution.simulated import SimulatedVenue
from quantmesh_execution.venue import AsyncVenueAdapter

from .test_idempotent_delivery import command, resting_buy

pytestmark = pytest.mark.integration

dsn, pool = migrated_schema_fixtures("qm_exec_claims", dsn="dsn", pool="pool", max_size=2)

D = Decimal


class CountingVenue(AsyncVenueAdapter):
    """A stand-in for a live venue: it outlives the execution process and counts its calls."""

    def __init__(self) -> None:
        venue = SimulatedVenue(id_prefix="LIVE")
        venue.on_book(
            stubs.book_snapshot(asks=[BookLevel(price=D("50000.20"), size=D("5"))], bids=[])
        )
        super().__init__(venue)
        self.calls: Counter[CommandType] = Counter()

    async def submit(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        self.calls[CommandType.SUBMIT] += 1
        return await super().submit(command, now_ns)

    async def cancel(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        self.calls[CommandType.CANCEL] += 1
        return await super().cancel(command, now_ns)

    async def replace(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        self.calls[CommandType.REPLACE] += 1
        return await super().replace(command, now_ns)


class Instance:
    """One execution process over the live venue, idempotent delivery, started from the store."""

    def __init__(self, pool: Any, venue: CountingVenue, *, claims: bool = True) -> None:
        self.outputs = OutputLog("SIM", pool)
        self.claims = PostgresCommandClaims("SIM", pool)
        self.handler = GuardedExecutionHandler(
            venue,
            PostgresSentLog(pool),
            outputs=self.outputs,
            command_claims=self.claims if claims else None,
        )

    async def start(self) -> Instance:
        await self.claims.check()
        await self.outputs.start()
        return self

    async def handle(self, command: OrderCommand) -> list[ExecutionReport]:
        """One input handled; nothing stored yet (a kill now loses the batch hook)."""
        envelope: Envelope[Any] = stubs.envelope(command, ts_event=command.ts_event)
        return reports_of(await self.handler(envelope))

    async def batch(self, command: OrderCommand) -> list[ExecutionReport]:
        """One input handled and stored by the batch hook."""
        reports = await self.handle(command)
        await self.outputs.flush()
        return reports


async def working(pool: Any, venue: CountingVenue) -> OrderCommand:
    """A resting buy at the venue, handled and stored by a process."""
    order = resting_buy()
    await (await Instance(pool, venue).start()).batch(order)
    return order


def reports_of(emits: list[Emit]) -> list[ExecutionReport]:
    reports = [emit.payload for emit in emits]
    assert all(isinstance(report, ExecutionReport) for report in reports)
    return cast(list[ExecutionReport], reports)


def ids(reports: list[ExecutionReport]) -> list[tuple[ExecType, str]]:
    return [(r.exec_type, r.report_id) for r in reports]


async def test_cancel_when_redelivered_after_a_kill_before_the_batch_hook_reaches_venue_once(
    pool: Any,
) -> None:
    # Arrange: the order is working; a process cancels it and dies before storing the batch.
    venue = CountingVenue()
    order = await working(pool, venue)
    cancel = command(CommandType.CANCEL, client_order_id=order.client_order_id)
    first = await (await Instance(pool, venue).start()).handle(cancel)
    restarted = await Instance(pool, venue).start()

    # Act
    again = await restarted.batch(cancel)

    # Assert: the venue saw one cancel; the order's history, which ends with that CANCELED.
    assert [r.exec_type for r in first] == [ExecType.CANCELED]
    assert venue.calls[CommandType.CANCEL] == 1
    assert ids(again) == ids(venue.adapter.history(order.client_order_id, order.account_id))
    assert ids(again)[-1] == ids(first)[0]


async def test_replace_when_redelivered_after_a_kill_before_the_batch_hook_reaches_venue_once(
    pool: Any,
) -> None:
    # Arrange
    venue = CountingVenue()
    order = await working(pool, venue)
    replace = command(
        CommandType.REPLACE,
        client_order_id=order.client_order_id,
        new_quantity=D("0.2"),
    )
    first = await (await Instance(pool, venue).start()).handle(replace)
    restarted = await Instance(pool, venue).start()

    # Act
    again = await restarted.batch(replace)

    # Assert: one replace at the venue; the order's history (its REPLACED included), then the
    # command's answer: not sent again, the order still working.
    assert [r.exec_type for r in first] == [ExecType.REPLACED]
    assert venue.calls[CommandType.REPLACE] == 1
    assert ids(again[:-1]) == ids(venue.adapter.history(order.client_order_id, order.account_id))
    assert first[0].report_id in [r.report_id for r in again]
    assert (again[-1].exec_type, again[-1].order_status) == (
        ExecType.CANCEL_REJECTED,
        OrderStatus.ACCEPTED,
    )
    assert again[-1].report_id == f"{replace.command_id}-R"
    assert (again[-1].reason or "").startswith("COMMAND_ALREADY_SENT")


async def test_cancel_when_claimed_but_killed_before_the_call_is_rejected_not_sent(
    pool: Any,
) -> None:
    # Arrange: the claim is stored, the process dies before the venue call.
    venue = CountingVenue()
    order = await working(pool, venue)
    cancel = command(CommandType.CANCEL, client_order_id=order.client_order_id)
    assert await PostgresCommandClaims("SIM", pool).claim(cancel)
    restarted = await Instance(pool, venue).start()

    # Act
    reports = await restarted.batch(cancel)

    # Assert: the order still works; the cancel is answered so a new one can be sent.
    assert venue.calls[CommandType.CANCEL] == 0
    assert [r.exec_type for r in reports] == [ExecType.ACCEPTED, ExecType.CANCEL_REJECTED]
    assert reports[-1].order_status is OrderStatus.ACCEPTED
    assert (reports[-1].reason or "").startswith("COMMAND_ALREADY_SENT")


async def test_cancel_when_transactional_and_redelivered_after_a_kill_reaches_venue_once(
    pool: Any,
) -> None:
    # Arrange: no output log (transactional delivery): the kill loses the Kafka commit.
    venue = CountingVenue()
    claims = PostgresCommandClaims("SIM", pool)

    def handler() -> GuardedExecutionHandler:
        return GuardedExecutionHandler(venue, PostgresSentLog(pool), command_claims=claims)

    order = resting_buy()
    await handler()(stubs.envelope(order, ts_event=order.ts_event))
    cancel = command(CommandType.CANCEL, client_order_id=order.client_order_id)
    await handler()(stubs.envelope(cancel, ts_event=cancel.ts_event))

    # Act
    again = reports_of(await handler()(stubs.envelope(cancel, ts_event=cancel.ts_event)))

    # Assert
    assert venue.calls[CommandType.CANCEL] == 1
    assert [r.exec_type for r in again] == [ExecType.ACCEPTED, ExecType.CANCELED]


async def test_claims_when_older_than_the_retention_are_pruned_and_recent_ones_kept(
    pool: Any,
) -> None:
    # Arrange
    claims = PostgresCommandClaims("SIM", pool)
    other = PostgresCommandClaims("OTHER", pool)
    old, recent = command(CommandType.CANCEL), command(CommandType.CANCEL)
    for claimed in (old, recent):
        assert await claims.claim(claimed)
    assert await other.claim(old)
    await pool.execute(
        "UPDATE execution_command_claims SET recorded_at = now() - interval '2 days'"
        " WHERE command_id = $1",
        old.command_id,
    )

    # Act
    pruned = await claims.prune(OUTPUT_RETENTION_NS)

    # Assert: this venue's old claim only; a pruned command may be claimed (sent) again.
    rows = await pool.fetch(
        "SELECT venue, command_id FROM execution_command_claims ORDER BY venue, command_id"
    )
    assert pruned == 1
    assert [(r["venue"], r["command_id"]) for r in rows] == [
        ("OTHER", old.command_id),
        ("SIM", recent.command_id),
    ]
    assert await claims.claim(old)
    assert not await claims.claim(recent)


async def test_service_when_ccxt_with_postgres_claims_commands_and_prunes_the_claims(
    pool: Any,
) -> None:
    from quantmesh_common.bus.memory import InMemoryBus
    from quantmesh_common.clock import SimulatedClock
    from quantmesh_common.testing.harness import context
    from quantmesh_execution.config import ExecutionSettings
    from quantmesh_execution.service import ExecutionService

    # Arrange: the live venue's stage as QM_* configures it (nothing is sent: no order).
    service = ExecutionService(
        ExecutionSettings(
            bus="memory",
            venue="BINANCE",
            exec_venue="ccxt",
            exec_ccxt_exchange="binance",
            exec_ccxt_base_url="http://127.0.0.1:9",
            database_url="postgresql://unused",
            order_flow_delivery="idempotent",
        )
    )
    clock = SimulatedClock(TS)
    ctx = context(service, InMemoryBus("test", clock=clock), clock, pg=pool)

    # Act
    await service.setup(ctx)
    try:
        handler = service.handler
    finally:
        await service.teardown(ctx)

    # Assert
    assert isinstance(handler, GuardedExecutionHandler)
    assert isinstance(handler.command_claims, PostgresCommandClaims)
    assert handler.command_claims.venue == "BINANCE"
    assert "execution.command_claims.prune" in [name for name, _ in ctx.tasks]
