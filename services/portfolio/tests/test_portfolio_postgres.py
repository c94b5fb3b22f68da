"""The portfolio on real PostgreSQL: state stored per fill, rebuilt on start, fills applied once."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.messages import ExecutionReport, OrderStatus, Position, Side
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.topics import Topic
from quantmesh_portfolio.config import PortfolioSettings
from quantmesh_portfolio.service import PortfolioService

pytestmark = pytest.mark.integration

D = Decimal
S = stubs.SECOND_NS
T0 = stubs.TS + 40 * S  # a minute boundary
ACC, BTC = stubs.ACCOUNT_ID, stubs.INSTRUMENT_ID


class Instance(StageHarness[PortfolioService]):
    """One portfolio service instance on its own in-memory bus, with the test schema's pool."""

    def __init__(self, pool: Any) -> None:
        settings = PortfolioSettings(
            bus="memory", http_port=0, starting_cash={"USDT": "100000"}, snapshot_interval_s=60
        )
        super().__init__(PortfolioService(settings), now_ns=T0, pg=pool)

    def positions(self) -> list[Position]:
        return self.payloads(Topic.PORTFOLIO_UPDATES)


def _fill(
    trade_id: str, side: Side, qty: str, price: str, fee: str, second: int
) -> ExecutionReport:
    return stubs.execution_report(
        report_id=f"R-{trade_id}",
        client_order_id=f"O-{trade_id}",
        trade_id=trade_id,
        side=side,
        last_qty=D(qty),
        last_price=D(price),
        cum_qty=D(qty),
        avg_price=D(price),
        fee=D(fee),
        order_status=OrderStatus.FILLED,
        ts_event=T0 + second * S,
    )


FILLS = [
    _fill("T-1", Side.BUY, "0.1", "49000", "4.9", 1),
    _fill("T-2", Side.BUY, "0.2", "50000", "10", 2),
    # Closes 0.1 @ 49000 (+200) and 0.05 @ 50000 (+50): realised 250 - fees 22.55 = 227.45.
    _fill("T-3", Side.SELL, "0.15", "51000", "7.65", 3),
]


async def test_fills_when_redelivered_after_a_restart_are_not_applied_again(
    portfolio_pool: Any,
) -> None:
    first = await Instance(portfolio_pool).start()
    await first.send(Topic.EXEC_REPORTS, *FILLS)
    assert len(first.positions()) == 3

    # Restart: a new instance on the same tables, the same fills delivered again.
    second = await Instance(portfolio_pool).start()
    await second.send(Topic.EXEC_REPORTS, *FILLS)
    rebuilt = second.service.handlers
    assert rebuilt is not None
    account = rebuilt.portfolio.accounts[ACC]
    book = account.positions[BTC]

    assert second.positions() == []
    assert book.quantity == D("0.15")
    assert book.avg_entry_price == D("50000")
    assert book.realized_pnl == D("227.45")
    assert book.fees == D("22.55")
    # 100000 - 4900 - 4.9 - 10000 - 10 + 7650 - 7.65
    assert account.balances == {"USDT": D("92727.45"), "BTC": D("0.15")}


async def test_lots_when_rebuilt_close_fifo_like_before_the_restart(portfolio_pool: Any) -> None:
    first = await Instance(portfolio_pool).start()
    await first.send(Topic.EXEC_REPORTS, *FILLS)

    second = await Instance(portfolio_pool).start()
    await second.send(Topic.EXEC_REPORTS, _fill("T-4", Side.SELL, "0.15", "52000", "0", 4))

    # The remaining lot 0.15 @ 50000 closes at 52000: +300.
    [position] = second.positions()
    assert position.quantity == D(0)
    assert position.realized_pnl == D("527.45")
    balances = second.service.handlers.portfolio.accounts[ACC].balances  # type: ignore[union-attr]
    assert balances["USDT"] == D("100527.45")
    rows = await portfolio_pool.fetch("SELECT * FROM portfolio_lots")
    assert rows == []


async def test_snapshot_when_due_is_stored_as_an_equity_row(portfolio_pool: Any) -> None:
    stage = await Instance(portfolio_pool).start()
    await stage.send(Topic.EXEC_REPORTS, *FILLS)
    tick = stubs.tick(price=D("52000"), ts_event=T0 + 61 * S)

    await stage.send(Topic.MD_TICKS, tick)

    row = await portfolio_pool.fetchrow("SELECT * FROM equity_snapshots")
    # At T0 + 60 s: 92727.45 USDT + 0.15 BTC at the last fill price 51000.
    assert row["ts_event"] == T0 + 60 * S
    assert row["equity"] == D("100377.45")
    assert row["balances"] == {"BTC": "0.15", "USDT": "92727.45"}
    position = await portfolio_pool.fetchrow("SELECT quantity, realized_pnl FROM positions")
    assert (position["quantity"], position["realized_pnl"]) == (D("0.15"), D("227.45"))
