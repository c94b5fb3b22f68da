"""One clock interface: a wall clock for services, a simulated clock for tests and backtests."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

NANOS_PER_SECOND = 1_000_000_000


@runtime_checkable
class Clock(Protocol):
    """Time source for stage code: UTC nanoseconds since the Unix epoch."""

    def now_ns(self) -> int:
        """Return the current time in UTC nanoseconds."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait for `seconds` of this clock's time."""
        ...


def ns_to_datetime(ns: int) -> datetime:
    """Convert UTC nanoseconds to an aware datetime (microsecond precision)."""
    return datetime.fromtimestamp(ns / NANOS_PER_SECOND, tz=UTC).replace(
        microsecond=(ns // 1_000) % 1_000_000
    )


def datetime_to_ns(value: datetime) -> int:
    """Convert an aware datetime to UTC nanoseconds; naive datetimes are refused."""
    if value.tzinfo is None:
        raise ValueError("naive datetime: quantmesh times are UTC and must carry a timezone")
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * NANOS_PER_SECOND + delta.microseconds * 1_000


class WallClock:
    """The machine's real-time clock."""

    def now_ns(self) -> int:
        """Return the current wall time in UTC nanoseconds."""
        return time.time_ns()

    async def sleep(self, seconds: float) -> None:
        """Sleep in real time."""
        await asyncio.sleep(seconds)


class SimulatedClock:
    """A clock that only moves when told to: deterministic time for tests and backtests.

    Timers set with `call_at` fire in time order (then in the order they were set) as
    `advance_to` passes them; `sleep` suspends until the clock is advanced past its deadline.
    """

    def __init__(self, start_ns: int = 0) -> None:
        self._now = start_ns
        self._timers: list[tuple[int, int, Callable[[], None]]] = []
        self._counter = itertools.count()

    def now_ns(self) -> int:
        """Return the simulated time."""
        return self._now

    def call_at(self, when_ns: int, callback: Callable[[], None]) -> None:
        """Run `callback` when the clock reaches `when_ns`."""
        heapq.heappush(self._timers, (when_ns, next(self._counter), callback))

    def advance_to(self, when_ns: int) -> None:
        """Move time forward to `when_ns`, firing due timers in order; time never goes back."""
        if when_ns < self._now:
            raise ValueError(f"simulated time cannot go back: now={self._now}, requested={when_ns}")
        while self._timers and self._timers[0][0] <= when_ns:
            due, _, callback = heapq.heappop(self._timers)
            self._now = max(self._now, due)
            callback()
        self._now = when_ns

    def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`."""
        self.advance_to(self._now + int(seconds * NANOS_PER_SECOND))

    async def sleep(self, seconds: float) -> None:
        """Suspend until simulated time has advanced by `seconds`."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        self.call_at(self._now + int(seconds * NANOS_PER_SECOND), wake)
        await future
