"""The signals stage's domain logic: configured strategies fed events, returning what to publish.

Plain Python, no bus or clock: every method takes an event (and its time) and returns the
Signal and OrderIntent events the strategies produced.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from quantmesh_common.envelope import Event
from quantmesh_common.messages import (
    Bar,
    ControlAction,
    ControlCommand,
    ExecutionReport,
    Identifier,
    InstrumentIdStr,
    StrategyState,
    StrategyStatus,
    Tick,
)
from quantmesh_signals.strategy import (
    Strategy,
    StrategyContext,
    UnknownStrategyError,
    create_strategy,
)

log = logging.getLogger(__name__)

#: Fill ids remembered per strategy to apply each fill once (redeliveries come soon after).
SEEN_FILLS_LIMIT = 100_000

#: A strategy id: short enough that `<id>-<ns>-<n>` still fits an order id (128 characters).
StrategyId = Annotated[Identifier, StringConstraints(max_length=64)]


class StrategySpec(BaseModel):
    """One entry of QM_STRATEGIES: which strategy runs as whom, on what, with which params."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: StrategyId = Field(description="Unique id of this running strategy, e.g. 'sma-btc'.")
    name: str = Field(min_length=1, description="Registered strategy name, e.g. 'sma_cross'.")
    account_id: Identifier
    instruments: list[InstrumentIdStr] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("instruments")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("instruments must be distinct")
        return value


class StrategyHost:
    """One configured strategy with its context and its switches (halted, killed, faulted)."""

    def __init__(self, spec: StrategySpec, strategy: Strategy[Any]) -> None:
        expected = type(strategy).instrument_count
        if expected is not None and len(spec.instruments) != expected:
            raise ValueError(
                f"strategy {spec.id!r} ({spec.name}) trades exactly {expected} instruments, "
                f"got {len(spec.instruments)}"
            )
        self.spec = spec
        self.strategy = strategy
        self.ctx = StrategyContext(spec.id, spec.account_id, spec.instruments)
        self.halted = False
        self.killed = False
        self.fault: str | None = None
        #: Why the last configuration command was refused (None once one is applied).
        self.last_error: str | None = None
        #: Configuration commands applied since start (replayed ones included).
        self.config_version = 0
        self._seen: set[tuple[str, str]] = set()
        self._seen_order: deque[tuple[str, str]] = deque()

    @classmethod
    def from_spec(cls, spec: StrategySpec) -> StrategyHost:
        """Build the strategy `spec` names; UnknownStrategyError or ValidationError if bad."""
        return cls(spec, create_strategy(spec.name, spec.params))

    @property
    def id(self) -> str:
        """The strategy id."""
        return self.spec.id

    @property
    def muted(self) -> bool:
        """True while the strategy's output is dropped."""
        return self.halted or self.killed or self.fault is not None

    def run(self, hook: Callable[[StrategyContext], None], now_ns: int) -> list[Event]:
        """Run one hook at event time `now_ns`; return what it asked to publish.

        A hook that raises faults this strategy alone: it is muted from then on (the others
        on the same instrument carry on) until the service restarts.
        """
        ctx = self.ctx
        ctx.now_ns = now_ns
        ctx.muted = self.muted
        try:
            hook(ctx)
        except Exception as exc:
            self.fault = f"{type(exc).__name__}: {exc}"
            ctx._drain()
            log.exception("strategy %s faulted; its output is muted", self.id)
            return [self.status(now_ns)]
        return ctx._drain()

    def reconfigure(self, params: Mapping[str, Any], *, replace: bool, now_ns: int) -> list[Event]:
        """Rebuild the strategy with `params` (merged onto the current ones unless `replace`).

        Validated by the strategy's own parameter model: ValidationError (or ValueError) if
        they do not fit, and the running strategy is left as it was. The new strategy starts
        afresh (its on_start runs; indicators warm up again), keeping the context: positions,
        targets and order-id counters.
        """
        merged = dict(params) if replace else {**self.spec.params, **params}
        strategy = create_strategy(self.spec.name, merged)
        self.strategy = strategy
        self.spec = self.spec.model_copy(update={"params": merged})
        self.config_version += 1
        self.last_error = None
        return self.run(strategy.on_start, now_ns)

    def status(self, now_ns: int, command_id: str | None = None) -> StrategyStatus:
        """The strategy as it runs now, for the `strategies` topic."""
        if self.fault is not None:
            state = StrategyState.FAULTED
        elif self.killed:
            state = StrategyState.KILLED
        elif self.halted:
            state = StrategyState.HALTED
        else:
            state = StrategyState.RUNNING
        params_type = type(self.strategy).params_type
        return StrategyStatus(
            strategy_id=self.id,
            name=self.spec.name,
            account_id=self.spec.account_id,
            instruments=list(self.spec.instruments),
            params=self.strategy.params.model_dump(mode="json"),
            param_schema=params_type.model_json_schema(),
            state=state,
            halted=self.halted,
            killed=self.killed,
            fault=self.fault,
            last_error=self.last_error,
            last_command_id=command_id,
            config_version=self.config_version,
            ts_event=now_ns,
        )

    def fill_is_new(self, report: ExecutionReport) -> bool:
        """Remember a fill's (account, trade id); False if it was seen already."""
        key = (report.account_id, report.trade_id or report.report_id)
        if key in self._seen:
            return False
        self._seen.add(key)
        self._seen_order.append(key)
        if len(self._seen_order) > SEEN_FILLS_LIMIT:
            self._seen.discard(self._seen_order.popleft())
        return True


class SignalsEngine:
    """Routes market data to the strategies trading each instrument and fills to their owner.

    Market data is applied once per instrument: a bar not newer than the last bar of its
    instrument and interval, or a tick older than the last tick of its instrument (or at the
    same time with a trade id already seen), is a redelivery and is ignored, so indicators are
    not updated twice after an at-least-once redelivery or a replay overlapping live input.

    With `route_joint=True` (the service on Kafka), strategies flagged `joint` (they need
    several instruments' data together) are not fed by `on_bar`/`on_tick` but by
    `on_joint_bar`/`on_joint_tick`: the service re-publishes their instruments' data keyed by
    `joint_key(instrument)` so that one instance of a consumer group receives all of it.
    Without it every strategy is fed directly (one process, backtests).
    """

    def __init__(self, hosts: Iterable[StrategyHost], *, route_joint: bool = False) -> None:
        self.hosts: dict[str, StrategyHost] = {}
        self.route_joint = route_joint
        self._by_instrument: dict[str, list[StrategyHost]] = {}
        self._joint_by_instrument: dict[str, list[StrategyHost]] = {}
        for host in hosts:
            if host.id in self.hosts:
                raise ValueError(f"strategy id {host.id!r} is configured twice")
            self.hosts[host.id] = host
            routed = route_joint and type(host.strategy).joint
            table = self._joint_by_instrument if routed else self._by_instrument
            for instrument in host.spec.instruments:
                table.setdefault(instrument, []).append(host)
        # Most strategies trade on bars: a tick only moves their last price, without a hook call.
        self._tick_hooks = {
            i: [h for h in hosts if _overrides_on_tick(h)]
            for i, hosts in self._by_instrument.items()
        }
        self._joint_tick_hooks = {
            i: [h for h in hosts if _overrides_on_tick(h)]
            for i, hosts in self._joint_by_instrument.items()
        }
        self._joint_keys = _joint_groups(
            [h for hosts in self._joint_by_instrument.values() for h in hosts]
        )
        self._direct = _Freshness()
        self._joint = _Freshness()

    @classmethod
    def from_specs(
        cls, specs: Sequence[StrategySpec], *, route_joint: bool = False
    ) -> SignalsEngine:
        """Build every configured strategy."""
        return cls((StrategyHost.from_spec(spec) for spec in specs), route_joint=route_joint)

    def joint_key(self, instrument_id: str) -> str | None:
        """The routing key of the joint strategies trading `instrument_id`, None if none do.

        Joint strategies sharing an instrument form one group (transitively) with one key,
        the smallest strategy id in it, so each instrument's data is re-published once.
        """
        return self._joint_keys.get(instrument_id)

    def start(self, now_ns: int) -> list[Event]:
        """Call every strategy's on_start."""
        out: list[Event] = []
        for host in self.hosts.values():
            out += host.run(host.strategy.on_start, now_ns)
        return out

    def stop(self, now_ns: int) -> list[Event]:
        """Call every strategy's on_stop."""
        out: list[Event] = []
        for host in self.hosts.values():
            out += host.run(host.strategy.on_stop, now_ns)
        return out

    def on_bar(self, bar: Bar) -> list[Event]:
        """Feed a bar to the strategies trading its instrument (event time = bar close)."""
        hosts = self._by_instrument.get(bar.instrument_id)
        if not hosts or not self._direct.bar_is_new(bar):
            return []
        return _feed_bar(hosts, bar)

    def on_tick(self, tick: Tick) -> list[Event]:
        """Feed a tick to the strategies trading its instrument."""
        instrument = tick.instrument_id
        hosts = self._by_instrument.get(instrument)
        if not hosts or not self._direct.tick_is_new(tick):
            return []
        return _feed_tick(hosts, self._tick_hooks[instrument], tick)

    def on_joint_bar(self, bar: Bar) -> list[Event]:
        """Feed a re-published bar to the joint strategies trading its instrument."""
        hosts = self._joint_by_instrument.get(bar.instrument_id)
        if not hosts or not self._joint.bar_is_new(bar):
            return []
        return _feed_bar(hosts, bar)

    def on_joint_tick(self, tick: Tick) -> list[Event]:
        """Feed a re-published tick to the joint strategies trading its instrument."""
        instrument = tick.instrument_id
        hosts = self._joint_by_instrument.get(instrument)
        if not hosts or not self._joint.tick_is_new(tick):
            return []
        return _feed_tick(hosts, self._joint_tick_hooks[instrument], tick)

    def owner(self, report: ExecutionReport) -> StrategyHost | None:
        """The strategy that sent the report's order: from its client order id, else the
        report's strategy id."""
        # Our ids are `<strategy_id>-<ns>-<n>`; strategy ids may hold dashes themselves.
        head = report.client_order_id.rsplit("-", 2)[0]
        host = self.hosts.get(head)
        if host is None and report.strategy_id is not None:
            host = self.hosts.get(report.strategy_id)
        return host

    def on_report(self, report: ExecutionReport) -> list[Event]:
        """Apply a fill to its strategy's position once, then call its on_fill."""
        if not report.is_fill:
            return []
        host = self.owner(report)
        if host is None or report.instrument_id not in host.ctx.instruments:
            return []
        if not host.fill_is_new(report):
            log.info("fill %s of %s seen already; ignored", report.trade_id, host.id)
            return []
        host.ctx._apply_fill(report)
        return host.run(partial(host.strategy.on_fill, report), report.ts_event)

    def touched_by(self, payload: object) -> list[str]:
        """The strategies whose state `payload` (a bar, tick or fill) changes when fed to this
        engine, joint and direct alike (for the hand-over of moved partitions)."""
        if isinstance(payload, Bar | Tick):
            instrument = payload.instrument_id
            hosts = [
                *self._by_instrument.get(instrument, ()),
                *self._joint_by_instrument.get(instrument, ()),
            ]
            return [h.id for h in hosts]
        if isinstance(payload, ExecutionReport) and payload.is_fill:
            host = self.owner(payload)
            return [] if host is None else [host.id]
        return []

    def joint_routed(self, strategy_id: str) -> bool:
        """True if the strategy is fed from the joint topics (not by on_bar/on_tick)."""
        return self.route_joint and type(self.hosts[strategy_id].strategy).joint

    def adopt(self, rebuilt: SignalsEngine, strategy_ids: Iterable[str]) -> None:
        """Take the named strategies' state from `rebuilt` (an engine of the same strategies
        fed the input again), dropping what this engine held for them.

        The state taken: the strategy object (indicators), its context (positions, targets,
        order-id counters, last prices), the fills seen, and the redelivery guards of the
        instruments the strategies trade (direct or joint, as they are routed). Kept from this
        engine: the switches (halted, killed; a fault stays), the parameters (a reconfigured
        strategy is rebuilt with its current parameters and starts afresh, as after a restart's
        replay) and the configuration version and error.
        """
        direct: set[str] = set()
        joint: set[str] = set()
        for strategy_id in strategy_ids:
            live, fresh = self.hosts[strategy_id], rebuilt.hosts[strategy_id]
            if fresh.spec.params != live.spec.params:
                fresh.reconfigure(live.spec.params, replace=True, now_ns=fresh.ctx.now_ns)
            live.strategy, live.ctx = fresh.strategy, fresh.ctx
            live._seen, live._seen_order = fresh._seen, fresh._seen_order
            live.fault = live.fault or fresh.fault
            (joint if self.joint_routed(strategy_id) else direct).update(live.spec.instruments)
        self._direct.take(rebuilt._direct, direct)
        self._joint.take(rebuilt._joint, joint)

    def statuses(self, now_ns: int) -> list[Event]:
        """Every strategy's status (published at start)."""
        return [host.status(now_ns) for host in self.hosts.values()]

    def on_control(self, command: ControlCommand, service: str = "signals") -> list[Event]:
        """Halt or resume strategies; switch the kill switch for accounts or everything;
        configure a strategy. Returns the status of every strategy the command touched (and
        whatever a reconfigured strategy's on_start asked for)."""
        action = command.action
        if action is ControlAction.CONFIGURE_STRATEGY:
            host = self.hosts.get(command.target)
            return [] if host is None else self._configure(host, command)
        halt = action in (ControlAction.HALT_STRATEGY, ControlAction.RESUME_STRATEGY)
        kill = action in (ControlAction.KILL_SWITCH_ON, ControlAction.KILL_SWITCH_OFF)
        out: list[Event] = []
        for host in self.hosts.values():
            if halt and command.applies_to(host.id):
                host.halted = action is ControlAction.HALT_STRATEGY
                log.warning("strategy %s %s", host.id, "halted" if host.halted else "resumed")
            elif kill and command.applies_to(host.spec.account_id, host.id, service):
                host.killed = action is ControlAction.KILL_SWITCH_ON
                log.warning(
                    "kill switch %s for strategy %s", "on" if host.killed else "off", host.id
                )
            else:
                continue
            out.append(host.status(command.ts_event, command.command_id))
        return out

    def _configure(self, host: StrategyHost, command: ControlCommand) -> list[Event]:
        """Apply CONFIGURE_STRATEGY to `host`; a refusal is reported in its status."""
        now = command.ts_event
        try:
            params, replace = configure_params(command.params)
            out = host.reconfigure(params, replace=replace, now_ns=now)
        except (ValueError, UnknownStrategyError) as exc:
            host.last_error = _reason(exc)
            log.warning("strategy %s: configuration refused: %s", host.id, host.last_error)
            return [host.status(now, command.command_id)]
        log.warning("strategy %s reconfigured: %s", host.id, host.spec.params)
        return [*out, host.status(now, command.command_id)]


def configure_params(params: Mapping[str, str]) -> tuple[dict[str, Any], bool]:
    """The parameters and whether they replace the current ones, from a CONFIGURE_STRATEGY
    command's params (`params`: a JSON object; `mode`: `merge` or `replace`); ValueError."""
    mode = params.get("mode", "merge")
    if mode not in ("merge", "replace"):
        raise ValueError(f"INVALID_MODE: mode must be merge or replace, got {mode!r}")
    try:
        value = json.loads(params.get("params", "{}"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"INVALID_PARAMS: params is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("INVALID_PARAMS: params must be a JSON object")
    return value, mode == "replace"


def _reason(exc: Exception) -> str:
    """One line naming each refused parameter and why."""
    if isinstance(exc, ValidationError):
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            parts.append(f"{where}: {error['msg']}" if where else error["msg"])
        return "INVALID_PARAMS: " + "; ".join(parts)
    text = str(exc)
    return text if text.startswith("INVALID_") else f"INVALID_PARAMS: {text}"


def _feed_bar(hosts: list[StrategyHost], bar: Bar) -> list[Event]:
    out: list[Event] = []
    instrument, close, ts = bar.instrument_id, bar.close, bar.ts_close
    for host in hosts:
        host.ctx._last_price[instrument] = close
        out += host.run(partial(host.strategy.on_bar, bar), ts)
    return out


def _feed_tick(hosts: list[StrategyHost], hooked: list[StrategyHost], tick: Tick) -> list[Event]:
    instrument, price = tick.instrument_id, tick.price
    for host in hosts:
        host.ctx._last_price[instrument] = price
    if not hooked:
        return []
    out: list[Event] = []
    for host in hooked:
        out += host.run(partial(host.strategy.on_tick, tick), tick.ts_event)
    return out


def _overrides_on_tick(host: StrategyHost) -> bool:
    return type(host.strategy).on_tick is not Strategy.on_tick


class _Freshness:
    """Which market data was applied already: the last bar per (instrument, interval), the
    last tick time per instrument with the trade ids seen at that time."""

    __slots__ = ("_bars", "_ticks")

    def __init__(self) -> None:
        self._bars: dict[tuple[str, str], int] = {}
        self._ticks: dict[str, tuple[int, str | None, set[str] | None]] = {}

    def bar_is_new(self, bar: Bar) -> bool:
        key = (bar.instrument_id, bar.interval)
        if bar.ts_close <= self._bars.get(key, -1):
            return False
        self._bars[key] = bar.ts_close
        return True

    def take(self, other: _Freshness, instruments: set[str]) -> None:
        """Replace what is known of `instruments` by what `other` knows of them."""
        if not instruments:
            return
        self._bars = {k: v for k, v in self._bars.items() if k[0] not in instruments}
        self._bars.update((k, v) for k, v in other._bars.items() if k[0] in instruments)
        self._ticks = {k: v for k, v in self._ticks.items() if k not in instruments}
        self._ticks.update(
            (k, (ts, trade, None if seen is None else set(seen)))
            for k, (ts, trade, seen) in other._ticks.items()
            if k in instruments
        )

    def tick_is_new(self, tick: Tick) -> bool:
        instrument, ts, trade_id = tick.instrument_id, tick.ts_event, tick.trade_id
        last = self._ticks.get(instrument)
        if last is None or ts > last[0]:
            # The set of trade ids at this time is made only if a second tick shares it.
            self._ticks[instrument] = (ts, trade_id, None)
            return True
        if ts < last[0]:
            return False
        # Same time: a new trade id is a new trade; without a trade id it cannot be told apart.
        if trade_id is None:
            return True
        seen = last[2]
        if trade_id == last[1] or (seen is not None and trade_id in seen):
            return False
        if seen is None:
            self._ticks[instrument] = (ts, last[1], {trade_id})
        else:
            seen.add(trade_id)
        return True


def _joint_groups(hosts: list[StrategyHost]) -> dict[str, str]:
    """Instrument -> key of its group (joint strategies linked by shared instruments, the
    smallest strategy id of the group), computed once at start over a few strategies."""
    by_instrument: dict[str, list[StrategyHost]] = {}
    for host in hosts:
        for instrument in host.spec.instruments:
            by_instrument.setdefault(instrument, []).append(host)
    key = {host.id: host.id for host in hosts}
    changed = True
    while changed:
        changed = False
        for members in by_instrument.values():
            smallest = min(key[h.id] for h in members)
            for host in members:
                if key[host.id] != smallest:
                    key[host.id], changed = smallest, True
    return {i: key[members[0].id] for i, members in by_instrument.items()}
