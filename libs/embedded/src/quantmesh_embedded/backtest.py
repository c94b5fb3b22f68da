"""Backtests: recorded bars through signals, risk, oms, execution and portfolio in one process."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, overload

import numpy as np

from quantmesh_common.clock import SimulatedClock
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import (
    Bar,
    ExecutionReport,
    Instrument,
    InstrumentId,
    PortfolioSnapshot,
    PositionSide,
    Side,
    Tick,
)
from quantmesh_common.performance import PerformanceSummary, RoundTrip, summarize
from quantmesh_common.topics import Topic
from quantmesh_embedded.columns import BarColumns
from quantmesh_embedded.mesh import DrivenClock, EmbeddedMesh
from quantmesh_embedded.orderflow import EngineDeclinedError, FlowConfig, run_orderflow
from quantmesh_embedded.sizing import SizedSignalsService, Sizer, SizeSpec
from quantmesh_embedded.sparse import Curve, FillLog, SparseRun, check_books, run_sparse
from quantmesh_execution.config import ExecutionSettings
from quantmesh_execution.service import ExecutionService
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.service import OmsService
from quantmesh_portfolio.config import PortfolioSettings
from quantmesh_portfolio.service import PortfolioService
from quantmesh_risk.config import RiskSettings
from quantmesh_risk.service import RiskService
from quantmesh_signals.columnar import Decisions, columnar_form
from quantmesh_signals.config import SignalsSettings
from quantmesh_signals.engine import StrategySpec
from quantmesh_signals.service import SignalsService
from quantmesh_signals.strategy import create_strategy

ACCOUNT_ID = "backtest"
#: Size of the trade prints made from bars: a bar backtest assumes the bar's liquidity covers
#: the order (the simulated venue would otherwise fill only what the print shows).
BAR_LIQUIDITY = Decimal("1e12")
#: How often (in bars) a run reports its progress.
PROGRESS_EVERY = 1024
FillAt = Literal["next_open", "close"]
#: How a backtest runs: see `run_backtest`.
Mode = Literal["auto", "columnar", "per_bar"]
#: What computes the order flow of a columnar run: see `run_backtest`.
Engine = Literal["auto", "stages", "columnar"]
#: Lot size when neither the instrument nor --lot-size gives one: fractional quantities.
DEFAULT_LOT_SIZE = Decimal("1e-8")
#: Called with (bars done, bars in all) as a run goes.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class BacktestConfig:
    """One backtest: the strategy, the costs and when market orders fill."""

    instrument_id: str
    strategy: str
    params: dict[str, Any] = field(default_factory=dict)
    cash: Decimal = Decimal("100000")
    commission: Decimal = Decimal("0.001")
    slippage_bps: Decimal = Decimal(0)
    fill_at: FillAt = "next_open"
    #: None: the strategy's own `quantity` parameter sizes the orders.
    size: SizeSpec | None = None
    #: None: fractional (orders are not rounded; --size N% / all-in round to DEFAULT_LOT_SIZE).
    lot_size: Decimal | None = None

    def __post_init__(self) -> None:
        if self.lot_size is not None and self.lot_size <= 0:
            raise ValueError(f"lot size must be positive, got {self.lot_size}")
        if self.size is not None and "quantity" in self.params:
            raise ValueError("give the size either as --size or as --param quantity, not both")

    def strategy_params(self) -> dict[str, Any]:
        """The strategy's parameters, with a fixed --size as its `quantity`."""
        if self.size is not None and self.size.kind == "fixed":
            return {**self.params, "quantity": str(self.size.value)}
        return dict(self.params)

    def describe(self) -> dict[str, str]:
        """The run's configuration as text, for reports."""
        return {
            "instrument": self.instrument_id,
            "strategy": self.strategy,
            "params": ", ".join(f"{k}={v}" for k, v in sorted(self.params.items())) or "-",
            "cash": str(self.cash),
            "commission": str(self.commission),
            "slippage_bps": str(self.slippage_bps),
            "fill_at": self.fill_at,
            "size": str(self.size) if self.size is not None else "strategy quantity",
            "lot_size": str(self.lot_size) if self.lot_size is not None else "fractional",
        }


@dataclass(repr=False)
class BacktestResult:
    """What a run produced: its fills, its equity curve and the figures over them."""

    bars: int
    #: A list, or (both paths of run_backtest) a FillLog whose reports are made when read.
    fills: Sequence[ExecutionReport]
    #: A list, or (columnar path) a sequence whose points are made when read.
    equity: Sequence[tuple[int, Decimal]]
    #: A list, or a RoundTrips paired from the fills when first read (a figure, not the run).
    round_trips: Sequence[RoundTrip]
    elapsed_s: float
    exposure_bars: int = 0
    #: What computed the order flow: "stages" (every order through risk, oms, venue and
    #: portfolio) or "columnar" (quantmesh_embedded.orderflow, proven equal to them).
    engine: str = "stages"
    #: Why the columnar engine declined the run (None: it ran, or was not asked).
    declined: str | None = None

    def __repr__(self) -> str:
        # Counts, not contents: Python 3.11's asyncio.run formats the repr of its main task's
        # result twice on the way out (signal.getsignal of its SIGINT handler), which with
        # every fill and round trip written out cost 4 s and 50 MB at 1,000,000 bars.
        return (
            f"BacktestResult(bars={self.bars}, fills={len(self.fills)}, "
            f"equity_points={len(self.equity)}, round_trips={_count(self.round_trips)}, "
            f"elapsed_s={self.elapsed_s:.3f}, exposure_bars={self.exposure_bars}, "
            f"engine={self.engine!r})"
        )

    def figures(self) -> dict[str, Any]:
        """The run's figures as plain JSON-ready values (None where not computable)."""
        s = summarize(self.equity, self.round_trips, periods_per_year="infer")
        t = s.trades
        return {
            "bars": self.bars,
            "trades": t.trades,
            "fills": len(self.fills),
            **curve_figures(s),
            "win_rate_pct": _pct(t.win_rate),
            "profit_factor": _num(t.profit_factor),
            "exposure_pct": _pct(self.exposure_bars / self.bars if self.bars else None),
            "elapsed_s": round(self.elapsed_s, 3),
            "bars_per_s": round(self.bars / self.elapsed_s) if self.elapsed_s > 0 else None,
        }


def _count(trips: Sequence[RoundTrip]) -> str:
    # A repr pairs no fills: the count once they are paired.
    if isinstance(trips, RoundTrips) and not trips.paired:
        return "unpaired"
    return str(len(trips))


class RoundTrips(Sequence[RoundTrip]):
    """A run's round trips, paired FIFO from its fills when first read.

    Pairing is analysis of the fills, like the figures: at 1,000,000 bars it took ~0.4 s of a
    ~1 s columnar run, and a caller that wants only the curve should not pay for it.
    """

    def __init__(
        self, fills: Callable[[], Iterable[tuple[Side, Decimal, Decimal, Decimal, int]]], iid: str
    ) -> None:
        self._fills = fills
        self._instrument_id = iid
        self._trips: list[RoundTrip] | None = None

    @property
    def paired(self) -> bool:
        """True once the trips have been paired."""
        return self._trips is not None

    def _list(self) -> list[RoundTrip]:
        if self._trips is None:
            self._trips = trips_of(self._fills(), self._instrument_id)
        return self._trips

    def __len__(self) -> int:
        return len(self._list())

    @overload
    def __getitem__(self, i: int) -> RoundTrip: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[RoundTrip]: ...

    def __getitem__(self, i: int | slice) -> RoundTrip | Sequence[RoundTrip]:
        return self._list()[i]

    def __iter__(self) -> Iterator[RoundTrip]:
        return iter(self._list())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return self._list() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def curve_figures(s: PerformanceSummary) -> dict[str, Any]:
    """The figures an equity curve alone gives, JSON-ready (`quantmesh report` prints these)."""
    return {
        "final_equity": str(s.final_equity) if s.final_equity is not None else None,
        "return_pct": _pct(s.total_return),
        "cagr_pct": _pct(s.cagr),
        "sharpe": _num(s.sharpe),
        "sortino": _num(s.sortino),
        "calmar": _num(s.calmar),
        "omega": _num(s.omega),
        "max_drawdown_pct": _pct(s.max_drawdown),
    }


def _num(value: float | None) -> float | None:
    # JSON has no infinity: "no losing period" reads as null, not as a number.
    if value is None or math.isinf(value) or math.isnan(value):
        return None
    return round(value, 6)


def _pct(value: float | None) -> float | None:
    return _num(value * 100) if value is not None else None


def round_trips(fills: Sequence[ExecutionReport]) -> list[RoundTrip]:
    """Pair fills FIFO into round trips; fees are shared pro rata by quantity."""
    if not fills:
        return []
    return trips_of(_rows(fills), fills[0].instrument_id)


def _rows(
    fills: Sequence[ExecutionReport],
) -> Iterator[tuple[Side, Decimal, Decimal, Decimal, int]]:
    for f in fills:
        assert f.last_price is not None  # a fill has one
        yield f.side, f.last_qty, f.last_price, f.fee, f.ts_event


def trips_of(
    fills: Iterable[tuple[Side, Decimal, Decimal, Decimal, int]], instrument_id: str
) -> list[RoundTrip]:
    """Pair fills (side, quantity, price, fee, time) of one instrument FIFO into round trips."""
    lots: deque[list[Any]] = deque()  # [side, qty left, price, fee per unit, ts]
    trips: list[RoundTrip] = []
    for side, qty, price, fee, ts in fills:
        fee_per_unit = fee / qty if qty else Decimal(0)
        while qty > 0 and lots and lots[0][0] is not side:
            lot = lots[0]
            matched = min(qty, lot[1])
            trips.append(
                RoundTrip(
                    side=PositionSide.LONG if lot[0] is Side.BUY else PositionSide.SHORT,
                    quantity=matched,
                    entry_price=lot[2],
                    exit_price=price,
                    entry_ts_ns=lot[4],
                    exit_ts_ns=ts,
                    fees=(lot[3] + fee_per_unit) * matched,
                    instrument_id=instrument_id,
                )
            )
            lot[1] -= matched
            qty -= matched
            if lot[1] == 0:
                lots.popleft()
        if qty > 0:
            lots.append([side, qty, price, fee_per_unit, ts])
    return trips


def make_sizer(config: BacktestConfig) -> Sizer | None:
    """The sizer of a `--size N%` or `all-in` run, None when the strategy sizes its orders."""
    size = config.size
    if size is None or size.kind == "fixed":
        return None
    return Sizer(
        size,
        config.instrument_id,
        cash=config.cash,
        commission=config.commission,
        lot_size=config.lot_size or DEFAULT_LOT_SIZE,
        slippage_bps=config.slippage_bps,
    )


#: Closed orders the oms and the simulated venue keep in memory during a backtest.
KEEP_CLOSED = 1_000


def risk_instrument(config: BacktestConfig) -> Instrument | None:
    """The reference data risk gets for the run's instrument: its lot size, if one is given."""
    if config.lot_size is None:
        return None
    instrument = InstrumentId.parse(config.instrument_id)
    return Instrument(
        instrument_id=config.instrument_id,
        venue=instrument.venue,
        symbol=f"{instrument.base}/{instrument.quote}",
        base=instrument.base,
        quote=instrument.quote,
        tick_size=DEFAULT_LOT_SIZE,
        lot_size=config.lot_size,
    )


def risk_settings(config: BacktestConfig) -> RiskSettings:
    """The risk stage's settings in a backtest (limits and sizing as QM_RISK_* say, if set)."""
    # The lot size reaches risk as reference data: every order is rounded down to it there.
    rules = risk_instrument(config)
    return RiskSettings(bus="memory", risk_instruments=[rules] if rules is not None else [])


def execution_settings(config: BacktestConfig, *, trades: bool = False) -> ExecutionSettings:
    """The simulated venue's settings in a backtest: the run's fees, slippage and fill timing.

    Over bars (`trades=False`), next_open makes a market order wait at the venue for the next
    print, which after a decision on a bar's close is the next bar's opening print, however
    long the market was shut in between. Over trades (ticks.py) the print that closes a bar is
    the next bar's first trade, already applied when the order is decided: the order reaches
    the venue 1 us later and takes it, as the latest trade, when the next print comes.
    """
    next_open = config.fill_at == "next_open"
    return ExecutionSettings(
        bus="memory",
        venue=InstrumentId.parse(config.instrument_id).venue,
        sim_maker_fee=config.commission,
        sim_taker_fee=config.commission,
        sim_slippage="fixed_bps" if config.slippage_bps else "none",
        sim_slippage_bps=config.slippage_bps,
        sim_latency_ms=Decimal("0.001") if next_open and trades else Decimal(0),
        sim_market_waits_for_trade=next_open and not trades,
        sim_forget_closed=True,
        sim_keep_closed=KEEP_CLOSED,
    )


def build_mesh(
    config: BacktestConfig,
    clock: SimulatedClock,
    interval_ns: int,
    *,
    signals: bool = True,
    trades: bool = False,
) -> EmbeddedMesh:
    """The five order-flow stages on one in-memory bus, configured for this backtest.

    `signals=False` leaves the signals stage out: the columnar path publishes what the
    strategy decided itself (quantmesh_embedded.sparse). `trades`: the run replays trades,
    not bars (see `execution_settings`).
    """
    instrument = InstrumentId.parse(config.instrument_id)
    quote = instrument.quote
    mesh = EmbeddedMesh(clock)
    spec = StrategySpec(
        id=config.strategy,
        name=config.strategy,
        account_id=ACCOUNT_ID,
        instruments=[config.instrument_id],
        params=config.strategy_params(),
    )
    signals_settings = SignalsSettings(bus="memory", strategies=[spec])
    sizer = make_sizer(config)
    if signals and sizer is None:
        mesh.add(SignalsService, signals_settings)
    elif signals and sizer is not None:
        sized = sizer
        mesh.add(SignalsService, signals_settings, lambda s: SizedSignalsService(s, sized))
    mesh.add(RiskService, risk_settings(config))
    # Nothing in a backtest reads a closed order back (no redelivery, no query, no restart):
    # the oms and the venue keep only open orders and the latest closed ones, so memory stays
    # flat however long the run (every order kept cost ~20 KB: 1.5 GB over 1,000,000 bars).
    mesh.add(
        OmsService,
        OmsSettings(bus="memory", oms_forget_terminal=True, oms_keep_terminal=KEEP_CLOSED),
    )
    mesh.add(ExecutionService, execution_settings(config, trades=trades))
    mesh.add(
        PortfolioService,
        PortfolioSettings(
            bus="memory",
            base_currency=quote,
            starting_cash={quote: config.cash},
            snapshot_interval_s=interval_ns / 1e9,
            # Nothing in a backtest reads the stage's performance reports, and each one
            # summarises the whole curve so far: hourly, that is quadratic in the bars.
            performance_interval_s=31_536_000,
            # Nor its round trips and curves, which grow with every fill and snapshot.
            portfolio_performance=False,
        ),
    )
    return mesh


#: Per (instrument, venue): the first print made, which later ones are copies of.
_PRINTS: dict[tuple[str, str], Tick] = {}


def _print(instrument_id: str, venue: str, price: Decimal, ts: int, n: int) -> Tick:
    # Built without validation: every field comes from a validated Bar and config. A copy of
    # the instrument's first print with four fields changed is the same message (same field
    # values, same set fields) at a third of model_construct's cost, which looks up the
    # default of every field not given on each call (three prints a bar on the per-bar path).
    template = _PRINTS.get((instrument_id, venue))
    if template is None:
        template = _PRINTS[instrument_id, venue] = Tick.model_construct(
            instrument_id=instrument_id,
            venue=venue,
            price=price,
            size=BAR_LIQUIDITY,
            trade_id=f"BAR-{n}",
            ts_event=ts,
            ts_init=ts,
        )
    return template.model_copy(
        update={"price": price, "trade_id": f"BAR-{n}", "ts_event": ts, "ts_init": ts}
    )


def columnar_plan(
    config: BacktestConfig, bars: Sequence[Bar] | BarColumns
) -> tuple[BarColumns, Decisions] | None:
    """The columns and the strategy's decisions over them, or None when the run must go bar
    by bar: the strategy has no columnar form, or the bars are not one instrument's strictly
    ascending series the columns can hold exactly."""
    strategy = create_strategy(config.strategy, config.strategy_params())
    form = columnar_form(strategy)
    if form is None:
        return None
    if isinstance(bars, BarColumns):
        columns = bars
    else:
        if any(bar.instrument_id != config.instrument_id for bar in bars):
            return None
        try:
            columns = BarColumns.from_bars(bars)
        except ValueError:
            return None
    if columns.instrument_id != config.instrument_id or len(columns) == 0:
        return None
    if np.any(np.diff(columns.ts_close) <= 0):
        return None  # the signals stage drops a bar not newer than the last: go bar by bar
    return columns, form.decide(columns.series())


async def run_backtest(
    config: BacktestConfig,
    bars: Sequence[Bar] | BarColumns,
    progress: Progress | None = None,
    *,
    mode: Mode = "auto",
    engine: Engine = "auto",
) -> BacktestResult:
    """Replay `bars` through the mesh; a strategy sees each bar only after it closes.

    Each bar becomes an opening print at ts_open, then a closing print and the bar itself at
    ts_close. With fill_at=next_open a market order decided on bar N fills at bar N+1's open,
    at its time (also after a gap: a weekend, missing minutes; a decision on the last bar at
    the end print, the last close); with fill_at=close it fills at bar N's close. `progress`,
    if given, is called every `PROGRESS_EVERY` bars and at the end.

    `mode`: `auto` takes the columnar path (quantmesh_embedded.sparse: decisions computed
    over all bars at once, the stages run only where something happens) when the strategy
    has a columnar form, else goes bar by bar; `columnar` insists (ValueError if it cannot);
    `per_bar` always goes bar by bar. Both give the same fills, curve and figures.

    `engine` (columnar path only): `columnar` computes the order flow with the columnar
    engine (quantmesh_embedded.orderflow: the stages' arithmetic over the decisions, no bus;
    ValueError when it declines the run); `stages` sends every decision through the real
    risk, oms, venue and portfolio handlers; `auto` takes the engine when the run qualifies,
    else the stages. The same fills (ids the venue makes aside), curve and figures.
    """
    if not len(bars):
        raise ValueError("no bars to backtest")
    started = time.perf_counter()
    if mode != "per_bar":
        plan = columnar_plan(config, bars)
        if plan is not None:
            declined = None
            if engine != "stages":
                try:
                    return _run_engine(config, *plan, progress, started)
                except EngineDeclinedError as exc:
                    if engine == "columnar":
                        raise ValueError(f"the columnar engine declines this run: {exc}") from None
                    declined = str(exc)
            result = await _run_columnar(config, *plan, progress, started)
            result.declined = declined
            return result
        if mode == "columnar":
            raise ValueError(f"strategy {config.strategy!r} cannot run columnar on these bars")
    if engine == "columnar":
        raise ValueError("the columnar engine needs the columnar path (a strategy's decide)")
    if isinstance(bars, BarColumns):
        bars = bars.bars()
    interval_ns = bars[0].ts_close - bars[0].ts_open
    clock = DrivenClock(bars[0].ts_open)
    mesh = build_mesh(config, clock, interval_ns)
    recorded = Recorded(config.cash)
    await recorded.attach(mesh)
    await mesh.start()
    bus, symbol = mesh.bus, config.instrument_id
    venue = InstrumentId.parse(symbol).venue
    settle = mesh.settle if mesh.has_tasks else bus.run_until_idle
    if progress is not None:
        progress(0, len(bars))
    for n, bar in enumerate(bars):
        clock.advance_to(bar.ts_open)
        await bus.publish(Topic.MD_TICKS, _print(symbol, venue, bar.open, bar.ts_open, 2 * n))
        await settle()
        clock.advance_to(bar.ts_close)
        await bus.publish(Topic.MD_TICKS, _print(symbol, venue, bar.close, bar.ts_close, 2 * n + 1))
        await bus.publish(Topic.MD_BARS, bar, ts_event=bar.ts_close)
        await settle()
        if progress is not None and (n + 1) % PROGRESS_EVERY == 0:
            progress(n + 1, len(bars))
    # One more print after the last close makes the portfolio snapshot the final boundary.
    end = bars[-1].ts_close + interval_ns
    clock.advance_to(end)
    await bus.publish(Topic.MD_TICKS, _print(symbol, venue, bars[-1].close, end, 2 * len(bars)))
    await mesh.stop()
    if progress is not None:
        progress(len(bars), len(bars))
    return recorded.result(bars, started)


@dataclass
class Recorded:
    """What a run through every stage (bar by bar, or trade by trade) collects from the bus:
    its fills and the portfolio's snapshots."""

    cash: Decimal
    fills: FillLog = field(default_factory=FillLog)
    snapshots: list[tuple[int, Decimal]] = field(default_factory=list)
    #: Snapshots with a position open.
    exposure: int = 0

    async def attach(self, mesh: EmbeddedMesh) -> None:
        """Subscribe to the fills and the snapshots (before the mesh starts)."""
        await mesh.bus.subscribe("backtest.fills", [Topic.EXEC_REPORTS], self.on_report).start()
        await mesh.bus.subscribe(
            "backtest.equity", [Topic.PORTFOLIO_SNAPSHOTS], self.on_snapshot
        ).start()

    def on_report(self, envelope: Envelope[Any]) -> None:
        report: ExecutionReport = envelope.payload
        if report.exec_type.is_fill:
            self.fills.append(report)

    def on_snapshot(self, envelope: Envelope[Any]) -> None:
        snap: PortfolioSnapshot = envelope.payload
        self.snapshots.append((snap.ts_event, snap.equity))
        self.exposure += bool(snap.positions)

    def result(self, bars: Sequence[Bar], started: float) -> BacktestResult:
        """The run's result over `bars`; its equity curve starts at the first bar's open.

        The portfolio snapshots an account from its first fill on; before it nothing was
        held and nothing paid, so each earlier bar closes at the starting cash. Without these
        points the figures would be over fewer periods than the run had.
        """
        first = self.snapshots[0][0] if self.snapshots else None
        idle = [(b.ts_close, self.cash) for b in bars if first is None or b.ts_close < first]
        equity = [(bars[0].ts_open, self.cash), *idle, *self.snapshots]
        return BacktestResult(
            bars=len(bars),
            fills=self.fills,
            equity=equity,
            round_trips=round_trips(self.fills),
            elapsed_s=time.perf_counter() - started,
            exposure_bars=self.exposure,
        )


async def _run_columnar(
    config: BacktestConfig,
    columns: BarColumns,
    decisions: Decisions,
    progress: Progress | None,
    started: float,
) -> BacktestResult:
    interval_ns = int(columns.ts_close[0] - columns.ts_open[0])
    clock = DrivenClock(int(columns.ts_open[0]))
    mesh = build_mesh(config, clock, interval_ns, signals=False)
    run = SparseRun(columns, config.cash, interval_ns)
    sizer = make_sizer(config)
    rewrite = None
    if sizer is not None:
        active = sizer

        def on_fill(envelope: Envelope[Any]) -> None:
            active.on_report(envelope.payload)

        def resize(emits: list[Any], close: Decimal) -> list[Any]:
            active.last_price = close  # the deciding bar's close, as SizedSignalsService sees
            return active.rewrite(emits)

        rewrite = resize
        await mesh.bus.subscribe("backtest.sizer", [Topic.EXEC_REPORTS], on_fill).start()
    await mesh.bus.subscribe("backtest.fills", [Topic.EXEC_REPORTS], run.on_report).start()
    await mesh.bus.subscribe("backtest.orders", [Topic.ORDERS_UPDATES], run.on_order).start()
    await mesh.start()
    if progress is not None:
        progress(0, len(columns))
    await run_sparse(
        mesh,
        clock,
        config.instrument_id,
        config.strategy,
        ACCOUNT_ID,
        columns,
        decisions,
        run,
        rewrite=rewrite,
        progress=progress,
        progress_every=PROGRESS_EVERY,
        make_print=_print,
    )
    await mesh.stop()
    instrument = InstrumentId.parse(config.instrument_id)
    check_books(mesh, run, ACCOUNT_ID, instrument.base, instrument.quote)
    exposure = run.exposure()
    elapsed = time.perf_counter() - started
    if progress is not None:
        progress(len(columns), len(columns))
    return BacktestResult(
        bars=len(columns),
        fills=run.fills,
        equity=Curve(run, instrument.base, instrument.quote),
        round_trips=RoundTrips(lambda: _rows(run.fills), config.instrument_id),
        elapsed_s=elapsed,
        exposure_bars=exposure,
    )


def flow_config(config: BacktestConfig) -> FlowConfig:
    """What the columnar engine is given of a run: the very settings the stages would get."""
    return FlowConfig(
        instrument_id=config.instrument_id,
        strategy_id=config.strategy,
        account_id=ACCOUNT_ID,
        cash=config.cash,
        risk=risk_settings(config),
        execution=execution_settings(config),
        instrument=risk_instrument(config),
        liquidity=BAR_LIQUIDITY,
        sizer=make_sizer(config),
    )


def _run_engine(
    config: BacktestConfig,
    columns: BarColumns,
    decisions: Decisions,
    progress: Progress | None,
    started: float,
) -> BacktestResult:
    interval_ns = int(columns.ts_close[0] - columns.ts_open[0])
    if progress is not None:
        progress(0, len(columns))
    run, fills = run_orderflow(flow_config(config), columns, decisions, interval_ns)
    instrument = InstrumentId.parse(config.instrument_id)
    exposure = run.exposure()
    elapsed = time.perf_counter() - started
    if progress is not None:
        progress(len(columns), len(columns))
    return BacktestResult(
        bars=len(columns),
        fills=fills,
        equity=Curve(run, instrument.base, instrument.quote),
        round_trips=RoundTrips(fills.rows, config.instrument_id),
        elapsed_s=elapsed,
        exposure_bars=exposure,
        engine="columnar",
    )
