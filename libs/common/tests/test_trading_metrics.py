"""Trading metrics: each trading event moves the right series by the right amount."""

from __future__ import annotations

from decimal import Decimal

import pytest

from quantmesh_common.messages import (
    AlertSeverity,
    ExecType,
    LiquiditySide,
    OrderStatus,
)
from quantmesh_common.testing import stubs
from quantmesh_common.trading_metrics import TradingMetrics


@pytest.fixture
def metrics() -> TradingMetrics:
    # A private collector, not the registered one, so tests do not see each other's counts.
    return TradingMetrics()


def _exported(metrics: TradingMetrics) -> dict[tuple[str, tuple[str, ...]], float]:
    return {
        (sample.name, tuple(sample.labels.values())): sample.value
        for family in metrics.collect()
        for sample in family.samples
    }


def test_observe_when_two_trade_ticks_counts_them_and_keeps_the_newest_venue_time(
    metrics: TradingMetrics,
) -> None:
    # Arrange
    older = stubs.tick(ts_event=1_700_000_000_000_000_000)
    newer = stubs.tick(ts_event=1_700_000_002_500_000_000)

    # Act: out of order on purpose, the gauge must keep the newest.
    metrics.observe(newer, "marketdata")
    metrics.observe(older, "marketdata")

    # Assert
    instrument, venue = older.instrument_id, older.venue
    exported = _exported(metrics)
    assert exported[("quantmesh_ticks_total", ("marketdata", venue, instrument, "TRADE"))] == 2
    assert exported[
        ("quantmesh_tick_event_timestamp_seconds", ("marketdata", venue, instrument))
    ] == pytest.approx(1_700_000_002.5)


def test_observe_when_order_updates_counts_each_status_entered(metrics: TradingMetrics) -> None:
    # Arrange
    updates = [
        stubs.order(status=OrderStatus.SUBMITTED),
        stubs.order(status=OrderStatus.ACCEPTED),
        stubs.order(status=OrderStatus.ACCEPTED),
    ]

    # Act
    for update in updates:
        metrics.observe(update, "oms")

    # Assert
    assert metrics.value("quantmesh_order_updates", ("oms", "SUBMITTED")) == 1
    assert metrics.value("quantmesh_order_updates", ("oms", "ACCEPTED")) == 2


def test_observe_when_fill_reported_counts_fill_and_notional_but_not_an_acceptance(
    metrics: TradingMetrics,
) -> None:
    # Arrange: 0.1 at 49000.00 -> 4900 notional; a partial 0.05 at 49010 -> 2450.5.
    fill = stubs.execution_report()
    partial = stubs.execution_report(
        exec_type=ExecType.PARTIAL_FILL,
        order_status=OrderStatus.PARTIALLY_FILLED,
        last_qty=Decimal("0.05"),
        last_price=Decimal("49010"),
        cum_qty=Decimal("0.05"),
        leaves_qty=Decimal("0.05"),
        avg_price=Decimal("49010"),
        liquidity_side=LiquiditySide.TAKER,
    )
    accepted = stubs.order_accepted()

    # Act
    for report in (fill, partial, accepted):
        metrics.observe(report, "execution")

    # Assert
    instrument = fill.instrument_id
    assert metrics.value("quantmesh_execution_reports", ("execution", "FILL")) == 1
    assert metrics.value("quantmesh_execution_reports", ("execution", "PARTIAL_FILL")) == 1
    assert metrics.value("quantmesh_execution_reports", ("execution", "ACCEPTED")) == 1
    assert metrics.value("quantmesh_fills", ("execution", instrument, "BUY", "MAKER")) == 1
    assert metrics.value("quantmesh_fills", ("execution", instrument, "BUY", "TAKER")) == 1
    assert metrics.value("quantmesh_filled_notional", ("execution", instrument)) == pytest.approx(
        7350.5
    )


def test_observe_when_risk_decides_counts_approvals_and_denials_by_reason(
    metrics: TradingMetrics,
) -> None:
    # Arrange / Act
    metrics.observe(stubs.risk_decision(), "risk")
    metrics.observe(stubs.risk_rejection(), "risk")
    metrics.observe(stubs.risk_rejection(), "risk")

    # Assert
    assert metrics.value("quantmesh_risk_decisions", ("risk", "approved", "APPROVED")) == 1
    assert (
        metrics.value(
            "quantmesh_risk_decisions", ("risk", "denied", "NOTIONAL_EXCEEDS_MAX_PER_ORDER")
        )
        == 2
    )


def test_observe_when_snapshots_arrive_gauges_show_the_latest_account_figures(
    metrics: TradingMetrics,
) -> None:
    # Arrange
    first = stubs.portfolio_snapshot()
    later = stubs.portfolio_snapshot(
        equity=Decimal("99000"), drawdown=Decimal("0.011"), positions=[]
    )

    # Act
    metrics.observe(first, "portfolio")
    metrics.observe(later, "portfolio")

    # Assert
    account = first.account_id
    assert metrics.value("quantmesh_account_equity", ("portfolio", account, "USDT")) == 99000.0
    assert metrics.value("quantmesh_account_drawdown_ratio", ("portfolio", account)) == 0.011
    assert metrics.value("quantmesh_account_open_positions", ("portfolio", account)) == 0.0
    assert metrics.value("quantmesh_account_unrealized_pnl", ("portfolio", account, "USDT")) == 100


def test_observe_when_alert_raised_counts_it_by_severity_and_code(
    metrics: TradingMetrics,
) -> None:
    # Arrange
    critical = stubs.alert(severity=AlertSeverity.CRITICAL, code="CIRCUIT_BREAKER_TRIPPED")

    # Act
    metrics.observe(stubs.alert(), "alerts")
    metrics.observe(critical, "alerts")

    # Assert
    assert metrics.value("quantmesh_alerts", ("alerts", "WARNING", "ORDER_REJECTED")) == 1
    assert metrics.value("quantmesh_alerts", ("alerts", "CRITICAL", "CIRCUIT_BREAKER_TRIPPED")) == 1


def test_observe_when_event_is_not_a_trading_event_changes_nothing(
    metrics: TradingMetrics,
) -> None:
    # Arrange
    before = _exported(metrics)

    # Act
    metrics.observe(stubs.bar(), "marketdata")
    metrics.observe(stubs.control_command(), "api")

    # Assert
    assert _exported(metrics) == before
    assert before == {}
