"""The strategy API: a class with validated parameters, event hooks and order-intent helpers.

A strategy in full::

    class Params(StrategyParams):
        period: int = Field(default=20, ge=2)
        quantity: Decimal = Field(default=Decimal(1), gt=0)

    class Breakout(Strategy[Params]):
        def on_start(self, ctx: StrategyContext) -> None:
            self.high = {i: None for i in ctx.instruments}

        def on_bar(self, bar: Bar, ctx: StrategyContext) -> None:
            if ...:
                ctx.target_position(bar.instrument_id, self.params.quantity, tag="breakout")

registered in its package's pyproject.toml under `[project.entry-points."quantmesh.strategies"]`
(`breakout = "my_pkg.breakout:Breakout"`), and configured by name in QM_STRATEGIES. Hooks return
nothing: what a strategy wants is what it asks its context for (`buy`, `sell`,
`target_position`); the engine publishes it after the hook returns.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Mapping, Sequence
from decimal import Decimal
from importlib.metadata import entry_points
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from quantmesh_common.envelope import Event
from quantmesh_common.messages import (
    Bar,
    ExecutionReport,
    OrderIntent,
    OrderType,
    PositionSide,
    Side,
    Signal,
    Tick,
    TimeInForce,
)

#: The entry-point group strategies are registered under.
ENTRY_POINT_GROUP = "quantmesh.strategies"

P = TypeVar("P", bound=BaseModel)

#: What the order helpers take as a quantity or price: exact values only, never floats.
Quantity = Decimal | int | str


class StrategyParams(BaseModel):
    """A convenient base for parameter models: immutable, and a misspelt parameter is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Strategy(Generic[P]):
    """Base of every strategy; `P` is the pydantic model of its parameters.

    Parameters are validated when the strategy is built, so a bad value raises
    pydantic.ValidationError naming the field. Override the hooks you need; each gets the
    strategy's `StrategyContext`.
    """

    #: The parameter model, taken from `Strategy[P]` when the subclass is declared.
    params_type: ClassVar[type[BaseModel]] = StrategyParams
    #: How many instruments the strategy trades: None means any number (at least one).
    instrument_count: ClassVar[int | None] = None
    #: True when a decision needs several instruments' data together (a spread). The service
    #: then routes those instruments' data to one instance; otherwise each instrument is
    #: handled on its own and instances may split a strategy's instruments between them.
    joint: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            if typing.get_origin(base) is Strategy:
                (arg,) = typing.get_args(base)
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    cls.params_type = arg

    def __init__(self, params: P | Mapping[str, Any] | None = None) -> None:
        validated = self.params_type.model_validate(params if params is not None else {})
        self.params: P = typing.cast(P, validated)

    def on_start(self, ctx: StrategyContext) -> None:
        """Called once before the first event."""

    def on_bar(self, bar: Bar, ctx: StrategyContext) -> None:
        """Called for every bar of an instrument the strategy trades."""

    def on_tick(self, tick: Tick, ctx: StrategyContext) -> None:
        """Called for every tick of an instrument the strategy trades."""

    def on_fill(self, report: ExecutionReport, ctx: StrategyContext) -> None:
        """Called for every fill of one of the strategy's orders; the position is updated."""

    def on_stop(self, ctx: StrategyContext) -> None:
        """Called once when the strategy stops."""


def _exact(value: Quantity, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str):
        raise TypeError(f"{what} must be a Decimal, int or str (never a float), got {value!r}")
    return value if isinstance(value, Decimal) else Decimal(value)


class StrategyContext:
    """What a strategy sees of the world and how it asks for orders.

    Positions are tracked from the strategy's own fills (signed, base units). `now_ns` is the
    event time of what is being handled. Every intent gets a deterministic client order id,
    `<strategy_id>-<event time ns>-<slot>.<n>` (`slot`: the instrument's place in the strategy's
    list; `n`: 1, 2, ... per instrument and time): replaying the same input yields the same ids
    (so a redelivered bar cannot become a second order downstream), later input never reuses
    one, and one instrument's ids do not depend on what the others did, so instances that
    split a strategy's instruments make the ids one instance would.
    """

    def __init__(self, strategy_id: str, account_id: str, instruments: Sequence[str]) -> None:
        if not instruments:
            raise ValueError(f"strategy {strategy_id!r} trades no instrument")
        self.strategy_id = strategy_id
        self.account_id = account_id
        self.instruments: tuple[str, ...] = tuple(instruments)
        self.now_ns = 0
        #: True while the engine drops this strategy's output (halted, kill switch, fault).
        self.muted = False
        self._positions: dict[str, Decimal] = {i: Decimal(0) for i in self.instruments}
        self._last_price: dict[str, Decimal] = {}
        self._targets: dict[str, Decimal] = {}
        self._outbox: list[Event] = []
        self._slots = {instrument: slot for slot, instrument in enumerate(self.instruments)}
        #: Per instrument: (event time of its last id, ids made at that time).
        self._stamps: dict[str, tuple[int, int]] = {}

    # -- what the strategy reads -------------------------------------------------------------

    def position(self, instrument_id: str) -> Decimal:
        """The strategy's signed position in `instrument_id`, from its fills."""
        self._check_instrument(instrument_id)
        return self._positions[instrument_id]

    @property
    def positions(self) -> Mapping[str, Decimal]:
        """Signed position per instrument the strategy trades."""
        return dict(self._positions)

    def last_price(self, instrument_id: str) -> Decimal | None:
        """The last bar close or tick price seen for `instrument_id`."""
        return self._last_price.get(instrument_id)

    def target(self, instrument_id: str) -> Decimal | None:
        """The last target position the strategy asked for, if any."""
        return self._targets.get(instrument_id)

    # -- what the strategy asks for ----------------------------------------------------------

    def buy(
        self,
        instrument_id: str,
        quantity: Quantity,
        *,
        order_type: OrderType = OrderType.MARKET,
        limit_price: Quantity | None = None,
        stop_price: Quantity | None = None,
        time_in_force: TimeInForce = TimeInForce.GTC,
        expire_time_ns: int | None = None,
        post_only: bool = False,
        reduce_only: bool = False,
        tag: str = "",
    ) -> OrderIntent:
        """Ask to buy `quantity`; returns the intent (validated: bad terms raise)."""
        return self._order(
            instrument_id,
            Side.BUY,
            quantity,
            order_type,
            limit_price,
            stop_price,
            time_in_force,
            expire_time_ns,
            post_only,
            reduce_only,
            tag,
        )

    def sell(
        self,
        instrument_id: str,
        quantity: Quantity,
        *,
        order_type: OrderType = OrderType.MARKET,
        limit_price: Quantity | None = None,
        stop_price: Quantity | None = None,
        time_in_force: TimeInForce = TimeInForce.GTC,
        expire_time_ns: int | None = None,
        post_only: bool = False,
        reduce_only: bool = False,
        tag: str = "",
    ) -> OrderIntent:
        """Ask to sell `quantity`; returns the intent (validated: bad terms raise)."""
        return self._order(
            instrument_id,
            Side.SELL,
            quantity,
            order_type,
            limit_price,
            stop_price,
            time_in_force,
            expire_time_ns,
            post_only,
            reduce_only,
            tag,
        )

    def target_position(
        self,
        instrument_id: str,
        quantity: Quantity,
        *,
        order_type: OrderType = OrderType.MARKET,
        limit_price: Quantity | None = None,
        time_in_force: TimeInForce = TimeInForce.GTC,
        expire_time_ns: int | None = None,
        tag: str = "",
        reason: str = "",
    ) -> OrderIntent:
        """Ask for a signed position (0 = flat); risk derives the side and size.

        When the target differs from the previous one a Signal is published too, carrying the
        direction, the target, the last price seen and `reason` (or `tag`).
        """
        self._check_instrument(instrument_id)
        target = _exact(quantity, "target position")
        ids = self._next_ids(instrument_id)
        intent = OrderIntent(
            intent_id=ids[1],
            account_id=self.account_id,
            strategy_id=self.strategy_id,
            instrument_id=instrument_id,
            client_order_id=ids[0],
            target_position=target,
            order_type=order_type,
            limit_price=None if limit_price is None else _exact(limit_price, "limit price"),
            time_in_force=time_in_force,
            expire_time_ns=expire_time_ns,
            tag=tag,
            ts_event=self.now_ns,
        )
        if self.muted:
            # A decision made while muted is dropped, not deferred: no target is remembered.
            return intent
        if self._targets.get(instrument_id) != target:
            self._outbox.append(
                Signal(
                    signal_id=f"{ids[0]}-signal",
                    strategy_id=self.strategy_id,
                    instrument_id=instrument_id,
                    direction=PositionSide.of(target),
                    target_position=target,
                    price=self._last_price.get(instrument_id),
                    reason=reason or tag,
                    ts_event=self.now_ns,
                )
            )
        self._targets[instrument_id] = target
        self._outbox.append(intent)
        return intent

    # -- used by the engine ------------------------------------------------------------------

    def _order(
        self,
        instrument_id: str,
        side: Side,
        quantity: Quantity,
        order_type: OrderType,
        limit_price: Quantity | None,
        stop_price: Quantity | None,
        time_in_force: TimeInForce,
        expire_time_ns: int | None,
        post_only: bool,
        reduce_only: bool,
        tag: str,
    ) -> OrderIntent:
        self._check_instrument(instrument_id)
        client_order_id, intent_id = self._next_ids(instrument_id)
        intent = OrderIntent(
            intent_id=intent_id,
            account_id=self.account_id,
            strategy_id=self.strategy_id,
            instrument_id=instrument_id,
            client_order_id=client_order_id,
            side=side,
            quantity=_exact(quantity, "quantity"),
            order_type=order_type,
            limit_price=None if limit_price is None else _exact(limit_price, "limit price"),
            stop_price=None if stop_price is None else _exact(stop_price, "stop price"),
            time_in_force=time_in_force,
            expire_time_ns=expire_time_ns,
            post_only=post_only,
            reduce_only=reduce_only,
            tag=tag,
            ts_event=self.now_ns,
        )
        if not self.muted:
            self._outbox.append(intent)
        return intent

    def _next_ids(self, instrument_id: str) -> tuple[str, str]:
        # (stamp, n) only ever grows per instrument, even if event times step back, so ids
        # never repeat.
        stamp, n = self._stamps.get(instrument_id, (-1, 0))
        if self.now_ns > stamp:
            stamp, n = self.now_ns, 0
        n += 1
        self._stamps[instrument_id] = (stamp, n)
        client_order_id = f"{self.strategy_id}-{stamp}-{self._slots[instrument_id]}.{n}"
        return client_order_id, f"{client_order_id}-intent"

    def _check_instrument(self, instrument_id: str) -> None:
        if instrument_id not in self._positions:
            raise ValueError(
                f"strategy {self.strategy_id!r} does not trade {instrument_id!r} "
                f"(it trades {', '.join(self.instruments)})"
            )

    def _apply_fill(self, report: ExecutionReport) -> None:
        self._positions[report.instrument_id] += report.side.sign * report.last_qty

    def _see_price(self, instrument_id: str, price: Decimal) -> None:
        self._last_price[instrument_id] = price

    def _drain(self) -> list[Event]:
        out, self._outbox = self._outbox, []
        return out


# --------------------------------------------------------------------------------------------
# Registry: strategies by name, from entry points
# --------------------------------------------------------------------------------------------


class UnknownStrategyError(LookupError):
    """A strategy name that no installed package registers."""


@functools.cache
def _registered() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_strategies() -> list[str]:
    """Names of every installed strategy, sorted."""
    return sorted(_registered())


def load_strategy_class(name: str) -> type[Strategy[Any]]:
    """Return the strategy class registered as `name`; UnknownStrategyError lists the known."""
    entry = _registered().get(name)
    if entry is None:
        known = ", ".join(available_strategies()) or "none"
        raise UnknownStrategyError(
            f"unknown strategy {name!r}; known strategies ({ENTRY_POINT_GROUP}): {known}"
        )
    loaded = entry.load()
    if not (isinstance(loaded, type) and issubclass(loaded, Strategy)):
        raise TypeError(f"entry point {name!r} ({entry.value}) is not a Strategy subclass")
    return loaded


def create_strategy(name: str, params: Mapping[str, Any] | None = None) -> Strategy[Any]:
    """Build the strategy registered as `name` with `params` (ValidationError if bad)."""
    return load_strategy_class(name)(params)
