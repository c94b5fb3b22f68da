"""Stub factories: one valid sample of every event, with any field overridable by keyword.

Every factory returns the same deterministic event for the same arguments (fixed ids and
times), so tests can compare results by equality. Override what the test is about and keep the
rest, e.g. `stubs.order_intent(quantity=Decimal("2"))`. Factories validate, so an override
that breaks a model's rules raises pydantic.ValidationError like real input would.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, TypeVar

from quantmesh_common.envelope import Envelope, Event
from quantmesh_common.messages import (
    AccountOpened,
    AggressorSide,
    Alert,
    AlertSeverity,
    Bar,
    BookLevel,
    BookSnapshot,
    CollectorState,
    CollectorStatus,
    CommandType,
    ControlAction,
    ControlCommand,
    ExecType,
    ExecutionReport,
    Instrument,
    LiquiditySide,
    Order,
    OrderCommand,
    OrderIntent,
    OrderRequest,
    OrderRequestAction,
    OrderStatus,
    OrderType,
    PerformanceReport,
    PortfolioSnapshot,
    Position,
    PositionSide,
    RiskDecision,
    RiskLimitsStatus,
    RoundTripRecord,
    Side,
    Signal,
    StrategyStatus,
    Tick,
    TickKind,
    TimeInForce,
)

#: A fixed instant (2023-11-14T22:13:20Z) that every stub's times are based on, in UTC ns.
TS = 1_700_000_000_000_000_000
#: One second in nanoseconds.
SECOND_NS = 1_000_000_000

VENUE = "SIM"
INSTRUMENT_ID = "BTC-USDT.SIM"
ACCOUNT_ID = "acc-1"
STRATEGY_ID = "strat-1"
CLIENT_ORDER_ID = "O-1"
VENUE_ORDER_ID = "V-1"

M = TypeVar("M", bound=Event)


def _build(model: type[M], fields: dict[str, Any], overrides: dict[str, Any]) -> M:
    return model.model_validate({**fields, **overrides})


def instrument(**overrides: Any) -> Instrument:
    """Return BTC-USDT on the simulated venue: tick 0.01, lot 0.00001, min notional 5."""
    return _build(
        Instrument,
        {
            "instrument_id": INSTRUMENT_ID,
            "venue": VENUE,
            "symbol": "BTC/USDT",
            "base": "BTC",
            "quote": "USDT",
            "tick_size": Decimal("0.01"),
            "lot_size": Decimal("0.00001"),
            "min_notional": Decimal("5"),
            "min_quantity": Decimal("0.00001"),
            "max_quantity": Decimal("1000"),
            "maker_fee": Decimal("0.001"),
            "taker_fee": Decimal("0.001"),
        },
        overrides,
    )


def tick(**overrides: Any) -> Tick:
    """Return a trade tick: 0.5 BTC at 50000.10, buyer-aggressed."""
    return _build(
        Tick,
        {
            "instrument_id": INSTRUMENT_ID,
            "venue": VENUE,
            "kind": TickKind.TRADE,
            "price": Decimal("50000.10"),
            "size": Decimal("0.5"),
            "aggressor_side": AggressorSide.BUYER,
            "trade_id": "T-1",
            "ts_event": TS,
            "ts_init": TS + 1_000_000,
        },
        overrides,
    )


def quote_tick(**overrides: Any) -> Tick:
    """Return a quote tick: 50000.00 / 50000.20 with mid 50000.10."""
    return _build(
        Tick,
        {
            "instrument_id": INSTRUMENT_ID,
            "venue": VENUE,
            "kind": TickKind.QUOTE,
            "price": Decimal("50000.10"),
            "bid": Decimal("50000.00"),
            "ask": Decimal("50000.20"),
            "bid_size": Decimal("1.5"),
            "ask_size": Decimal("2.25"),
            "ts_event": TS,
            "ts_init": TS + 1_000_000,
        },
        overrides,
    )


def bar(**overrides: Any) -> Bar:
    """Return a one-minute bar starting at TS."""
    return _build(
        Bar,
        {
            "instrument_id": INSTRUMENT_ID,
            "interval": "1m",
            "open": Decimal("50000.00"),
            "high": Decimal("50100.50"),
            "low": Decimal("49950.25"),
            "close": Decimal("50050.75"),
            "volume": Decimal("12.34567"),
            "trades": 321,
            "ts_open": TS,
            "ts_close": TS + 60 * SECOND_NS,
        },
        overrides,
    )


def book_snapshot(**overrides: Any) -> BookSnapshot:
    """Return a two-level book: bids 50000.00/49999.90, asks 50000.20/50000.30."""
    return _build(
        BookSnapshot,
        {
            "instrument_id": INSTRUMENT_ID,
            "bids": [
                BookLevel(price=Decimal("50000.00"), size=Decimal("1.5")),
                BookLevel(price=Decimal("49999.90"), size=Decimal("3")),
            ],
            "asks": [
                BookLevel(price=Decimal("50000.20"), size=Decimal("2.25")),
                BookLevel(price=Decimal("50000.30"), size=Decimal("0.75")),
            ],
            "sequence": 42,
            "depth": 10,
            "ts_event": TS,
            "ts_init": TS + 1_000_000,
        },
        overrides,
    )


def signal(**overrides: Any) -> Signal:
    """Return a full-strength LONG signal."""
    return _build(
        Signal,
        {
            "signal_id": "S-1",
            "strategy_id": STRATEGY_ID,
            "instrument_id": INSTRUMENT_ID,
            "direction": PositionSide.LONG,
            "strength": Decimal("1"),
            "price": Decimal("50000.10"),
            "reason": "ema_fast crossed above ema_slow",
            "ts_event": TS,
        },
        overrides,
    )


def order_intent(**overrides: Any) -> OrderIntent:
    """Return an intent to buy 0.1 BTC at market."""
    return _build(
        OrderIntent,
        {
            "intent_id": "I-1",
            "account_id": ACCOUNT_ID,
            "strategy_id": STRATEGY_ID,
            "instrument_id": INSTRUMENT_ID,
            "client_order_id": CLIENT_ORDER_ID,
            "side": Side.BUY,
            "quantity": Decimal("0.1"),
            "order_type": OrderType.MARKET,
            "time_in_force": TimeInForce.GTC,
            "ts_event": TS,
        },
        overrides,
    )


def limit_order_intent(**overrides: Any) -> OrderIntent:
    """Return an intent to buy 0.1 BTC with a GTC limit at 49000.00."""
    fields: dict[str, Any] = {"order_type": OrderType.LIMIT, "limit_price": Decimal("49000.00")}
    return order_intent(**{**fields, **overrides})


def risk_decision(**overrides: Any) -> RiskDecision:
    """Return an approval of `order_intent()`."""
    intent = overrides.pop("intent", None) or order_intent()
    return _build(
        RiskDecision,
        {
            "decision_id": "D-1",
            "account_id": intent.account_id,
            "intent": intent,
            "approved": True,
            "ts_event": TS + 1_000,
        },
        overrides,
    )


def risk_rejection(**overrides: Any) -> RiskDecision:
    """Return a rejection of `order_intent()` for NOTIONAL_EXCEEDS_MAX_PER_ORDER."""
    fields: dict[str, Any] = {
        "approved": False,
        "reason": "NOTIONAL_EXCEEDS_MAX_PER_ORDER",
        "details": {"max_notional": "1000", "notional": "5000.01"},
    }
    return risk_decision(**{**fields, **overrides})


def order(**overrides: Any) -> Order:
    """Return an accepted, unfilled limit buy of 0.1 BTC at 49000.00."""
    return _build(
        Order,
        {
            "client_order_id": CLIENT_ORDER_ID,
            "venue_order_id": VENUE_ORDER_ID,
            "account_id": ACCOUNT_ID,
            "strategy_id": STRATEGY_ID,
            "instrument_id": INSTRUMENT_ID,
            "intent_id": "I-1",
            "side": Side.BUY,
            "order_type": OrderType.LIMIT,
            "quantity": Decimal("0.1"),
            "limit_price": Decimal("49000.00"),
            "time_in_force": TimeInForce.GTC,
            "status": OrderStatus.ACCEPTED,
            "ts_init": TS,
            "ts_last": TS + 2_000,
        },
        overrides,
    )


def order_command(**overrides: Any) -> OrderCommand:
    """Return the SUBMIT command of `order()`."""
    return _build(
        OrderCommand,
        {
            "command_id": "C-1",
            "command_type": CommandType.SUBMIT,
            "account_id": ACCOUNT_ID,
            "venue": VENUE,
            "instrument_id": INSTRUMENT_ID,
            "client_order_id": CLIENT_ORDER_ID,
            "strategy_id": STRATEGY_ID,
            "side": Side.BUY,
            "order_type": OrderType.LIMIT,
            "quantity": Decimal("0.1"),
            "limit_price": Decimal("49000.00"),
            "time_in_force": TimeInForce.GTC,
            "ts_event": TS + 2_000,
        },
        overrides,
    )


def execution_report(**overrides: Any) -> ExecutionReport:
    """Return a complete fill of `order()`: 0.1 BTC at 49000.00, maker, fee 4.9 USDT."""
    return _build(
        ExecutionReport,
        {
            "report_id": "R-1",
            "account_id": ACCOUNT_ID,
            "client_order_id": CLIENT_ORDER_ID,
            "venue_order_id": VENUE_ORDER_ID,
            "strategy_id": STRATEGY_ID,
            "instrument_id": INSTRUMENT_ID,
            "exec_type": ExecType.FILL,
            "order_status": OrderStatus.FILLED,
            "side": Side.BUY,
            "last_qty": Decimal("0.1"),
            "last_price": Decimal("49000.00"),
            "cum_qty": Decimal("0.1"),
            "leaves_qty": Decimal("0"),
            "avg_price": Decimal("49000.00"),
            "fee": Decimal("4.9"),
            "fee_currency": "USDT",
            "liquidity_side": LiquiditySide.MAKER,
            "trade_id": "T-1",
            "ts_event": TS + 3_000,
        },
        overrides,
    )


def order_accepted(**overrides: Any) -> ExecutionReport:
    """Return the venue's acknowledgement of `order()`."""
    fields: dict[str, Any] = {
        "report_id": "R-0",
        "exec_type": ExecType.ACCEPTED,
        "order_status": OrderStatus.ACCEPTED,
        "last_qty": Decimal(0),
        "last_price": None,
        "cum_qty": Decimal(0),
        "leaves_qty": Decimal("0.1"),
        "avg_price": None,
        "fee": Decimal(0),
        "fee_currency": None,
        "liquidity_side": LiquiditySide.NONE,
        "trade_id": None,
    }
    return execution_report(**{**fields, **overrides})


def position(**overrides: Any) -> Position:
    """Return a 0.1 BTC long entered at 49000.00, marked at 50000.00."""
    return _build(
        Position,
        {
            "account_id": ACCOUNT_ID,
            "instrument_id": INSTRUMENT_ID,
            "side": PositionSide.LONG,
            "quantity": Decimal("0.1"),
            "avg_entry_price": Decimal("49000.00"),
            "realized_pnl": Decimal("0"),
            "unrealized_pnl": Decimal("100.000"),
            "fees": Decimal("4.9"),
            "last_price": Decimal("50000.00"),
            "ts_event": TS + 3_000,
        },
        overrides,
    )


def portfolio_snapshot(**overrides: Any) -> PortfolioSnapshot:
    """Return a USDT account holding `position()`."""
    return _build(
        PortfolioSnapshot,
        {
            "account_id": ACCOUNT_ID,
            "base_currency": "USDT",
            "balances": {"USDT": Decimal("95095.1"), "BTC": Decimal("0.1")},
            "equity": Decimal("100095.100"),
            "realized_pnl": Decimal("0"),
            "unrealized_pnl": Decimal("100.000"),
            "fees": Decimal("4.9"),
            "positions": [position()],
            "peak_equity": Decimal("100100.00"),
            "drawdown": Decimal("0.0000489"),
            "ts_event": TS + 4_000,
        },
        overrides,
    )


def alert(**overrides: Any) -> Alert:
    """Return a WARNING from risk about a rejected order."""
    return _build(
        Alert,
        {
            "alert_id": "A-1",
            "severity": AlertSeverity.WARNING,
            "source_service": "risk",
            "code": "ORDER_REJECTED",
            "message": "NOTIONAL_EXCEEDS_MAX_PER_ORDER: max_notional=1000, notional=5000.01",
            "account_id": ACCOUNT_ID,
            "instrument_id": INSTRUMENT_ID,
            "details": {"max_notional": "1000", "notional": "5000.01"},
            "ts_event": TS,
        },
        overrides,
    )


def control_command(**overrides: Any) -> ControlCommand:
    """Return a platform-wide KILL_SWITCH_ON from an operator."""
    return _build(
        ControlCommand,
        {
            "command_id": "K-1",
            "action": ControlAction.KILL_SWITCH_ON,
            "target": "*",
            "issued_by": "ops@example.com",
            "reason": "drill",
            "ts_event": TS,
        },
        overrides,
    )


def order_request(**overrides: Any) -> OrderRequest:
    """Return an operator's CANCEL request for order O-1."""
    return _build(
        OrderRequest,
        {
            "request_id": "RQ-1",
            "action": OrderRequestAction.CANCEL,
            "account_id": ACCOUNT_ID,
            "client_order_id": CLIENT_ORDER_ID,
            "requested_by": "ops@example.com",
            "ts_event": TS,
        },
        overrides,
    )


def collector_status(**overrides: Any) -> CollectorStatus:
    """Return a running OHLCV backfill of BTC-USDT.SIM, a quarter done."""
    return _build(
        CollectorStatus,
        {
            "job_id": "BF-1",
            "kind": "backfill.ohlcv",
            "state": CollectorState.RUNNING,
            "venue": "SIM",
            "instrument_id": INSTRUMENT_ID,
            "timeframe": "1m",
            "start_ns": TS - 4 * 3_600_000_000_000,
            "end_ns": TS,
            "cursor_ns": TS - 3 * 3_600_000_000_000,
            "fetched": 60,
            "progress": 0.25,
            "ts_event": TS,
        },
        overrides,
    )


def performance_report(**overrides: Any) -> PerformanceReport:
    """Return acc-1's performance over two snapshots and one winning round trip."""
    return _build(
        PerformanceReport,
        {
            "report_id": f"PERF:{ACCOUNT_ID}:{TS}",
            "account_id": ACCOUNT_ID,
            "base_currency": "USDT",
            "points": 2,
            "start_ts_ns": TS - 60 * SECOND_NS,
            "start_equity": Decimal("100000"),
            "final_equity": Decimal("100100"),
            "periods_per_year": 525_960.0,
            "total_return": 0.001,
            "trades": 1,
            "wins": 1,
            "win_rate": 1.0,
            "gross_profit": Decimal("100"),
            "net_pnl": Decimal("100"),
            "expectancy": Decimal("100"),
            "round_trips": [
                RoundTripRecord(
                    instrument_id=INSTRUMENT_ID,
                    side=PositionSide.LONG,
                    quantity=Decimal("0.1"),
                    entry_price=Decimal("49000.00"),
                    exit_price=Decimal("50000.00"),
                    entry_ts_ns=TS - 60 * SECOND_NS,
                    exit_ts_ns=TS,
                    pnl=Decimal("100"),
                    mae=Decimal("100"),
                    mfe=Decimal("1000"),
                )
            ],
            "ts_event": TS,
        },
        overrides,
    )


def account_opened(**overrides: Any) -> AccountOpened:
    """Return acc-1 opened as a paper account on SIM with 50,000 USDT."""
    return _build(
        AccountOpened,
        {
            "account_id": ACCOUNT_ID,
            "owner": "user-1",
            "base_currency": "USDT",
            "starting_cash": {"USDT": Decimal("50000")},
            "venue": VENUE,
            "ts_event": TS,
        },
        overrides,
    )


def strategy_status(**overrides: Any) -> StrategyStatus:
    """Return strategy strat-1 (sma_cross on BTC-USDT.SIM for acc-1) running."""
    return _build(
        StrategyStatus,
        {
            "strategy_id": STRATEGY_ID,
            "name": "sma_cross",
            "account_id": ACCOUNT_ID,
            "instruments": [INSTRUMENT_ID],
            "params": {"fast": 10, "slow": 30, "quantity": "1"},
            "ts_event": TS,
        },
        overrides,
    )


def risk_limits_status(**overrides: Any) -> RiskLimitsStatus:
    """Return acc-1's limits: 2 per order, no kill switch, breaker closed."""
    return _build(
        RiskLimitsStatus,
        {
            "account_id": ACCOUNT_ID,
            "configured": True,
            "limits": {"max_order_quantity": "2"},
            "opening_equity": Decimal("50000"),
            "base_currency": "USDT",
            "ts_event": TS,
        },
        overrides,
    )


def envelope(
    payload: M, *, source: str = "test", ts_event: int = TS, ts_init: int = TS, **kwargs: Any
) -> Envelope[M]:
    """Wrap `payload` in an envelope with fixed times (ids and lineage may be given)."""
    return Envelope.wrap(payload, source=source, ts_event=ts_event, ts_init=ts_init, **kwargs)


def all_samples() -> list[Event]:
    """Return one sample of every registered model (and both tick kinds and decision outcomes)."""
    return [
        instrument(),
        tick(),
        quote_tick(),
        bar(),
        book_snapshot(),
        signal(),
        order_intent(),
        limit_order_intent(),
        risk_decision(),
        risk_rejection(),
        order(),
        order_command(),
        execution_report(),
        order_accepted(),
        position(),
        portfolio_snapshot(),
        alert(),
        control_command(),
        order_request(),
        collector_status(),
        performance_report(),
        account_opened(),
        strategy_status(),
        risk_limits_status(),
    ]
