"""Round trips with their excursions, equity curves and performance reports per account/strategy.

Plain domain state beside `Portfolio`, fed the same fills and marks; the figures come from the
shared `quantmesh_common.performance`, so a live account and a backtest agree.

Definitions
    - *Scope*: the whole account (strategy None), and each strategy that traded in it (the
      fill's `strategy_id`; fills without one count for the account only). Each scope keeps
      its own FIFO lots per instrument, so two strategies in one instrument have their own
      round trips even when the account's position nets them.
    - *Round trip*: from a fill that opens a position (from flat) to the fill that closes its
      last FIFO lot. A flip closes the trip and opens the next with the rest. Its entry and
      exit prices are volume-weighted; its fees are those of its fills (a flip's fee split pro
      rata by quantity), in the quote currency as the portfolio counts them (a fee in the base
      currency at the fill price, one in a third currency not at all).
    - *MAE / MFE*: each open lot keeps the lowest and highest price it saw (marks, and fill
      prices of the instrument) from its own entry to its close. Closing `q` of a long lot at
      price `p` adds `q x (p_lot - low)` to the trip's adverse and `q x (high - p_lot)` to its
      favourable excursion (the reverse for a short); per unit, the sums over the trip's
      quantity.
    - *Equity curves*: the account's is its snapshot equities. A strategy's is the account's
      capital (its opening cash in the base currency) plus the strategy's P&L (realised net of
      fees, plus unrealised at the mark, converted to the base currency) at each snapshot: the
      account as if it had traded that strategy alone.
    - *Periods per year*: a year of 365.25 days over the snapshot interval.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Any

from quantmesh_common import performance as perf
from quantmesh_common.messages import (
    ExecutionReport,
    InstrumentId,
    PerformanceReport,
    PositionSide,
    RoundTripRecord,
)

_ZERO = Decimal(0)
#: Python's default context, stated: the thread's may have been changed (ccxt sets ROUND_HALF_UP).
_DIV = Context(prec=28, rounding=ROUND_HALF_EVEN)
_MAX_ID = 128

#: (account_id, strategy_id or None for the whole account).
Scope = tuple[str, str | None]
#: A rate lookup: the price of one `currency` in `to`, or None.
RateFn = Callable[[str, str], Decimal | None]


@dataclass(slots=True)
class TripLot:
    """An open lot of a round trip and the price range it has seen since it opened."""

    quantity: Decimal
    price: Decimal
    low: Decimal
    high: Decimal
    #: The lot's number in its book, rising in FIFO order (`TripBook.next_seq`).
    seq: int = 0

    def see(self, price: Decimal) -> None:
        """Widen the range with a price the lot lived through."""
        if price < self.low:
            self.low = price
        elif price > self.high:
            self.high = price


@dataclass(slots=True)
class OpenTrip:
    """A round trip in progress: entries and exits so far, fees and closed excursions."""

    direction: int
    entry_ts_ns: int
    entered: Decimal = _ZERO
    entry_value: Decimal = _ZERO
    exited: Decimal = _ZERO
    exit_value: Decimal = _ZERO
    fees: Decimal = _ZERO
    adverse: Decimal = _ZERO
    favourable: Decimal = _ZERO
    lots: deque[TripLot] = field(default_factory=deque)

    def open_quantity(self) -> Decimal:
        """Return the quantity still open."""
        return sum((lot.quantity for lot in self.lots), _ZERO)


@dataclass(frozen=True, slots=True)
class ClosedTrip:
    """A finished round trip of one scope, and the fill that closed it."""

    account_id: str
    strategy_id: str | None
    close_fill_id: str
    trip: perf.RoundTrip
    pnl: Decimal
    mae: Decimal
    mfe: Decimal

    def record(self) -> RoundTripRecord:
        """Return the trip as it travels in a report."""
        trip = self.trip
        return RoundTripRecord(
            instrument_id=trip.instrument_id,
            side=trip.side,
            quantity=trip.quantity,
            entry_price=trip.entry_price,
            exit_price=trip.exit_price,
            entry_ts_ns=trip.entry_ts_ns,
            exit_ts_ns=trip.exit_ts_ns,
            fees=trip.fees,
            pnl=self.pnl,
            mae=self.mae,
            mfe=self.mfe,
        )


@dataclass(slots=True)
class TripBook:
    """One scope's FIFO lots in one instrument: its open trip and its P&L in the quote currency."""

    account_id: str
    strategy_id: str | None
    instrument_id: str
    quote: str
    trip: OpenTrip | None = None
    #: Realised P&L net of fees over the life of the book (not reset when flat).
    realized: Decimal = _ZERO
    last_price: Decimal | None = None
    #: The number the next lot gets. Lots are stored one row each (V0031); a fill only cuts
    #: the front lot, drops lots from the front and appends at the back, and a price widens
    #: the ranges of a suffix of the lots (`see`), so a store writes the front lot and those
    #: numbered from `dirty_seq` on, and deletes those below the front, not every open lot.
    next_seq: int = 0
    #: The lowest number of a lot that may differ from its stored row (the front lot's
    #: quantity aside): `next_seq` once a write committed (set by the store), lowered by a
    #: price that widens older lots' ranges. Lots added since have numbers from it on.
    dirty_seq: int = 0

    @property
    def unrealized(self) -> Decimal:
        """Return the open lots' P&L at the last price (0 when flat)."""
        trip = self.trip
        if trip is None or self.last_price is None:
            return _ZERO
        mark = self.last_price
        return sum(((mark - lot.price) * lot.quantity for lot in trip.lots), _ZERO) * (
            trip.direction
        )

    def see(self, price: Decimal) -> None:
        """Take a market price: the mark, and a price every open lot lived through.

        Lots open in time order, each after every older lot saw its fill price (`apply_fill`),
        so an older lot's range holds every newer one's. Walking from the newest, the first
        lot whose range already holds the price ends the walk: every older range holds it too.
        (Every lot per tick cost portfolio a third of its time with a thousand lots open.)
        """
        self.last_price = price
        trip = self.trip
        if trip is None:
            return
        widened: TripLot | None = None
        for lot in reversed(trip.lots):
            if price < lot.low:
                lot.low = price
            elif price > lot.high:
                lot.high = price
            else:
                break
            widened = lot
        if widened is not None and widened.seq < self.dirty_seq:
            self.dirty_seq = widened.seq

    def apply_fill(
        self, sign: int, quantity: Decimal, price: Decimal, fee: Decimal, ts_ns: int, fill_id: str
    ) -> ClosedTrip | None:
        """Apply a fill (fee in the quote currency); return the trip it closed, if any."""
        self.see(price)
        trip = self.trip
        closed: ClosedTrip | None = None
        remaining = quantity
        if trip is not None and sign != trip.direction:
            realized = _ZERO
            while remaining and trip.lots:
                lot = trip.lots[0]
                take = min(lot.quantity, remaining)
                realized += (price - lot.price) * take * trip.direction
                if trip.direction > 0:
                    trip.adverse += (lot.price - lot.low) * take
                    trip.favourable += (lot.high - lot.price) * take
                else:
                    trip.adverse += (lot.high - lot.price) * take
                    trip.favourable += (lot.price - lot.low) * take
                lot.quantity -= take
                remaining -= take
                if not lot.quantity:
                    trip.lots.popleft()
            closing = quantity - remaining
            fee_part = fee if not remaining else _DIV.divide(_DIV.multiply(fee, closing), quantity)
            fee -= fee_part
            trip.fees += fee_part
            trip.exited += closing
            trip.exit_value += closing * price
            self.realized += realized - fee_part
            if not trip.lots:
                closed = self._close(trip, ts_ns, fill_id)
                self.trip = trip = None
        if remaining:
            if trip is None:
                trip = self.trip = OpenTrip(direction=sign, entry_ts_ns=ts_ns)
            trip.lots.append(TripLot(remaining, price, price, price, self.next_seq))
            self.next_seq += 1
            trip.entered += remaining
            trip.entry_value += remaining * price
            trip.fees += fee
            self.realized -= fee
        return closed

    def _close(self, trip: OpenTrip, ts_ns: int, fill_id: str) -> ClosedTrip:
        side = PositionSide.LONG if trip.direction > 0 else PositionSide.SHORT
        quantity = trip.entered
        round_trip = perf.RoundTrip(
            side=side,
            quantity=quantity,
            entry_price=_DIV.divide(trip.entry_value, quantity),
            exit_price=_DIV.divide(trip.exit_value, trip.exited),
            entry_ts_ns=trip.entry_ts_ns,
            exit_ts_ns=ts_ns,
            fees=trip.fees,
            instrument_id=self.instrument_id,
        )
        # Exact: the VWAPs above may be rounded, the sums are not.
        gross = (trip.exit_value - trip.entry_value) * trip.direction
        return ClosedTrip(
            account_id=self.account_id,
            strategy_id=self.strategy_id,
            close_fill_id=fill_id,
            trip=round_trip,
            pnl=gross - trip.fees,
            mae=_DIV.divide(trip.adverse, quantity),
            mfe=_DIV.divide(trip.favourable, quantity),
        )

    # -- state for the store -----------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Return the book but its open lots as JSON-ready data (decimals as strings).

        The lots are stored apart, one row each (`changed_lots`, `restore_lot`).
        """
        out: dict[str, Any] = {"realized": str(self.realized), "last_price": _s(self.last_price)}
        trip = self.trip
        if trip is not None:
            out["trip"] = {
                "direction": trip.direction,
                "entry_ts_ns": trip.entry_ts_ns,
                **{
                    name: str(getattr(trip, name))
                    for name in (
                        "entered",
                        "entry_value",
                        "exited",
                        "exit_value",
                        "fees",
                        "adverse",
                        "favourable",
                    )
                },
            }
        return out

    def changed_lots(self) -> list[TripLot]:
        """Return the lots a write must (re)store: those numbered from `dirty_seq` on (newest
        first) and the front lot, whose quantity a fill may have cut."""
        trip = self.trip
        if trip is None:
            return []
        lots = trip.lots
        dirty = self.dirty_seq
        changed: list[TripLot] = []
        for lot in reversed(lots):
            if lot.seq < dirty:
                break
            changed.append(lot)
        if lots and lots[0].seq < dirty:
            changed.append(lots[0])
        return changed

    def front_seq(self) -> int:
        """Return the number of the oldest open lot (`next_seq` when flat): stored lots
        numbered below it are closed."""
        trip = self.trip
        return trip.lots[0].seq if trip is not None and trip.lots else self.next_seq

    def restore(self, state: dict[str, Any]) -> None:
        """Load what `state` returned; its open lots follow with `restore_lot`.

        A state stored before V0031 holds the lots themselves (`lots`): they are numbered
        from 0 and count as not stored, so the next write stores them as rows.
        """
        self.realized = Decimal(state["realized"])
        self.last_price = Decimal(state["last_price"]) if state.get("last_price") else None
        self.next_seq = self.dirty_seq = 0
        raw = state.get("trip")
        if raw is None:
            self.trip = None
            return
        trip = OpenTrip(direction=int(raw["direction"]), entry_ts_ns=int(raw["entry_ts_ns"]))
        for name in (
            "entered",
            "entry_value",
            "exited",
            "exit_value",
            "fees",
            "adverse",
            "favourable",
        ):
            setattr(trip, name, Decimal(raw[name]))
        trip.lots = deque(
            TripLot(Decimal(q), Decimal(p), Decimal(low), Decimal(high), seq)
            for seq, (q, p, low, high) in enumerate(raw.get("lots", ()))
        )
        self.next_seq = len(trip.lots)
        self.trip = trip

    def restore_lot(self, lot: TripLot) -> None:
        """Append a stored open lot to the trip `restore` loaded (lots in `seq` order)."""
        trip = self.trip
        assert trip is not None, "open lots stored for a book with no open trip"
        trip.lots.append(lot)
        self.next_seq = self.dirty_seq = lot.seq + 1


def _s(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def fee_in_quote(report: ExecutionReport, quote: str, base: str) -> Decimal:
    """Return a fill's fee as the position P&L counts it, in the quote currency."""
    if not report.fee:
        return _ZERO
    currency = report.fee_currency or quote
    if currency == quote:
        return report.fee
    if currency == base and report.last_price is not None:
        return report.fee * report.last_price
    return _ZERO


def fill_id(report: ExecutionReport) -> str:
    """Return the id of a fill within its account and instrument (as the portfolio keys it)."""
    return report.trade_id or report.report_id


def report_id_of(account_id: str, strategy_id: str | None, ts_ns: int) -> str:
    """Return the id of a scope's report at `ts_ns`: the same for the same report, always valid.

    `PERF:<account>[:<strategy>]:<ts>` from Identifier parts (no character outside the id
    pattern); past 128 characters, `PERF:` and a digest of that text, so a long backtest's
    scope still gets a valid id that a repeated report shares.
    """
    scope_id = account_id if strategy_id is None else f"{account_id}:{strategy_id}"
    report_id = f"PERF:{scope_id}:{ts_ns}"
    if len(report_id) > _MAX_ID:
        report_id = "PERF:" + hashlib.sha256(report_id.encode()).hexdigest()
    return report_id


class PerformanceTracker:
    """Round trips, equity curves and reports of every account and strategy."""

    def __init__(
        self,
        snapshot_interval_ns: int,
        *,
        confidence: float = perf.DEFAULT_CONFIDENCE,
        risk_free: float = 0.0,
        report_trips: int = 20,
    ) -> None:
        self.periods_per_year = perf.NS_PER_YEAR / snapshot_interval_ns
        self.confidence = confidence
        self.risk_free = risk_free
        self.report_trips = report_trips
        self.books: dict[tuple[str, str | None, str], TripBook] = {}
        self._by_instrument: dict[str, list[TripBook]] = {}
        self.trips: dict[Scope, list[ClosedTrip]] = {}
        self.curves: dict[Scope, list[perf.EquityPoint]] = {}

    # -- feeding -----------------------------------------------------------------------------

    def book(self, account_id: str, strategy_id: str | None, instrument_id: str) -> TripBook:
        """Return the scope's book of the instrument, creating it if needed."""
        key = (account_id, strategy_id, instrument_id)
        found = self.books.get(key)
        if found is None:
            quote = InstrumentId.parse(instrument_id).quote
            found = self.books[key] = TripBook(account_id, strategy_id, instrument_id, quote)
            self._by_instrument.setdefault(instrument_id, []).append(found)
        return found

    def on_fill(self, report: ExecutionReport) -> list[ClosedTrip]:
        """Apply a fill the portfolio applied (once) to its scopes; return the closed trips."""
        assert report.last_price is not None  # a fill always has one
        price = report.last_price
        for other in self._by_instrument.get(report.instrument_id, ()):
            other.see(price)
        parts = InstrumentId.parse(report.instrument_id)
        fee = fee_in_quote(report, parts.quote, parts.base)
        scopes: list[str | None] = [None]
        if report.strategy_id is not None:
            scopes.append(report.strategy_id)
        closed: list[ClosedTrip] = []
        for strategy_id in scopes:
            book = self.book(report.account_id, strategy_id, report.instrument_id)
            trip = book.apply_fill(
                report.side.sign,
                report.last_qty,
                price,
                fee,
                report.ts_event,
                fill_id(report),
            )
            if trip is not None:
                self.trips.setdefault((report.account_id, strategy_id), []).append(trip)
                closed.append(trip)
        return closed

    def books_of(self, report: ExecutionReport) -> list[TripBook]:
        """Return the books a fill changed: the account's and its strategy's."""
        scopes = [None] if report.strategy_id is None else [None, report.strategy_id]
        return [
            self.books[key]
            for s in scopes
            if (key := (report.account_id, s, report.instrument_id)) in self.books
        ]

    def mark(self, instrument_id: str, price: Decimal) -> None:
        """Take a market price of the instrument (the portfolio accepted it as current)."""
        for book in self._by_instrument.get(instrument_id, ()):
            book.see(price)

    def forget_accounts(self, keep: Callable[[str], bool]) -> None:
        """Drop the trip books, round trips and curves of the accounts `keep` rejects."""
        self.books = {k: b for k, b in self.books.items() if keep(k[0])}
        by_instrument: dict[str, list[TripBook]] = {}
        for instrument_id, books in self._by_instrument.items():
            kept = [b for b in books if keep(b.account_id)]
            if kept:
                by_instrument[instrument_id] = kept
        self._by_instrument = by_instrument
        self.trips = {scope: t for scope, t in self.trips.items() if keep(scope[0])}
        self.curves = {scope: c for scope, c in self.curves.items() if keep(scope[0])}

    def strategies(self, account_id: str) -> list[str]:
        """Return the strategies that traded in the account, sorted."""
        return sorted(
            {s for (a, s, _) in self.books if a == account_id and s is not None}
            | {s for (a, s) in self.curves if a == account_id and s is not None}
        )

    def on_snapshot(
        self,
        account_id: str,
        ts_ns: int,
        equity: Decimal,
        *,
        base: str,
        capital: Decimal,
        rate: RateFn,
    ) -> list[tuple[str, perf.EquityPoint]]:
        """Add a snapshot's equity to the account's curve, and capital + P&L to each of its
        strategies' curves; return the strategies' new points (strategy id, point)."""
        self.curves.setdefault((account_id, None), []).append((ts_ns, equity))
        points: list[tuple[str, perf.EquityPoint]] = []
        for strategy_id in self.strategies(account_id):
            pnl = _ZERO
            for (a, s, _), book in self.books.items():
                if a != account_id or s != strategy_id:
                    continue
                converted = rate(book.quote, base)
                if converted is not None:
                    pnl += (book.realized + book.unrealized) * converted
            point = (ts_ns, capital + pnl)
            self.curves.setdefault((account_id, strategy_id), []).append(point)
            points.append((strategy_id, point))
        return points

    # -- reports -----------------------------------------------------------------------------

    def scopes(self, account_id: str) -> Iterator[Scope]:
        """Return the account's scopes: the account itself, then each strategy."""
        yield (account_id, None)
        for strategy_id in self.strategies(account_id):
            yield (account_id, strategy_id)

    def report(self, scope: Scope, base_currency: str, ts_ns: int) -> PerformanceReport:
        """Return the performance of a scope from its equity curve and round trips."""
        account_id, strategy_id = scope
        curve = self.curves.get(scope, [])
        trips = self.trips.get(scope, [])
        round_trips = [t.trip for t in trips]
        try:
            summary = perf.summarize(
                curve,
                round_trips,
                risk_free=self.risk_free,
                periods_per_year=self.periods_per_year,
                confidence=self.confidence,
            )
            returns = _returns(curve)
        except ValueError:
            # Equity at or below zero: no returns exist; the trade figures still do.
            summary = perf.summarize([], round_trips, periods_per_year=self.periods_per_year)
            returns = []
        stats = summary.trades
        report_id = report_id_of(account_id, strategy_id, ts_ns)
        return PerformanceReport(
            report_id=report_id,
            account_id=account_id,
            strategy_id=strategy_id,
            base_currency=base_currency,
            points=summary.points,
            start_ts_ns=curve[0][0] if curve else None,
            start_equity=summary.start_equity,
            final_equity=summary.final_equity,
            periods_per_year=summary.periods_per_year,
            total_return=summary.total_return,
            cagr=summary.cagr,
            volatility=summary.volatility,
            sharpe=summary.sharpe,
            sortino=summary.sortino,
            calmar=summary.calmar,
            omega=summary.omega,
            max_drawdown=summary.max_drawdown,
            max_drawdown_duration_ns=summary.max_drawdown_duration_ns,
            max_drawdown_duration_periods=summary.max_drawdown_duration_periods,
            confidence=self.confidence,
            historical_var=summary.historical_var,
            historical_cvar=summary.historical_cvar,
            parametric_var=summary.parametric_var,
            parametric_cvar=perf.parametric_cvar(returns, self.confidence),
            trades=stats.trades,
            wins=stats.wins,
            losses=stats.losses,
            win_rate=stats.win_rate,
            profit_factor=stats.profit_factor,
            gross_profit=stats.gross_profit,
            gross_loss=stats.gross_loss,
            net_pnl=stats.net_pnl,
            expectancy=stats.expectancy,
            average_win=stats.average_win,
            average_loss=stats.average_loss,
            mean_mae_fraction=_mean_fraction(t.mae / t.trip.entry_price for t in trips),
            mean_mfe_fraction=_mean_fraction(t.mfe / t.trip.entry_price for t in trips),
            round_trips=[t.record() for t in trips[-self.report_trips :]]
            if self.report_trips
            else [],
            ts_event=ts_ns,
        )


def _returns(curve: list[perf.EquityPoint]) -> list[float]:
    """`perf.period_returns` of a curve `perf.summarize` accepted: the same floats, without
    a second walk over its drawdowns (that walk was a third of an hourly report's time)."""
    # IEEE double division as numpy's: the same floats.
    equities = [float(equity) for _, equity in curve]
    return [b / a - 1.0 for a, b in itertools.pairwise(equities)]


def _mean_fraction(values: Iterable[Decimal]) -> float | None:
    floats = [float(v) for v in values]
    return math.fsum(floats) / len(floats) if floats else None


class NoPerformanceTracker(PerformanceTracker):
    """A tracker that keeps and reports nothing (QM_PORTFOLIO_PERFORMANCE=false).

    For one-process backtests: they compute their own round trips and figures, and nothing
    reads the stage's reports there, while its trips and curves grow with every fill and
    snapshot (~2 KB per round trip: 110 MB over a 1,000,000-bar run).
    """

    def on_fill(self, report: ExecutionReport) -> list[ClosedTrip]:
        """Nothing: no round trip is tracked."""
        return []

    def mark(self, instrument_id: str, price: Decimal) -> None:
        """Nothing: no open lot is tracked."""

    def on_snapshot(
        self,
        account_id: str,
        ts_ns: int,
        equity: Decimal,
        *,
        base: str,
        capital: Decimal,
        rate: RateFn,
    ) -> list[tuple[str, perf.EquityPoint]]:
        """Nothing: no curve is kept."""
        return []

    def scopes(self, account_id: str) -> Iterator[Scope]:
        """None: there is nothing to report."""
        return iter(())
