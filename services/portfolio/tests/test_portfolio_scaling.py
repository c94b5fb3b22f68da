"""Two portfolio members in one group on the in-memory bus, sharing one PostgreSQL schema: each
snapshots, stores and reports only the accounts whose `exec.reports` partitions it owns, a member
given a partition snapshots the state its previous owner stored, and REPORT_PERFORMANCE (read by
every member) yields one report per account and scope."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.base import partition_of
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.messages import ControlAction, PerformanceReport, PortfolioSnapshot, Side
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import deliver
from quantmesh_common.topics import Topic, registry

from .conftest import T0, PortfolioMember, new_portfolio, whole_fill

pytestmark = pytest.mark.integration

D = Decimal
S = stubs.SECOND_NS
BTC = stubs.INSTRUMENT_ID
STRATEGY = stubs.STRATEGY_ID
#: exec.reports partition 0: the first member's half of 6 in a group of two.
ACC_FIRST = "acc-4"
#: exec.reports partition 3: the second member's half.
ACC_SECOND = "acc-2"


def _tick(price: str, second: int) -> Any:
    return stubs.tick(instrument_id=BTC, price=D(price), ts_event=T0 + second * S)


def _snapshots(bus: InMemoryBus) -> list[PortfolioSnapshot]:
    return [e.payload for e in bus.messages(Topic.PORTFOLIO_SNAPSHOTS)]


async def _stored_snapshots(pool: Any) -> list[tuple[str, int, Decimal]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT account_id, ts_event, equity FROM equity_snapshots"
            " ORDER BY ts_event, account_id"
        )
    return [(r["account_id"], r["ts_event"], r["equity"]) for r in rows]


def test_accounts_when_chosen_fall_on_each_half_of_the_partitions() -> None:
    # Arrange
    partitions = registry().partitions(Topic.EXEC_REPORTS)

    # Act
    placed = (partition_of(ACC_FIRST, partitions), partition_of(ACC_SECOND, partitions))

    # Assert: a group of two splits 6 partitions 0-2 / 3-5 (range assignor, join order).
    assert (partitions, placed) == (6, (0, 3))


async def test_snapshots_when_two_members_split_accounts_are_written_once_by_the_owner(
    portfolio_pool: Any,
) -> None:
    # Arrange: both members hold a BUY of 1 BTC at 50000 in one account each; every member
    # sees every tick, so both cross each boundary.
    clock = SimulatedClock(T0)
    bus = InMemoryBus("test", clock=clock, retain=True)
    first = await PortfolioMember.join(new_portfolio(), bus, clock, portfolio_pool)
    second = await PortfolioMember.join(new_portfolio(), bus, clock, portfolio_pool)
    await deliver(
        bus,
        Topic.EXEC_REPORTS,
        whole_fill("T-1", Side.BUY, "1", "50000", 1, account_id=ACC_FIRST),
        whole_fill("T-2", Side.BUY, "1", "50000", 1, account_id=ACC_SECOND),
    )

    # Act: a tick at 52000 in the first minute, then one in each of the next two minutes.
    await deliver(bus, Topic.MD_TICKS, _tick("52000", 2), _tick("53000", 61), _tick("53000", 121))

    # Assert: one snapshot per account and boundary, published and stored: equity 100000 +
    # (52000 - 50000) x 1 = 102000 at T0+60, 100000 + 3000 = 103000 at T0+120.
    published = sorted((s.ts_event, s.account_id, s.equity) for s in _snapshots(bus))
    expected = [
        (T0 + 60 * S, ACC_SECOND, D(102000)),
        (T0 + 60 * S, ACC_FIRST, D(102000)),
        (T0 + 120 * S, ACC_SECOND, D(103000)),
        (T0 + 120 * S, ACC_FIRST, D(103000)),
    ]
    assert published == expected
    stored = await _stored_snapshots(portfolio_pool)
    assert sorted((ts, a, eq) for a, ts, eq in stored) == expected
    # Each member holds its own account only.
    assert (first.holds(ACC_FIRST), first.holds(ACC_SECOND)) == (True, False)
    assert (second.holds(ACC_FIRST), second.holds(ACC_SECOND)) == (False, True)


async def test_snapshot_when_a_partition_moves_is_the_new_owners_of_the_stored_state(
    portfolio_pool: Any,
) -> None:
    # Arrange: the first member alone buys 1 BTC at 50000 in ACC_FIRST and 2 in ACC_SECOND.
    # The second member loads the store (ACC_SECOND long 2); then the first sells 1 of
    # ACC_SECOND at 51000, and only then does the second join and take partitions 3-5, with
    # no fill of them to come (the bus tells on_assign only before such a message).
    clock = SimulatedClock(T0)
    bus = InMemoryBus("test", clock=clock, retain=True)
    first = await PortfolioMember.join(new_portfolio(), bus, clock, portfolio_pool)
    await deliver(
        bus,
        Topic.EXEC_REPORTS,
        whole_fill("T-1", Side.BUY, "1", "50000", 1, account_id=ACC_FIRST),
        whole_fill("T-2", Side.BUY, "2", "50000", 1, account_id=ACC_SECOND),
    )
    second = await PortfolioMember.prepare(new_portfolio(), bus, clock, portfolio_pool)
    await deliver(
        bus,
        Topic.EXEC_REPORTS,
        whole_fill("T-3", Side.SELL, "1", "51000", 2, account_id=ACC_SECOND),
    )
    await second.start()

    # Act: the minute closes.
    await deliver(bus, Topic.MD_TICKS, _tick("52000", 3), _tick("52000", 61))

    # Assert: ACC_SECOND snapshotted once, by the second member, as the first stored it:
    # 1 BTC left, cash 100000 - 100000 + 51000 = 51000, equity 51000 + 52000 = 103000,
    # realised (51000 - 50000) x 1 = 1000, unrealised (52000 - 50000) x 1 = 2000 (its own
    # start's view, long 2, would say 104000). ACC_FIRST by the first: 100000 + 2000.
    snapshots = {s.account_id: s for s in _snapshots(bus)}
    assert len(_snapshots(bus)) == 2
    moved = snapshots[ACC_SECOND]
    assert (moved.ts_event, moved.equity, moved.realized_pnl, moved.unrealized_pnl) == (
        T0 + 60 * S,
        D(103000),
        D(1000),
        D(2000),
    )
    assert [(p.quantity, p.last_price) for p in moved.positions] == [(D(1), D(52000))]
    assert snapshots[ACC_FIRST].equity == D(102000)
    assert (first.holds(ACC_SECOND), second.holds(ACC_SECOND)) == (False, True)
    assert (first.holds(ACC_FIRST), second.holds(ACC_FIRST)) == (True, False)
    stored = await _stored_snapshots(portfolio_pool)
    assert stored == [(ACC_SECOND, T0 + 60 * S, D(103000)), (ACC_FIRST, T0 + 60 * S, D(102000))]
    async with portfolio_pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT quantity, realized_pnl, last_price FROM positions WHERE account_id = $1",
            ACC_SECOND,
        )
    assert (row["quantity"], row["realized_pnl"], row["last_price"]) == (
        D(1),
        D(1000),
        D(52000),
    )


async def test_snapshot_when_the_owner_leaves_is_taken_over_by_the_other_member(
    portfolio_pool: Any,
) -> None:
    # Arrange: two members, one account each, long 1 BTC at 50000; the minute's snapshots
    # are out; then the second member leaves.
    clock = SimulatedClock(T0)
    bus = InMemoryBus("test", clock=clock, retain=True)
    first = await PortfolioMember.join(new_portfolio(), bus, clock, portfolio_pool)
    second = await PortfolioMember.join(new_portfolio(), bus, clock, portfolio_pool)
    await deliver(
        bus,
        Topic.EXEC_REPORTS,
        whole_fill("T-1", Side.BUY, "1", "50000", 1, account_id=ACC_FIRST),
        whole_fill("T-2", Side.BUY, "1", "50000", 1, account_id=ACC_SECOND),
    )
    await deliver(bus, Topic.MD_TICKS, _tick("51000", 61))
    await second.leave()

    # Act: the next minute closes.
    await deliver(bus, Topic.MD_TICKS, _tick("54000", 121))

    # Assert: at T0+120 both accounts by the first member (the only one left): equity
    # 100000 + (51000 - 50000) = 101000 (the tick at 61 s is within the second minute).
    at_120 = sorted((s.account_id, s.equity) for s in _snapshots(bus) if s.ts_event == T0 + 120 * S)
    assert at_120 == [(ACC_SECOND, D(101000)), (ACC_FIRST, D(101000))]
    assert first.holds(ACC_SECOND)
    assert len(_snapshots(bus)) == 4


async def test_report_performance_when_two_members_split_accounts_reports_each_once(
    portfolio_pool: Any,
) -> None:
    # Arrange: one account per member, each traded by the same strategy.
    clock = SimulatedClock(T0)
    bus = InMemoryBus("test", clock=clock, retain=True)
    await PortfolioMember.join(new_portfolio(), bus, clock, portfolio_pool)
    await PortfolioMember.join(new_portfolio(), bus, clock, portfolio_pool)
    await deliver(
        bus,
        Topic.EXEC_REPORTS,
        whole_fill("T-1", Side.BUY, "1", "50000", 1, account_id=ACC_FIRST),
        whole_fill("T-2", Side.BUY, "1", "50000", 1, account_id=ACC_SECOND),
    )
    command = stubs.control_command(
        command_id="PERF-1",
        action=ControlAction.REPORT_PERFORMANCE,
        target="*",
        ts_event=T0 + 5 * S,
    )

    # Act
    await deliver(bus, Topic.CONTROL, command)

    # Assert: the account and its strategy, per account, once each; stored once too.
    reports: list[PerformanceReport] = [
        e.payload for e in bus.messages(Topic.PORTFOLIO_PERFORMANCE)
    ]
    assert sorted((r.account_id, r.strategy_id or "") for r in reports) == [
        (ACC_SECOND, ""),
        (ACC_SECOND, STRATEGY),
        (ACC_FIRST, ""),
        (ACC_FIRST, STRATEGY),
    ]
    async with portfolio_pool.acquire() as conn:
        stored = await conn.fetchval("SELECT count(*) FROM portfolio_performance")
    assert stored == 4
