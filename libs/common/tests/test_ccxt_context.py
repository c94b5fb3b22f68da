"""ccxt's decimal_to_precision changes the caller's decimal context; the guards keep it out."""

from __future__ import annotations

import asyncio
import decimal
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.ccxt_context import (
    DecimalGuarded,
    awaited_in_own_context,
    ccxt_decimal_context,
    decimal_guarded,
)

ccxt_precision = pytest.importorskip("ccxt.base.decimal_to_precision")
ROUND, DECIMAL_PLACES = ccxt_precision.ROUND, ccxt_precision.DECIMAL_PLACES


def ccxt_round(value: str, places: int) -> str:
    """ccxt's own rounding of `value` to `places` decimals (its price_to_precision's core)."""
    result: str = ccxt_precision.decimal_to_precision(value, ROUND, places, DECIMAL_PLACES)
    return result


def settings(context: decimal.Context) -> tuple[Any, ...]:
    """What decides how a Decimal computes (flags left out: they record, they do not decide)."""
    traps = tuple(sorted((t.__name__, on) for t, on in context.traps.items()))
    return (context.prec, context.rounding, context.Emin, context.Emax, context.clamp, traps)


def half_rounded() -> Decimal:
    """2.5 to a whole number with the current context's rounding: 2 half-even, 3 half-up."""
    return Decimal("2.5").quantize(Decimal("1"))


class FakeExchange:
    """An object shaped like a ccxt exchange whose methods run ccxt's real rounding."""

    def __init__(self) -> None:
        self.markets: dict[str, Any] = {"BTC/USDT": {"precision": {"price": 2}}}
        self.started: list[asyncio.Task[str]] = []

    def price_to_precision(self, price: str) -> str:
        return ccxt_round(price, 2)

    async def create_order(self, price: str) -> str:
        await asyncio.sleep(0)  # ccxt awaits its HTTP reply, then formats and parses
        return ccxt_round(price, 2)

    async def watch(self, price: str) -> str:
        # A receive loop started during the call and running after it, as ccxt.pro's is.
        self.started.append(asyncio.get_running_loop().create_task(self.create_order(price)))
        return "subscribed"


def test_decimal_to_precision_when_called_unguarded_leaves_the_thread_rounding_half_up() -> None:
    before = decimal.getcontext()
    assert half_rounded() == Decimal(2)

    assert ccxt_round("1.005", 2) == "1.01"

    assert decimal.getcontext() is before
    assert before.rounding == decimal.ROUND_HALF_UP
    assert before.traps[decimal.Underflow]
    assert half_rounded() == Decimal(3)


async def test_decimal_to_precision_when_called_in_a_child_task_changes_the_parent_task() -> None:
    async def child() -> str:
        return ccxt_round("1.005", 2)

    await asyncio.create_task(child())

    # The task copied the reference to the same Context object, and ccxt changed it in place.
    assert decimal.getcontext().rounding == decimal.ROUND_HALF_UP
    assert half_rounded() == Decimal(3)


def test_ccxt_decimal_context_when_ccxt_rounds_inside_keeps_the_callers_context() -> None:
    before = decimal.getcontext()
    expected = settings(before)

    with ccxt_decimal_context():
        rounded = ccxt_round("1.005", 2)

    assert rounded == "1.01"
    assert decimal.getcontext() is before
    assert settings(before) == expected
    assert half_rounded() == Decimal(2)


async def test_awaited_in_own_context_when_ccxt_rounds_after_an_await_keeps_the_task() -> None:
    before = decimal.getcontext()
    expected = settings(before)

    rounded = await awaited_in_own_context(FakeExchange().create_order("2.345"))

    assert rounded == "2.35"
    assert decimal.getcontext() is before
    assert settings(before) == expected
    assert half_rounded() == Decimal(2)


async def test_awaited_in_own_context_when_suspended_other_tasks_keep_half_even() -> None:
    gate = asyncio.Event()
    seen: list[Decimal] = []

    async def ccxt_call() -> str:
        rounded = ccxt_round("2.345", 2)  # ccxt has changed its context, then waits
        await gate.wait()
        return rounded

    async def ours() -> None:
        seen.append(half_rounded())
        gate.set()

    call = asyncio.create_task(awaited_in_own_context(ccxt_call()))
    await asyncio.sleep(0)  # the ccxt call runs up to its wait
    await asyncio.create_task(ours())
    rounded = await call

    assert (rounded, seen) == ("2.35", [Decimal(2)])
    assert half_rounded() == Decimal(2)


def test_decimal_guarded_when_a_sync_method_rounds_keeps_context_and_attributes() -> None:
    before = decimal.getcontext()
    expected = settings(before)
    exchange = FakeExchange()
    guarded = decimal_guarded(exchange)

    rounded = guarded.price_to_precision("0.125")
    guarded.markets = {"ETH/USDT": {}}

    assert rounded == "0.13"  # ccxt's half-up, inside
    assert settings(decimal.getcontext()) == expected
    assert half_rounded() == Decimal(2)
    assert exchange.markets == {"ETH/USDT": {}}
    assert guarded.markets is exchange.markets
    assert guarded.unwrapped is exchange
    assert decimal_guarded(guarded) is guarded


async def test_decimal_guarded_when_an_async_method_rounds_keeps_the_tasks_context() -> None:
    before = decimal.getcontext()
    expected = settings(before)
    guarded = DecimalGuarded(FakeExchange())

    rounded = await guarded.create_order("0.125")

    assert rounded == "0.13"
    assert decimal.getcontext() is before
    assert settings(before) == expected
    assert half_rounded() == Decimal(2)


async def test_decimal_guarded_when_the_call_starts_a_task_that_task_cannot_reach_ours() -> None:
    exchange = FakeExchange()
    guarded = DecimalGuarded(exchange)
    expected = settings(decimal.getcontext())

    answer = await guarded.watch("0.125")
    rounded = await exchange.started[0]  # ran after the guarded call had returned

    assert (answer, rounded) == ("subscribed", "0.13")
    assert settings(decimal.getcontext()) == expected
    assert half_rounded() == Decimal(2)


def test_decimal_guarded_when_a_method_is_replaced_on_the_target_calls_the_new_one() -> None:
    exchange = FakeExchange()
    guarded = DecimalGuarded(exchange)
    first = guarded.price_to_precision

    again = guarded.price_to_precision
    guarded.price_to_precision = lambda price: f"stub {price}"
    replaced = guarded.price_to_precision("0.125")

    assert again is first  # one wrapper per method, not one per attribute read
    assert first("0.125") == "0.13"
    assert replaced == "stub 0.125"
