"""Averages, fee splits and conversions round half-even even if the thread's context does not.

ccxt's decimal_to_precision leaves the current decimal context at ROUND_HALF_UP; the books
divide with a stated context (Python's default: 28 digits, ROUND_HALF_EVEN), so a process
that reached ccxt values positions as one that did not. Each case below is a tie at the 29th
significant digit, where the two roundings differ in the last place.
"""

from __future__ import annotations

import decimal
from collections.abc import Iterator
from decimal import Decimal

import pytest

from quantmesh_portfolio.performance import TripBook
from quantmesh_portfolio.positions import PositionBook

D = Decimal
TS = 1_700_000_000_000_000_000
#: 1 + 1e-27 has 28 significant digits; (it + 1) / 2 = 1.0000000000000000000000000005 has 29.
TICK_UP = D("1.000000000000000000000000001")
HALF_EVEN_MEAN = D("1.000000000000000000000000000")


@pytest.fixture(autouse=True)
def half_up_thread() -> Iterator[None]:
    """The thread's context as ccxt leaves it: ROUND_HALF_UP, Underflow trapped."""
    context = decimal.Context(rounding=decimal.ROUND_HALF_UP)
    context.traps[decimal.Underflow] = True
    with decimal.localcontext(context):
        assert TICK_UP / 2 + D("0.5") == D("1.000000000000000000000000001")  # half-up here
        yield


def test_avg_entry_price_when_thread_rounds_half_up_is_the_half_even_mean() -> None:
    book = PositionBook("ACC-1", "BTC-USDT.BINANCE", "BTC", "USDT")
    book.apply_fill(+1, D(1), TICK_UP, TS)
    book.apply_fill(+1, D(1), D(1), TS)

    average = book.avg_entry_price
    event = book.to_event()

    assert average == HALF_EVEN_MEAN
    assert event.avg_entry_price == HALF_EVEN_MEAN


def test_round_trip_when_thread_rounds_half_up_has_half_even_entry_price_and_fee_split() -> None:
    book = TripBook("ACC-1", None, "BTC-USDT.BINANCE", "USDT")
    book.apply_fill(+1, D(1), TICK_UP, D(0), TS, "F-1")
    book.apply_fill(+1, D(1), D(1), D(0), TS, "F-2")
    fee = D("3.000000000000000000000000001")

    closed = book.apply_fill(-1, D(2), D(1), D(0), TS, "F-3")
    opened_and_closed = TripBook("ACC-1", None, "ETH-USDT.BINANCE", "USDT")
    opened_and_closed.apply_fill(+1, D(1), D(1), D(0), TS, "F-4")
    split = opened_and_closed.apply_fill(-1, D(2), D(1), fee, TS, "F-5")

    assert closed is not None
    assert closed.trip.entry_price == HALF_EVEN_MEAN
    assert split is not None
    # Half the fee (1 of the 2 sold closes the trip): 1.5000000000000000000000000005 half-even.
    assert split.trip.fees == D("1.500000000000000000000000000")
    assert split.pnl == D("-1.500000000000000000000000000")
