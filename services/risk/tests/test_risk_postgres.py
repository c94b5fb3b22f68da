"""Risk on real PostgreSQL: a tripped breaker, positions and working orders survive a restart."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import ControlAction, ControlCommand, Side
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic

from .conftest import Deciding, new_risk

pytestmark = pytest.mark.integration

D = Decimal
S = stubs.SECOND_NS
T0 = stubs.TS


class Instance(Deciding):
    """One risk instance on its own in-memory bus, with the test schema's pool."""

    def __init__(self, pool: Any, limits: dict[str, Any]) -> None:
        super().__init__(new_risk(risk_limits={"default": limits}), now_ns=T0, pg=pool)

    async def snapshot(self, equity: str, ts: int) -> None:
        snap = stubs.portfolio_snapshot(
            equity=D(equity), positions=[], peak_equity=None, drawdown=D(0), ts_event=ts
        )
        await self.bus.publish(Topic.PORTFOLIO_SNAPSHOTS, snap, ts_event=ts)
        await self.bus.run_until_idle()


def _reset(command_id: str) -> ControlCommand:
    return stubs.control_command(
        command_id=command_id, action=ControlAction.RESET_CIRCUIT_BREAKER, target="acc-1"
    )


LOSS = {"max_daily_loss": "1000"}


async def test_breaker_when_tripped_before_a_restart_still_halts_the_account(
    risk_pool: Any,
) -> None:
    first = await Instance(risk_pool, LOSS).start()
    await first.snapshot("100000", T0)
    await first.snapshot("98000", T0 + 60 * S)

    second = await Instance(risk_pool, LOSS).start()
    decision = await second.decide()

    assert decision.reason == "CIRCUIT_BREAKER_TRIPPED"
    assert decision.details["cause"] == "DAILY_LOSS_LIMIT_BREACHED"
    assert decision.details["daily_loss"] == "2000"


async def test_reset_when_control_replays_it_after_a_restart_does_not_reopen_a_later_trip(
    risk_pool: Any,
) -> None:
    first = await Instance(risk_pool, LOSS).start()
    await first.snapshot("100000", T0)
    await first.snapshot("98000", T0 + 60 * S)  # trips
    await first.send(Topic.CONTROL, _reset("C-1"))  # re-based at 98000
    await first.snapshot("96500", T0 + 120 * S)  # trips again: 1500 lost since the reset

    second = await Instance(risk_pool, LOSS).start()
    await second.send(Topic.CONTROL, _reset("C-1"))  # the fresh control group replays it
    after_replay = await second.decide()
    await second.send(Topic.CONTROL, _reset("C-2"))  # a new reset re-opens it
    after_new_reset = await second.decide()
    # Restarted, risk knows no equity yet: the reset re-bases at the next one (96000).
    await second.snapshot("96000", T0 + 150 * S)
    await second.snapshot("95000", T0 + 180 * S)  # 1000 below: at the limit
    at_limit = await second.decide()

    assert after_replay.reason == "CIRCUIT_BREAKER_TRIPPED"
    assert after_replay.details["daily_loss"] == "1500"
    assert after_new_reset.approved is True
    assert at_limit.approved is True


async def test_positions_fills_and_working_orders_when_restarted_are_read_from_the_tables(
    risk_pool: Any,
) -> None:
    await risk_pool.execute(
        "INSERT INTO positions (account_id, instrument_id, side, quantity, ts_event)"
        " VALUES ('acc-1', 'BTC-USDT.SIM', 'LONG', 0.3, 1)"
    )
    await risk_pool.execute(
        "INSERT INTO portfolio_applied_fills (account_id, instrument_id, fill_id, ts_event)"
        " VALUES ('acc-1', 'BTC-USDT.SIM', 'T-1', 1)"
    )
    await risk_pool.execute(
        "INSERT INTO orders (client_order_id, account_id, strategy_id, instrument_id, venue,"
        " side, order_type, quantity, filled_quantity, avg_fill_price, limit_price, status,"
        " ts_init, ts_last) VALUES ('W-1', 'acc-1', 'strat-1', 'BTC-USDT.SIM', 'SIM', 'BUY',"
        " 'LIMIT', 0.5, 0.2, 49000, 49000, 'PARTIALLY_FILLED', 1, 1)"
    )
    risk = await Instance(risk_pool, {"max_position": "1"}).start()
    # Redelivered fill T-1 is already in the stored position: it must not count again.
    await risk.send(
        Topic.EXEC_REPORTS,
        stubs.execution_report(
            client_order_id="F-1", trade_id="T-1", last_qty=D("0.3"), cum_qty=D("0.3")
        ),
    )

    # Position 0.3 + working 0.3 left of W-1 + 0.4 = 1.0: at the limit; 0.41 is beyond it.
    at_limit = await risk.decide(quantity=D("0.4"))
    beyond = await risk.decide(quantity=D("0.01"), side=Side.BUY)

    assert at_limit.approved is True
    assert beyond.reason == "POSITION_EXCEEDS_MAX"
    assert beyond.details["position"] == "0.3"
    assert beyond.details["open_quantity"] == "0.7"


async def test_batch_when_snapshots_trip_the_breaker_stores_the_account_once_at_its_end(
    risk_pool: Any,
) -> None:
    risk = await Instance(risk_pool, LOSS).start()
    service = risk.service
    for equity, ts in (("100000", T0), ("98000", T0 + 60 * S)):
        snap = stubs.portfolio_snapshot(
            equity=D(equity), positions=[], peak_equity=None, drawdown=D(0), ts_event=ts
        )
        service.on_order_flow_held(Envelope.wrap(snap, source="test", ts_event=ts, ts_init=ts))
    stored_before_flush = await risk_pool.fetchval("SELECT count(*) FROM risk_account_state")

    await service.flush()

    assert stored_before_flush == 0
    row = await risk_pool.fetchrow("SELECT breaker_cause, day_open_equity FROM risk_account_state")
    assert (row["breaker_cause"], row["day_open_equity"]) == (
        "DAILY_LOSS_LIMIT_BREACHED",
        D("100000"),
    )


async def test_limits_status_when_restarted_shows_the_stored_breaker_and_the_opening_capital(
    risk_pool: Any,
) -> None:
    first = await Instance(risk_pool, LOSS).start()
    await first.snapshot("100000", T0)
    await first.snapshot("98000", T0 + 60 * S)  # trips: 2000 lost

    second = await Instance(risk_pool, LOSS).start()
    at_start = [s for s in second.payloads(Topic.RISK_LIMITS) if s.account_id == "acc-1"]
    # The compacted accounts topic is read whole at every start.
    await second.send(Topic.ACCOUNTS, stubs.account_opened(starting_cash={"USDT": D(100000)}))
    opened = second.payloads(Topic.RISK_LIMITS)[-1]

    assert [(s.breaker_tripped, s.breaker_cause) for s in at_start] == [
        (True, "DAILY_LOSS_LIMIT_BREACHED")
    ]
    assert at_start[0].breaker_details["daily_loss"] == "2000"
    assert (opened.account_id, opened.opening_equity, opened.breaker_tripped) == (
        "acc-1",
        D(100000),
        True,
    )
    # The stored loss references stand: the opening does not re-base them.
    losses = second.service.engine.losses.account("acc-1")
    assert (losses.day_open_equity, losses.peak_equity) == (D(100000), D(100000))
