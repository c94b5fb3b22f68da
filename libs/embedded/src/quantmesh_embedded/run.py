"""`quantmesh run`: every order-flow stage live in one process, paper trading a synthetic feed,
a replay file or a live ccxt venue's trades."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from rich.columns import Columns
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from quantmesh_alerts.config import AlertsSettings
from quantmesh_alerts.service import AlertsService
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import Clock, WallClock, ns_to_datetime
from quantmesh_common.envelope import Envelope, Event
from quantmesh_common.messages import (
    Bar,
    ExecutionReport,
    InstrumentId,
    Order,
    OrderStatus,
    PortfolioSnapshot,
    RiskDecision,
    Tick,
    bar_interval_ns,
)
from quantmesh_common.topics import Topic
from quantmesh_embedded.api import DEFAULT_API_HOST, DEFAULT_API_PORT, ApiOptions, EmbeddedApi
from quantmesh_embedded.backtest import _print as bar_print
from quantmesh_embedded.data import infer_csv_interval
from quantmesh_embedded.history import TOPICS as HISTORY_TOPICS
from quantmesh_embedded.history import History, alert_row, default_path
from quantmesh_embedded.mesh import DrivenClock, EmbeddedMesh
from quantmesh_execution.config import ExecutionSettings
from quantmesh_execution.service import ExecutionService
from quantmesh_marketdata.config import MarketDataSettings
from quantmesh_marketdata.feed import SyntheticFeed
from quantmesh_marketdata.files import csv_header, is_ohlcv_header
from quantmesh_marketdata.normalize import venue_name
from quantmesh_marketdata.replay import event_time, file_events, topic_of
from quantmesh_marketdata.service import MarketDataService
from quantmesh_marketdata.synthetic import GbmParams
from quantmesh_marketdata.venue import check_exchange_id, parse_url_overrides
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.service import OmsService
from quantmesh_portfolio.config import PortfolioSettings
from quantmesh_portfolio.service import PortfolioService
from quantmesh_risk.config import RiskSettings
from quantmesh_risk.service import RiskService
from quantmesh_signals.config import SignalsSettings
from quantmesh_signals.engine import StrategySpec
from quantmesh_signals.service import SignalsService

ACCOUNT_ID = "paper"
DEFAULT_INSTRUMENTS = ("BTC-USDT.SIM", "ETH-USDT.SIM")
DEFAULT_STRATEGY = "sma_cross"
#: Short averages on short bars, shorting allowed: the demo trades within seconds, not hours.
DEFAULT_SMA_PARAMS: Mapping[str, Any] = {
    "fast": 2,
    "slow": 4,
    "quantity": "0.01",
    "allow_short": True,
}
DEFAULT_BAR_INTERVAL = "2s"
#: Start prices by base currency, so the screen looks like the market it imitates.
START_PRICES: Mapping[str, Decimal] = {"BTC": Decimal("60000"), "ETH": Decimal("3000")}
FALLBACK_START_PRICE = Decimal("100")
RECENT_LINES = 8
REFRESH_S = 1.0
#: How often a venue-fed run delivers what the venue's streams published meanwhile.
VENUE_SETTLE_S = 0.05
#: Order states not worth a line: a FILL line already says it.
_QUIET_STATUSES = frozenset(
    {OrderStatus.ACCEPTED, OrderStatus.PARTIALLY_FILLED, OrderStatus.FILLED}
)


def default_markets_cache() -> Path:
    """Where a venue's markets metadata is cached between runs ($XDG_CACHE_HOME/quantmesh)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "quantmesh" / "markets"


@dataclass(frozen=True)
class VenueFeed:
    """A live ccxt venue whose public trades feed a paper run (orders stay on the paper venue).

    `url_overrides` (dotted paths in ccxt's `urls`, as QM_VENUE_URLS) and `options` (ccxt
    exchange options) point the client at a proxy or a local server.
    """

    exchange_id: str
    sandbox: bool = False
    url_overrides: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    markets_cache_dir: Path = field(default_factory=default_markets_cache)

    def __post_init__(self) -> None:
        check_exchange_id(self.exchange_id)

    @property
    def venue(self) -> str:
        """Our name of the venue, the suffix of its instrument ids: BINANCE."""
        return venue_name(self.exchange_id)


@dataclass(frozen=True)
class RunConfig:
    """One embedded run: what trades what, on which synthetic market, for how long."""

    instruments: tuple[str, ...] = DEFAULT_INSTRUMENTS
    strategy: str = DEFAULT_STRATEGY
    #: Given parameters; sma_cross fills the others from DEFAULT_SMA_PARAMS.
    params: Mapping[str, Any] = field(default_factory=dict)
    bar_interval: str = DEFAULT_BAR_INTERVAL
    #: Ticks per second per instrument.
    rate: float = 10.0
    seed: int = 1
    #: None: until stopped (Ctrl-C / SIGTERM).
    duration_s: float | None = None
    cash: Decimal = Decimal("100000")
    volatility: float = 1.0
    #: A CSV of trades or OHLCV bars to replay instead of the synthetic feed (one instrument).
    replay: Path | None = None
    #: Replay pace: N times faster than the file's own time; None as fast as possible.
    speed: float | None = None
    #: A live venue's trades instead of the synthetic feed; the instruments must be its own.
    venue: VenueFeed | None = None
    #: The alerts stage's rules (YAML, as QM_ALERT_RULES_FILE); None: no alerts stage.
    alert_rules: Path | None = None
    #: Serve the api (REST + WebSocket) there; None: no api stage.
    api: ApiOptions | None = None

    def __post_init__(self) -> None:
        if not self.instruments:
            raise ValueError("needs at least one instrument")
        for instrument_id in self.instruments:
            InstrumentId.parse(instrument_id)
        if len({InstrumentId.parse(i).venue for i in self.instruments}) != 1:
            raise ValueError("the paper venue is one venue: give instruments of one venue")
        if len({InstrumentId.parse(i).quote for i in self.instruments}) != 1:
            raise ValueError("give instruments of one quote currency (it is the account's)")
        bar_interval_ns(self.bar_interval)
        if not 0 < self.rate <= 10_000:
            raise ValueError(f"rate must be in (0, 10000] ticks/s, got {self.rate}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration must be positive, got {self.duration_s}")
        if self.volatility < 0:
            raise ValueError(f"volatility must be >= 0, got {self.volatility}")
        if self.replay is not None and len(self.instruments) != 1:
            raise ValueError("a replay file holds one instrument: give exactly one --symbol")
        if self.speed is not None and self.speed <= 0:
            raise ValueError(f"speed must be positive, got {self.speed}")
        if self.api is not None and self.replay is not None:
            # A replay runs on the file's clock: tokens and orders stamped in file time.
            raise ValueError("the api runs on the wall clock, not with a replay: give --no-api")
        if self.venue is not None:
            if self.replay is not None:
                raise ValueError("give a replay file or a venue, not both")
            for instrument_id in self.instruments:
                if InstrumentId.parse(instrument_id).venue != self.venue.venue:
                    raise ValueError(
                        f"{instrument_id} is not on {self.venue.exchange_id}: its instruments "
                        f"end in .{self.venue.venue}, e.g. BTC-USDT.{self.venue.venue}"
                    )

    def strategy_params(self) -> dict[str, Any]:
        """The strategy's parameters: the given ones over the defaults of the default strategy."""
        if self.strategy == DEFAULT_STRATEGY:
            return {**DEFAULT_SMA_PARAMS, **self.params}
        return dict(self.params)


def build_live_mesh(config: RunConfig, clock: Clock) -> EmbeddedMesh:
    """Signals, risk, oms, execution (simulated venue) and portfolio on one in-memory bus;
    with a venue, the marketdata stage streaming its trades (and bars of them) first; with
    alert rules, the alerts stage last (its channels configured as the service's, QM_ALERT_*).
    """
    first = InstrumentId.parse(config.instruments[0])
    spec = StrategySpec(
        id=config.strategy,
        name=config.strategy,
        account_id=ACCOUNT_ID,
        instruments=list(config.instruments),
        params=config.strategy_params(),
    )
    mesh = EmbeddedMesh(clock)
    if config.venue is not None:
        mesh.add(MarketDataService, venue_settings(config.venue, config))
    mesh.add(SignalsService, SignalsSettings(bus="memory", strategies=[spec]))
    mesh.add(RiskService, RiskSettings(bus="memory"))
    mesh.add(OmsService, OmsSettings(bus="memory"))
    mesh.add(ExecutionService, ExecutionSettings(bus="memory", venue=first.venue))
    mesh.add(
        PortfolioService,
        PortfolioSettings(
            bus="memory",
            base_currency=first.quote,
            starting_cash={first.quote: config.cash},
            snapshot_interval_s=REFRESH_S,
        ),
    )
    if config.alert_rules is not None:
        mesh.add(AlertsService, AlertsSettings(bus="memory", alert_rules_file=config.alert_rules))
    return mesh


def venue_settings(venue: VenueFeed, config: RunConfig) -> MarketDataSettings:
    """The marketdata stage's settings for streaming `venue`'s trades of the run's instruments."""
    symbols = [f"{i.base}/{i.quote}" for i in map(InstrumentId.parse, config.instruments)]
    return MarketDataSettings(
        bus="memory",
        feed="venue",
        instruments=",".join(config.instruments),
        bar_interval=config.bar_interval,
        venue=venue.exchange_id,
        venue_symbols=",".join(symbols),
        venue_channels="trades",
        venue_sandbox=venue.sandbox,
        venue_urls=json.dumps(dict(venue.url_overrides)),
        venue_options=json.dumps(dict(venue.options)),
        markets_cache_dir=str(venue.markets_cache_dir),
    )


def build_feeds(config: RunConfig, start_ns: int) -> list[SyntheticFeed]:
    """One feed per instrument, seeded `seed + i` as SyntheticFeed would, each at its own price."""
    feeds = []
    for i, instrument_id in enumerate(config.instruments):
        base = InstrumentId.parse(instrument_id).base
        params = GbmParams(
            start_price=START_PRICES.get(base, FALLBACK_START_PRICE),
            volatility=config.volatility,
            interval_ns=int(1_000_000_000 / config.rate),
        )
        feeds.append(
            SyntheticFeed([instrument_id], params, start_ns, config.seed + i, config.bar_interval)
        )
    return feeds


#: What a feed hands the bus: the topic, the event and its event time.
Published = tuple[str, Event, int]


def replay_events(path: Path, instrument_id: str, interval: str) -> Iterator[Published]:
    """(topic, event, event time) of a replay file, in the order a live feed publishes them.

    A trade file gives its trades as ticks and the `interval` bars aggregated from them. An
    OHLCV file (its interval read from its first two rows) gives each bar as the backtest
    does: an opening print at its open, then a closing print and the bar at its close, so
    the paper venue has trades to fill orders against.
    """
    if not is_ohlcv_header([c.strip().lower() for c in csv_header(path)]):
        for event in file_events(path, instrument_id, interval):
            yield topic_of(event), event, event_time(event)
        return
    venue = InstrumentId.parse(instrument_id).venue
    n = 0
    for bar in file_events(path, instrument_id, infer_csv_interval(path)):
        assert isinstance(bar, Bar)  # an OHLCV file yields bars only
        yield Topic.MD_TICKS, bar_print(instrument_id, venue, bar.open, bar.ts_open, n), bar.ts_open
        yield (
            Topic.MD_TICKS,
            bar_print(instrument_id, venue, bar.close, bar.ts_close, n + 1),
            bar.ts_close,
        )
        yield Topic.MD_BARS, bar, bar.ts_close
        n += 2


class LiveView:
    """What the terminal shows, kept up to date from the bus: prices, positions, orders, alerts."""

    def __init__(self, instruments: tuple[str, ...], cash: Decimal) -> None:
        self.prices: dict[str, Decimal] = dict.fromkeys(instruments, Decimal(0))
        self.snapshot: PortfolioSnapshot | None = None
        self.cash = cash
        self.ticks = 0
        self.bars = 0
        self._order_ids: set[str] = set()
        self.fills: list[ExecutionReport] = []
        self.rejects = 0
        self.alerts: deque[str] = deque(maxlen=RECENT_LINES)
        self.alert_count = 0
        self.recent: deque[str] = deque(maxlen=RECENT_LINES)
        self._unprinted: list[str] = []

    async def attach(self, bus: InMemoryBus) -> None:
        """Subscribe the view to the topics it shows."""
        topics = [
            Topic.MD_TICKS,
            Topic.MD_BARS,
            Topic.ORDERS_UPDATES,
            Topic.ORDERS_REJECTED,
            Topic.EXEC_REPORTS,
            Topic.PORTFOLIO_SNAPSHOTS,
            Topic.ALERTS,
        ]
        await bus.subscribe("run.view", topics, self.on_event).start()

    def on_event(self, envelope: Envelope[Any]) -> None:
        """Fold one event into the view."""
        event = envelope.payload
        if isinstance(event, Tick):
            self.ticks += 1
            self.prices[event.instrument_id] = event.price
            return
        if isinstance(event, Bar):
            self.bars += 1
            return
        if isinstance(event, PortfolioSnapshot):
            self.snapshot = event
        elif isinstance(event, Order):
            self._on_order(event)
        elif isinstance(event, ExecutionReport) and event.exec_type.is_fill:
            self.fills.append(event)
            self._note(
                event.ts_event,
                f"FILL   {event.side} {event.last_qty} {event.instrument_id} @ {event.last_price}"
                f" fee {event.fee}",
            )
        elif isinstance(event, RiskDecision) and not event.approved:
            self.rejects += 1
        if (alert := alert_row(event)) is not None:
            severity, source, code, message, _, _ = alert
            self.alert_count += 1
            line = f"{ns_to_datetime(envelope.ts_event):%H:%M:%S} {severity} {source} {code}"
            self.alerts.append(f"{line}: {message}")
            self._unprinted.append(f"{line}: {message}")

    def _on_order(self, order: Order) -> None:
        self._order_ids.add(order.client_order_id)
        if order.status in _QUIET_STATUSES:
            return
        self._note(
            order.ts_last,
            f"ORDER  {order.side} {order.quantity} {order.instrument_id} {order.order_type}"
            f" {order.status}",
        )

    def _note(self, ts: int, text: str) -> None:
        line = f"{ns_to_datetime(ts):%H:%M:%S} {text}"
        self.recent.append(line)
        self._unprinted.append(line)

    @property
    def orders(self) -> int:
        """Orders the OMS has created so far."""
        return len(self._order_ids)

    @property
    def equity(self) -> Decimal:
        """Equity at the last snapshot (the starting cash before the first)."""
        return self.snapshot.equity if self.snapshot is not None else self.cash

    def render(self, elapsed_s: float) -> RenderableType:
        """The full view as rich tables, for a terminal redrawn in place."""
        prices = Table(title="Prices", title_justify="left", expand=False)
        prices.add_column("instrument")
        prices.add_column("last", justify="right")
        for symbol, price in self.prices.items():
            prices.add_row(symbol, str(price))
        positions = Table(title="Positions", title_justify="left")
        for name in ("instrument", "quantity", "avg entry", "last", "uPnL", "rPnL"):
            positions.add_column(name, justify="left" if name == "instrument" else "right")
        held = self.snapshot.positions if self.snapshot is not None else []
        for p in held:
            positions.add_row(
                p.instrument_id,
                f"{p.quantity:+}",
                str(p.avg_entry_price),
                str(p.last_price or "-"),
                _signed(p.unrealized_pnl),
                _signed(p.realized_pnl),
            )
        if not held:
            positions.add_row("(flat)", "", "", "", "", "")
        snap = self.snapshot
        zero = Decimal(0)
        pnl = Table.grid(padding=(0, 2))
        for _ in range(5):
            pnl.add_column(no_wrap=True)
        pnl.add_row(
            f"[bold]equity[/] {self.equity:.2f}",
            f"realised {_signed(snap.realized_pnl if snap else zero)}",
            f"unrealised {_signed(snap.unrealized_pnl if snap else zero)}",
            f"fees {(snap.fees if snap else zero):.2f}",
            f"dd {float(snap.drawdown if snap else zero) * 100:.2f}%",
        )
        pnl.add_row(
            f"ticks {self.ticks}",
            f"bars {self.bars}",
            f"orders {self.orders}",
            f"fills {len(self.fills)}",
            f"rejects {self.rejects}",
        )
        recent = Text("\n".join(self.recent) or "(none yet)")
        alerts = Text("\n".join(self.alerts) or "(none)")
        self._unprinted.clear()
        return Group(
            Text(f"quantmesh run - paper trading, {elapsed_s:,.0f} s (Ctrl-C stops)", "bold"),
            Columns([prices, positions]),
            Panel(pnl, title="P&L", title_align="left"),
            Panel(recent, title="Recent orders and fills", title_align="left"),
            Panel(alerts, title=f"Alerts ({self.alert_count})", title_align="left"),
        )

    def summary(self, elapsed_s: float) -> str:
        """New order/fill/alert lines since the last call, then one summary line (plain mode)."""
        prices = " ".join(f"{symbol} {price}" for symbol, price in self.prices.items())
        positions = self.snapshot.positions if self.snapshot is not None else []
        held = (
            " ".join(
                f"{p.instrument_id} {p.quantity:+} uPnL {p.unrealized_pnl:+.2f}" for p in positions
            )
            or "flat"
        )
        out = [f"  {line}" for line in self._unprinted]
        self._unprinted.clear()
        out.append(
            f"[{elapsed_s:6.1f}s] {prices} | {held} | equity {self.equity:.2f}"
            f" | orders {self.orders} fills {len(self.fills)} alerts {self.alert_count}"
        )
        return "\n".join(out) + "\n"


def _signed(value: Decimal) -> str:
    colour = "green" if value > 0 else "red" if value < 0 else "default"
    return f"[{colour}]{value:+.2f}[/]"


async def run_live(
    config: RunConfig,
    out: TextIO,
    *,
    tty: bool = False,
    clock: Clock | None = None,
    stop: asyncio.Event | None = None,
    handle_signals: bool = False,
    history: Path | None = None,
    on_mesh: Callable[[EmbeddedMesh], Awaitable[None]] | None = None,
) -> LiveView:
    """Run the mesh on the synthetic feed (or `config.replay`, or `config.venue`'s trades)
    until `duration_s`, `stop` or SIGINT/SIGTERM.

    Ticks are stamped on a grid starting at the current bar's boundary and published when the
    clock reaches their time, so the bars (and hence the trades) depend only on the seed, the
    rate and the interval, not on the moment the run started. `tty` draws the rich view in
    place; otherwise new lines and a summary line are written every second. `history` is the
    SQLite file the run appends to; `on_mesh` is awaited with the mesh before it starts.
    """
    clock = clock or WallClock()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        if config.replay is not None:
            return await _replay(config, out, tty, stop, history, on_mesh)
        return await _run(config, out, tty, clock, stop, history, on_mesh)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def _describe(config: RunConfig) -> dict[str, Any]:
    return {
        "instruments": list(config.instruments),
        "strategy": config.strategy,
        "params": config.strategy_params(),
        "bar_interval": config.bar_interval,
        "rate": config.rate,
        "seed": config.seed,
        "cash": str(config.cash),
        "volatility": config.volatility,
        **({"replay": str(config.replay), "speed": config.speed} if config.replay else {}),
        **(
            {"venue": config.venue.exchange_id, "sandbox": config.venue.sandbox}
            if config.venue
            else {}
        ),
        **({"alert_rules": str(config.alert_rules)} if config.alert_rules else {}),
        **({"api": f"{config.api.host}:{config.api.port}"} if config.api else {}),
    }


async def _run(
    config: RunConfig,
    out: TextIO,
    tty: bool,
    clock: Clock,
    stop: asyncio.Event,
    history_path: Path | None,
    on_mesh: Callable[[EmbeddedMesh], Awaitable[None]] | None,
) -> LiveView:
    mesh = build_live_mesh(config, clock)
    api = EmbeddedApi(mesh, config.api) if config.api is not None else None
    if api is not None:
        await api.attach(mesh)
    view = LiveView(config.instruments, config.cash)
    await view.attach(mesh.bus)
    started = clock.now_ns()
    history = History(history_path, started, _describe(config)) if history_path else None
    if history is not None:
        await mesh.bus.subscribe("run.history", list(HISTORY_TOPICS), history.on_event).start()
    if on_mesh is not None:
        await on_mesh(mesh)
    try:
        await mesh.start()
    except OSError as exc:
        if api is None or api.service.port is not None:
            raise
        address = f"{api.options.host}:{api.options.port}"
        raise ValueError(f"the api cannot listen on {address}: {exc.strerror or exc}") from exc
    if api is not None:
        out.write(api.banner())
        out.flush()
    bar_ns = bar_interval_ns(config.bar_interval)
    start_ns = started - started % bar_ns
    # A venue's trades arrive on the marketdata stage's own tasks: no synthetic feed then.
    feeds = build_feeds(config, start_ns) if config.venue is None else []
    step_ns = feeds[0].params.interval_ns if feeds else int(VENUE_SETTLE_S * 1e9)
    end_ns = started + int(config.duration_s * 1e9) if config.duration_s is not None else None
    next_draw = started + int(REFRESH_S * 1e9)
    due = start_ns if feeds else started
    console = Console(file=out, force_terminal=True) if tty else None
    live = (
        Live(view.render(0), console=console, auto_refresh=False, transient=False)
        if console is not None
        else None
    )

    def draw(now: int) -> None:
        _draw(view, live, out, history, (now - started) / 1e9)

    if live is not None:
        live.start(refresh=True)
    try:
        while not stop.is_set():
            now = clock.now_ns()
            if end_ns is not None and now >= end_ns:
                break
            if now < due:
                # Short naps keep Ctrl-C and the screen responsive whatever the rate.
                await clock.sleep(min(due - now, 100_000_000) / 1e9)
                continue
            for feed in feeds:
                for topic, event in feed.step():
                    ts = event.ts_close if isinstance(event, Bar) else event.ts_event  # type: ignore[attr-defined]
                    await mesh.bus.publish(topic, event, ts_event=ts)
            await mesh.settle()
            due += step_ns
            if now >= next_draw:
                draw(now)
                next_draw += int(REFRESH_S * 1e9)
    finally:
        await mesh.stop()
        stopped = clock.now_ns()
        draw(stopped)
        if live is not None:
            live.stop()
        if history is not None:
            history.close(stopped)
    _stopped_line(out, view, (stopped - started) / 1e9, history_path)
    return view


def _draw(
    view: LiveView, live: Live | None, out: TextIO, history: History | None, elapsed: float
) -> None:
    """Redraw the live view (a summary line without a terminal); make the history durable."""
    if live is not None:
        live.update(view.render(elapsed), refresh=True)
    else:
        out.write(view.summary(elapsed))
        out.flush()
    if history is not None:
        history.flush()


def _stopped_line(out: TextIO, view: LiveView, elapsed: float, history: Path | None) -> None:
    saved = f"; history in {history}" if history else ""
    out.write(
        f"stopped after {elapsed:.1f} s: {view.ticks} ticks, {view.bars} bars, "
        f"{view.orders} orders, {len(view.fills)} fills, {view.alert_count} alerts, "
        f"equity {view.equity:.2f}{saved}\n"
    )
    out.flush()


async def _replay(
    config: RunConfig,
    out: TextIO,
    tty: bool,
    stop: asyncio.Event,
    history_path: Path | None,
    on_mesh: Callable[[EmbeddedMesh], Awaitable[None]] | None,
) -> LiveView:
    """The run on a replay file: the file's own timeline drives a simulated clock (every
    stage sees the recorded times); the wall clock only paces it (`speed`) and the view."""
    assert config.replay is not None
    instrument = config.instruments[0]
    events = replay_events(config.replay, instrument, config.bar_interval)
    first = next(events, None)
    if first is None:
        raise ValueError(f"{config.replay}: nothing to replay")
    clock = DrivenClock(first[2])
    mesh = build_live_mesh(config, clock)
    view = LiveView(config.instruments, config.cash)
    await view.attach(mesh.bus)
    history = History(history_path, first[2], _describe(config)) if history_path else None
    if history is not None:
        await mesh.bus.subscribe("run.history", list(HISTORY_TOPICS), history.on_event).start()
    if on_mesh is not None:
        await on_mesh(mesh)
    await mesh.start()
    wall0 = time.monotonic()
    deadline = wall0 + config.duration_s if config.duration_s is not None else None
    next_draw = wall0 + REFRESH_S
    console = Console(file=out, force_terminal=True) if tty else None
    live = Live(view.render(0), console=console, auto_refresh=False) if console else None

    def draw() -> None:
        _draw(view, live, out, history, (clock.now_ns() - first[2]) / 1e9)

    if live is not None:
        live.start(refresh=True)
    try:
        for topic, event, ts in _chain(first, events):
            if stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
                break
            if config.speed is not None:
                due = wall0 + (ts - first[2]) / 1e9 / config.speed
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
            if ts > clock.now_ns():
                clock.advance_to(ts)
                await mesh.settle()
            await mesh.bus.publish(topic, event, ts_event=ts)
            await mesh.bus.run_until_idle()
            if time.monotonic() >= next_draw:
                draw()
                next_draw += REFRESH_S
    finally:
        await mesh.stop()
        draw()
        if live is not None:
            live.stop()
        if history is not None:
            history.close(clock.now_ns())
    _stopped_line(out, view, (clock.now_ns() - first[2]) / 1e9, history_path)
    return view


def _chain(first: Published, rest: Iterator[Published]) -> Iterator[Published]:
    yield first
    yield from rest


def add_run_parser(commands: Any, param: Any, instrument: Any) -> None:
    """Add `run` to the `quantmesh` subcommands; `param`/`instrument` parse KEY=VALUE and ids."""
    run = commands.add_parser("run", help="every stage live in one process, paper trading")
    run.add_argument(
        "--symbol",
        type=instrument,
        action="append",
        metavar="ID",
        help=f"instrument, repeatable (default: {' '.join(DEFAULT_INSTRUMENTS)})",
    )
    run.add_argument("--strategy", default=DEFAULT_STRATEGY, help="a registered strategy")
    run.add_argument(
        "--param",
        type=param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"strategy parameter (sma_cross defaults: {dict(DEFAULT_SMA_PARAMS)})",
    )
    run.add_argument("--bar-interval", default=DEFAULT_BAR_INTERVAL, help="e.g. 1s, 5s, 1m")
    run.add_argument("--rate", type=float, default=10.0, help="ticks/s per instrument")
    run.add_argument("--seed", type=int, default=1, help="seed of the synthetic feed")
    run.add_argument("--volatility", type=float, default=1.0, help="annualised, e.g. 0.5")
    run.add_argument("--cash", type=Decimal, default=Decimal("100000"), help="starting cash")
    run.add_argument(
        "--duration", type=float, metavar="SECONDS", help="stop after it (default: Ctrl-C)"
    )
    run.add_argument(
        "--db",
        type=Path,
        metavar="PATH.sqlite",
        help=f"history file, appended to (default: {default_path()})",
    )
    run.add_argument(
        "--replay",
        type=Path,
        metavar="PATH.csv",
        help="replay a CSV of trades (ticks, bars of --bar-interval) or OHLCV bars instead of "
        "the synthetic feed; one --symbol (default: the first default)",
    )
    run.add_argument(
        "--speed",
        type=float,
        help="replay N times faster than recorded (default: as fast as possible)",
    )
    run.add_argument(
        "--venue",
        metavar="EXCHANGE",
        help="paper trade on a live ccxt venue's public trades (e.g. binance) instead of the "
        "synthetic feed; --symbol ids end in its name (default BTC-USDT.<VENUE>)",
    )
    run.add_argument("--sandbox", action="store_true", help="the venue's testnet / sandbox")
    run.add_argument(
        "--venue-urls",
        type=_json_object,
        default={},
        metavar="JSON",
        help='ccxt URL overrides, e.g. {"api.ws.spot": "ws://127.0.0.1:9000/ws"} (a proxy)',
    )
    run.add_argument(
        "--venue-options",
        type=_json_object,
        default={},
        metavar="JSON",
        help='ccxt exchange options, e.g. {"fetchMarkets": {"types": ["spot"]}}',
    )
    run.add_argument(
        "--alert-rules",
        type=Path,
        metavar="PATH.yaml",
        help="run the alerts stage with these rules (channels from QM_ALERT_WEBHOOK_URL, "
        "QM_TELEGRAM_BOT_TOKEN, QM_SMTP_HOST, ... as the service)",
    )
    run.add_argument(
        "--api-port",
        type=int,
        metavar="PORT",
        help=f"serve the api (REST + WebSocket, /api/v1) on it (default {DEFAULT_API_PORT}; 0: any "
        "free port); the URL and the admin's login are printed at start",
    )
    run.add_argument(
        "--api-host",
        default=DEFAULT_API_HOST,
        help=f"the api's address (default {DEFAULT_API_HOST})",
    )
    run.add_argument(
        "--no-api",
        action="store_true",
        help="no api (the default with --replay: its clock is the file's)",
    )
    run.add_argument("--no-history", action="store_true", help="keep no history file")
    run.add_argument(
        "--no-tui",
        action="store_true",
        help="plain lines every second instead of the live view (for logs and CI)",
    )


def _json_object(text: str) -> dict[str, Any]:
    """An option's JSON object; anything else ends the command with status 2 and the reason."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def run_config(args: Any) -> RunConfig:
    """The run `quantmesh run`'s parsed arguments ask for; ValueError says what is wrong."""
    venue = None
    default = DEFAULT_INSTRUMENTS[:1] if args.replay is not None else DEFAULT_INSTRUMENTS
    if args.venue is not None:
        parse_url_overrides(json.dumps(args.venue_urls))  # the same check as QM_VENUE_URLS
        venue = VenueFeed(
            args.venue.strip().lower(),
            sandbox=args.sandbox,
            url_overrides=args.venue_urls,
            options=args.venue_options,
        )
        default = (f"BTC-USDT.{venue.venue}",)
    # With a replay the api is off unless a port is asked for (RunConfig then says why not).
    serve_api = not args.no_api and (args.replay is None or args.api_port is not None)
    api_port = DEFAULT_API_PORT if args.api_port is None else args.api_port
    return RunConfig(
        instruments=tuple(args.symbol) if args.symbol else default,
        strategy=args.strategy,
        params=dict(args.param),
        bar_interval=args.bar_interval,
        rate=args.rate,
        seed=args.seed,
        duration_s=args.duration,
        cash=args.cash,
        volatility=args.volatility,
        replay=args.replay,
        speed=args.speed,
        venue=venue,
        alert_rules=args.alert_rules,
        api=ApiOptions(args.api_host, api_port) if serve_api else None,
    )


def run_command(args: Any, out: TextIO) -> int:
    """Run `quantmesh run` from parsed arguments; 0 when it stopped cleanly."""
    config = run_config(args)
    history = None if args.no_history else (args.db or default_path())
    tty = out.isatty() and not args.no_tui
    asyncio.run(run_live(config, out, tty=tty, handle_signals=True, history=history))
    return 0
