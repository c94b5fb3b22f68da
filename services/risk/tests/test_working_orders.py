"""An account's working orders summed per instrument and side: the sums read as a walk's would."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from quantmesh_common.messages import Side
from quantmesh_risk.engine import WorkingOrder, WorkingOrders

D = Decimal
BTC = "BTC-USDT.SIM"
ETH = "ETH-USDT.SIM"


def _walk(orders: dict[str, WorkingOrder], instrument: str, side: Side, skip: str | None) -> str:
    total = sum(
        (
            o.leaves
            for cid, o in orders.items()
            if o.instrument_id == instrument and o.side is side and cid != skip
        ),
        D(0),
    )
    return str(total)


def _walk_net(orders: dict[str, WorkingOrder], instrument: str, skip: str | None) -> str:
    total = sum(
        (
            o.leaves if o.side is Side.BUY else -o.leaves
            for cid, o in orders.items()
            if o.instrument_id == instrument and cid != skip
        ),
        D(0),
    )
    return str(total)


def test_leaves_when_orders_come_and_go_sum_the_working_ones_of_the_instrument_and_side() -> None:
    # Arrange
    orders = WorkingOrders()
    orders.put("a", WorkingOrder(BTC, Side.BUY, D("1.5")))
    orders.put("b", WorkingOrder(BTC, Side.BUY, D("0.25")))
    orders.put("c", WorkingOrder(BTC, Side.SELL, D(2)))
    orders.put("d", WorkingOrder(ETH, Side.BUY, D(7)))

    # Act
    orders.put("a", WorkingOrder(BTC, Side.BUY, D("0.5")))  # partly filled
    removed = orders.pop("b")

    # Assert: BTC buys 0.5; sells 2; net 0.5 - 2 = -1.5; without "c" no sells at all
    assert removed == WorkingOrder(BTC, Side.BUY, D("0.25"))
    assert orders.leaves(BTC, Side.BUY) == D("0.5")
    assert orders.leaves(BTC, Side.SELL) == D(2)
    assert orders.net(BTC) == D("-1.5")
    assert orders.leaves(BTC, Side.SELL, excluding=orders.get("c")) == D(0)
    assert orders.leaves(ETH, Side.SELL) == D(0)
    assert len(orders) == 3
    assert "b" not in orders
    assert orders.pop("b") is None


def test_leaves_when_the_finer_orders_left_read_as_a_fresh_sum() -> None:
    # Arrange: 1 + 0.25 leaves 1.25; once 0.25 is gone a walk gives "1", not "1.00"
    orders = WorkingOrders()
    orders.put("a", WorkingOrder(BTC, Side.BUY, D(1)))
    orders.put("b", WorkingOrder(BTC, Side.BUY, D("0.25")))

    # Act
    orders.pop("b")

    # Assert
    assert str(orders.leaves(BTC, Side.BUY)) == "1"
    assert str(orders.net(BTC)) == "1"


_ids = st.sampled_from(["o1", "o2", "o3", "o4", "o5"])
_orders = st.builds(
    WorkingOrder,
    st.sampled_from([BTC, ETH]),
    st.sampled_from([Side.BUY, Side.SELL]),
    st.decimals(min_value=D("0.001"), max_value=D(1000), places=3).map(lambda d: d.normalize())
    | st.sampled_from([D(1), D("1.0"), D("0.10"), D("2E+1")]),
)


@given(
    steps=st.lists(st.tuples(_ids, st.none() | _orders), max_size=40),
    skip=st.none() | _ids,
)
def test_sums_when_orders_are_put_and_popped_in_any_order_equal_a_walk_digit_for_digit(
    steps: list[tuple[str, WorkingOrder | None]], skip: str | None
) -> None:
    # Arrange
    orders = WorkingOrders()
    plain: dict[str, WorkingOrder] = {}

    # Act
    for cid, order in steps:
        if order is None:
            orders.pop(cid)
            plain.pop(cid, None)
        else:
            orders.put(cid, order)
            plain[cid] = order

    # Assert
    excluded = orders.get(skip) if skip is not None else None
    for instrument in (BTC, ETH):
        for side in (Side.BUY, Side.SELL):
            got = orders.leaves(instrument, side, excluding=excluded)
            assert str(got) == _walk(plain, instrument, side, skip)
        assert str(orders.net(instrument, excluding=excluded)) == _walk_net(plain, instrument, skip)
    assert len(orders) == len(plain)
