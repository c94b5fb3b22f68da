"""The ccxt live adapter: orders on real venues, with retries, a circuit breaker and failover.

One `CcxtRoute` is one ccxt exchange (e.g. binance) with its credentials, rate limit, retry
policy and circuit breaker; a `CcxtVenue` serves one venue id (QM_VENUE) over one or more
routes, in order, failing over to the next route only when an order certainly did not reach
the current one. The client order id goes to the venue with every order (ccxt's unified
`clientOrderId` parameter), so the venue itself can be asked about it after a crash or an
ambiguous failure.

Retries: only on ccxt's NetworkError family (RequestTimeout, ExchangeNotAvailable,
DDoSProtection, ...), with exponential backoff. A create that failed that way may still have
reached the venue (a timeout, or a 5xx whose outcome the venue calls unknown), so before
sending again the adapter asks the venue for the client order id and adopts the order if it
is there: at most one order per client order id. A refusal (InvalidOrder, InsufficientFunds
and every other ExchangeError) is never retried and becomes a REJECTED report.

If the venue cannot be reached even to ask, the outcome is unknown: the adapter raises
`VenueUnreachable`, a BaseException, so the stage stops without committing and the command
is redelivered after the restart, where the sent-log sends it to `history` instead.

Every call into ccxt runs under a copy of the caller's decimal context (quantmesh_common.
ccxt_context): ccxt's amount_to_precision and price_to_precision set ROUND_HALF_UP on the
current context in place, which would otherwise change how the whole process rounds.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Context, Decimal
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import ccxt.async_support as ccxt_async  # type: ignore[import-untyped]
from ccxt.base import errors as ccxt_errors  # type: ignore[import-untyped]

from quantmesh_common.ccxt_context import awaited_in_own_context, ccxt_decimal_context
from quantmesh_common.messages import (
    BookSnapshot,
    CommandType,
    ExecType,
    ExecutionReport,
    InstrumentId,
    LiquiditySide,
    OrderCommand,
    OrderStatus,
    OrderType,
    Side,
    Tick,
    TimeInForce,
    format_reason,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
_ZERO = Decimal(0)
#: Python's default context, stated: the thread's may have been changed (ccxt sets ROUND_HALF_UP).
_AVERAGE = Context(prec=28, rounding=ROUND_HALF_EVEN)
_NS_PER_MS = 1_000_000
REDACTED = "***"

#: ccxt's transient failures: the request may be tried again. (All subclass NetworkError.)
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (ccxt_errors.NetworkError,)


class VenueUnreachable(BaseException):
    """Whether an order reached the venue cannot be known now: stop and let Kafka redeliver.

    A BaseException so that the bus neither dead-letters the command nor commits its offset.
    """


class CircuitOpenError(Exception):
    """The route's circuit breaker is open: the request was not sent."""


#: Failures after which the venue could not be asked (network, or the breaker refused).
_UNREACHABLE: tuple[type[Exception], ...] = (*TRANSIENT_ERRORS, CircuitOpenError)


class _NotSentError(Exception):
    """The order certainly did not reach this route (breaker open, or the venue says so)."""


# --------------------------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    """A venue's API credentials; never shown by repr, str or logs."""

    api_key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (
            f"Credentials(api_key={self._shown(self.api_key)}, secret={self._shown(self.secret)})"
        )

    __str__ = __repr__

    @staticmethod
    def _shown(value: str | None) -> str:
        return "None" if value is None else REDACTED

    @property
    def values(self) -> list[str]:
        """The secret strings, for redaction."""
        return [v for v in (self.api_key, self.secret, self.password) if v]

    def config(self) -> dict[str, str]:
        """The ccxt constructor entries."""
        entries = {"apiKey": self.api_key, "secret": self.secret, "password": self.password}
        return {k: v for k, v in entries.items() if v}

    @classmethod
    def from_env(cls, exchange_id: str, environ: Mapping[str, str] | None = None) -> Credentials:
        """Read `QM_<ID>_API_KEY`, `_API_SECRET`, `_API_PASSWORD`, each or its `_FILE` twin.

        A `_FILE` variable names a file holding the value (a mounted secret); its trailing
        newline is dropped. A missing file raises ValueError naming the variable.
        """
        env = os.environ if environ is None else environ
        prefix = f"QM_{exchange_id.upper()}_API_"

        def read(name: str) -> str | None:
            value = env.get(prefix + name)
            path = env.get(f"{prefix}{name}_FILE")
            if value is None and path:
                try:
                    value = Path(path).read_text().rstrip("\r\n")
                except OSError as exc:
                    raise ValueError(f"{prefix}{name}_FILE: cannot read {path}: {exc}") from None
            return value or None

        return cls(read("KEY"), read("SECRET"), read("PASSWORD"))


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret value replaced by ***."""
    for value in secrets:
        if value:
            text = text.replace(value, REDACTED)
    return text


class _RedactSecrets(logging.Filter):
    """Removes known secrets from records: ccxt logs request headers (the API key) at DEBUG."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            cleaned = redact(message, self.secrets)
            if cleaned != message:
                record.msg, record.args = cleaned, None
        return True


_SECRET_FILTER = _RedactSecrets()
#: The loggers that may see credentials: ccxt's own, and this module's.
_GUARDED_LOGGERS = ("ccxt", "ccxt.base.exchange", __name__)


def guard_logs(credentials: Credentials) -> None:
    """Make sure `credentials` never appear in what ccxt or this adapter logs."""
    _SECRET_FILTER.secrets.update(credentials.values)
    for name in _GUARDED_LOGGERS:
        logger = logging.getLogger(name)
        if _SECRET_FILTER not in logger.filters:
            logger.addFilter(_SECRET_FILTER)


# --------------------------------------------------------------------------------------------
# Retries and the circuit breaker
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff: attempt n waits base x factor^(n-1), capped, with +-jitter."""

    attempts: int = 4
    base_delay_s: float = 0.2
    factor: float = 2.0
    max_delay_s: float = 5.0
    jitter: float = 0.1

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based)."""
        raw = min(self.max_delay_s, self.base_delay_s * self.factor ** (attempt - 1))
        return raw * (1 + random.uniform(-self.jitter, self.jitter))


class BreakerState(enum.Enum):
    """Where a circuit breaker is."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failures; one probe after `reset_after_s`.

    While open every call fails fast (nothing is sent). After `reset_after_s` the breaker is
    half-open: one call goes through as a probe; its success closes the breaker, its failure
    opens it again for another `reset_after_s`. Only transient (network) failures count: a
    venue that answers "invalid order" is up.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker past its timeout reads half-open)."""
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self.reset_after_s
        ):
            self._state = BreakerState.HALF_OPEN
            self._probing = False
        return self._state

    def available(self) -> bool:
        """True if a call would be let through now (does not take the probe)."""
        state = self.state
        return state is BreakerState.CLOSED or (
            state is BreakerState.HALF_OPEN and not self._probing
        )

    def before_call(self) -> None:
        """Raise CircuitOpenError unless a call may go now; a half-open breaker lets one."""
        state = self.state
        if state is BreakerState.CLOSED:
            return
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return
        raise CircuitOpenError(f"circuit open ({self._failures} consecutive failures)")

    def success(self) -> None:
        """The venue answered: close."""
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probing = False

    def failure(self) -> None:
        """A transient failure: count it; open at the threshold, or at once when probing."""
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            if self._state is not BreakerState.OPEN:
                log.warning("circuit breaker opened after %d failures", self._failures)
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self._probing = False


# --------------------------------------------------------------------------------------------
# One route: one ccxt exchange
# --------------------------------------------------------------------------------------------


def point_at(exchange: Any, base_url: str) -> None:
    """Send every API request of `exchange` to `base_url` (scheme://host:port), paths kept.

    For a local stand-in of the venue (tests) or a proxy: `exchange.urls['api']` is rewritten.
    """
    target = urlsplit(base_url)

    def rewrite(value: Any) -> Any:
        if isinstance(value, str):
            parts = urlsplit(value)
            return parts._replace(scheme=target.scheme, netloc=target.netloc).geturl()
        if isinstance(value, dict):
            return {k: rewrite(v) for k, v in value.items()}
        return value

    exchange.urls["api"] = rewrite(exchange.urls["api"])


def build_exchange(
    exchange_id: str,
    credentials: Credentials,
    *,
    sandbox: bool = False,
    timeout_ms: int = 10_000,
    base_url: str | None = None,
) -> Any:
    """A ccxt.async_support exchange: rate-limited, spot markets only, sandbox if asked."""
    cls = getattr(ccxt_async, exchange_id, None)
    if cls is None:
        raise ValueError(f"unknown ccxt exchange {exchange_id!r}")
    guard_logs(credentials)
    with ccxt_decimal_context():
        exchange = _construct(cls, credentials, sandbox, timeout_ms)
    if base_url:
        point_at(exchange, base_url)
    return exchange


def _construct(cls: Any, credentials: Credentials, sandbox: bool, timeout_ms: int) -> Any:
    exchange = cls(
        {
            **credentials.config(),
            "enableRateLimit": True,  # ccxt's own throttle at the venue's documented rate
            "timeout": timeout_ms,
            "options": {
                "fetchMarkets": {"types": ["spot"]},
                "fetchCurrencies": False,  # a private call per start, not needed to trade
                "fetchMargins": False,
            },
        }
    )
    if sandbox:
        exchange.set_sandbox_mode(True)
    return exchange


class CcxtRoute:
    """One ccxt exchange: retries on transient errors, a circuit breaker, redacted errors."""

    def __init__(
        self,
        name: str,
        exchange: Any,
        credentials: Credentials | None = None,
        *,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.name = name
        self.exchange = exchange
        self.credentials = credentials or Credentials()
        self.retry = retry or RetryPolicy()
        self.breaker = breaker or CircuitBreaker()
        self._sleep = sleep
        self._markets_loaded = False
        guard_logs(self.credentials)

    def __repr__(self) -> str:
        return (
            f"CcxtRoute(name={self.name!r}, breaker={self.breaker.state.value}, "
            f"credentials={self.credentials!r})"
        )

    def redact(self, text: str) -> str:
        """`text` without this route's secrets."""
        return redact(text, self.credentials.values)

    async def once(self, what: str, call: Callable[[], Awaitable[T]], *, lookup: bool = False) -> T:
        """One attempt through the breaker; transient failures counted, refusals not.

        A `lookup` (asking for an order after an ambiguous failure) is not gated by an open
        breaker, since only its answer tells whether an order is at the venue, and its success
        does not close the breaker: reads working says nothing of order entry.
        """
        if not lookup:
            self.breaker.before_call()
        if not self._markets_loaded:
            try:
                await awaited_in_own_context(self.exchange.load_markets())
            except TRANSIENT_ERRORS:
                self.breaker.failure()
                raise
            self._markets_loaded = True
        try:
            result = await awaited_in_own_context(call())
        except TRANSIENT_ERRORS as exc:
            self.breaker.failure()
            log.warning(
                "%s on %s failed (transient): %s",
                what,
                self.name,
                self.redact(f"{type(exc).__name__}: {exc}"),
            )
            raise
        except ccxt_errors.BaseError:
            if not lookup:
                self.breaker.success()  # the venue answered; it refused
            raise
        if not lookup:
            self.breaker.success()
        return result

    async def retried(
        self, what: str, call: Callable[[], Awaitable[T]], *, lookup: bool = False
    ) -> T:
        """`once`, retried with backoff on transient errors (idempotent calls only)."""
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return await self.once(what, call, lookup=lookup)
            except TRANSIENT_ERRORS:
                if attempt == self.retry.attempts:
                    raise
                await self._sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close the exchange's HTTP session."""
        await awaited_in_own_context(self.exchange.close())


# --------------------------------------------------------------------------------------------
# The venue: routes, failover, reports
# --------------------------------------------------------------------------------------------


def ccxt_symbol(instrument_id: str) -> str:
    """`BTC-USDT.BINANCE` -> `BTC/USDT` (a spot symbol)."""
    parts = InstrumentId.parse(instrument_id)
    return f"{parts.base}/{parts.quote}"


_ORDER_TYPES = {
    OrderType.MARKET: "market",
    OrderType.LIMIT: "limit",
    OrderType.STOP: "market",
    OrderType.STOP_LIMIT: "limit",
}


class CcxtVenue:
    """An `AsyncVenue` over ccxt routes (tried in order: failover when an order was not sent)."""

    def __init__(self, venue: str, routes: list[CcxtRoute]) -> None:
        if not routes:
            raise ValueError("a live venue needs at least one route")
        self._venue = venue
        self.routes = routes
        self._by_name = {r.name: r for r in routes}
        # Orders placed by this process: client order id -> (route, venue order id, command).
        self._placed: dict[str, tuple[CcxtRoute, str, OrderCommand]] = {}

    def __repr__(self) -> str:
        return f"CcxtVenue(venue={self._venue!r}, routes={self.routes!r})"

    @property
    def venue(self) -> str:
        """The venue id served."""
        return self._venue

    def route_for(self, command: OrderCommand) -> str:
        """The first route whose breaker lets a call through, else the first route."""
        for route in self.routes:
            if route.breaker.available():
                return route.name
        return self.routes[0].name

    # -- commands ----------------------------------------------------------------------------

    async def submit(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        """Place the order on the first route that takes it; REJECTED if every route refuses."""
        unavailable: list[str] = []
        for route in self.routes:
            try:
                order = await self._create(route, command)
            except _NotSentError as not_sent:
                unavailable.append(f"{route.name}={not_sent}")
                continue
            except ccxt_errors.BaseError as exc:  # a refusal: InvalidOrder, InsufficientFunds...
                reason = format_reason(
                    "VENUE_REJECTED",
                    {"route": route.name, "error": route.redact(f"{type(exc).__name__}: {exc}")},
                )
                return [self._rejected(command, reason[:2000], now_ns)]
            if unavailable:
                log.warning(
                    "order %s failed over to %s",
                    command.client_order_id,
                    route.name,
                    extra={"client_order_id": command.client_order_id, "skipped": unavailable},
                )
            return await self._reports(route, command, order, now_ns)
        reason = format_reason("NO_ROUTE_AVAILABLE", {"routes": "; ".join(unavailable)})
        return [self._rejected(command, reason, now_ns)]

    async def _create(self, route: CcxtRoute, command: OrderCommand) -> dict[str, Any]:
        assert command.side is not None
        assert command.order_type is not None
        assert command.quantity is not None
        symbol = ccxt_symbol(command.instrument_id)
        params: dict[str, Any] = {"clientOrderId": command.client_order_id}
        if command.stop_price is not None:
            params["stopPrice"] = float(command.stop_price)
        if command.order_type is not OrderType.MARKET and command.time_in_force in (
            TimeInForce.IOC,
            TimeInForce.FOK,
            TimeInForce.GTC,
        ):
            params["timeInForce"] = command.time_in_force.value
        if command.post_only:
            params["postOnly"] = True
        price = float(command.limit_price) if command.limit_price is not None else None
        order_type, side, quantity = command.order_type, command.side, command.quantity

        async def create() -> dict[str, Any]:
            result: dict[str, Any] = await route.exchange.create_order(
                symbol,
                _ORDER_TYPES[order_type],
                side.value.lower(),
                float(quantity),
                price,
                params,
            )
            return result

        for attempt in range(1, route.retry.attempts + 1):
            try:
                return await route.once("create_order", create)
            except CircuitOpenError as exc:
                raise _NotSentError(str(exc)) from None
            except TRANSIENT_ERRORS:
                # The order may have arrived: ask before sending it again.
                found = await self._find_after_failure(route, command)
                if found is not None:
                    return found
                if attempt == route.retry.attempts:
                    raise _NotSentError(f"{attempt} attempts failed") from None
                await route._sleep(route.retry.delay(attempt))
        raise AssertionError("unreachable")

    async def _find_after_failure(
        self, route: CcxtRoute, command: OrderCommand
    ) -> dict[str, Any] | None:
        """The venue's order for the client order id, None if it has none; raises if unknowable."""
        try:
            return await self._fetch(route, command)
        except _UNREACHABLE as exc:
            raise VenueUnreachable(
                f"{route.name}: cannot tell whether {command.client_order_id} arrived: "
                + route.redact(str(exc))
            ) from None

    async def _fetch(self, route: CcxtRoute, command: OrderCommand) -> dict[str, Any] | None:
        symbol = ccxt_symbol(command.instrument_id)

        async def fetch() -> dict[str, Any] | None:
            try:
                result: dict[str, Any] = await route.exchange.fetch_order(
                    None, symbol, {"clientOrderId": command.client_order_id}
                )
            except ccxt_errors.OrderNotFound:
                return None
            return result

        return await route.retried("fetch_order", fetch, lookup=True)

    async def cancel(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        """Cancel by client order id on the route the order went to."""
        route = self._route_of(command)
        symbol = ccxt_symbol(command.instrument_id)

        async def cancel() -> dict[str, Any]:
            result: dict[str, Any] = await route.exchange.cancel_order(
                command.venue_order_id, symbol, {"clientOrderId": command.client_order_id}
            )
            return result

        try:
            order = await route.retried("cancel_order", cancel)
        except _UNREACHABLE as exc:
            reason = format_reason("VENUE_UNAVAILABLE", {"route": route.name, "error": str(exc)})
            return [self._cancel_rejected(command, route.redact(reason), now_ns)]
        except ccxt_errors.BaseError as exc:
            code = "ORDER_NOT_FOUND" if isinstance(exc, ccxt_errors.OrderNotFound) else "REFUSED"
            reason = format_reason(code, {"route": route.name, "error": type(exc).__name__})
            return [self._cancel_rejected(command, reason, now_ns)]
        self._placed.pop(command.client_order_id, None)
        return [self._report(route, command, order, ExecType.CANCELED, now_ns)]

    async def replace(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        """Not supported on live venues yet: refused, the order unchanged."""
        reason = format_reason("REPLACE_NOT_SUPPORTED", {"venue": self._venue})
        return [self._cancel_rejected(command, reason, now_ns)]

    async def history(
        self, command: OrderCommand, route: str | None, now_ns: int
    ) -> list[ExecutionReport]:
        """Ask the route (or every route) for the client order id; its reports, or []."""
        candidates = [self._by_name[route]] if route in self._by_name else self.routes
        for candidate in candidates:
            try:
                order = await self._fetch(candidate, command)
            except _UNREACHABLE as exc:
                raise VenueUnreachable(
                    f"{candidate.name}: cannot ask for {command.client_order_id}: "
                    + candidate.redact(str(exc))
                ) from None
            if order is not None:
                return await self._reports(candidate, command, order, now_ns)
        return []

    async def on_market_data(self, event: Tick | BookSnapshot) -> list[ExecutionReport]:
        """A live venue has its own market: nothing to do."""
        return []

    async def cancel_all(
        self, now_ns: int, account_ids: Iterable[str] | None = None, reason: str | None = None
    ) -> list[ExecutionReport]:
        """Cancel every order this process placed and has not seen end (of `account_ids`)."""
        accounts = set(account_ids) if account_ids is not None else None
        reports: list[ExecutionReport] = []
        for _route, venue_order_id, placed in list(self._placed.values()):
            if accounts is not None and placed.account_id not in accounts:
                continue
            cancel = placed.model_copy(
                update={
                    "command_type": CommandType.CANCEL,
                    "command_id": f"{placed.command_id}-cancel-all",
                    "venue_order_id": venue_order_id,
                }
            )
            reports.extend(await self.cancel(cancel, now_ns))
        return reports

    async def close(self) -> None:
        """Close every route's HTTP session."""
        for route in self.routes:
            await route.close()

    # -- reports -----------------------------------------------------------------------------

    def _route_of(self, command: OrderCommand) -> CcxtRoute:
        placed = self._placed.get(command.client_order_id)
        return placed[0] if placed is not None else self.routes[0]

    async def _reports(
        self, route: CcxtRoute, command: OrderCommand, order: dict[str, Any], now_ns: int
    ) -> list[ExecutionReport]:
        """The order's story as reports: ACCEPTED, its fills (real trade ids), how it ended."""
        status = order.get("status")
        if status == "rejected":
            return [self._rejected(command, format_reason("VENUE_REJECTED", {}), now_ns)]
        venue_order_id = str(order["id"])
        reports = [self._report(route, command, order, ExecType.ACCEPTED, now_ns, cum=_ZERO)]
        trades = list(order.get("trades") or [])
        filled = _dec(order.get("filled"))
        if filled > 0 and not trades:
            trades = await self._trades(route, command, venue_order_id)
        cum, notional = _ZERO, _ZERO
        quantity = _dec(order.get("amount")) or (command.quantity or _ZERO)
        for trade in trades:
            qty, price = _dec(trade.get("amount")), _dec(trade.get("price"))
            if qty <= 0 or price <= 0 or trade.get("id") is None:
                continue
            cum += qty
            notional += qty * price
            fee = trade.get("fee") or {}
            done = cum >= quantity
            reports.append(
                self._base(route, command, venue_order_id, now_ns, order).model_copy(
                    update={
                        "report_id": f"{route.name}:{venue_order_id}:T:{trade['id']}",
                        "exec_type": ExecType.FILL if done else ExecType.PARTIAL_FILL,
                        "order_status": (
                            OrderStatus.FILLED if done else OrderStatus.PARTIALLY_FILLED
                        ),
                        "last_qty": qty,
                        "last_price": price,
                        "cum_qty": cum,
                        "leaves_qty": max(quantity - cum, _ZERO),
                        "avg_price": _AVERAGE.divide(notional, cum),
                        "fee": _dec(fee.get("cost")),
                        "fee_currency": fee.get("currency") or None,
                        "liquidity_side": _liquidity(trade.get("takerOrMaker")),
                        "trade_id": str(trade["id"]),
                        "ts_event": _ts(trade.get("timestamp"), now_ns),
                    }
                )
            )
        ending = {"canceled": ExecType.CANCELED, "expired": ExecType.EXPIRED}.get(str(status))
        if ending is not None:
            reports.append(self._report(route, command, order, ending, now_ns, cum=cum))
        elif status == "open":
            self._placed[command.client_order_id] = (route, venue_order_id, command)
        return reports

    async def _trades(
        self, route: CcxtRoute, command: OrderCommand, venue_order_id: str
    ) -> list[dict[str, Any]]:
        if not route.exchange.has.get("fetchOrderTrades"):
            return []
        symbol = ccxt_symbol(command.instrument_id)

        async def fetch() -> list[dict[str, Any]]:
            result: list[dict[str, Any]] = await route.exchange.fetch_order_trades(
                venue_order_id, symbol
            )
            return result

        try:
            return await route.retried("fetch_order_trades", fetch)
        except ccxt_errors.BaseError as exc:
            log.warning("trades of %s not fetched: %s", venue_order_id, route.redact(str(exc)))
            return []

    def _base(
        self,
        route: CcxtRoute,
        command: OrderCommand,
        venue_order_id: str,
        now_ns: int,
        order: dict[str, Any],
    ) -> ExecutionReport:
        quantity = _dec(order.get("amount")) or (command.quantity or _ZERO)
        return ExecutionReport(
            report_id=f"{route.name}:{venue_order_id}:ACCEPTED",
            account_id=command.account_id,
            client_order_id=command.client_order_id,
            venue_order_id=venue_order_id,
            strategy_id=command.strategy_id,
            instrument_id=command.instrument_id,
            exec_type=ExecType.ACCEPTED,
            order_status=OrderStatus.ACCEPTED,
            side=command.side or _side(order.get("side")),
            leaves_qty=quantity,
            ts_event=_ts(order.get("timestamp"), now_ns),
        )

    def _report(
        self,
        route: CcxtRoute,
        command: OrderCommand,
        order: dict[str, Any],
        exec_type: ExecType,
        now_ns: int,
        *,
        cum: Decimal | None = None,
    ) -> ExecutionReport:
        venue_order_id = str(order.get("id") or command.venue_order_id or "")
        base = self._base(route, command, venue_order_id, now_ns, order)
        status = {
            ExecType.ACCEPTED: OrderStatus.ACCEPTED,
            ExecType.CANCELED: OrderStatus.CANCELED,
            ExecType.EXPIRED: OrderStatus.EXPIRED,
        }[exec_type]
        cum_qty = _dec(order.get("filled")) if cum is None else cum
        average = order.get("average")
        return base.model_copy(
            update={
                "report_id": f"{route.name}:{venue_order_id}:{exec_type.value}",
                "exec_type": exec_type,
                "order_status": status,
                "cum_qty": cum_qty,
                "leaves_qty": base.leaves_qty if exec_type is ExecType.ACCEPTED else _ZERO,
                "avg_price": _dec(average) if average and cum_qty > 0 else None,
                "venue_order_id": venue_order_id or None,
            }
        )

    def _rejected(self, command: OrderCommand, reason: str, now_ns: int) -> ExecutionReport:
        return ExecutionReport(
            report_id=f"{command.command_id}-R",
            account_id=command.account_id,
            client_order_id=command.client_order_id,
            strategy_id=command.strategy_id,
            instrument_id=command.instrument_id,
            exec_type=ExecType.REJECTED,
            order_status=OrderStatus.REJECTED,
            side=command.side or Side.BUY,
            reason=reason,
            ts_event=now_ns,
        )

    def _cancel_rejected(self, command: OrderCommand, reason: str, now_ns: int) -> ExecutionReport:
        placed = self._placed.get(command.client_order_id)
        return ExecutionReport(
            report_id=f"{command.command_id}-R",
            account_id=command.account_id,
            client_order_id=command.client_order_id,
            venue_order_id=command.venue_order_id or (placed[1] if placed else None),
            strategy_id=command.strategy_id,
            instrument_id=command.instrument_id,
            exec_type=ExecType.CANCEL_REJECTED,
            # The order's status is not known from a refused cancel; ACCEPTED: still working.
            order_status=OrderStatus.ACCEPTED,
            side=command.side or (placed[2].side if placed and placed[2].side else Side.BUY),
            reason=reason,
            ts_event=now_ns,
        )


def _dec(value: Any) -> Decimal:
    """ccxt's numbers (floats or strings) as exact decimals; None -> 0."""
    if value is None:
        return _ZERO
    return Decimal(str(value))


def _ts(ms: Any, default_ns: int) -> int:
    return int(ms) * _NS_PER_MS if isinstance(ms, int | float) and ms > 0 else default_ns


def _side(value: Any) -> Side:
    return Side.SELL if str(value).lower() == "sell" else Side.BUY


def _liquidity(value: Any) -> LiquiditySide:
    if value == "maker":
        return LiquiditySide.MAKER
    if value == "taker":
        return LiquiditySide.TAKER
    return LiquiditySide.NONE
