"""MemoryApiStore fed from the bus (the embedded run): orders and fills as the OMS stores them."""

from __future__ import annotations

from decimal import Decimal

from quantmesh_api.routes import OrderPublic
from quantmesh_api.store import MemoryApiStore, TradeRow
from quantmesh_common.messages import OrderStatus
from quantmesh_common.testing import stubs

TS = stubs.order().ts_init


async def test_record_order_when_states_arrive_keeps_the_newest_as_one_row() -> None:
    # Arrange
    store = MemoryApiStore()
    accepted = stubs.order()
    filled = stubs.order(
        status=OrderStatus.FILLED,
        filled_quantity=Decimal("0.1"),
        avg_fill_price=Decimal("48999.5"),
        ts_last=TS + 9_000,
    )

    # Act: the filled state, then a late copy of the accepted one
    store.record_order(accepted)
    store.record_order(filled)
    store.record_order(accepted)
    rows = await store.list_orders(accepted.account_id, open_only=False, limit=10)
    open_rows = await store.list_orders(accepted.account_id, open_only=True, limit=10)

    # Assert
    assert len(rows) == 1
    public = OrderPublic.model_validate(rows[0])
    assert (public.client_order_id, public.status) == (accepted.client_order_id, "FILLED")
    assert (public.side, public.order_type, public.time_in_force) == ("BUY", "LIMIT", "GTC")
    assert public.filled_quantity == Decimal("0.1")
    assert public.avg_fill_price == Decimal("48999.5")
    assert (public.ts_init, public.ts_last) == (TS, TS + 9_000)
    assert open_rows == []
    assert await store.get_order(accepted.account_id, accepted.client_order_id) == rows[0]


async def test_record_fill_when_a_fill_repeats_keeps_it_once_and_ignores_other_reports() -> None:
    # Arrange
    store = MemoryApiStore()
    fill = stubs.execution_report()

    # Act
    store.record_fill(stubs.order_accepted())
    store.record_fill(fill)
    store.record_fill(fill)
    trades = await store.list_trades(fill.account_id, limit=10)

    # Assert
    assert trades == [
        TradeRow(
            fill.client_order_id,
            fill.instrument_id,
            "BUY",
            Decimal("0.1"),
            Decimal("49000.00"),
            "T-1",
            TS + 3_000,
        )
    ]
