"""The index of open GTD orders by expiry time: expiry still fires, terminal orders leave it."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from quantmesh_common.messages import CommandType, ExecType, OrderCommand, OrderStatus, TimeInForce
from quantmesh_common.testing import stubs
from quantmesh_oms.orders import ExpiryIndex, OrderManager

NOW = stubs.TS + 10 * stubs.SECOND_NS
S = stubs.SECOND_NS


def _gtd(manager: OrderManager, client_order_id: str, expire_time_ns: int | None) -> None:
    tif = TimeInForce.GTD if expire_time_ns is not None else TimeInForce.GTC
    intent = stubs.limit_order_intent(
        client_order_id=client_order_id,
        intent_id=f"I-{client_order_id}",
        quantity=Decimal("0.1"),
        time_in_force=tif,
        expire_time_ns=expire_time_ns,
    )
    manager.on_decision(stubs.risk_decision(decision_id=f"D-{client_order_id}", intent=intent), NOW)


def _report(client_order_id: str, exec_type: ExecType, status: OrderStatus, **kw: Any) -> Any:
    return stubs.order_accepted(
        client_order_id=client_order_id,
        report_id=f"R-{client_order_id}-{exec_type.value}",
        exec_type=exec_type,
        order_status=status,
        **kw,
    )


def _cancels(emits: list[Any]) -> list[str]:
    return [
        e.payload.command_id
        for e in emits
        if isinstance(e.payload, OrderCommand) and e.payload.command_type is CommandType.CANCEL
    ]


def test_expire_due_when_two_gtd_orders_expires_each_at_its_own_time() -> None:
    manager = OrderManager()
    _gtd(manager, "O-A", NOW + 30 * S)
    _gtd(manager, "O-B", NOW + 60 * S)
    _gtd(manager, "O-C", None)  # GTC: never indexed

    before = manager.expire_due(NOW + 29 * S)
    at_a = manager.expire_due(NOW + 30 * S)
    between = manager.expire_due(NOW + 59 * S)
    at_b = manager.expire_due(NOW + 61 * S)

    assert before == []
    assert _cancels(at_a) == ["O-A:CANCEL:EXPIRE"]
    assert between == []
    assert _cancels(at_b) == ["O-B:CANCEL:EXPIRE"]
    assert len(manager.expiries) == 0


def test_index_when_gtd_order_fills_forgets_it_and_nothing_expires() -> None:
    manager = OrderManager()
    _gtd(manager, "O-A", NOW + 30 * S)
    assert "O-A" in manager.expiries

    manager.on_report(
        stubs.execution_report(
            client_order_id="O-A",
            report_id="R-fill",
            trade_id="T-1",
            last_qty=Decimal("0.1"),
            cum_qty=Decimal("0.1"),
            leaves_qty=Decimal("0"),
        ),
        NOW + S,
    )

    assert manager.get("O-A").status is OrderStatus.FILLED  # type: ignore[union-attr]
    assert "O-A" not in manager.expiries
    assert len(manager.expiries) == 0
    assert manager.expire_due(NOW + 30 * S) == []


def test_index_when_gtd_order_canceled_by_venue_forgets_it() -> None:
    manager = OrderManager()
    _gtd(manager, "O-A", NOW + 30 * S)

    manager.on_report(_report("O-A", ExecType.CANCELED, OrderStatus.CANCELED), NOW + S)

    assert len(manager.expiries) == 0


def test_expire_due_when_requested_cancel_refused_after_due_expires_next_check() -> None:
    # Arrange: a cancel request is pending when the order comes due.
    manager = OrderManager()
    _gtd(manager, "O-A", NOW + 30 * S)
    manager.on_request(stubs.order_request(client_order_id="O-A"), NOW + 10 * S)
    while_pending = manager.expire_due(NOW + 30 * S)

    # Act: the venue refuses the cancel, then the next check comes.
    manager.on_report(
        _report("O-A", ExecType.CANCEL_REJECTED, OrderStatus.ACCEPTED, reason="TOO_LATE"),
        NOW + 31 * S,
    )
    next_check = manager.expire_due(NOW + 32 * S)

    # Assert
    assert while_pending == []
    assert _cancels(next_check) == ["O-A:CANCEL:EXPIRE"]


def test_expiry_index_when_many_discarded_rebuilds_heap_to_live_entries() -> None:
    index = ExpiryIndex()
    for n in range(200):
        index.add(f"O-{n}", NOW + n)
    for n in range(199):
        index.discard(f"O-{n}")

    index.add("O-new", NOW + 500)

    # 200 pushes + 1 > 2 * 2 live + 64: rebuilt to the two live entries.
    assert len(index._heap) == 2
    assert index.due(NOW + 1000) == ["O-199", "O-new"]
