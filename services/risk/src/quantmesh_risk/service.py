"""The risk stage service: every order intent approved or denied, with the reason behind it."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from quantmesh_common.bus.base import Emit
from quantmesh_common.clock import Clock, WallClock
from quantmesh_common.envelope import Envelope
from quantmesh_common.ids import new_id
from quantmesh_common.messages import (
    Bar,
    ControlCommand,
    ExecutionReport,
    Order,
    OrderIntent,
    PortfolioSnapshot,
    Position,
    Tick,
)
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic
from quantmesh_risk.config import RiskSettings
from quantmesh_risk.engine import RiskEngine

log = logging.getLogger(__name__)

#: The issue that brings this stage's handlers; None: they exist.
HANDLERS_ISSUE: int | None = None

#: The order flow of an account: intents, fills, order states and the portfolio's positions and
#: snapshots (all keyed by account_id over 6 partitions, so an account meets in one instance).
GROUP = "risk"
#: What the order-flow group reads.
ORDER_FLOW_TOPICS = (
    Topic.ORDERS_INTENTS,
    Topic.EXEC_REPORTS,
    Topic.ORDERS_UPDATES,
    Topic.PORTFOLIO_UPDATES,
    Topic.PORTFOLIO_SNAPSHOTS,
)
#: Last prices: keyed by instrument, so not co-partitioned with the accounts.
MARKET_DATA_GROUP = "risk.md"
#: Prefix of the control group; each process adds a fresh suffix (see setup).
CONTROL_GROUP_PREFIX = "risk.control."


class RiskService(Service[RiskSettings]):
    """The risk stage: pre-trade checks, kill switch and circuit breakers."""

    name = "risk"
    settings_class = RiskSettings

    #: Input topics.
    consumes: ClassVar[tuple[str, ...]] = (
        Topic.ORDERS_INTENTS,
        Topic.EXEC_REPORTS,
        Topic.ORDERS_UPDATES,
        Topic.MD_TICKS,
        Topic.CONTROL,
        Topic.PORTFOLIO_UPDATES,
        Topic.PORTFOLIO_SNAPSHOTS,
        Topic.MD_BARS,
    )
    #: Output topics.
    produces: ClassVar[tuple[str, ...]] = (
        Topic.ORDERS_APPROVED,
        Topic.ORDERS_REJECTED,
        Topic.ALERTS,
    )

    def __init__(self, settings: RiskSettings) -> None:
        super().__init__(settings)
        self.engine = RiskEngine(
            settings.risk_limits,
            settings.risk_instruments,
            var_horizon_ns=settings.var_horizon_ns,
            var_window=settings.risk_var_window,
        )
        self.clock: Clock = WallClock()

    async def setup(self, ctx: ServiceContext[RiskSettings]) -> None:
        """Subscribe the order flow (transactional), market data and control."""
        self.clock = ctx.clock
        if self.settings.risk_limits.is_unlimited:
            ctx.logger.warning(
                "no risk limits configured (QM_RISK_LIMITS): only halts and instrument rules apply"
            )
        ctx.subscribe(GROUP, ORDER_FLOW_TOPICS, self.on_order_flow, transactional=True)
        ctx.subscribe(MARKET_DATA_GROUP, [Topic.MD_TICKS, Topic.MD_BARS], self.on_tick)
        # A fresh group reads `control` from the beginning at every start, so the kill switch
        # and breaker resets survive a restart: the state is rebuilt from the command history.
        ctx.subscribe(CONTROL_GROUP_PREFIX + new_id(), [Topic.CONTROL], self.on_control)

    def on_order_flow(self, envelope: Envelope[Any]) -> list[Emit]:
        """Decide on an intent; learn positions from fills and working orders from the OMS."""
        payload = envelope.payload
        if isinstance(payload, OrderIntent):
            decision = self.engine.evaluate(payload, self.clock.now_ns())
            if decision.approved:
                return [Emit(Topic.ORDERS_APPROVED, decision)]
            log.info(
                "intent %s denied: %s",
                payload.intent_id,
                decision.reason_text,
                extra={"client_order_id": payload.client_order_id, "reason": decision.reason},
            )
            return [Emit(Topic.ORDERS_REJECTED, decision)]
        if isinstance(payload, ExecutionReport):
            self.engine.on_report(payload)
            return []
        if isinstance(payload, Order):
            self.engine.on_order(payload)
            return []
        if isinstance(payload, PortfolioSnapshot | Position):
            alert = self.engine.on_portfolio(payload, envelope.ts_event)
            return [Emit(Topic.ALERTS, alert, ts_event=alert.ts_event)] if alert else []
        raise TypeError(f"risk does not handle {envelope.schema_name} in its order flow")

    def on_tick(self, envelope: Envelope[Any]) -> None:
        """Remember the latest price of the instrument; sample its returns for VaR."""
        payload = envelope.payload
        if isinstance(payload, Tick):
            self.engine.on_tick(payload)
        elif isinstance(payload, Bar):
            self.engine.on_bar(payload)
        else:
            raise TypeError(f"risk expected a tick or a bar, got {envelope.schema_name}")

    def on_control(self, envelope: Envelope[Any]) -> None:
        """Apply an operator command."""
        payload = envelope.payload
        if not isinstance(payload, ControlCommand):
            raise TypeError(f"risk expected a control command, got {envelope.schema_name}")
        self.engine.on_control(payload)
