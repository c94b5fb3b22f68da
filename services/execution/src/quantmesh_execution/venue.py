"""The venue adapter interface: what the execution stage asks of a venue, simulated or live."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from quantmesh_common.messages import (
    BookSnapshot,
    CommandType,
    ExecutionReport,
    OrderCommand,
    Tick,
)


@runtime_checkable
class VenueAdapter(Protocol):
    """One venue: takes order commands and market data, answers with execution reports.

    Every method gets the time it happens at (UTC ns) instead of reading a clock, and returns
    the reports the venue produced in order — possibly none (e.g. a command still travelling
    under a latency model, or a duplicate). Reports of one order are always returned in the
    order the venue produced them: ACCEPTED before its fills, fills before a CANCELED remainder.

    The interface is synchronous because the simulated venue is; a network adapter (ccxt) will
    need an async twin of it, which is not written yet.
    """

    @property
    def venue(self) -> str:
        """The venue id this adapter serves, e.g. "SIM" or "BINANCE"."""
        ...

    def submit(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        """Send a new order (a SUBMIT command); at most one venue order per client order id."""
        ...

    def cancel(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        """Cancel a working order (a CANCEL command)."""
        ...

    def replace(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        """Change a working order's quantity or prices (a REPLACE command)."""
        ...

    def on_market_data(self, event: Tick | BookSnapshot) -> list[ExecutionReport]:
        """Take a trade, a quote or a book; a simulated venue matches its resting orders on it."""
        ...

    def advance(self, now_ns: int) -> list[ExecutionReport]:
        """Let venue time reach `now_ns`: delayed orders activate, GTD orders expire."""
        ...

    def cancel_all(
        self, now_ns: int, account_ids: Iterable[str] | None = None, reason: str | None = None
    ) -> list[ExecutionReport]:
        """Cancel every working order, or those of `account_ids` (an operator's command)."""
        ...


def dispatch(adapter: VenueAdapter, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
    """Route `command` to the adapter method of its command type."""
    if command.command_type is CommandType.SUBMIT:
        return adapter.submit(command, now_ns)
    if command.command_type is CommandType.CANCEL:
        return adapter.cancel(command, now_ns)
    return adapter.replace(command, now_ns)
