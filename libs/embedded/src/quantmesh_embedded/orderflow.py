"""The columnar order-flow engine: what risk, the OMS, the simulated venue and the portfolio make
of a columnar strategy's decisions, computed without the bus, proven equal to the stages.

It mirrors the batch indicators (`quantmesh_signals.indicators`, each the twin of an
incremental one): the stage path (`quantmesh_embedded.sparse`) stays the reference, and this
engine computes the same fills, curve and figures for the runs it can reproduce exactly,
digit for digit (tests/test_orderflow_engine.py runs both on many seeded series and
configurations). Anything it cannot reproduce makes it decline (`qualify` names why) and the
run goes through the stages.

Where the time goes: the decisions come from the strategy's columnar form (numpy over every
bar); the fill print of every order is found with one `searchsorted` over the print times;
then one tight loop over the decisions (never over bars) does, with the stages' own Decimal
arithmetic, what each stage does with one order:

- the sizer (`--size N%`/`all-in`: `Sizer.quantity`, fed the fills it would have seen),
- risk: `target - position - working` (`TARGET_POSITION_ALREADY_REACHED` at zero), the lot
  rounding and quantity rules of `quantmesh_risk.checks` with the run's `Instrument`,
- the venue: a market order reaches it after its latency; with `market_waits_for_trade` (a
  bar backtest's next_open) it is accepted and fills at the first print after its arrival,
  at that print's time (the next bar's open, also after a gap); otherwise it takes the last
  trade before the first print at or after its arrival (`SimulatedVenue.advance` acts on
  arrived commands before it applies the print). Slipped by the venue's own slippage model,
  its fee `qty x price x rate` quantized as the venue does; an ACCEPTED and a FILL report,
- the portfolio: cash and position after each fill; its snapshots and the equity curve come
  from `SparseRun`'s bulk curve, exactly as on the stage path.

What qualifies (else `qualify` gives the reason): risk limits and sizing policies at their
defaults (nothing else in risk can deny a market target intent without reference prices), the
simulated venue, no minimum notional, prints in
time order, every order filled whole (within the print's liquidity) before the next decision
and before the run's end print.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Context, Decimal
from typing import overload

import numpy as np
import numpy.typing as npt

from quantmesh_common.messages import (
    ExecType,
    ExecutionReport,
    Instrument,
    InstrumentId,
    LiquiditySide,
    OrderStatus,
    Side,
)
from quantmesh_embedded.columns import BarColumns
from quantmesh_embedded.sizing import Sizer
from quantmesh_embedded.sparse import SparseRun, book_fill
from quantmesh_execution.config import ExecutionSettings
from quantmesh_execution.service import build_slippage
from quantmesh_execution.simulated import FEE_PRECISION, NoSlippage, SlippageModel
from quantmesh_risk.checks import check_quantity_rules, round_to_lot
from quantmesh_risk.config import RiskSettings
from quantmesh_risk.engine import WorkingOrders
from quantmesh_risk.limits import RiskConfig
from quantmesh_risk.sizing import SizingConfig
from quantmesh_signals.columnar import Decisions
from quantmesh_signals.strategy import StrategyContext

Ints = npt.NDArray[np.int64]
_ZERO = Decimal(0)
#: Python's default context, stated: the thread's may have been changed (ccxt sets ROUND_HALF_UP).
_AVERAGE = Context(prec=28, rounding=ROUND_HALF_EVEN)
#: Prefix of the ids the engine gives what the venue would name (order, trade, report).
ID_PREFIX = "columnar"


class EngineDeclinedError(Exception):
    """The engine cannot reproduce this run exactly: it goes through the stages."""


@dataclass(frozen=True)
class FlowConfig:
    """What the engine needs of a backtest's configuration, as the stages are given it."""

    instrument_id: str
    strategy_id: str
    account_id: str
    cash: Decimal
    risk: RiskSettings
    execution: ExecutionSettings
    #: Risk's reference data for the instrument (its lot size), or None.
    instrument: Instrument | None
    #: Size of the print a bar's open or close makes (the venue's liquidity for one order).
    liquidity: Decimal
    sizer: Sizer | None = None


def qualify(flow: FlowConfig) -> str | None:
    """Why the engine cannot reproduce a run of this configuration, or None if it can."""
    risk = flow.risk
    # Exactly the defaults, not merely "no numeric limit": any setting may change a decision
    # (e.g. allow_unknown_instruments=false denies every order of an instrument without rules).
    if risk.risk_limits != RiskConfig():
        return "risk limits are configured (QM_RISK_LIMITS)"
    if risk.risk_sizing != SizingConfig():
        return "a risk sizing policy is configured (QM_RISK_SIZING)"
    execution = flow.execution
    if execution.exec_venue == "ccxt":
        return f"the venue is not the simulated one ({execution.exec_venue})"
    if flow.instrument is not None and flow.instrument.min_notional > 0:
        return "the instrument has a minimum notional"
    return None


class EngineFills(Sequence[ExecutionReport]):
    """The engine's fill reports, kept as columns; each report is made when it is read.

    What a report holds beyond the columns is made as the stages make it: the client order id
    as the strategy's context names an order (`StrategyContext._next_ids`: one decision a bar,
    so always its first id at the deciding bar's close, kept in `decided`), the order's filled
    quantity and average price as the venue's order computes them (from zero), its venue ids in
    the venue's pattern under `ID_PREFIX` (the venue's own prefix is random per run).
    """

    def __init__(self, flow: FlowConfig, quote: str) -> None:
        self._flow = flow
        self._quote = quote
        slot = StrategyContext(flow.strategy_id, flow.account_id, [flow.instrument_id])._slots
        self._order_prefix = f"{flow.strategy_id}-"
        self._order_suffix = f"-{slot[flow.instrument_id]}.1"
        self.ts: list[int] = []
        #: The deciding bar's close of each fill's order.
        self.decided: list[int] = []
        self.side: list[Side] = []
        self.qty: list[Decimal] = []
        self.price: list[Decimal] = []
        self.fee: list[Decimal] = []

    def __len__(self) -> int:
        return len(self.ts)

    def _report(self, k: int) -> ExecutionReport:
        n = k + 1
        ts, qty, price = self.ts[k], self.qty[k], self.price[k]
        filled = _ZERO + qty
        return ExecutionReport.model_construct(
            report_id=f"{ID_PREFIX}-R{2 * n}",
            account_id=self._flow.account_id,
            client_order_id=f"{self._order_prefix}{self.decided[k]}{self._order_suffix}",
            venue_order_id=f"{ID_PREFIX}-O{n}",
            strategy_id=self._flow.strategy_id,
            instrument_id=self._flow.instrument_id,
            exec_type=ExecType.FILL,
            order_status=OrderStatus.FILLED,
            side=self.side[k],
            last_qty=qty,
            last_price=price,
            cum_qty=filled,
            leaves_qty=_ZERO,
            avg_price=_AVERAGE.divide(_ZERO + qty * price, filled),
            fee=self.fee[k],
            fee_currency=self._quote,
            liquidity_side=LiquiditySide.TAKER,
            trade_id=f"{ID_PREFIX}-T{n}",
            reason=None,
            ts_event=ts,
        )

    @overload
    def __getitem__(self, i: int) -> ExecutionReport: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[ExecutionReport]: ...

    def __getitem__(self, i: int | slice) -> ExecutionReport | Sequence[ExecutionReport]:
        n = len(self)
        if isinstance(i, slice):
            return [self._report(k) for k in range(*i.indices(n))]
        if not -n <= i < n:
            raise IndexError(i)
        return self._report(i % n)

    def __iter__(self) -> Iterator[ExecutionReport]:
        return (self._report(k) for k in range(len(self)))

    def rows(self) -> Iterator[tuple[Side, Decimal, Decimal, Decimal, int]]:
        """(side, quantity, price, fee, time) of each fill, without making reports."""
        return zip(self.side, self.qty, self.price, self.fee, self.ts, strict=True)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def _print_times(columns: BarColumns, end_ns: int) -> Ints:
    n = len(columns)
    times = np.empty(2 * n + 1, dtype=np.int64)
    times[0 : 2 * n : 2] = columns.ts_open
    times[1 : 2 * n : 2] = columns.ts_close
    times[2 * n] = end_ns
    return times


def _fill_prints(
    columns: BarColumns, decisions: Decisions, end_ns: int, latency_ns: int, wait: bool = False
) -> list[int]:
    """Per decision, the print whose delivery fills its order (EngineDeclinedError if one does
    not, or not before the next decision). `wait`: the venue's `market_waits_for_trade`."""
    times = _print_times(columns, end_ns)
    if np.any(np.diff(times) < 0):
        raise EngineDeclinedError(
            "prints out of time order (a bar opens before the last one closed)"
        )
    index = np.asarray(decisions.index, dtype=np.int64)
    if np.any(np.diff(index) <= 0):
        raise EngineDeclinedError("more than one decision on a bar")
    close_prints = 2 * index + 1
    if latency_ns == 0:
        # The order reaches the venue at once, right after the deciding bar's closing print:
        # it takes that print, or waits for the next one.
        fill = close_prints + 1 if wait else close_prints
    else:
        arrival = times[close_prints] + latency_ns
        fill = np.searchsorted(times, arrival, side="left").astype(np.int64)
    if len(fill) and int(fill[-1]) >= len(times):
        raise EngineDeclinedError("an order would reach the venue after the run's last print")
    # Its fill must reach risk before the next decision is checked: at the latest with the
    # next deciding bar's closing print (delivered before that decision's intent).
    if len(fill) > 1 and np.any(fill[:-1] > close_prints[1:]):
        raise EngineDeclinedError("an order would still be open at the next decision")
    return fill.tolist()  # type: ignore[no-any-return]


def run_orderflow(
    flow: FlowConfig, columns: BarColumns, decisions: Decisions, interval_ns: int
) -> tuple[SparseRun, EngineFills]:
    """Fills, report times and holdings of the run as the stages would make them.

    Raises EngineDeclinedError when the run is outside what the engine reproduces (before
    anything of the run is computed, or as soon as an order shows it).
    """
    reason = qualify(flow)
    if reason is not None:
        raise EngineDeclinedError(reason)
    run = SparseRun(columns, flow.cash, interval_ns)
    symbol = flow.instrument_id
    quote = InstrumentId.parse(symbol).quote
    latency_ns = flow.execution.sim_latency_ns
    wait = flow.execution.sim_market_waits_for_trade
    fill_prints = _fill_prints(columns, decisions, run.end_ns, latency_ns, wait)
    # The price each order takes: the filling print's when it waited for it, else the last
    # trade the venue saw before the filling print (print p - 1); the end print's is the last
    # close. A waiting order fills at its print's time, another at its arrival.
    n = len(columns)
    filling = np.asarray(fill_prints, dtype=np.int64)
    taken = filling - (0 if wait or latency_ns == 0 else 1)
    fill_times = _print_times(columns, run.end_ns)[filling].tolist() if wait else None
    bar = np.minimum(taken // 2, n - 1)
    is_close = (taken % 2 == 1) | (taken // 2 > n - 1)
    exact_open, exact_close = columns.exact["open"], columns.exact["close"]
    mantissas = np.where(is_close, exact_close.mantissa[bar], exact_open.mantissa[bar]).tolist()
    exponents = np.where(is_close, exact_close.exponent[bar], exact_open.exponent[bar]).tolist()
    index = np.asarray(decisions.index, dtype=np.int64)
    close_ts = columns.ts_close[index].tolist()
    fills = EngineFills(flow, quote)
    report_ts: list[int] = []
    report_after: list[int] = []
    cash, position = flow.cash, _ZERO
    cashes, positions = [cash], [position]
    risk_position = _ZERO
    # What risk adds for working orders: none is ever working at a decision here (checked
    # above), so the sum over none, exactly as WorkingOrders gives it.
    working = WorkingOrders().net(symbol)
    instrument = flow.instrument
    slippage: SlippageModel = build_slippage(flow.execution)
    slipped = not isinstance(slippage, NoSlippage)
    rate = flow.execution.sim_taker_fee
    liquidity = flow.liquidity
    sizer = flow.sizer
    # The fill the sizer has not seen yet: (the print it came with, side, qty, price, fee).
    unseen: tuple[int, Side, Decimal, Decimal, Decimal] | None = None
    buy, sell = Side.BUY, Side.SELL
    index_list = index.tolist()
    fill_ts, fill_decided, fill_side, fill_qty = fills.ts, fills.decided, fills.side, fills.qty
    fill_price, fill_fee = fills.price, fills.fee
    for k, target in enumerate(decisions.target):
        if sizer is not None:
            i = index_list[k]
            close_print = 2 * i + 1
            if unseen is not None and unseen[0] < close_print:
                sizer.apply_fill(*unseen[1:])
                unseen = None
            if target:
                sizer.last_price = columns.price("close", i)
                size = sizer.quantity()
                target = size if target > 0 else -size
            if unseen is not None:
                # It comes with the deciding bar's closing print: after the sizing.
                sizer.apply_fill(*unseen[1:])
                unseen = None
        # Risk: the order that moves the position to the target.
        delta = target - risk_position - working
        if delta == 0:
            continue  # TARGET_POSITION_ALREADY_REACHED
        side, requested = (buy, delta) if delta > 0 else (sell, -delta)
        quantity = requested
        if instrument is not None:
            quantity = round_to_lot(requested, instrument)
            if check_quantity_rules(quantity, requested, instrument) is not None:
                continue
        if quantity > liquidity:
            raise EngineDeclinedError("an order larger than a print's liquidity would fill in part")
        # The venue: the last trade before the filling print, slipped; its fee.
        price = Decimal(mantissas[k]).scaleb(exponents[k])
        if slipped:
            price = slippage.apply(price, side, quantity)
        fee = (quantity * price * rate).quantize(FEE_PRECISION, rounding=ROUND_HALF_UP)
        sign = side.sign
        decided = close_ts[k]
        at = decided + latency_ns  # its arrival: the ACCEPTED report's time
        filled_at = at if fill_times is None else fill_times[k]
        fill_ts.append(filled_at)
        fill_decided.append(decided)
        fill_side.append(side)
        fill_qty.append(quantity)
        fill_price.append(price)
        fill_fee.append(fee)
        p = fill_prints[k]
        report_ts += (at, filled_at)  # ACCEPTED, then FILL
        # Each after the print last delivered before it: the deciding bar's close for an
        # order accepted at once, else the print whose delivery made it arrive.
        report_after += (2 * index_list[k] + 1 if latency_ns == 0 else p, p)
        risk_position = risk_position + sign * quantity
        cash, position = book_fill(cash, position, sign, quantity, price, fee)
        cashes.append(cash)
        positions.append(position)
        if sizer is not None:
            unseen = (p, side, quantity, price, fee)
    run.report_ts = array("q", report_ts)
    run.report_after = array("q", report_after)
    run.report_fill = array("b", [0, 1]) * len(fills)
    run.give_holdings(cashes, positions)
    return run, fills
