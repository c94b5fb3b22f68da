"""Risk's remembered fill keys and finished orders when bounded: the newest kept, the rest go."""

from __future__ import annotations

from decimal import Decimal

from quantmesh_common.messages import ExecType, ExecutionReport, OrderStatus
from quantmesh_common.testing import stubs
from quantmesh_risk.engine import RiskEngine
from quantmesh_risk.limits import RiskConfig

D = Decimal
KEY = (stubs.ACCOUNT_ID, stubs.INSTRUMENT_ID)


def _fill(n: int) -> ExecutionReport:
    return stubs.execution_report(
        report_id=f"R-{n}",
        client_order_id=f"O-{n}",
        trade_id=f"T-{n}",
        exec_type=ExecType.FILL,
        order_status=OrderStatus.FILLED,
        last_qty=D("0.1"),
    )


def test_fill_keys_when_past_twice_the_bound_keep_the_newest_and_count_a_repeat_once() -> None:
    engine = RiskEngine(RiskConfig(), keep_ids=2)
    for n in range(1, 6):
        engine.on_report(_fill(n))

    engine.on_report(_fill(5))

    # Trimmed to 2 when the fifth made it 5 (> 2 x 2): T-4 and T-5 stay.
    assert [t[2] for t in engine.seen_trades] == ["T-4", "T-5"]
    assert engine.positions[KEY] == D("0.5")


def test_finished_orders_when_unbounded_are_all_remembered() -> None:
    engine = RiskEngine(RiskConfig())
    for n in range(1, 6):
        engine.on_report(_fill(n))

    assert len(engine.seen_trades) == 5
    assert len(engine._closed) == 5


def test_approval_times_when_no_order_rate_limit_are_not_kept() -> None:
    engine = RiskEngine(RiskConfig())
    engine.on_tick(stubs.tick(price=D(50000)))

    decisions = [
        engine.evaluate(
            stubs.order_intent(intent_id=f"I-{n}", client_order_id=f"O-{n}"), stubs.TS + n
        )
        for n in range(1, 4)
    ]

    assert [d.approved for d in decisions] == [True, True, True]
    assert engine.approvals == {}


def test_approval_times_when_an_order_rate_limit_is_set_are_kept_per_strategy() -> None:
    engine = RiskEngine(RiskConfig.model_validate({"default": {"max_orders_per_strategy": 5}}))
    engine.on_tick(stubs.tick(price=D(50000)))

    for n in range(1, 4):
        engine.evaluate(
            stubs.order_intent(intent_id=f"I-{n}", client_order_id=f"O-{n}"), stubs.TS + n
        )

    key = (stubs.ACCOUNT_ID, stubs.STRATEGY_ID)
    assert list(engine.approvals[key]) == [stubs.TS + 1, stubs.TS + 2, stubs.TS + 3]
