"""Trading metrics read off the events a service publishes: ticks, orders, fills, risk, equity.

Every event a stage emits crosses the bus, so the bus reports what it carries here and every
stage exports the trading figures of what it produces with no metric code of its own: ticks per
venue and instrument (marketdata), order updates by status (oms), execution reports and fills
(execution), risk decisions by reason (risk), equity, P&L and drawdown per account (portfolio)
and alerts by code (alerts). The Grafana trading and market-data dashboards and the Prometheus
rules read these families.

Counters are added without locks to per-thread shards (as the bus's own metrics are) because
ticks are on the hot path; gauges hold the last value written, where a lost race between two
threads only means the other, equally recent, value is shown. A tick, the one event published
tens of thousands of times a second, only bumps a count and a newest venue time per (service,
venue, instrument, kind) in its thread's shard; a scrape folds those into the tick counter and
the venue-time gauge, with the values per-tick updates would have given.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any, cast

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from quantmesh_common.envelope import Event
from quantmesh_common.messages import (
    Alert,
    ExecType,
    ExecutionReport,
    Order,
    PortfolioSnapshot,
    RiskDecision,
    Tick,
)

_NS = 1_000_000_000

# name -> (help, label names). Counter names carry no _total: the family adds it.
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "quantmesh_ticks": (
        "Market data ticks published, by venue, instrument and kind.",
        ("service", "venue", "instrument", "kind"),
    ),
    "quantmesh_order_updates": (
        "Order state changes published by the oms, by the status entered.",
        ("service", "status"),
    ),
    "quantmesh_execution_reports": (
        "Execution reports published, by type (ACCEPTED, FILL, REJECTED, ...).",
        ("service", "exec_type"),
    ),
    "quantmesh_fills": (
        "Fills (full and partial) reported by a venue, by instrument, side and liquidity.",
        ("service", "instrument", "side", "liquidity"),
    ),
    "quantmesh_filled_notional": (
        "Notional traded in fills (quantity x price, quote currency), by instrument.",
        ("service", "instrument"),
    ),
    "quantmesh_risk_decisions": (
        "Pre-trade risk decisions, by outcome and reason (the UPPER_SNAKE code of a denial).",
        ("service", "outcome", "reason"),
    ),
    "quantmesh_alerts": (
        "Alerts raised, by severity and code.",
        ("service", "severity", "code"),
    ),
}
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "quantmesh_tick_event_timestamp_seconds": (
        "Venue time of the newest tick published per instrument (feed staleness = now - this).",
        ("service", "venue", "instrument"),
    ),
    "quantmesh_account_equity": (
        "Account equity (cash plus marked positions) in its base currency.",
        ("service", "account", "currency"),
    ),
    "quantmesh_account_realized_pnl": (
        "Realised P&L of the account in its base currency.",
        ("service", "account", "currency"),
    ),
    "quantmesh_account_unrealized_pnl": (
        "Unrealised P&L of the account's open positions in its base currency.",
        ("service", "account", "currency"),
    ),
    "quantmesh_account_drawdown_ratio": (
        "Drawdown of the account from its equity peak, 0..1.",
        ("service", "account"),
    ),
    "quantmesh_account_open_positions": (
        "Number of open positions of the account.",
        ("service", "account"),
    ),
}

_Key = tuple[str, tuple[str, ...]]
#: (service, venue, instrument, kind) of a tick; the kind as its text (an enum member's hash
#: is a Python-level call, its `_value_` a plain attribute).
_TickKey = tuple[str, str, str, str]
_FILLS = (ExecType.FILL, ExecType.PARTIAL_FILL)
_TICKS = "quantmesh_ticks"
_TICK_TIME = "quantmesh_tick_event_timestamp_seconds"


class TradingMetrics(Collector):
    """Collector of the trading families; `observe` is called by the bus for each event."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._shards: list[dict[_Key, float]] = []
        # Per thread: tick key -> [count, newest ts_event]; only the owning thread writes.
        self._tick_shards: list[dict[_TickKey, list[int]]] = []
        self._lock = threading.Lock()
        self._gauges: dict[_Key, float] = {}
        # Ticks are counted in `observe` itself, not through this table.
        self._observers: dict[type[Event], Callable[[Any, str], None]] = {
            Order: self._order,
            ExecutionReport: self._report,
            RiskDecision: self._decision,
            PortfolioSnapshot: self._snapshot,
            Alert: self._alert,
        }

    def observe(self, payload: Event, service: str) -> None:
        """Count `payload` if it is one of the trading events; others cost one dict lookup."""
        if type(payload) is Tick:
            # Inline rather than through the observer table: a tick is most of what the bus
            # carries, and the table's lookup and method call were half of counting one.
            # Annotated, not cast(): `dict[...]` in a call is built anew on every tick.
            ticks: dict[_TickKey, list[int]]
            try:
                ticks = self._local.ticks
            except AttributeError:
                ticks = self._tick_shard()
            key = (service, payload.venue, payload.instrument_id, payload.kind._value_)
            entry = ticks.get(key)
            ts = payload.ts_event
            if entry is None:
                ticks[key] = [1, ts]
            else:
                entry[0] += 1
                if ts > entry[1]:
                    entry[1] = ts
            return
        observer = self._observers.get(type(payload))
        if observer is not None:
            observer(payload, service)

    def value(self, name: str, labels: tuple[str, ...]) -> float:
        """The current value of one series (a counter summed over threads, or a gauge)."""
        counters, gauges = self._values()
        return (gauges if name in GAUGES else counters).get((name, labels), 0.0)

    # -- observers ---------------------------------------------------------------------------

    def _shard(self) -> dict[_Key, float]:
        try:
            return cast(dict[_Key, float], self._local.shard)
        except AttributeError:
            shard: dict[_Key, float] = {}
            self._local.shard = shard
            with self._lock:
                self._shards.append(shard)
            return shard

    def _add(self, name: str, labels: tuple[str, ...], amount: float = 1.0) -> None:
        shard = self._shard()
        key = (name, labels)
        shard[key] = shard.get(key, 0.0) + amount

    def _tick_shard(self) -> dict[_TickKey, list[int]]:
        """A new tick shard for the calling thread: tick key -> [count, newest ts_event]."""
        ticks: dict[_TickKey, list[int]] = {}
        self._local.ticks = ticks
        with self._lock:
            self._tick_shards.append(ticks)
        return ticks

    def _order(self, order: Order, service: str) -> None:
        self._add("quantmesh_order_updates", (service, order.status.value))

    def _report(self, report: ExecutionReport, service: str) -> None:
        self._add("quantmesh_execution_reports", (service, report.exec_type.value))
        if report.exec_type in _FILLS and report.last_qty and report.last_price:
            liquidity = report.liquidity_side.value if report.liquidity_side else "NONE"
            instrument = report.instrument_id
            self._add("quantmesh_fills", (service, instrument, report.side.value, liquidity))
            notional = float(report.last_qty * report.last_price)
            self._add("quantmesh_filled_notional", (service, instrument), notional)

    def _decision(self, decision: RiskDecision, service: str) -> None:
        outcome = "approved" if decision.approved else "denied"
        reason = decision.reason or ("APPROVED" if decision.approved else "UNSPECIFIED")
        self._add("quantmesh_risk_decisions", (service, outcome, reason))

    def _snapshot(self, snapshot: PortfolioSnapshot, service: str) -> None:
        account, currency = snapshot.account_id, snapshot.base_currency
        gauges = self._gauges
        gauges[("quantmesh_account_equity", (service, account, currency))] = _f(snapshot.equity)
        gauges[("quantmesh_account_realized_pnl", (service, account, currency))] = _f(
            snapshot.realized_pnl
        )
        gauges[("quantmesh_account_unrealized_pnl", (service, account, currency))] = _f(
            snapshot.unrealized_pnl
        )
        gauges[("quantmesh_account_drawdown_ratio", (service, account))] = _f(snapshot.drawdown)
        gauges[("quantmesh_account_open_positions", (service, account))] = float(
            len(snapshot.positions)
        )

    def _alert(self, alert: Alert, service: str) -> None:
        self._add("quantmesh_alerts", (service, alert.severity.value, alert.code))

    # -- collection --------------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        """The families without values, for the registry's name checks."""
        for name, (doc, labels) in COUNTERS.items():
            yield CounterMetricFamily(name, doc, labels=labels)
        for name, (doc, labels) in GAUGES.items():
            yield GaugeMetricFamily(name, doc, labels=labels)

    def collect(self) -> Iterable[Metric]:
        """Sum the counter shards and read the gauges."""
        totals, gauges = self._values()
        yield from _families(COUNTERS, totals, CounterMetricFamily)
        yield from _families(GAUGES, gauges, GaugeMetricFamily)

    def _values(self) -> tuple[dict[_Key, float], dict[_Key, float]]:
        """Every series' value: counters summed over the threads, ticks folded in."""
        with self._lock:
            shards = list(self._shards)
            tick_shards = list(self._tick_shards)
        totals: dict[_Key, float] = {}
        for shard in shards:
            # dict.copy is one C call: atomic against the owning thread's updates.
            for key, amount in shard.copy().items():
                totals[key] = totals.get(key, 0.0) + amount
        gauges = self._gauges.copy()
        for ticks in tick_shards:
            for (service, venue, instrument, kind), (count, ts) in ticks.copy().items():
                counter = (_TICKS, (service, venue, instrument, kind))
                totals[counter] = totals.get(counter, 0.0) + count
                # Per tick, the gauge only ever moved up from 0.0 to a newer venue time.
                gauge = (_TICK_TIME, (service, venue, instrument))
                seconds = ts / _NS
                if seconds > gauges.get(gauge, 0.0):
                    gauges[gauge] = seconds
        return totals, gauges


def _families(
    specs: dict[str, tuple[str, tuple[str, ...]]],
    values: dict[_Key, float],
    family_type: type[CounterMetricFamily] | type[GaugeMetricFamily],
) -> Iterable[Metric]:
    by_name: dict[str, list[tuple[tuple[str, ...], float]]] = {}
    for (name, labels), value in values.items():
        by_name.setdefault(name, []).append((labels, value))
    for name, (doc, label_names) in specs.items():
        family = family_type(name, doc, labels=label_names)
        for labels, value in sorted(by_name.get(name, [])):
            family.add_metric(labels, value)
        yield family


def _f(value: Decimal) -> float:
    # Prometheus samples are floats; the exact Decimals stay in the events and the database.
    return float(value)


#: The process-wide collector, registered with the default registry /metrics serves.
TRADING_METRICS = TradingMetrics()
REGISTRY.register(TRADING_METRICS)
