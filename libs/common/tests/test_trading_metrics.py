"""Trading metrics: each trading event moves the right series by the right amount."""

from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from prometheus_client import CollectorRegistry, generate_latest

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


def test_observe_when_ticks_of_two_kinds_on_two_threads_scrape_sums_counts_and_keeps_newest(
    metrics: TradingMetrics,
) -> None:
    # Arrange: this thread 2 trades (t=10 s, 12 s) and 1 quote (t=15 s); another thread 3 trades
    # (t=11 s, 14 s, 13 s) and a tick of another service. Expected: trades 5, quotes 1, the
    # instrument's venue time 15 s (the quote's, the newest of both kinds and both threads).
    s = 1_000_000_000

    def other_thread() -> None:
        for ts in (11 * s, 14 * s, 13 * s):
            metrics.observe(stubs.tick(ts_event=ts), "marketdata")
        metrics.observe(stubs.tick(ts_event=99 * s), "replay")

    # Act
    metrics.observe(stubs.tick(ts_event=10 * s), "marketdata")
    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    metrics.observe(stubs.quote_tick(ts_event=15 * s), "marketdata")
    metrics.observe(stubs.tick(ts_event=12 * s), "marketdata")

    # Assert
    tick = stubs.tick()
    venue, instrument = tick.venue, tick.instrument_id
    assert metrics.value("quantmesh_ticks", ("marketdata", venue, instrument, "TRADE")) == 5
    assert metrics.value("quantmesh_ticks", ("marketdata", venue, instrument, "QUOTE")) == 1
    assert metrics.value("quantmesh_ticks", ("replay", venue, instrument, "TRADE")) == 1
    time_key = ("marketdata", venue, instrument)
    assert metrics.value("quantmesh_tick_event_timestamp_seconds", time_key) == 15.0
    assert (
        metrics.value("quantmesh_tick_event_timestamp_seconds", ("replay", venue, instrument))
        == 99.0
    )


def test_collect_when_ticks_observed_exposition_is_the_text_per_tick_counting_gave() -> None:
    # Arrange: the registry serves what Prometheus scrapes; three trades (t = 1.5 s, 2.5 s,
    # 2 s) give a counter of 3.0 and a venue time of 2.5.
    registry = CollectorRegistry()
    metrics = TradingMetrics()
    registry.register(metrics)
    for ts in (1_500_000_000, 2_500_000_000, 2_000_000_000):
        metrics.observe(stubs.tick(ts_event=ts), "marketdata")

    # Act
    text = generate_latest(registry).decode()

    # Assert
    tick = stubs.tick()
    instrument, venue = tick.instrument_id, tick.venue
    # The exposition writes the labels in name order.
    assert (
        f'quantmesh_ticks_total{{instrument="{instrument}",kind="TRADE",'
        f'service="marketdata",venue="{venue}"}} 3.0\n'
    ) in text
    assert (
        f'quantmesh_tick_event_timestamp_seconds{{instrument="{instrument}",'
        f'service="marketdata",venue="{venue}"}} 2.5\n'
    ) in text


def test_observe_when_tick_at_time_zero_exports_its_count_but_no_venue_time(
    metrics: TradingMetrics,
) -> None:
    # Arrange: a venue time of 0 never moved the gauge above its 0.0 start, so no series.
    tick = stubs.tick(ts_event=0)

    # Act
    metrics.observe(tick, "marketdata")

    # Assert
    exported = _exported(metrics)
    labels = ("marketdata", tick.venue, tick.instrument_id)
    assert exported[("quantmesh_ticks_total", (*labels, "TRADE"))] == 1
    assert ("quantmesh_tick_event_timestamp_seconds", labels) not in exported
