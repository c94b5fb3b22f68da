"""What an instance that owns some accounts only does with the rest: its handlers snapshot and
report the owned ones, and the portfolio and tracker drop the others whole."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import (
    ControlAction,
    PerformanceReport,
    PortfolioSnapshot,
)
from quantmesh_common.testing import stubs
from quantmesh_portfolio.performance import PerformanceTracker
from quantmesh_portfolio.positions import Portfolio
from quantmesh_portfolio.service import PortfolioHandlers

from .conftest import T0, account_buy

D = Decimal
S = stubs.SECOND_NS
MINUTE = 60 * S
BTC = stubs.INSTRUMENT_ID
OWNED, OTHER = "acc-owned", "acc-other"


def _buy(account_id: str, second: int) -> Envelope[Any]:
    return stubs.envelope(account_buy(account_id, "1", "50000", second))


def _tick(price: str, second: int) -> Envelope[Any]:
    return stubs.envelope(stubs.tick(instrument_id=BTC, price=D(price), ts_event=T0 + second * S))


def _handlers_holding_both() -> PortfolioHandlers:
    handlers = PortfolioHandlers(
        Portfolio("USDT", {"USDT": D(100000)}), MINUTE, tracker=PerformanceTracker(MINUTE)
    )
    handlers(_buy(OWNED, 1))
    handlers(_buy(OTHER, 1))
    return handlers


def test_snapshot_when_owns_is_set_covers_only_the_owned_accounts() -> None:
    # Arrange
    handlers = _handlers_holding_both()
    handlers.owns = lambda account_id: account_id == OWNED

    # Act: the first minute closes.
    out = handlers(_tick("51000", 61))

    # Assert: the snapshot at T0+60 precedes the tick at 61 s, so the position is marked at
    # its fill price: equity 100000. Only the owned account's curves grow.
    snapshots = [e.payload for e in out if isinstance(e.payload, PortfolioSnapshot)]
    assert [(s.account_id, s.ts_event, s.equity) for s in snapshots] == [
        (OWNED, T0 + 60 * S, D(100000))
    ]
    assert set(handlers.tracker.curves) == {(OWNED, None), (OWNED, stubs.STRATEGY_ID)}


def test_report_performance_when_owns_is_set_reports_only_the_owned_account() -> None:
    # Arrange
    handlers = _handlers_holding_both()
    handlers.owns = lambda account_id: account_id == OWNED
    command = stubs.control_command(
        command_id="PERF-1", action=ControlAction.REPORT_PERFORMANCE, target="*", ts_event=T0
    )

    # Act
    out = handlers(stubs.envelope(command))

    # Assert: the account and the strategy that traded in it.
    reports = [e.payload for e in out if isinstance(e.payload, PerformanceReport)]
    assert [(r.account_id, r.strategy_id) for r in reports] == [
        (OWNED, None),
        (OWNED, stubs.STRATEGY_ID),
    ]


def test_report_performance_when_targeting_an_account_not_owned_reports_nothing() -> None:
    # Arrange
    handlers = _handlers_holding_both()
    handlers.owns = lambda account_id: account_id == OWNED
    command = stubs.control_command(
        command_id="PERF-2", action=ControlAction.REPORT_PERFORMANCE, target=OTHER, ts_event=T0
    )

    # Act
    out = handlers(stubs.envelope(command))

    # Assert
    assert out == []


def test_forget_accounts_when_one_is_not_kept_drops_it_and_its_books_only() -> None:
    # Arrange
    handlers = _handlers_holding_both()
    portfolio, tracker = handlers.portfolio, handlers.tracker

    def keep(account_id: str) -> bool:
        return account_id == OWNED

    # Act
    dropped = portfolio.forget_accounts(keep)
    tracker.forget_accounts(keep)
    handlers(_tick("52000", 2))

    # Assert: the kept position is marked by the next tick, (52000 - 50000) x 1 = 2000; the
    # tracker keeps the kept account's books only; the price stays for conversion.
    assert dropped == 1
    assert set(portfolio.accounts) == {OWNED}
    assert portfolio.accounts[OWNED].positions[BTC].unrealized_pnl == D(2000)
    assert {key[0] for key in tracker.books} == {OWNED}
    assert all(key[0] == OWNED for key in tracker.trips)
    assert portfolio.rate("BTC", "USDT") == D(52000)


def test_forget_accounts_when_every_account_is_kept_changes_nothing() -> None:
    # Arrange
    handlers = _handlers_holding_both()

    # Act
    dropped = handlers.portfolio.forget_accounts(lambda _account_id: True)

    # Assert
    assert dropped == 0
    assert set(handlers.portfolio.accounts) == {OWNED, OTHER}
