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

    The interface is synchronous because the simulated venue is; network adapters implement
    its async twin, `AsyncVenue`, and `AsyncVenueAdapter` lifts a synchronous one to it.
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

    def history(self, client_order_id: str, account_id: str) -> list[ExecutionReport]:
        """What the venue did with one order, as reports; empty if it never received it."""
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


@runtime_checkable
class AsyncVenue(Protocol):
    """The async twin of `VenueAdapter`, for venues behind a network (ccxt) and routers.

    `history` answers "what do you know of this client order id?" from the venue's own
    record: the order's reports so far (a live venue may only tell its current state), or an
    empty list when the venue has no such order.
    """

    @property
    def venue(self) -> str:
        """The venue id served."""
        ...

    def route_for(self, command: OrderCommand) -> str:
        """The route (adapter) a SUBMIT will go to first: recorded in the sent-log."""
        ...

    async def submit(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        """Send a new order."""
        ...

    async def cancel(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        """Cancel a working order."""
        ...

    async def replace(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        """Amend a working order."""
        ...

    async def history(
        self, command: OrderCommand, route: str | None, now_ns: int
    ) -> list[ExecutionReport]:
        """What the venue (at `route` if known) says of the command's client order id."""
        ...

    async def on_market_data(self, event: Tick | BookSnapshot) -> list[ExecutionReport]:
        """Take market data (a live venue ignores it: it has its own market)."""
        ...

    async def cancel_all(
        self, now_ns: int, account_ids: Iterable[str] | None = None, reason: str | None = None
    ) -> list[ExecutionReport]:
        """Cancel every working order this adapter knows, or those of `account_ids`."""
        ...


class AsyncVenueAdapter:
    """A synchronous `VenueAdapter` (the simulated venue) seen as an `AsyncVenue`."""

    def __init__(self, adapter: VenueAdapter) -> None:
        self.adapter = adapter

    @property
    def venue(self) -> str:
        """The wrapped adapter's venue id."""
        return self.adapter.venue

    def route_for(self, command: OrderCommand) -> str:
        """The venue id: one route."""
        return self.adapter.venue

    async def submit(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        """See `VenueAdapter.submit`."""
        return self.adapter.submit(command, now_ns)

    async def cancel(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        """See `VenueAdapter.cancel`."""
        return self.adapter.cancel(command, now_ns)

    async def replace(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        """See `VenueAdapter.replace`."""
        return self.adapter.replace(command, now_ns)

    async def history(
        self, command: OrderCommand, route: str | None, now_ns: int
    ) -> list[ExecutionReport]:
        """See `VenueAdapter.history`."""
        return self.adapter.history(command.client_order_id, command.account_id)

    async def on_market_data(self, event: Tick | BookSnapshot) -> list[ExecutionReport]:
        """See `VenueAdapter.on_market_data`."""
        return self.adapter.on_market_data(event)

    async def cancel_all(
        self, now_ns: int, account_ids: Iterable[str] | None = None, reason: str | None = None
    ) -> list[ExecutionReport]:
        """See `VenueAdapter.cancel_all`."""
        return self.adapter.cancel_all(now_ns, account_ids, reason)


async def dispatch_async(
    adapter: AsyncVenue, command: OrderCommand, now_ns: int
) -> list[ExecutionReport]:
    """Route `command` to the async adapter method of its command type."""
    if command.command_type is CommandType.SUBMIT:
        return await adapter.submit(command, now_ns)
    if command.command_type is CommandType.CANCEL:
        return await adapter.cancel(command, now_ns)
    return await adapter.replace(command, now_ns)
