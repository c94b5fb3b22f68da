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
