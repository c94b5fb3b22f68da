"""The venue adapter interface: what the execution stage asks of a venue, simulated or live."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from quantmesh_common.messages import (
    BookSnapshot,
    CommandType,
    ExecType,
    ExecutionReport,
    OrderCommand,
    OrderStatus,
    Side,
    Tick,
    format_reason,
)

#: Reason code of the answer to a QUERY for an order the venue does not have.
UNKNOWN_ORDER = "UNKNOWN_ORDER"


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


def unknown_order(command: OrderCommand, now_ns: int) -> ExecutionReport:
    """The answer to a QUERY for an order the venue does not have: REJECTED, UNKNOWN_ORDER.

    Its report id derives from the QUERY's command id, so a redelivered QUERY answers the same.
    """
    return ExecutionReport(
        report_id=f"{command.command_id}-R",
        account_id=command.account_id,
        client_order_id=command.client_order_id,
        venue_order_id=command.venue_order_id,
        strategy_id=command.strategy_id,
        instrument_id=command.instrument_id,
        exec_type=ExecType.REJECTED,
        order_status=OrderStatus.REJECTED,
        side=command.side or Side.BUY,  # the model needs a side; a QUERY need not carry one
        reason=format_reason(
            UNKNOWN_ORDER, {"client_order_id": command.client_order_id, "venue": command.venue}
        ),
        ts_event=now_ns,
    )


def answer_query(
    command: OrderCommand, history: list[ExecutionReport], now_ns: int
) -> list[ExecutionReport]:
    """The order's reports as the venue made them, or one UNKNOWN_ORDER rejection."""
    return history if history else [unknown_order(command, now_ns)]


def dispatch(adapter: VenueAdapter, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
    """Route `command` to the adapter method of its command type (QUERY: its history)."""
    kind = command.command_type
    if kind is CommandType.SUBMIT:
        return adapter.submit(command, now_ns)
    if kind is CommandType.CANCEL:
        return adapter.cancel(command, now_ns)
    if kind is CommandType.REPLACE:
        return adapter.replace(command, now_ns)
    if kind is CommandType.QUERY:
        history = adapter.history(command.client_order_id, command.account_id)
        return answer_query(command, history, now_ns)
    raise ValueError(f"unsupported command type {kind}")


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
    adapter: AsyncVenue, command: OrderCommand, now_ns: int, route: str | None = None
) -> list[ExecutionReport]:
    """Route `command` to the async adapter method of its command type.

    QUERY asks the venue (at `route`, the one the sent-log recorded, if known) for the order.
    """
    kind = command.command_type
    if kind is CommandType.SUBMIT:
        return await adapter.submit(command, now_ns)
    if kind is CommandType.CANCEL:
        return await adapter.cancel(command, now_ns)
    if kind is CommandType.REPLACE:
        return await adapter.replace(command, now_ns)
    if kind is CommandType.QUERY:
        return answer_query(command, await adapter.history(command, route, now_ns), now_ns)
    raise ValueError(f"unsupported command type {kind}")
