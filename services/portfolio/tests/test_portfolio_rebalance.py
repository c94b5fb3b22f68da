"""Two portfolio members in one group on the in-memory bus, sharing one PostgreSQL schema: a
member assigned an account's partition after its start applies the account's fills to the book
the previous owner stored, not to the one it loaded at its own start."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.messages import Position, Side
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import deliver
from quantmesh_common.topics import Topic

from .conftest import T0, PortfolioMember, new_portfolio, whole_fill

pytestmark = pytest.mark.integration

D = Decimal
S = stubs.SECOND_NS
ACC, BTC = stubs.ACCOUNT_ID, stubs.INSTRUMENT_ID


def _positions(bus: InMemoryBus) -> list[Position]:
    return [e.payload for e in bus.messages(Topic.PORTFOLIO_UPDATES)]


async def test_sell_when_the_account_moves_to_a_member_started_before_its_buy_is_flat(
    portfolio_pool: Any,
) -> None:
    # Arrange: both members start on an empty store; the BUY 2 reaches whichever owns the
    # account's partition, and that one leaves, so the other (which never saw the BUY) gets it.
    clock = SimulatedClock(T0)
    bus = InMemoryBus("test", clock=clock, retain=True)
    first = await PortfolioMember.join(new_portfolio(), bus, clock, portfolio_pool)
    second = await PortfolioMember.join(new_portfolio(), bus, clock, portfolio_pool)
    await deliver(bus, Topic.EXEC_REPORTS, whole_fill("T-1", Side.BUY, "2", "50000", 1))
    owner, heir = (first, second) if first.holds(ACC) else (second, first)
    assert owner.holds(ACC)
    assert not heir.holds(ACC)
    await owner.leave()

    # Act
    await deliver(bus, Topic.EXEC_REPORTS, whole_fill("T-2", Side.SELL, "2", "51000", 2))

    # Assert: flat, not -2; realised (51000 - 50000) x 2 = 2000; stored flat too.
    published = _positions(bus)
    assert [(p.quantity, p.realized_pnl) for p in published] == [(D(2), D(0)), (D(0), D(2000))]
    async with portfolio_pool.acquire() as conn:
        stored = await conn.fetchrow(
            "SELECT quantity, realized_pnl FROM positions WHERE account_id = $1", ACC
        )
        lots = await conn.fetchval("SELECT count(*) FROM portfolio_lots WHERE account_id = $1", ACC)
        usdt = await conn.fetchval(
            "SELECT amount FROM portfolio_balances WHERE account_id = $1 AND currency = 'USDT'",
            ACC,
        )
    assert (stored["quantity"], stored["realized_pnl"], lots) == (D(0), D(2000), 0)
    assert usdt == D(102000)  # 100000 - 2 x 50000 + 2 x 51000
    assert heir.service.reloads >= 1


async def test_fill_when_a_member_regains_partitions_keeps_the_mark_it_saw_since_the_store(
    portfolio_pool: Any,
) -> None:
    # Arrange: one member buys 2 at 50000 and sees a tick at 51000 in the same minute (no
    # snapshot: the store still marks the position at 50000); a second member joins and
    # leaves, so the first is assigned partitions again and reloads from the store.
    clock = SimulatedClock(T0)
    bus = InMemoryBus("test", clock=clock, retain=True)
    first = await PortfolioMember.join(new_portfolio(), bus, clock, portfolio_pool)
    await deliver(bus, Topic.EXEC_REPORTS, whole_fill("T-1", Side.BUY, "2", "50000", 1))
    await deliver(bus, Topic.MD_TICKS, stubs.tick(price=D("51000"), ts_event=T0 + 2 * S))
    second = await PortfolioMember.join(new_portfolio(), bus, clock, portfolio_pool)
    await second.leave()
    reloads_before = first.service.reloads

    # Act
    await deliver(bus, Topic.EXEC_REPORTS, whole_fill("T-2", Side.SELL, "1", "50500", 3))

    # Assert: one lot of 1 left at 50000, marked at the tick's 51000: unrealised 1000;
    # realised (50500 - 50000) x 1 = 500.
    last = _positions(bus)[-1]
    assert (last.quantity, last.last_price, last.unrealized_pnl, last.realized_pnl) == (
        D(1),
        D(51000),
        D(1000),
        D(500),
    )
    assert first.service.reloads == reloads_before + 1


async def test_reload_when_only_market_data_partitions_are_assigned_keeps_the_memory(
    portfolio_pool: Any,
) -> None:
    # Arrange: a member holds a BUY 2 in memory; the store is emptied behind its back, so a
    # reload would lose the account.
    clock = SimulatedClock(T0)
    bus = InMemoryBus("test", clock=clock, retain=True)
    member = await PortfolioMember.join(new_portfolio(), bus, clock, portfolio_pool)
    await deliver(bus, Topic.EXEC_REPORTS, whole_fill("T-1", Side.BUY, "2", "50000", 1))
    reloads_before = member.service.reloads
    async with portfolio_pool.acquire() as conn:
        for table in ("portfolio_lots", "positions", "portfolio_balances", "portfolio_accounts"):
            await conn.execute(f"DELETE FROM {table}")

    # Act: tick and control partitions carry no account.
    await member.service.reload([(Topic.MD_TICKS, 3), (Topic.CONTROL, 0)])

    # Assert
    assert member.service.reloads == reloads_before
    assert member.holds(ACC)
