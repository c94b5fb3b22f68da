"""The simulated venue's sent-log written per batch: held claims, restarts, races, eviction."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.messages import BookLevel, ExecType, OrderCommand, OrderType, Side
from quantmesh_common.storage.postgres import create_pool
from quantmesh_common.testing import stubs
from quantmesh_common.testing.postgres import fresh_schema, server_dsn_for_tests
from quantmesh_common.testing.stubs import TS
from quantmesh_execution.guarded import GuardedExecutionHandler
from quantmesh_execution.sentlog import (
    PostgresSentLog,
    SentEntry,
    SentLogConflictError,
    WriteBehindSentLog,
)
from quantmesh_execution.simulated import SimulatedVenue
from quantmesh_execution.venue import AsyncVenueAdapter

pytestmark = pytest.mark.integration

D = Decimal
_ids = itertools.count(1)


@pytest.fixture
async def pool() -> AsyncIterator[Any]:
    """An asyncpg pool on a fresh migrated schema."""
    server = server_dsn_for_tests()
    if server is None:
        pytest.skip("QM_DATABASE_URL is not set (start the stack: deploy/local/stack.sh up)")
    with fresh_schema(server, "qm_exec_wb", migrate=True) as dsn:
        created = await create_pool(dsn)
        try:
            yield created
        finally:
            await created.close()


def sim_with_book() -> SimulatedVenue:
    sim = SimulatedVenue(id_prefix="SIM")
    sim.on_book(stubs.book_snapshot(asks=[BookLevel(price=D("50000.20"), size=D("5"))], bids=[]))
    return sim


def market_buy(ts: int = TS) -> OrderCommand:
    n = next(_ids)
    return stubs.order_command(
        command_id=f"C-wb-{n}",
        client_order_id=f"O-wb-{n}",
        order_type=OrderType.MARKET,
        limit_price=None,
        side=Side.BUY,
        quantity=D("1"),
        ts_event=ts,
    )


async def _rows(pool: Any) -> list[tuple[str, str]]:
    rows = await pool.fetch(
        "SELECT client_order_id, command_id FROM execution_sent_orders ORDER BY ts_command"
    )
    return [(r["client_order_id"], r["command_id"]) for r in rows]


async def test_claims_when_a_batch_is_handled_are_written_once_by_the_hook(pool: Any) -> None:
    log = WriteBehindSentLog(PostgresSentLog(pool))
    await log.start()
    handler = GuardedExecutionHandler(AsyncVenueAdapter(sim_with_book()), log)
    first, second = market_buy(TS), market_buy(TS + 1)

    sent = [await handler.reports_for(first), await handler.reports_for(second)]
    before_flush = await _rows(pool)
    await log.flush()

    assert [[r.exec_type for r in reports] for reports in sent] == [
        [ExecType.ACCEPTED, ExecType.FILL],
        [ExecType.ACCEPTED, ExecType.FILL],
    ]
    assert before_flush == []
    assert await _rows(pool) == [
        (first.client_order_id, first.command_id),
        (second.client_order_id, second.command_id),
    ]
    assert log.lookups == 0


async def test_submit_when_claimed_before_a_restart_is_not_sent_to_the_new_venue(
    pool: Any,
) -> None:
    # Arrange: a process claimed and stored the order, then died before its Kafka commit.
    order = market_buy()
    before = WriteBehindSentLog(PostgresSentLog(pool))
    await before.start()
    await GuardedExecutionHandler(AsyncVenueAdapter(sim_with_book()), before).reports_for(order)
    await before.flush()
    restarted = WriteBehindSentLog(PostgresSentLog(pool))
    await restarted.start()
    fresh_venue = sim_with_book()
    handler = GuardedExecutionHandler(AsyncVenueAdapter(fresh_venue), restarted)

    reports = await handler.reports_for(order)
    await restarted.flush()

    assert [r.exec_type for r in reports] == [ExecType.REJECTED]
    assert reports[0].reason is not None
    assert reports[0].reason.startswith("ORDER_NOT_FOUND_AT_VENUE")
    assert fresh_venue.ledger.orders == []
    assert restarted.lookups == 1
    assert await _rows(pool) == [(order.client_order_id, order.command_id)]


async def test_flush_when_another_writer_claimed_the_id_first_raises_the_conflict(
    pool: Any,
) -> None:
    order = market_buy()
    ours, theirs = WriteBehindSentLog(PostgresSentLog(pool)), PostgresSentLog(pool)
    await ours.start()
    await ours.claim(order, "SIM")
    await theirs.claim(order.model_copy(update={"command_id": "C-theirs"}), "SIM")

    with pytest.raises(SentLogConflictError, match="1 client order ids"):
        await ours.flush()

    assert await _rows(pool) == [(order.client_order_id, "C-theirs")]
    assert await ours.get("SIM", order.client_order_id) == SentEntry(
        "SIM", order.client_order_id, order.account_id, "C-theirs", "SIM"
    )


async def test_claim_when_evicted_from_memory_is_answered_by_the_log(pool: Any) -> None:
    log = WriteBehindSentLog(PostgresSentLog(pool), recent=2)
    await log.start()
    orders = [market_buy(TS + i) for i in range(3)]
    for order in orders:
        await log.claim(order, "SIM")
    await log.flush()
    kept = list(log.recent)
    high_water = log.high_water

    again = await log.claim(orders[0], "SIM")
    new = await log.claim(market_buy(TS + 10), "SIM")

    assert kept == [("SIM", orders[1].client_order_id), ("SIM", orders[2].client_order_id)]
    assert high_water == TS
    assert again == SentEntry(
        "SIM", orders[0].client_order_id, orders[0].account_id, orders[0].command_id, "SIM"
    )
    assert new is None
    assert log.lookups == 1
