"""Calls into ccxt under a decimal context of their own, so ccxt cannot change the caller's.

ccxt's `decimal_to_precision` (behind `amount_to_precision`, `price_to_precision`,
`cost_to_precision`, and so behind every `create_order`) does `context = decimal.getcontext();
context.traps[Underflow] = True; context.rounding = ROUND_HALF_UP` and never restores them. It
changes that Context object in place, and the object is shared: the thread's top-level code and
every asyncio task that never set a context of its own hold the same one (a task copies the
reference when it is created, not the object). So one ccxt call in any task left every later
Decimal of the thread rounding half-up, where our code assumes Python's default (28 digits,
ROUND_HALF_EVEN).

Each guard here runs ccxt under `decimal.localcontext()`: a copy of the caller's context is
current while ccxt runs (ccxt changes the copy) and the caller's own object is current again
afterwards, unchanged. For an awaited call the copy stays current in the awaiting task across
the await (ccxt parses replies in that task), and tasks ccxt starts meanwhile (a websocket's
receive loop, the rate limiter) inherit the copy, never the caller's context. This module does
not import ccxt.
"""

from __future__ import annotations

import decimal
import types
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

T = TypeVar("T")


def ccxt_decimal_context() -> AbstractContextManager[decimal.Context]:
    """A block whose decimal context changes (ccxt's) are undone when it ends."""
    return decimal.localcontext()


async def awaited_in_own_context(awaitable: Awaitable[T]) -> T:
    """Await `awaitable` (a ccxt coroutine, not started yet) under a copy of our context."""
    with decimal.localcontext():
        return await awaitable


_METHODS = (types.MethodType, types.FunctionType, types.BuiltinMethodType)


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        with decimal.localcontext():
            result = method(*args, **kwargs)
        if hasattr(type(result), "__await__"):  # a coroutine or future: ccxt runs when awaited
            return awaited_in_own_context(result)
        return result

    call.__name__ = getattr(method, "__name__", "call")
    call.__doc__ = method.__doc__
    return call


class DecimalGuarded:
    """`target` (a ccxt exchange) with every method called through this wrapper guarded.

    Attribute reads and writes pass through (`markets`, `urls`, `has`, `precisionMode`...); a
    method comes back wrapped so that it, and the awaiting of what it returns, runs under a
    copy of the caller's decimal context. ccxt's calls among its own methods are not wrapped
    again: only the boundary pays for the copy.
    """

    __slots__ = ("_target", "_wrapped")

    def __init__(self, target: Any) -> None:
        object.__setattr__(self, "_target", target)
        # name -> (the method as last read, its wrapper): made once, not on every call.
        object.__setattr__(self, "_wrapped", {})

    @property
    def unwrapped(self) -> Any:
        """The wrapped object itself."""
        return self._target

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not isinstance(value, _METHODS):
            return value
        cached = self._wrapped.get(name)
        if cached is not None and cached[0] == value:  # same function bound to the same object
            return cached[1]
        wrapper = _guarded(value)
        self._wrapped[name] = (value, wrapper)
        return wrapper

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._target, name)

    def __repr__(self) -> str:
        return f"DecimalGuarded({self._target!r})"


def decimal_guarded(target: Any) -> Any:
    """`target` wrapped in DecimalGuarded (once: an already wrapped object is returned as is)."""
    return target if isinstance(target, DecimalGuarded) else DecimalGuarded(target)
