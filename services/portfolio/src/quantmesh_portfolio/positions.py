"""Positions from fills: FIFO lots, realised and unrealised P&L, fees, cash and equity per account.

Plain domain state, no bus, clock or store: the service feeds it execution reports and marks and
publishes what it returns.

Conventions
    - An instrument id `<BASE>-<QUOTE>.<VENUE>` names the currencies a fill moves: a BUY of q at
      p adds q BASE and pays q x p QUOTE; a SELL the reverse. Balances are signed (a short sells
      BASE it does not hold: a negative BASE balance).
    - Realised P&L is FIFO: a reducing fill closes the oldest open lots first, each at
      `(fill price - lot price) x quantity` (negated for a short). It is *net of fees*: every
      fee charged to a position is subtracted from its realised P&L when paid, and also
      accumulated in `fees`. A fill that crosses zero closes every lot and opens a new one in
      the other direction with the rest (a flip).
    - A fee in the quote currency (or with no currency) is charged as it is. A fee in the base
      currency (some spot venues take it from what was bought) is charged to the BASE balance
      and counted in the position's P&L at the fill price. A fee in a third currency (e.g. BNB)
      is charged to that balance only: with no rate at hand it is not in the position's P&L.
    - Unrealised P&L is `(mark - lot price) x quantity` over the open lots. The mark is the
      latest market price of the instrument (trade tick, quote mid, bar close), or the latest
      fill price while no market price has been seen. A mark older than the one held is ignored.
    - Equity of an account, in its base currency: every balance converted at the latest price
      of `<CURRENCY>-<BASE CCY>` (or the inverse pair) on any venue. A balance that cannot be
      converted yet is left out and reported by `Account.equity` so the caller can say so.
    - A fill is applied exactly once: the key (account_id, instrument_id, trade_id) — the
      instrument is part of it because venues such as Binance number trades per symbol; the
      report_id stands in for a missing trade id — is kept in `Portfolio.seen_fills` (the store
      rebuilds it after a restart, store.py).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Context, Decimal

from quantmesh_common.messages import (
    AccountOpened,
    ExecutionReport,
    InstrumentId,
    PortfolioSnapshot,
    Position,
    PositionSide,
)
from quantmesh_common.trusted import build

log = logging.getLogger(__name__)

_ZERO = Decimal(0)
_ONE = Decimal(1)
#: Python's default context, stated: the thread's may have been changed (ccxt sets ROUND_HALF_UP).
_DIV = Context(prec=28, rounding=ROUND_HALF_EVEN)

#: The key that identifies one fill: (account_id, instrument_id, trade_id or report_id).
FillKey = tuple[str, str, str]


def fill_key(report: ExecutionReport) -> FillKey:
    """Return the key that identifies a fill across redeliveries."""
    return (report.account_id, report.instrument_id, report.trade_id or report.report_id)


@dataclass(slots=True)
class Lot:
    """An open lot: a quantity (> 0, base units) bought or sold at one price."""

    quantity: Decimal
    price: Decimal
    ts_ns: int
    #: The lot's number in its book, rising in FIFO order (`PositionBook.next_seq`).
    seq: int = 0


@dataclass(slots=True)
class PositionBook:
    """One account's position in one instrument: its FIFO lots and P&L in the quote currency.

    `realized_pnl` and `fees` accumulate over the life of the (account, instrument) pair; they
    are not reset when the position goes flat.
    """

    account_id: str
    instrument_id: str
    base: str
    quote: str
    lots: deque[Lot] = field(default_factory=deque)
    #: +1 long, -1 short, 0 flat; every open lot has this direction.
    direction: int = 0
    #: Sum of the open lots' quantities (unsigned) and of quantity x price over them.
    open_quantity: Decimal = _ZERO
    cost: Decimal = _ZERO
    realized_pnl: Decimal = _ZERO
    fees: Decimal = _ZERO
    last_price: Decimal | None = None
    ts_event: int = 0
    #: The number the next lot gets. A fill only shrinks the oldest lot, drops lots from the
    #: front and appends at the back, so a store writes what changed since `stored_seq` (the
    #: lots numbered from it, the front lot, and a delete of those below the front) instead
    #: of every open lot again.
    next_seq: int = 0
    #: `next_seq` when the book was last stored (set by the store once its write committed).
    stored_seq: int = 0

    @property
    def quantity(self) -> Decimal:
        """Return the signed size: > 0 long, < 0 short, 0 flat."""
        return self.open_quantity if self.direction >= 0 else -self.open_quantity

    @property
    def avg_entry_price(self) -> Decimal:
        """Return the average price of the open lots (0 when flat)."""
        return _DIV.divide(self.cost, self.open_quantity) if self.open_quantity else _ZERO

    @property
    def unrealized_pnl(self) -> Decimal:
        """Return the open lots' P&L at the mark (0 when flat or never marked)."""
        if self.last_price is None or not self.open_quantity:
            return _ZERO
        return (self.last_price * self.open_quantity - self.cost) * self.direction

    def apply_fill(self, sign: int, quantity: Decimal, price: Decimal, ts_ns: int) -> Decimal:
        """Apply a fill of `quantity` at `price` (`sign` +1 buy, -1 sell); return realised P&L.

        The returned P&L is gross of fees (the caller charges them) and is also added to
        `realized_pnl`.
        """
        remaining = quantity
        realized = _ZERO
        if self.direction and sign != self.direction:
            lots = self.lots
            while remaining and lots:
                lot = lots[0]
                take = lot.quantity if lot.quantity <= remaining else remaining
                realized += (price - lot.price) * take * self.direction
                lot.quantity -= take
                remaining -= take
                self.open_quantity -= take
                self.cost -= take * lot.price
                if not lot.quantity:
                    lots.popleft()
            if not lots:
                # Exactly flat: drop any residue the running sums could have picked up.
                self.direction, self.open_quantity, self.cost = 0, _ZERO, _ZERO
        if remaining:
            self.direction = sign
            self.lots.append(Lot(remaining, price, ts_ns, self.next_seq))
            self.next_seq += 1
            self.open_quantity += remaining
            self.cost += remaining * price
        self.realized_pnl += realized
        self.ts_event = max(self.ts_event, ts_ns)
        return realized

    def charge_fee(self, amount: Decimal) -> None:
        """Charge a fee (in the quote currency; negative for a rebate) to this position."""
        self.fees += amount
        self.realized_pnl -= amount

    def to_event(self) -> Position:
        """Return the position as the `portfolio.position` event.

        Built without validating again (`quantmesh_common.trusted`): the ids come from
        validated fills, the side is the quantity's, the sums are finite Decimals (a Decimal
        operation that would not be raises instead), the average entry price of positive lots
        is positive and the mark a validated price; tests/test_trusted_events.py checks the
        JSON of a replay against the validating build.
        """
        direction = self.direction
        open_quantity = self.open_quantity
        quantity = open_quantity if direction >= 0 else -open_quantity
        last_price = self.last_price
        if last_price is None or not open_quantity:
            unrealized = _ZERO
        else:
            unrealized = (last_price * open_quantity - self.cost) * direction
        return build(
            Position,
            {
                "account_id": self.account_id,
                "instrument_id": self.instrument_id,
                "side": PositionSide.of(quantity),
                "quantity": quantity,
                "avg_entry_price": _DIV.divide(self.cost, open_quantity)
                if open_quantity
                else _ZERO,
                "realized_pnl": self.realized_pnl,
                "unrealized_pnl": unrealized,
                "fees": self.fees,
                "last_price": last_price,
                "ts_event": self.ts_event,
            },
        )


@dataclass(frozen=True, slots=True)
class Valuation:
    """An account's equity in its base currency, and the balances that could not be converted."""

    equity: Decimal
    unvalued: tuple[str, ...] = ()


class Account:
    """One account: cash per currency, positions per instrument, and its equity peak.

    `capital` is the cash it opened with in its base currency: the base of its strategies'
    equity curves (performance.py). `opened` is True once its cash came from an
    `AccountOpened` (never applied twice), False while it has the default starting cash.
    """

    def __init__(
        self,
        account_id: str,
        base_currency: str,
        cash: Mapping[str, Decimal],
        capital: Decimal | None = None,
    ) -> None:
        self.account_id = account_id
        self.base_currency = base_currency
        self.balances: dict[str, Decimal] = dict(cash)
        self.capital = cash.get(base_currency, _ZERO) if capital is None else capital
        self.positions: dict[str, PositionBook] = {}
        self.peak_equity: Decimal | None = None
        self.opened = False

    def credit(self, currency: str, amount: Decimal) -> None:
        """Add `amount` (negative to debit) to the balance of `currency`."""
        self.balances[currency] = self.balances.get(currency, _ZERO) + amount


class Portfolio:
    """Every account's positions, cash and P&L, built from fills and marked to market prices.

    New accounts start with `starting_cash`, their equity is reported in `base_currency`.
    """

    def __init__(self, base_currency: str, starting_cash: Mapping[str, Decimal]) -> None:
        self.base_currency = base_currency
        self.starting_cash = dict(starting_cash)
        self.accounts: dict[str, Account] = {}
        self.seen_fills: set[FillKey] = set()
        self._books_by_instrument: dict[str, list[PositionBook]] = {}
        # Latest market price per instrument and its time; fills stand in until one exists.
        self._marks: dict[str, tuple[Decimal, int]] = {}
        # Latest price per (base, quote) pair over all venues, for currency conversion.
        self._rates: dict[tuple[str, str], tuple[Decimal, int]] = {}
        self._market_pairs: set[tuple[str, str]] = set()
        self._parsed: dict[str, InstrumentId] = {}

    # -- accounts and books ----------------------------------------------------------------

    def account(self, account_id: str) -> Account:
        """Return the account, opening it with the starting cash on first use."""
        found = self.accounts.get(account_id)
        if found is None:
            found = Account(account_id, self.base_currency, self.starting_cash)
            self.accounts[account_id] = found
        return found

    def open_account(self, opened: AccountOpened) -> Account | None:
        """Seed an account's cash from its opening; None if an opening was applied before.

        An account that a fill opened first (with the default starting cash) is rebased: the
        default cash is taken out and the opening's put in, so its balances are exactly what
        they would be had the opening come first. Its equity peak restarts.
        """
        account = self.accounts.get(opened.account_id)
        cash = opened.starting_cash
        if account is None:
            account = Account(opened.account_id, opened.base_currency, cash)
            self.accounts[opened.account_id] = account
        elif account.opened:
            return None
        else:
            for currency, amount in self.starting_cash.items():
                account.credit(currency, -amount)
            for currency, amount in cash.items():
                account.credit(currency, amount)
            account.base_currency = opened.base_currency
            account.capital = cash.get(opened.base_currency, _ZERO)
            account.peak_equity = None
        account.opened = True
        return account

    def forget_accounts(self, keep: Callable[[str], bool]) -> int:
        """Drop the accounts `keep` rejects, with their position books; return how many.

        Prices and currency rates stay (every instrument's, whichever account holds it), and
        so do the applied fill keys (bounded; a reload replaces them before such an account's
        fill can come back).
        """
        gone = {account_id for account_id in self.accounts if not keep(account_id)}
        if not gone:
            return 0
        for account_id in gone:
            del self.accounts[account_id]
        for instrument_id, books in list(self._books_by_instrument.items()):
            kept = [b for b in books if b.account_id not in gone]
            if kept:
                self._books_by_instrument[instrument_id] = kept
            else:
                del self._books_by_instrument[instrument_id]
        return len(gone)

    def _instrument(self, instrument_id: str) -> InstrumentId:
        parsed = self._parsed.get(instrument_id)
        if parsed is None:
            parsed = self._parsed[instrument_id] = InstrumentId.parse(instrument_id)
        return parsed

    def book(self, account_id: str, instrument_id: str) -> PositionBook:
        """Return the position book of (account, instrument), creating an empty one if needed."""
        account = self.account(account_id)
        found = account.positions.get(instrument_id)
        if found is None:
            parts = self._instrument(instrument_id)
            found = PositionBook(account_id, instrument_id, parts.base, parts.quote)
            mark = self._marks.get(instrument_id)
            if mark is not None:
                found.last_price = mark[0]
            account.positions[instrument_id] = found
            self._books_by_instrument.setdefault(instrument_id, []).append(found)
        return found

    # -- events ----------------------------------------------------------------------------

    def apply_fill(self, report: ExecutionReport) -> Position | None:
        """Apply a (partial) fill; return the updated position, or None if it is not a fill or
        was applied before."""
        if not report.is_fill or report.last_price is None:
            return None
        key = fill_key(report)
        if key in self.seen_fills:
            return None
        self.seen_fills.add(key)
        book = self.book(report.account_id, report.instrument_id)
        account = self.accounts[report.account_id]
        sign = report.side.sign
        qty, price = report.last_qty, report.last_price
        book.apply_fill(sign, qty, price, report.ts_event)
        account.credit(book.base, qty * sign)
        account.credit(book.quote, -qty * price * sign)
        self._charge_fee(account, book, report.fee, report.fee_currency, price)
        self._fill_price(book, price, report.ts_event)
        return book.to_event()

    def _charge_fee(
        self,
        account: Account,
        book: PositionBook,
        fee: Decimal,
        currency: str | None,
        price: Decimal,
    ) -> None:
        if not fee:
            return
        currency = currency or book.quote
        account.credit(currency, -fee)
        if currency == book.quote:
            book.charge_fee(fee)
        elif currency == book.base:
            book.charge_fee(fee * price)
        else:
            log.debug(
                "fee in a third currency is charged to cash only",
                extra={"account_id": account.account_id, "currency": currency, "fee": str(fee)},
            )

    def _fill_price(self, book: PositionBook, price: Decimal, ts_ns: int) -> None:
        """Use a fill price as the mark while the instrument has no market price."""
        if book.instrument_id not in self._marks:
            for other in self._books_by_instrument.get(book.instrument_id, ()):
                other.last_price = price
        pair = (book.base, book.quote)
        if pair not in self._market_pairs:
            current = self._rates.get(pair)
            if current is None or ts_ns >= current[1]:
                self._rates[pair] = (price, ts_ns)

    def mark(self, instrument_id: str, price: Decimal, ts_ns: int) -> bool:
        """Mark every position in `instrument_id` at a market `price`; False if it is stale."""
        current = self._marks.get(instrument_id)
        if current is not None and ts_ns < current[1]:
            return False
        self._marks[instrument_id] = (price, ts_ns)
        parts = self._instrument(instrument_id)
        pair = (parts.base, parts.quote)
        rate = self._rates.get(pair)
        if pair not in self._market_pairs or rate is None or ts_ns >= rate[1]:
            self._rates[pair] = (price, ts_ns)
        self._market_pairs.add(pair)
        for book in self._books_by_instrument.get(instrument_id, ()):
            book.last_price = price
            if ts_ns > book.ts_event:
                book.ts_event = ts_ns
        return True

    def carry_prices(self, other: Portfolio) -> list[tuple[str, Decimal]]:
        """Take the prices `other` holds that are newer than this portfolio's; return the marks
        applied (instrument, price), oldest first.

        A portfolio rebuilt from the store knows the marks stored with its positions; `other`,
        the one it replaces, may have seen later ticks (stored only with the next snapshot) and
        prices of instruments no position holds, which convert currencies.
        """
        applied: list[tuple[str, Decimal]] = []
        for instrument_id, (price, ts_ns) in sorted(
            other._marks.items(), key=lambda item: item[1][1]
        ):
            if self._marks.get(instrument_id) == (price, ts_ns):
                # The mark loaded from the store, not a later tick: taken again it would reach
                # the performance lots opened since it was seen and widen their price ranges.
                continue
            if self.mark(instrument_id, price, ts_ns):
                applied.append((instrument_id, price))
        # Rates taken from fill prices (pairs no market price was seen for yet).
        for pair, (price, ts_ns) in other._rates.items():
            if pair in self._market_pairs:
                continue
            current = self._rates.get(pair)
            if current is None or ts_ns > current[1]:
                self._rates[pair] = (price, ts_ns)
        return applied

    # -- valuation -------------------------------------------------------------------------

    def rate(self, currency: str, to: str) -> Decimal | None:
        """Return the price of one `currency` in `to`, or None if no price is known yet."""
        if currency == to:
            return _ONE
        direct = self._rates.get((currency, to))
        if direct is not None:
            return direct[0]
        inverse = self._rates.get((to, currency))
        if inverse is not None:
            return _DIV.divide(_ONE, inverse[0])
        return None

    def valuation(self, account_id: str) -> Valuation:
        """Return the account's equity: its balances converted to the base currency."""
        account = self.account(account_id)
        equity = _ZERO
        unvalued: list[str] = []
        for currency, amount in sorted(account.balances.items()):
            if not amount:
                continue
            rate = self.rate(currency, account.base_currency)
            if rate is None:
                unvalued.append(currency)
                continue
            equity += amount * rate
        return Valuation(equity, tuple(unvalued))

    def _converted(self, books: Iterable[PositionBook], to: str) -> tuple[Decimal, ...]:
        realized = unrealized = fees = _ZERO
        for book in books:
            rate = self.rate(book.quote, to)
            if rate is None:
                continue
            realized += book.realized_pnl * rate
            unrealized += book.unrealized_pnl * rate
            fees += book.fees * rate
        return realized, unrealized, fees

    def snapshot(self, account_id: str, ts_ns: int) -> PortfolioSnapshot:
        """Return the account's snapshot at `ts_ns` and raise its equity peak if exceeded.

        P&L totals are converted to the base currency where a rate is known; the drawdown is
        measured against the peak of the equities of earlier snapshots (and this one), within
        [0, 1].
        """
        account = self.account(account_id)
        value = self.valuation(account_id)
        if value.unvalued:
            log.warning(
                "balances left out of equity: no price to convert them yet",
                extra={"account_id": account_id, "currencies": list(value.unvalued)},
            )
        equity = value.equity
        if account.peak_equity is None or equity > account.peak_equity:
            account.peak_equity = equity
        peak = account.peak_equity
        drawdown = _ZERO
        if peak > 0 and equity < peak:
            drawdown = min(_DIV.divide(peak - equity, peak), _ONE)
        books = [account.positions[i] for i in sorted(account.positions)]
        realized, unrealized, fees = self._converted(books, account.base_currency)
        # Built without validating again, as `PositionBook.to_event`: currencies and amounts
        # come from validated settings, openings and fills, the drawdown is clamped to [0, 1]
        # and every position is this account's.
        return build(
            PortfolioSnapshot,
            {
                "account_id": account_id,
                "base_currency": account.base_currency,
                "balances": dict(sorted(account.balances.items())),
                "equity": equity,
                "realized_pnl": realized,
                "unrealized_pnl": unrealized,
                "fees": fees,
                "positions": [b.to_event() for b in books if b.open_quantity],
                "peak_equity": peak,
                "drawdown": drawdown,
                "ts_event": ts_ns,
            },
        )
