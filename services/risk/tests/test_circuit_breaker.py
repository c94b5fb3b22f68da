"""Daily loss limit and max drawdown: portfolio events trip the breaker that halts the account."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from quantmesh_common.messages import (
    Alert,
    AlertSeverity,
    ControlAction,
    PortfolioSnapshot,
    Position,
    RiskDecision,
)
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.topics import Topic
from quantmesh_risk.config import RiskSettings
from quantmesh_risk.losses import LossTracker
from quantmesh_risk.service import RiskService

D = Decimal
S = stubs.SECOND_NS
#: 2023-11-14T22:13:20Z; the next UTC midnight is 2023-11-15T00:00:00Z.
T0 = stubs.TS
MIDNIGHT = 1_700_006_400 * S


class Risk(StageHarness[RiskService]):
    """The risk stage with limits, on the in-memory bus."""

    def __init__(self, limits: dict[str, Any]) -> None:
        settings = RiskSettings(bus="memory", http_port=0, risk_limits={"default": limits})
        super().__init__(RiskService(settings), now_ns=T0)

    async def snapshot(self, equity: str, ts: int, positions: list[Position] | None = None) -> None:
        snap = _snap(equity, 0, positions or []).model_copy(update={"ts_event": ts})
        await self.bus.publish(Topic.PORTFOLIO_SNAPSHOTS, snap, ts_event=ts)
        await self.bus.run_until_idle()

    async def position(self, realized: str, unrealized: str, ts: int) -> None:
        pos = _position(realized, unrealized, ts)
        await self.bus.publish(Topic.PORTFOLIO_UPDATES, pos, ts_event=ts)
        await self.bus.run_until_idle()

    async def decide(self, cid: str) -> RiskDecision:
        before = len(self.decisions())
        await self.send(
            Topic.ORDERS_INTENTS, stubs.order_intent(intent_id=f"I-{cid}", client_order_id=cid)
        )
        decisions = self.decisions()
        assert len(decisions) == before + 1
        found: RiskDecision = next(d for d in decisions if d.intent.client_order_id == cid)
        return found

    def decisions(self) -> list[RiskDecision]:
        return self.payloads(Topic.ORDERS_APPROVED) + self.payloads(Topic.ORDERS_REJECTED)

    def alerts(self) -> list[Alert]:
        return self.payloads(Topic.ALERTS)


def _position(realized: str, unrealized: str, ts: int) -> Position:
    return stubs.position(realized_pnl=D(realized), unrealized_pnl=D(unrealized), ts_event=ts)


async def test_daily_loss_when_beyond_the_limit_trips_halts_and_alerts_once() -> None:
    risk = await Risk({"max_daily_loss": "1000"}).start()
    await risk.snapshot("100000", T0)
    # At the limit: 100000 - 99000 = 1000 passes.
    await risk.snapshot("99000", T0 + 60 * S, [_position("0", "-500", T0 + 60 * S)])
    assert (await risk.decide("O-1")).approved is True

    # The position's P&L goes from -500 to -4.9 - 600 = -604.9: equity 99000 - 104.9.
    await risk.position("-4.9", "-600", T0 + 61 * S)
    denied = await risk.decide("O-2")
    await risk.position("-4.9", "-700", T0 + 62 * S)

    assert denied.approved is False
    assert denied.reason == "CIRCUIT_BREAKER_TRIPPED"
    assert denied.details == {
        "account_id": "acc-1",
        "cause": "DAILY_LOSS_LIMIT_BREACHED",
        "max_daily_loss": "1000",
        "daily_loss": "1104.9",
        "day_open_equity": "100000",
        "equity": "98895.1",
        "day": "2023-11-14",
    }
    [alert] = risk.alerts()
    assert alert.code == "CIRCUIT_BREAKER_TRIPPED"
    assert alert.severity is AlertSeverity.CRITICAL
    assert alert.source_service == "risk"
    assert alert.account_id == "acc-1"
    assert alert.details["cause"] == "DAILY_LOSS_LIMIT_BREACHED"
    assert alert.details["daily_loss"] == "1104.9"
    assert alert.ts_event == T0 + 61 * S


async def test_breaker_when_reset_by_an_operator_lets_orders_through_and_measures_from_there() -> (
    None
):
    risk = await Risk({"max_daily_loss": "1000"}).start()
    await risk.snapshot("100000", T0)
    await risk.snapshot("98000", T0 + 60 * S)
    assert (await risk.decide("O-1")).reason == "CIRCUIT_BREAKER_TRIPPED"

    reset = stubs.control_command(action=ControlAction.RESET_CIRCUIT_BREAKER, target="acc-1")
    await risk.send(Topic.CONTROL, reset)
    after_reset = await risk.decide("O-2")
    # Re-based at 98000: 98000 - 97000 = 1000 is at the limit, 96999 beyond it.
    await risk.snapshot("97000", T0 + 120 * S)
    still_open = await risk.decide("O-3")
    await risk.snapshot("96999", T0 + 180 * S)
    tripped_again = await risk.decide("O-4")

    assert after_reset.approved is True
    assert still_open.approved is True
    assert tripped_again.reason == "CIRCUIT_BREAKER_TRIPPED"
    assert tripped_again.details["daily_loss"] == "1001"
    assert len(risk.alerts()) == 2


async def test_daily_loss_when_a_utc_day_ends_restarts_from_the_last_equity_of_the_day() -> None:
    risk = await Risk({"max_daily_loss": "1000"}).start()
    await risk.snapshot("100000", T0)
    await risk.snapshot("99500", MIDNIGHT - 60 * S)  # day 1: -500
    # Day 2 opens at 99500: 98600 is -900 today (it would be -1400 against day 1's open).
    await risk.snapshot("98600", MIDNIGHT + 60 * S)
    open_today = await risk.decide("O-1")
    await risk.snapshot("98400", MIDNIGHT + 120 * S)
    tripped = await risk.decide("O-2")

    assert open_today.approved is True
    assert tripped.details["daily_loss"] == "1100"
    assert tripped.details["day_open_equity"] == "99500"
    assert tripped.details["day"] == "2023-11-15"


async def test_max_drawdown_when_beyond_the_limit_trips_and_at_it_passes() -> None:
    risk = await Risk({"max_drawdown_pct": "5"}).start()
    await risk.snapshot("100000", T0)
    await risk.snapshot("110000", T0 + 60 * S)
    await risk.snapshot("104500", T0 + 120 * S)  # (110000 - 104500) / 110000 = 5 % exactly
    at_limit = await risk.decide("O-1")
    await risk.snapshot("104400", T0 + 180 * S)  # 5600 / 110000 = 5.0909... %
    beyond = await risk.decide("O-2")

    assert at_limit.approved is True
    assert beyond.reason == "CIRCUIT_BREAKER_TRIPPED"
    assert beyond.details == {
        "account_id": "acc-1",
        "cause": "MAX_DRAWDOWN_BREACHED",
        "max_drawdown_pct": "5",
        "drawdown_pct": "5.0909",
        "peak_equity": "110000",
        "equity": "104400",
    }


async def test_breaker_when_another_account_trips_keeps_this_one_trading() -> None:
    risk = await Risk({"max_daily_loss": "10"}).start()
    other = stubs.portfolio_snapshot(account_id="acc-2", positions=[], equity=D(100), ts_event=T0)
    worse = other.model_copy(update={"equity": D(50), "ts_event": T0 + S})
    await risk.bus.publish(Topic.PORTFOLIO_SNAPSHOTS, other, ts_event=T0)
    await risk.bus.publish(Topic.PORTFOLIO_SNAPSHOTS, worse, ts_event=T0 + S)
    await risk.bus.run_until_idle()

    assert (await risk.decide("O-1")).approved is True
    assert [a.account_id for a in risk.alerts()] == ["acc-2"]


def test_equity_when_an_update_after_the_snapshot_arrives_before_it_counts_only_the_change() -> (
    None
):
    tracker = LossTracker()
    tracker.on_snapshot(_snap("100000", 60, [_position("0", "0", 60 * S)]), 60 * S)
    later = _position("0", "-300", 130 * S)
    tracker.on_position(later, 130 * S)
    # Snapshot at 120 s holds P&L -200 for the position; the update at 130 s is not in it.
    tracker.on_snapshot(_snap("99800", 120, [_position("0", "-200", 120 * S)]), 120 * S)
    stale = _position("0", "-250", 110 * S)  # older than the snapshot: already in it
    ignored = tracker.on_position(stale, 131 * S)

    state = tracker.account("acc-1")
    assert ignored is None
    assert state.equity == D("99700")  # 99800 + (-300 - -200)
    assert state.peak_equity == D("100000")


def test_equity_when_a_position_quoted_in_another_currency_updates_waits_for_a_snapshot() -> None:
    tracker = LossTracker()
    tracker.on_snapshot(_snap("100000", 60, []), 60 * S)
    eth_btc = stubs.position(
        instrument_id="ETH-BTC.SIM", realized_pnl=D("-1"), unrealized_pnl=D(0), ts_event=61 * S
    )

    assert tracker.on_position(eth_btc, 61 * S) is None
    assert tracker.account("acc-1").equity == D("100000")


def _snap(equity: str, ts_s: int, positions: list[Position]) -> PortfolioSnapshot:
    return stubs.portfolio_snapshot(
        equity=D(equity), positions=positions, peak_equity=None, drawdown=D(0), ts_event=ts_s * S
    )
