"""Idempotent order-flow delivery: a redelivered input reaches the venue once, its reports again."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import (
    BookLevel,
    CommandType,
    ExecType,
    ExecutionReport,
    OrderCommand,
    OrderType,
)
from quantmesh_common.storage.postgres import create_pool
from quantmesh_common.testing import stubs
from quantmesh_common.testing.postgres import fresh_schema, server_dsn_for_tests
from quantmesh_common.testing.stubs import TS
from quantmesh_common.topics import Topic
from quantmesh_execution.guarded import GuardedExecutionHandler
from quantmesh_execution.outputs import OutputLog, command_cause, event_cause
from quantmesh_execution.sentlog import MemorySentLog, PostgresSentLog, WriteBehindSentLog
from quantmesh_execution.simulated import SimulatedVenue
from quantmesh_execution.venue import AsyncVenueAdapter

D = Decimal
_ids = itertools.count(1)


def sim(prefix: str = "SIM") -> SimulatedVenue:
    """A venue whose book offers 5 BTC at 50000.20 and bids nothing."""
    venue = SimulatedVenue(id_prefix=prefix)
    venue.on_book(stubs.book_snapshot(asks=[BookLevel(price=D("50000.20"), size=D("5"))], bids=[]))
    return venue


def command(kind: CommandType = CommandType.SUBMIT, **overrides: Any) -> OrderCommand:
    n = next(_ids)
    fields: dict[str, Any] = {
        "command_id": f"C-idem-{n}",
        "client_order_id": f"O-idem-{n}",
        "command_type": kind,
        "ts_event": TS + n,
    }
    if kind is CommandType.CANCEL:
        fields |= dict.fromkeys(("side", "order_type", "quantity", "limit_price", "time_in_force"))
    return stubs.order_command(**{**fields, **overrides})


def resting_buy() -> OrderCommand:
    """A limit buy of 0.1 at 49990: below the ask, so it rests."""
    return command(limit_price=D("49990"), quantity=D("0.1"))


def market_buy() -> OrderCommand:
    return command(order_type=OrderType.MARKET, limit_price=None, quantity=D("1"))


def cancel_of(order: OrderCommand) -> OrderCommand:
    return command(CommandType.CANCEL, client_order_id=order.client_order_id)


def trade_through(ts: int) -> Any:
    """A trade of 1 BTC at 49980: strictly through the resting buy at 49990."""
    return stubs.tick(price=D("49980"), size=D("1"), ts_event=ts)


def wrap(payload: Any) -> Envelope[Any]:
    return stubs.envelope(payload, ts_event=payload.ts_event)


def ids(reports: list[ExecutionReport]) -> list[tuple[ExecType, str, str | None]]:
    return [(r.exec_type, r.report_id, r.trade_id) for r in reports]


async def published(handler: GuardedExecutionHandler, envelope: Envelope[Any]) -> list[Any]:
    emits = await handler(envelope)
    assert all(e.topic == Topic.EXEC_REPORTS for e in emits)
    return [e.payload for e in emits]


# -- unit: one process, the log in memory -----------------------------------------------------


def memory_handler(venue: SimulatedVenue) -> GuardedExecutionHandler:
    return GuardedExecutionHandler(
        AsyncVenueAdapter(venue), MemorySentLog(), outputs=OutputLog("SIM", None)
    )


async def test_trade_tick_when_redelivered_fills_once_and_publishes_the_same_fill_again() -> None:
    # Arrange
    venue = sim()
    handler = memory_handler(venue)
    order = resting_buy()
    await published(handler, wrap(order))
    tick = wrap(trade_through(order.ts_event + 1))
    first = await published(handler, tick)

    # Act
    again = await published(handler, tick)

    # Assert: one maker fill of 0.1 at the limit, 49990; the same report the second time.
    assert [(r.exec_type, r.last_qty, r.last_price) for r in first] == [
        (ExecType.FILL, D("0.1"), D("49990"))
    ]
    assert again == first
    assert len(venue.ledger.fills) == 1


async def test_cancel_when_redelivered_reaches_the_venue_once_and_republishes_the_order() -> None:
    # Arrange
    venue = sim()
    handler = memory_handler(venue)
    order = resting_buy()
    accepted = await published(handler, wrap(order))
    cancel = wrap(cancel_of(order))
    canceled = await published(handler, cancel)

    # Act
    again = await published(handler, cancel)

    # Assert: the order's history, ACCEPTED then CANCELED, under the ids they were made with.
    assert [r.exec_type for r in canceled] == [ExecType.CANCELED]
    assert ids(again) == ids(accepted + canceled)
    assert ids(venue.history(order.client_order_id, order.account_id)) == ids(again)


async def test_cancel_when_the_oms_sends_it_again_with_a_new_envelope_is_recognised() -> None:
    # Arrange: the oms re-emits a pending cancel: the same command, a new envelope.
    venue = sim()
    handler = memory_handler(venue)
    order = resting_buy()
    await published(handler, wrap(order))
    cancel = cancel_of(order)
    canceled = await published(handler, wrap(cancel))

    # Act
    again = await published(handler, wrap(cancel))

    # Assert
    assert [r.report_id for r in again if r.exec_type is ExecType.CANCELED] == [
        canceled[0].report_id
    ]
    assert [r.exec_type for r in venue.history(order.client_order_id, order.account_id)] == [
        ExecType.ACCEPTED,
        ExecType.CANCELED,
    ]


async def test_submit_when_redelivered_is_sent_once_and_republishes_its_reports() -> None:
    # Arrange
    venue = sim()
    handler = memory_handler(venue)
    submit = wrap(market_buy())
    first = await published(handler, submit)

    # Act
    again = await published(handler, submit)

    # Assert: 1 BTC taken at 50000.20 once.
    assert [(r.exec_type, r.last_qty, r.last_price) for r in first] == [
        (ExecType.ACCEPTED, D("0"), None),
        (ExecType.FILL, D("1"), D("50000.20")),
    ]
    assert again == first
    assert len(venue.ledger.orders) == 1
    assert len(venue.ledger.fills) == 1


async def test_tick_when_it_made_no_report_is_not_recorded() -> None:
    # Arrange
    handler = memory_handler(sim())
    quiet = wrap(trade_through(TS + 10))

    # Act
    reports = await published(handler, quiet)

    # Assert
    assert reports == []
    assert handler.outputs is not None
    assert handler.outputs.recent == {}


async def test_handler_when_no_output_log_drops_a_redelivered_cancel_as_before() -> None:
    # Arrange: transactional delivery keeps today's behaviour (the venue drops the duplicate).
    venue = sim()
    handler = GuardedExecutionHandler(AsyncVenueAdapter(venue), MemorySentLog())
    order = resting_buy()
    await published(handler, wrap(order))
    cancel = wrap(cancel_of(order))
    await published(handler, cancel)

    # Act
    again = await published(handler, cancel)

    # Assert
    assert again == []


def test_output_log_when_memory_evicts_only_commands_raise_the_look_up_time() -> None:
    # Arrange: memory for one cause; a tick's time runs on the venue's clock, not the oms's.
    log = OutputLog("SIM", None, recent=1)
    report = stubs.order_accepted()

    # Act
    log.record(command_cause("C-old"), 100, [report])
    log.record(event_cause("E-tick"), 500, [report])  # evicts C-old
    log.record(command_cause("C-new"), 200, [report])  # evicts E-tick

    # Assert
    assert log.high_water == 100
    assert list(log.recent) == ["command:C-new"]


# -- integration: PostgreSQL, a restarted instance rebuilt from the store ---------------------


@pytest.fixture
async def pool() -> AsyncIterator[Any]:
    """An asyncpg pool on a fresh migrated schema."""
    server = server_dsn_for_tests()
    if server is None:
        pytest.skip("QM_DATABASE_URL is not set (start the stack: deploy/local/stack.sh up)")
    with fresh_schema(server, "qm_exec_idem", migrate=True) as dsn:
        created = await create_pool(dsn)
        try:
            yield created
        finally:
            await created.close()


class Instance:
    """One execution process: its venue, its sent-log and output log, started from the store."""

    def __init__(self, pool: Any, prefix: str, *, recent: int = 20_000) -> None:
        self.venue = sim(prefix)
        self.claims = WriteBehindSentLog(PostgresSentLog(pool))
        self.outputs = OutputLog("SIM", pool, recent=recent)
        self.handler = GuardedExecutionHandler(
            AsyncVenueAdapter(self.venue), self.claims, outputs=self.outputs
        )

    async def start(self) -> Instance:
        await self.claims.start()
        await self.outputs.start()
        return self

    async def batch(self, envelopes: list[Envelope[Any]]) -> list[list[Any]]:
        """Handle a batch, then store it as the batch hook does (claims, then reports)."""
        out = [await published(self.handler, envelope) for envelope in envelopes]
        await self.claims.flush()
        await self.outputs.flush()
        return out


async def _stored(pool: Any) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    outputs = await pool.fetch("SELECT cause, report_id FROM execution_outputs ORDER BY id")
    claims = await pool.fetch(
        "SELECT client_order_id, command_id FROM execution_sent_orders ORDER BY client_order_id"
    )
    return (
        [(r["cause"], r["report_id"]) for r in outputs],
        [(r["client_order_id"], r["command_id"]) for r in claims],
    )


@pytest.mark.integration
async def test_inputs_when_handled_again_after_a_restart_republish_the_stored_reports(
    pool: Any,
) -> None:
    # Arrange: a process applied a batch and stored it, then died before its output was
    # acknowledged (or before its offsets were committed).
    taken, resting, cancelled = market_buy(), resting_buy(), resting_buy()
    batch = [
        wrap(taken),
        wrap(resting),
        wrap(cancelled),
        wrap(trade_through(cancelled.ts_event + 1)),
        wrap(cancel_of(cancelled)),
    ]
    first = await (await Instance(pool, "SIMA").start()).batch(batch)
    stored_before = await _stored(pool)
    restarted = await Instance(pool, "SIMB").start()

    # Act: the new process gets the same inputs again.
    again = await restarted.batch(batch)

    # Assert: every input's reports again, with the first process's ids; a command's are its
    # order's whole stored history (the fills by the later trade, the cancel's answer).
    taken_r, resting_r, cancelled_r, traded_r, canceled_r = first
    assert [r.exec_type for r in traded_r] == [ExecType.FILL, ExecType.FILL]
    assert [r.exec_type for r in canceled_r] == [ExecType.CANCEL_REJECTED]
    assert again[0] == taken_r
    assert again[1] == [*resting_r, traded_r[0]]
    assert again[2] == [*cancelled_r, traded_r[1], canceled_r[0]]
    assert again[3] == traded_r
    assert again[4] == [*cancelled_r, traded_r[1], canceled_r[0]]
    assert restarted.venue.ledger.orders == []
    assert restarted.venue.ledger.fills == []
    assert await _stored(pool) == stored_before
    assert len(stored_before[0]) == 2 + 1 + 1 + 2 + 1


@pytest.mark.integration
async def test_cancel_when_sent_again_long_after_a_restart_is_found_in_the_table(
    pool: Any,
) -> None:
    # Arrange: the cancel's cause is older than what the restarted memory holds (recent=1).
    order = resting_buy()
    cancel = cancel_of(order)
    later = market_buy()
    first = await (await Instance(pool, "SIMA").start()).batch(
        [wrap(order), wrap(cancel), wrap(later)]
    )
    restarted = await Instance(pool, "SIMB", recent=1).start()

    # Act
    [again] = await restarted.batch([wrap(cancel)])

    # Assert
    assert again == first[0] + first[1]
    assert restarted.venue.ledger.orders == []
    assert restarted.outputs.lookups == 2  # the cancel's reports, then its order's history


@pytest.mark.integration
async def test_submit_when_claimed_but_its_reports_were_not_stored_is_not_sent_again(
    pool: Any,
) -> None:
    # Arrange: the process stored the claim, then died before the reports were written.
    order = market_buy()
    dead = await Instance(pool, "SIMA").start()
    await published(dead.handler, wrap(order))
    await dead.claims.flush()
    restarted = await Instance(pool, "SIMB").start()

    # Act
    [reports] = await restarted.batch([wrap(order)])

    # Assert: none of the first output was published, so the order never was at the venue.
    assert [r.exec_type for r in reports] == [ExecType.REJECTED]
    assert (reports[0].reason or "").startswith("ORDER_NOT_FOUND_AT_VENUE")
    assert restarted.venue.ledger.orders == []


@pytest.mark.integration
async def test_service_when_idempotent_stores_each_batch_reports_with_its_claims(
    pool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from quantmesh_common.testing.harness import StageHarness
    from quantmesh_execution.config import ExecutionSettings
    from quantmesh_execution.service import ExecutionService

    # Arrange
    monkeypatch.setenv("QM_ORDER_FLOW_DELIVERY", "idempotent")
    settings = ExecutionSettings(
        bus="memory", http_port=0, database_url="postgresql://unused", redis_url=None
    )
    service = ExecutionService(settings)
    harness = await StageHarness(service, now_ns=TS, pg=pool).start()
    await harness.send(Topic.MD_BOOKS, stubs.book_snapshot(asks=[], bids=[]))
    order = resting_buy()

    # Act
    await harness.send(Topic.ORDERS_COMMANDS, order)

    # Assert
    [accepted] = harness.payloads(Topic.EXEC_REPORTS)
    assert accepted.exec_type is ExecType.ACCEPTED
    assert await _stored(pool) == (
        [(f"command:{order.command_id}", accepted.report_id)],
        [(order.client_order_id, order.command_id)],
    )
