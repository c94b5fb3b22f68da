"""The columnar backtest: decide over every bar at once, run the stages only where it matters.

A strategy with a columnar form (`quantmesh_signals.columnar`) gives every decision of a run
from the bar columns in one pass. Only then does the mesh run, and only on the bars where
something happens: each decision becomes the very Signal and OrderIntent the signals stage
would publish (same `StrategyContext`, same ids, resized by the same `Sizer`), at the deciding
bar's close, after that bar's closing print; risk, the OMS, the simulated venue and the
portfolio handle it with their own handlers on the in-memory bus and the simulated clock.
While an order is open every print is delivered, bar by bar, as in the per-bar path; once
none is, the prints up to the next decision are skipped: nothing in the stages can change on
them (no order rests at the venue, no risk limit in a backtest reads prices or equity).

The equity curve is then marked in bulk: the portfolio's own snapshot rule (a snapshot at
each interval boundary an event crosses, holding every event up to it) applied with numpy to
the times of every print and every execution report, cash and position from the fills, the
mark from the last print. The curve keeps those indices and makes each exact Decimal point
when it is read; the portfolio's final cash and position are checked against it.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from typing import Any, overload

import numpy as np
import numpy.typing as npt

from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import ExecutionReport, InstrumentId, Order
from quantmesh_common.topics import Topic
from quantmesh_embedded.columns import BarColumns
from quantmesh_embedded.mesh import DrivenClock
from quantmesh_portfolio.service import PortfolioService
from quantmesh_signals.columnar import Decisions
from quantmesh_signals.service import to_emits
from quantmesh_signals.strategy import StrategyContext

EquityPoint = tuple[int, Decimal]
_ZERO, _ONE = Decimal(0), Decimal(1)
_CHUNK = 65_536
#: Prints per block of the bulk curve's pass: its temporaries stay a few MB whatever the run.
_BLOCK = 1 << 16
Ints = npt.NDArray[np.int64]


class Curve(Sequence[EquityPoint]):
    """The run's equity curve, each point made when it is read.

    Holds numpy indices (a few bytes a point) instead of a million (ts, Decimal) tuples:
    point i is the start, an idle close at the starting cash, or a snapshot valued from the
    cash and position after its fills and the exact price of its marking print.
    """

    def __init__(self, run: SparseRun, base: str, quote: str) -> None:
        self._cash = run.cash
        self._stamps, self._applied, marks = run.curve_indices()
        self._cashes, self._positions = run.holdings()
        first = int(self._stamps[0]) if len(self._stamps) else run.end_ns + 1
        closes = run.columns.ts_close
        self._idle = closes[closes < first]
        self._base_first = base < quote
        self._start = (int(run.columns.ts_open[0]), run.cash)
        # Each snapshot's mark as an exact decimal: print p is bar p // 2's open (even p) or
        # close (odd p); the end print is the last close.
        last = len(run.columns) - 1
        bar = np.minimum(marks // 2, last)
        is_close = (marks % 2 == 1) | (marks // 2 > last)
        exact_open, exact_close = run.columns.exact["open"], run.columns.exact["close"]
        self._mantissa = np.where(is_close, exact_close.mantissa[bar], exact_open.mantissa[bar])
        self._exponent = np.where(is_close, exact_close.exponent[bar], exact_open.exponent[bar])

    def __len__(self) -> int:
        return 1 + len(self._idle) + len(self._stamps)

    def _value(self, applied: int, mantissa: int, exponent: int) -> Decimal:
        cash, position = self._cashes[applied], self._positions[applied]
        # Portfolio.valuation: balances in currency order, each times its rate (1 for cash).
        value = _ZERO
        held = position * Decimal(mantissa).scaleb(exponent) if position else None
        if self._base_first and held is not None:
            value += held
        if cash:
            value += cash * _ONE
        if not self._base_first and held is not None:
            value += held
        return value

    def _point(self, i: int) -> EquityPoint:
        if i == 0:
            return self._start
        i -= 1
        if i < len(self._idle):
            return int(self._idle[i]), self._cash
        i -= len(self._idle)
        value = self._value(int(self._applied[i]), int(self._mantissa[i]), int(self._exponent[i]))
        return int(self._stamps[i]), value

    @overload
    def __getitem__(self, i: int) -> EquityPoint: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[EquityPoint]: ...

    def __getitem__(self, i: int | slice) -> EquityPoint | Sequence[EquityPoint]:
        n = len(self)
        if isinstance(i, slice):
            return [self._point(k) for k in range(*i.indices(n))]
        if not -n <= i < n:
            raise IndexError(i)
        return self._point(i % n)

    def __iter__(self) -> Iterator[EquityPoint]:
        yield self._start
        cash = self._cash
        for ts in self._idle.tolist():
            yield ts, cash
        value = self._value
        # In chunks of plain ints: numpy scalars are slow to index one by one.
        for k in range(0, len(self._stamps), _CHUNK):
            part = slice(k, k + _CHUNK)
            yield from (
                (ts, value(j, m, e))
                for ts, j, m, e in zip(
                    self._stamps[part].tolist(),
                    self._applied[part].tolist(),
                    self._mantissa[part].tolist(),
                    self._exponent[part].tolist(),
                    strict=True,
                )
            )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class FillKeeper:
    """Copies of fill reports to keep, sharing one set of the names of their set fields.

    A report built with every field has its own set of their names (~2.3 KB, more than its
    values): the 55,151 fills of a 1,000,000-bar run spent 125 MB on equal sets. The copy
    holds the very same values (not validated again: they were); the models are frozen, so
    nothing adds to a shared set (a `model_copy` copies it).
    """

    def __init__(self) -> None:
        self._names: dict[frozenset[str], set[str]] = {}

    def keep(self, report: ExecutionReport) -> ExecutionReport:
        """The copy of `report` to keep."""
        names = report.model_fields_set
        shared = self._names.setdefault(frozenset(names), set(names))
        return ExecutionReport.model_construct(shared, **report.__dict__)


#: Fields of a fill report whose values recur from fill to fill: a FillLog keeps one object
#: per distinct value (the ids, the time and the enums are left as they are).
_RECURRING = frozenset(
    {
        "account_id",
        "strategy_id",
        "instrument_id",
        "last_qty",
        "last_price",
        "cum_qty",
        "leaves_qty",
        "avg_price",
        "fee",
        "fee_currency",
        "reason",
    }
)


class FillLog(Sequence[ExecutionReport]):
    """Fill reports kept as rows of their values; each report is made again when read.

    A kept report as an object costs ~1.7 KB (its attribute dict, six Decimals, its ids); as
    a tuple of its values, one object per distinct recurring value (quantities, prices, fees
    at the same level, the account), ~0.6 KB: 55,151 fills of a 1,000,000-bar run, ~60 MB
    less. A read gives a report equal to the one appended, built without validation (it was
    validated), its field-name set shared with the others of its layout; a new object each
    time. Only values of the same type and text are shared (`Decimal("2")` is not
    `Decimal("2.0")`), and they are immutable.
    """

    def __init__(self) -> None:
        self._layouts: list[tuple[tuple[str, ...], set[str]]] = []
        self._layout_of: dict[tuple[tuple[str, ...], frozenset[str]], int] = {}
        self._recurring: list[tuple[bool, ...]] = []
        self._rows: list[tuple[Any, ...]] = []
        self._values: dict[tuple[type, str], Any] = {}

    def append(self, report: ExecutionReport) -> None:
        """Keep `report` (a copy of its values; the report itself is not held)."""
        values = report.__dict__
        names = tuple(values)
        key = (names, frozenset(report.model_fields_set))
        layout = self._layout_of.get(key)
        if layout is None:
            layout = self._layout_of[key] = len(self._layouts)
            self._layouts.append((names, set(report.model_fields_set)))
            self._recurring.append(tuple(name in _RECURRING for name in names))
        pool = self._values
        row: list[Any] = [layout]
        for recurring, value in zip(self._recurring[layout], values.values(), strict=True):
            if recurring and (type(value) is Decimal or type(value) is str):
                value = pool.setdefault((type(value), str(value)), value)
            row.append(value)
        self._rows.append(tuple(row))

    def _report(self, row: tuple[Any, ...]) -> ExecutionReport:
        names, fields_set = self._layouts[row[0]]
        return ExecutionReport.model_construct(fields_set, **dict(zip(names, row[1:], strict=True)))

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, i: int) -> ExecutionReport: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[ExecutionReport]: ...

    def __getitem__(self, i: int | slice) -> ExecutionReport | Sequence[ExecutionReport]:
        if isinstance(i, slice):
            return [self._report(row) for row in self._rows[i]]
        return self._report(self._rows[i])

    def __iter__(self) -> Iterator[ExecutionReport]:
        return (self._report(row) for row in self._rows)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def book_fill(
    cash: Decimal, position: Decimal, sign: int, quantity: Decimal, price: Decimal, fee: Decimal
) -> tuple[Decimal, Decimal]:
    """Cash and position after one fill in the quote currency, with the portfolio's arithmetic
    (quantmesh_portfolio: the base balance moves by quantity x sign, the quote balance by
    -quantity x price x sign, then by -fee)."""
    position = position + quantity * sign
    cash = cash + -quantity * price * sign
    if fee:
        cash = cash + -fee
    return cash, position


class SparseRun:
    """What a columnar run recorded: fills, report times, and the curve built from them."""

    def __init__(self, columns: BarColumns, cash: Decimal, interval_ns: int) -> None:
        self.columns = columns
        self.cash = cash
        self.interval_ns = interval_ns
        self.fills = FillLog()
        # Machine ints, not lists of Python ints: a 1,000,000-bar run has ~165,000 reports.
        self.report_ts = array("q")
        #: Per report: the print last delivered before it, and whether it is a fill.
        self.report_after = array("q")
        self.report_fill = array("b")
        self.last_print = -1
        self.open_orders: set[str] = set()
        self._indices: tuple[Ints, Ints, Ints] | None = None
        self._holdings: tuple[list[Decimal], list[Decimal]] | None = None
        #: The holdings were given (the columnar engine's), not computed from `fills`.
        self._given = False
        self.end_ns = int(columns.ts_close[-1]) + interval_ns
        #: Prints of the run, in publish order: open i at 2i, close i at 2i + 1, the end at 2n.
        self.prints = 2 * len(columns) + 1

    def print_time(self, p: int) -> int:
        """The time of print `p`."""
        bar, kind = divmod(p, 2)
        if bar == len(self.columns):
            return self.end_ns
        return int((self.columns.ts_close if kind else self.columns.ts_open)[bar])

    def print_times(self, start: int, stop: int) -> Ints:
        """The times of prints `start` to `stop` - 1, as an array."""
        out = np.empty(stop - start, dtype=np.int64)
        n = len(self.columns)
        for kind, source in ((0, self.columns.ts_open), (1, self.columns.ts_close)):
            first = start + (start + kind) % 2  # the first print of this kind in the range
            bars = source[first // 2 : min((stop - kind + 1) // 2, n)]
            out[first - start : first - start + 2 * len(bars) : 2] = bars
        if stop == self.prints:
            out[-1] = self.end_ns
        return out

    def print_price(self, p: int) -> Decimal:
        """The exact price of print `p`."""
        bar, kind = divmod(p, 2)
        if bar == len(self.columns):
            return self.columns.price("close", bar - 1)
        return self.columns.price("close" if kind else "open", bar)

    def on_report(self, envelope: Envelope[Any]) -> None:
        """Note an execution report: its time, the print it followed, and a fill."""
        report: ExecutionReport = envelope.payload
        self.report_ts.append(report.ts_event)
        self.report_after.append(self.last_print)
        fill = report.exec_type.is_fill
        self.report_fill.append(int(fill))
        if fill:
            self.fills.append(report)

    def on_order(self, envelope: Envelope[Any]) -> None:
        """Follow which orders are still open (the prints matter while one is)."""
        order: Order = envelope.payload
        if order.status.is_terminal:
            self.open_orders.discard(order.client_order_id)
        else:
            self.open_orders.add(order.client_order_id)

    # -- the curve -----------------------------------------------------------------------------

    def curve_indices(
        self,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Per portfolio snapshot: its time, the fills applied by then, the print marking it.

        Computed once, when the run is over (later calls return the same arrays).

        The portfolio sees every print (those skipped here too) and every report, a report
        right after the print that caused it: that is the order, not the time (a fill
        stamped at an order's arrival comes after the later print that matched it). An event
        whose time passes the next boundary (the largest boundary any earlier event reached)
        emits one snapshot at the last boundary before it, holding the events before it,
        once the account exists (its first fill).
        """
        if self._indices is not None:
            return self._indices
        # The events in that order are the prints with each report after the print it
        # followed; they are walked in blocks of prints, carrying the running fill count,
        # last print and boundary reached from one block to the next.
        rank = np.argsort(np.frombuffer(self.report_after, dtype=np.int64), kind="stable")
        after = np.frombuffer(self.report_after, dtype=np.int64)[rank]
        report_ts = np.frombuffer(self.report_ts, dtype=np.int64)[rank]
        report_fill = np.frombuffer(self.report_fill, dtype=np.int8)[rank].astype(bool)
        parts: tuple[list[Ints], list[Ints], list[Ints]] = ([], [], [])
        fills, last, reached = 0, -1, None
        for p0 in range(0, self.prints, _BLOCK):
            p1 = min(p0 + _BLOCK, self.prints)
            lo = 0 if p0 == 0 else int(np.searchsorted(after, p0))
            hi = int(np.searchsorted(after, p1))
            a = after[lo:hi]
            prints = np.arange(p0, p1, dtype=np.int64)
            size = len(prints) + len(a)
            # A print's place: the prints before it in the block plus the reports after an
            # earlier print; a report's: the reports before it plus the prints up to its own.
            at_print = prints - p0 + np.searchsorted(a, prints)
            at_report = np.arange(len(a), dtype=np.int64) + a - p0 + 1
            times = np.empty(size, dtype=np.int64)
            times[at_print] = self.print_times(p0, p1)
            times[at_report] = report_ts[lo:hi]
            is_fill = np.zeros(size, dtype=np.int64)
            is_fill[at_report] = report_fill[lo:hi]
            marks = np.full(size, -1, dtype=np.int64)
            marks[at_print] = prints
            fills_by = np.cumsum(is_fill) + fills
            last_print = np.maximum(np.maximum.accumulate(marks), last)
            cells = -(-times // self.interval_ns)
            reach = np.maximum.accumulate(cells)
            if reached is not None:
                reach = np.maximum(reach, reached)
            # Each event against the boundary reached before it (the first event: none).
            before_reach = np.concatenate(([cells[0] if reached is None else reached], reach[:-1]))
            before_fills = np.concatenate(([fills], fills_by[:-1]))
            before_print = np.concatenate(([last], last_print[:-1]))
            trigger = np.flatnonzero(cells > before_reach)
            applied = before_fills[trigger]
            held = applied > 0  # the account exists from its first fill on
            parts[0].append((cells[trigger][held] - 1) * self.interval_ns)
            parts[1].append(applied[held])
            parts[2].append(before_print[trigger][held])
            fills, last, reached = int(fills_by[-1]), int(last_print[-1]), int(reach[-1])
        # One column at a time, its blocks' pieces let go once copied.
        columns: list[Ints] = []
        for pieces in parts:
            columns.append(np.concatenate(pieces))
            pieces.clear()
        self._indices = (columns[0], columns[1], columns[2])
        return self._indices

    def holdings(self) -> tuple[list[Decimal], list[Decimal]]:
        """Cash and position after 0, 1, 2, ... fills, with the portfolio's arithmetic."""
        if self._holdings is not None and (
            self._given or len(self._holdings[0]) == len(self.fills) + 1
        ):
            return self._holdings
        cash, position = self.cash, Decimal(0)
        cashes, positions = [cash], [position]
        for fill in self.fills:
            assert fill.last_price is not None  # a fill has one
            cash, position = book_fill(
                cash, position, fill.side.sign, fill.last_qty, fill.last_price, fill.fee
            )
            cashes.append(cash)
            positions.append(position)
        self._holdings = (cashes, positions)
        return self._holdings

    def give_holdings(self, cashes: list[Decimal], positions: list[Decimal]) -> None:
        """Take cash and position after 0, 1, 2, ... fills as computed elsewhere (the engine's
        fills are not reports this run holds)."""
        self._holdings = (cashes, positions)
        self._given = True

    def exposure(self) -> int:
        """Snapshots taken while a position was open (the per-bar path's count)."""
        _, applied, _ = self.curve_indices()
        _, positions = self.holdings()
        held = np.asarray([p != 0 for p in positions], dtype=bool)
        return int(np.count_nonzero(held[applied]))


async def run_sparse(
    mesh: Any,
    clock: DrivenClock,
    symbol: str,
    strategy_id: str,
    account_id: str,
    columns: BarColumns,
    decisions: Decisions,
    run: SparseRun,
    *,
    rewrite: Callable[[list[Any], Decimal], list[Any]] | None = None,
    progress: Callable[[int, int], None] | None = None,
    progress_every: int = 1024,
    make_print: Callable[[str, str, Decimal, int, int], Any],
) -> None:
    """Drive `mesh` through the decisions (see the module docstring)."""
    bus = mesh.bus
    venue = InstrumentId.parse(symbol).venue
    settle = mesh.settle if mesh.has_tasks else bus.run_until_idle
    ctx = StrategyContext(strategy_id, account_id, [symbol])
    n = len(columns)
    cursor = 0
    next_progress = progress_every

    async def deliver(p: int) -> None:
        ts = run.print_time(p)
        clock.advance_to(ts)
        run.last_print = p
        await bus.publish(Topic.MD_TICKS, make_print(symbol, venue, run.print_price(p), ts, p))
        await settle()

    async def skip_to(p: int) -> None:
        # Prints before `p` matter only while an order is open at the venue.
        nonlocal cursor, next_progress
        while cursor < p and run.open_orders:
            await deliver(cursor)
            cursor += 1
        cursor = max(cursor, p)
        if progress is not None and cursor // 2 >= next_progress:
            progress(min(cursor // 2, n), n)
            next_progress = (cursor // 2 // progress_every + 1) * progress_every

    index = decisions.index.tolist()
    for i, target, reason in zip(index, decisions.target, decisions.reason, strict=True):
        close_print = 2 * i + 1
        await skip_to(close_print)
        ts = int(columns.ts_close[i])
        close = columns.price("close", i)
        ctx.now_ns = ts
        ctx._see_price(symbol, close)
        ctx.target_position(symbol, target, tag=decisions.tag, reason=reason)
        emits = to_emits(ctx._drain())
        if rewrite is not None:
            # Sized now, as the signals stage does: it decides on the bar, queued behind the
            # closing print, before the fill that print may cause reaches it.
            emits = rewrite(emits, close)
        await deliver(close_print)
        cursor = close_print + 1
        for emit in emits:
            await bus.publish(emit.topic, emit.payload, key=emit.key, ts_event=emit.ts_event)
        await settle()
    await skip_to(2 * n)
    # The end print (as in the per-bar path) fills a decision on the last bar and closes the
    # last snapshot; mesh.stop() delivers it.
    clock.advance_to(run.end_ns)
    run.last_print = 2 * n
    await bus.publish(
        Topic.MD_TICKS, make_print(symbol, venue, run.print_price(2 * n), run.end_ns, 2 * n)
    )


def check_books(mesh: Any, run: SparseRun, account_id: str, base: str, quote: str) -> None:
    """Raise if the portfolio's final cash or position differs from the bulk curve's."""
    for service in mesh.services:
        if isinstance(service, PortfolioService) and service.handlers is not None:
            accounts = service.handlers.portfolio.accounts
            if account_id not in accounts:
                if run.fills:
                    raise RuntimeError("the portfolio applied none of the run's fills")
                return
            balances = accounts[account_id].balances
            cashes, positions = run.holdings()
            got = (balances.get(quote, Decimal(0)), balances.get(base, Decimal(0)))
            if got != (cashes[-1], positions[-1]):
                raise RuntimeError(
                    f"portfolio holds {got}, the bulk curve {(cashes[-1], positions[-1])}"
                )
