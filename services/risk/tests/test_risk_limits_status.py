"""Risk publishes its limits, kill switch and breakers; paper accounts' capital is their equity."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Self

from quantmesh_common.messages import ControlAction, OrderType, RiskDecision, RiskLimitsStatus
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.topics import Topic
from quantmesh_risk.service import RiskService

from .conftest import new_risk

D = Decimal
NOW = stubs.TS + 10 * stubs.SECOND_NS
LIMITS: dict[str, Any] = {
    "default": {"max_order_quantity": "2", "max_daily_loss": "1000"},
    "accounts": {"acc-big": {"max_order_quantity": "50"}},
}
#: A quarter of equity per position; 100,000 of capital until equity is known.
SIZING: dict[str, Any] = {
    "default": {"method": "fraction", "fraction": "0.25", "capital": "100000"}
}


class Risk(StageHarness[RiskService]):
    """The risk service's handlers on a retaining in-memory bus."""

    def __init__(self, limits: dict[str, Any], sizing: dict[str, Any] | None = None) -> None:
        risk = new_risk(risk_limits=limits, risk_sizing=sizing or {})
        super().__init__(risk, now_ns=NOW)

    async def start(self) -> Self:
        await super().start()
        await self.bus.run_until_idle()
        return self

    def statuses(self) -> list[RiskLimitsStatus]:
        return [e.payload for e in self.bus.messages(Topic.RISK_LIMITS)]

    def latest(self, account_id: str) -> RiskLimitsStatus:
        return [s for s in self.statuses() if s.account_id == account_id][-1]

    def decisions(self) -> list[RiskDecision]:
        approved = [e.payload for e in self.bus.messages(Topic.ORDERS_APPROVED)]
        return approved + [e.payload for e in self.bus.messages(Topic.ORDERS_REJECTED)]


def _target_intent(account_id: str) -> Any:
    # A long target of any size: the fraction policy sizes it; 100.00 is the price.
    return stubs.order_intent(
        account_id=account_id,
        side=None,
        quantity=None,
        target_position=D(1),
        order_type=OrderType.LIMIT,
        limit_price=D("100.00"),
    )


async def test_start_when_limits_are_configured_publishes_the_default_and_each_account() -> None:
    risk = await Risk(LIMITS).start()

    statuses = risk.statuses()

    assert [(s.account_id, s.configured) for s in statuses] == [("*", True), ("acc-big", True)]
    assert [r.key for r in risk.bus.records(Topic.RISK_LIMITS)] == ["*", "acc-big"]
    default, big = statuses
    assert default.limits["max_order_quantity"] == "2"
    assert default.limits["max_daily_loss"] == "1000"
    # The account's entry over the default's, as risk applies it.
    assert (big.limits["max_order_quantity"], big.limits["max_daily_loss"]) == ("50", "1000")
    assert (big.kill_switch, big.breaker_tripped) == (False, False)


async def test_kill_switch_when_engaged_for_an_account_republishes_it_and_the_default() -> None:
    risk = await Risk(LIMITS).start()
    before = len(risk.statuses())

    await risk.send(
        Topic.CONTROL,
        stubs.control_command(action=ControlAction.KILL_SWITCH_ON, target="acc-big"),
    )

    new = risk.statuses()[before:]
    assert [(s.account_id, s.kill_switch, s.kill_switch_targets) for s in new] == [
        ("*", False, ["acc-big"]),
        ("acc-big", True, ["acc-big"]),
    ]


async def test_kill_switch_when_engaged_for_everything_marks_every_account() -> None:
    risk = await Risk(LIMITS).start()
    before = len(risk.statuses())

    await risk.send(Topic.CONTROL, stubs.control_command(action=ControlAction.KILL_SWITCH_ON))

    new = risk.statuses()[before:]
    assert [(s.account_id, s.kill_switch) for s in new] == [("*", True), ("acc-big", True)]


async def test_opened_account_when_it_loses_past_the_daily_limit_trips_from_its_capital() -> None:
    risk = await Risk(LIMITS).start()
    opened = stubs.account_opened(
        account_id="pa-1", starting_cash={"USDT": D("50000")}, ts_event=stubs.TS
    )
    # No portfolio snapshot yet: the loss is measured from the 50,000 the account opened with.
    losing = stubs.position(
        account_id="pa-1", realized_pnl=D(0), unrealized_pnl=D("-1200"), ts_event=stubs.TS + 5
    )

    await risk.send(Topic.ACCOUNTS, opened)
    await risk.send(Topic.PORTFOLIO_UPDATES, losing)

    opened_status, tripped = [s for s in risk.statuses() if s.account_id == "pa-1"]
    assert (opened_status.opening_equity, opened_status.base_currency) == (D("50000"), "USDT")
    assert opened_status.breaker_tripped is False
    assert (tripped.breaker_tripped, tripped.breaker_cause) == (True, "DAILY_LOSS_LIMIT_BREACHED")
    assert tripped.breaker_details["daily_loss"] == "1200"
    assert tripped.breaker_details["day_open_equity"] == "50000"


async def test_opened_account_when_sized_by_fraction_uses_its_capital_not_the_policy() -> None:
    risk = await Risk({}, SIZING).start()
    await risk.send(
        Topic.ACCOUNTS, stubs.account_opened(account_id="pa-1", starting_cash={"USDT": D(50000)})
    )

    await risk.send(Topic.ORDERS_INTENTS, _target_intent("pa-1"), _target_intent("acc-9"))

    opened, unknown = risk.decisions()
    # 50,000 x 0.25 / 100.00 = 125; without an opening, the policy's 100,000: 250.
    assert (opened.approved, opened.adjusted_quantity) == (True, D(125))
    assert (unknown.approved, unknown.adjusted_quantity) == (True, D(250))


async def test_opened_account_when_read_again_or_after_a_snapshot_keeps_the_known_equity() -> None:
    risk = await Risk({}, SIZING).start()
    snapshot = stubs.portfolio_snapshot(account_id="pa-1", equity=D("80000"), positions=[])
    opened = stubs.account_opened(account_id="pa-1", starting_cash={"USDT": D(50000)})

    await risk.send(Topic.PORTFOLIO_SNAPSHOTS, snapshot)
    await risk.send(Topic.ACCOUNTS, opened, opened)
    await risk.send(Topic.ORDERS_INTENTS, _target_intent("pa-1"))

    (decision,) = risk.decisions()
    # 80,000 x 0.25 / 100.00 = 200: the snapshot's equity, not the opening's.
    assert decision.adjusted_quantity == D(200)
    # One status for the opening, none for the same opening read again.
    assert [s.opening_equity for s in risk.statuses() if s.account_id == "pa-1"] == [D(50000)]


async def test_breaker_reset_when_applied_republishes_the_account_closed() -> None:
    risk = await Risk(LIMITS).start()
    await risk.send(Topic.ACCOUNTS, stubs.account_opened(account_id="pa-1"))
    await risk.send(
        Topic.PORTFOLIO_UPDATES,
        stubs.position(account_id="pa-1", realized_pnl=D(0), unrealized_pnl=D("-5000")),
    )
    assert risk.latest("pa-1").breaker_tripped

    await risk.send(
        Topic.CONTROL,
        stubs.control_command(action=ControlAction.RESET_CIRCUIT_BREAKER, target="pa-1"),
    )

    assert risk.latest("pa-1").breaker_tripped is False
