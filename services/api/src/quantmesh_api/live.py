"""Per-account projections of the update topics, and the WebSocket fan-out with back-pressure."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pydantic import BaseModel

from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import Alert, ExecutionReport, Order, PortfolioSnapshot, Position

log = logging.getLogger(__name__)

#: How many fills, alerts and equity points an account's projection keeps.
HISTORY = 5_000
#: How many orders an account's projection remembers (only to drop updates older than the one
#: pushed; REST reads orders from PostgreSQL): the oldest are forgotten first.
ORDERS_KEPT = 1_000


@dataclass
class AccountView:
    """What the update topics said about one account, latest first where it matters."""

    orders: dict[str, Order] = field(default_factory=dict)
    positions: dict[str, Position] = field(default_factory=dict)
    snapshot: PortfolioSnapshot | None = None
    equity: deque[tuple[int, Decimal]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    fills: deque[ExecutionReport] = field(default_factory=lambda: deque(maxlen=HISTORY))


@dataclass(frozen=True, slots=True)
class Push:
    """One message for WebSocket clients: for one account's owner, or for admins (None).

    `source` is the event itself (or a ready dict): its JSON form is built only when a
    client takes it, so a replay or an update nobody watches costs no serialisation.
    """

    account_id: str | None
    channel: str
    source: BaseModel | dict[str, Any]

    @property
    def data(self) -> dict[str, Any]:
        """The JSON-ready body of the message."""
        source = self.source
        return source if isinstance(source, dict) else source.model_dump(mode="json")


class Projection:
    """Folds orders.updates, exec.reports, portfolio.* and alerts into AccountViews.

    Plain state: `apply` takes an envelope and returns what to push; no I/O.
    """

    def __init__(self) -> None:
        self.accounts: dict[str, AccountView] = {}
        self.alerts: deque[Alert] = deque(maxlen=HISTORY)

    def view(self, account_id: str) -> AccountView:
        """The account's view (empty until something arrived for it)."""
        return self.accounts.get(account_id) or AccountView()

    def _view(self, account_id: str) -> AccountView:
        view = self.accounts.get(account_id)
        if view is None:
            view = self.accounts[account_id] = AccountView()
        return view

    def apply(self, envelope: Envelope[Any]) -> list[Push]:
        """Fold one envelope in; return the pushes it causes (none for a stale update)."""
        return self.apply_payload(envelope.payload)

    def apply_payload(self, payload: Any) -> list[Push]:
        """Fold one event in (from an envelope, or a stored row at start); return the pushes."""
        if isinstance(payload, Order):
            view = self._view(payload.account_id)
            held = view.orders.get(payload.client_order_id)
            if held is not None and held.ts_last > payload.ts_last:
                return []
            view.orders[payload.client_order_id] = payload
            if len(view.orders) > ORDERS_KEPT:
                del view.orders[next(iter(view.orders))]
            return [Push(payload.account_id, "orders", payload)]
        if isinstance(payload, ExecutionReport):
            if not payload.is_fill:
                return []
            self._view(payload.account_id).fills.append(payload)
            return [Push(payload.account_id, "fills", payload)]
        if isinstance(payload, Position):
            view = self._view(payload.account_id)
            held_position = view.positions.get(payload.instrument_id)
            if held_position is not None and held_position.ts_event > payload.ts_event:
                return []
            view.positions[payload.instrument_id] = payload
            return [Push(payload.account_id, "positions", payload)]
        if isinstance(payload, PortfolioSnapshot):
            view = self._view(payload.account_id)
            if view.snapshot is not None and view.snapshot.ts_event >= payload.ts_event:
                return []
            view.snapshot = payload
            view.equity.append((payload.ts_event, payload.equity))
            for position in payload.positions:
                held_position = view.positions.get(position.instrument_id)
                if held_position is None or held_position.ts_event <= position.ts_event:
                    view.positions[position.instrument_id] = position
            return [Push(payload.account_id, "portfolio", payload)]
        if isinstance(payload, Alert):
            self.alerts.append(payload)
            return [Push(payload.account_id, "alerts", payload)]
        return []


#: Channels every client gets: latest prices and the collector's job statuses.
BROADCAST = frozenset({"prices", "collector"})


class Client:
    """One WebSocket connection: the accounts it may see and its bounded outbox."""

    def __init__(self, user_id: str, accounts: set[str], *, admin: bool, queue_size: int) -> None:
        self.user_id = user_id
        self.accounts = accounts
        self.admin = admin
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=queue_size)
        #: Set when the client fell behind: its sender closes the socket.
        self.dropped = asyncio.Event()

    def wants(self, push: Push) -> bool:
        """Return True if this client may and wants to see `push`."""
        if push.channel in BROADCAST:
            # Everyone's: READ_PORTFOLIO reads them over REST, and every WebSocket holds it.
            return True
        if push.account_id is None:
            return self.admin
        return push.account_id in self.accounts


class Hub:
    """Fans pushes out to clients without ever waiting on one: a full outbox drops the client."""

    def __init__(self) -> None:
        self.clients: set[Client] = set()
        self.dropped_total = 0

    def add(self, client: Client) -> None:
        """Register a connected client."""
        self.clients.add(client)

    def remove(self, client: Client) -> None:
        """Forget a client (disconnected or dropped)."""
        self.clients.discard(client)

    def publish(self, push: Push) -> int:
        """Queue `push` for every client that may see it; return how many got it."""
        delivered = 0
        message: dict[str, Any] | None = None
        for client in list(self.clients):
            if client.dropped.is_set() or not client.wants(push):
                continue
            if message is None:
                message = {
                    "channel": push.channel,
                    "account_id": push.account_id,
                    "data": push.data,
                }
            try:
                client.queue.put_nowait(message)
                delivered += 1
            except asyncio.QueueFull:
                log.warning(
                    "websocket client of user %s is too slow; dropping it",
                    client.user_id,
                    extra={"queue_size": client.queue.maxsize},
                )
                client.dropped.set()
                self.clients.discard(client)
                self.dropped_total += 1
        return delivered
