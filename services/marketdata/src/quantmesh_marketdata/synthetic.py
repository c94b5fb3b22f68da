"""A seeded synthetic market: geometric Brownian motion trades with a quoted spread."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

from quantmesh_common.messages import AggressorSide, InstrumentId, Tick
from quantmesh_marketdata.files import trade_tick

NANOS_PER_YEAR = 365 * 24 * 3600 * 1_000_000_000
# Module-level members: reading an enum member through its class costs a descriptor call.
_BUYER = AggressorSide.BUYER
_SELLER = AggressorSide.SELLER


@dataclass(frozen=True, slots=True)
class GbmParams:
    """Parameters of the synthetic feed.

    `drift` and `volatility` are annual (e.g. 0.05 and 0.6); prices follow
    S(t+dt) = S(t) * exp((drift - volatility^2 / 2) dt + volatility sqrt(dt) Z), Z ~ N(0, 1),
    rounded to `tick_size`. Each trade prints at the bid or the ask, `spread_bps` apart.
    """

    start_price: Decimal = Decimal("100")
    drift: float = 0.0
    volatility: float = 0.5
    spread_bps: float = 2.0
    tick_size: Decimal = Decimal("0.01")
    interval_ns: int = 1_000_000_000
    min_size: Decimal = Decimal("0.001")
    max_size: Decimal = Decimal("1")

    def __post_init__(self) -> None:
        if self.start_price <= 0 or self.tick_size <= 0:
            raise ValueError("start_price and tick_size must be positive")
        if self.volatility < 0 or self.spread_bps < 0 or self.interval_ns <= 0:
            raise ValueError("volatility, spread_bps must be >= 0 and interval_ns > 0")
        if not 0 < self.min_size <= self.max_size:
            raise ValueError("need 0 < min_size <= max_size")


def gbm_ticks(instrument_id: str, params: GbmParams, start_ns: int, seed: int) -> Iterator[Tick]:
    """Yield trade ticks forever, one every `interval_ns`; the same seed gives the same ticks."""
    venue = InstrumentId.parse(instrument_id).venue
    rng = random.Random(seed)
    dt = params.interval_ns / NANOS_PER_YEAR
    drift = (params.drift - params.volatility**2 / 2) * dt
    shock = params.volatility * math.sqrt(dt)
    half_spread = params.spread_bps / 20_000
    size_step = params.min_size
    size_units = int((params.max_size - params.min_size) / size_step)
    mid = float(params.start_price)
    ts = start_ns
    n = 0
    while True:
        mid *= math.exp(drift + shock * rng.gauss(0.0, 1.0))
        buy = rng.random() < 0.5
        raw = mid * (1 + half_spread) if buy else mid * (1 - half_spread)
        price = _to_tick(raw, params.tick_size)
        size = params.min_size + size_step * rng.randint(0, size_units)
        n += 1
        side = _BUYER if buy else _SELLER
        if n > 1:
            # The first tick went through the model (it checked the id and venue); trade_tick
            # makes the same checks of the rest without pydantic's validation (a third of a
            # step's cost), and an equal Tick.
            yield trade_tick(instrument_id, venue, price, size, side, f"SYN-{seed}-{n}", ts)
        else:
            yield Tick(
                instrument_id=instrument_id,
                venue=venue,
                price=price,
                size=size,
                aggressor_side=side,
                trade_id=f"SYN-{seed}-{n}",
                ts_event=ts,
                ts_init=ts,
            )
        ts += params.interval_ns


def _to_tick(price: float, tick_size: Decimal) -> Decimal:
    # Decimal(repr) keeps the float's shortest decimal form before snapping to the tick grid.
    units = (Decimal(repr(price)) / tick_size).to_integral_value(rounding=ROUND_HALF_EVEN)
    return max(units, Decimal(1)) * tick_size
