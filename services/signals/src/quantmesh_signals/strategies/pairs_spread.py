"""`pairs_spread`: trade the z-score of the spread between two instruments."""

from __future__ import annotations

from collections import deque
from decimal import Decimal

from pydantic import Field, model_validator

from quantmesh_common.messages import Bar
from quantmesh_signals.indicators import RollingStd
from quantmesh_signals.strategy import Strategy, StrategyContext, StrategyParams

#: Closes of one leg kept while waiting for the other leg's bar at the same time.
MAX_UNMATCHED = 1_000


class PairsSpreadParams(StrategyParams):
    """Parameters of `pairs_spread`."""

    lookback: int = Field(default=60, ge=2, description="Bars in the spread's mean and std.")
    entry_z: float = Field(default=2.0, gt=0, description="Open when |z| exceeds this.")
    exit_z: float = Field(default=0.5, ge=0, description="Close when |z| falls below this.")
    quantity: Decimal = Field(default=Decimal(1), gt=0, description="Size of the first leg.")
    hedge_ratio: Decimal = Field(default=Decimal(1), gt=0, description="Second leg per first.")

    @model_validator(mode="after")
    def _exit_inside_entry(self) -> PairsSpreadParams:
        if self.exit_z >= self.entry_z:
            raise ValueError(f"exit_z ({self.exit_z}) must be below entry_z ({self.entry_z})")
        return self


class PairsSpread(Strategy[PairsSpreadParams]):
    """Instruments [A, B]; spread = close(A) - hedge_ratio * close(B) on bars closing at the
    same time (whichever leg arrives first). z = (spread - mean) / sample std over the last
    `lookback` spreads, this one included. z > entry_z: short the spread (A -q, B +q*h);
    z < -entry_z: long it (A +q, B -q*h); |z| < exit_z while in a position: both legs to 0."""

    instrument_count = 2
    joint = True

    def on_start(self, ctx: StrategyContext) -> None:
        self._a, self._b = ctx.instruments
        self._std = RollingStd(self.params.lookback, sample=True)
        # Per leg, closes not yet matched by the other leg, oldest first. Each leg's bars come
        # in order but the legs may interleave any way (two partitions), so the matching must
        # not depend on which leg arrives first.
        self._pending: dict[str, deque[tuple[int, Decimal]]] = {
            self._a: deque(),
            self._b: deque(),
        }
        self._last: dict[str, int] = {}
        self._side = 0  # +1 long spread, -1 short spread, 0 flat

    def on_bar(self, bar: Bar, ctx: StrategyContext) -> None:
        me = bar.instrument_id
        other = self._b if me == self._a else self._a
        ts = bar.ts_close
        self._last[me] = ts
        waiting = self._pending[other]
        # The other leg's closes before this one can no longer be matched: this leg is past.
        while waiting and waiting[0][0] < ts:
            waiting.popleft()
        if not waiting or waiting[0][0] != ts:
            if self._last.get(other, -1) < ts:  # the other leg may still print at `ts`
                mine = self._pending[me]
                mine.append((ts, bar.close))
                if len(mine) > MAX_UNMATCHED:  # the other leg is silent: forget the oldest
                    mine.popleft()
            return
        other_close = waiting.popleft()[1]
        a, b = (bar.close, other_close) if me == self._a else (other_close, bar.close)
        p = self.params
        spread = a - p.hedge_ratio * b
        std = self._std.update(spread)
        mean = self._std.mean
        if std is None or mean is None or std == 0.0:
            return
        z = (float(spread) - mean) / std
        side = self._side
        if z > p.entry_z:
            side = -1
        elif z < -p.entry_z:
            side = 1
        elif abs(z) < p.exit_z:
            side = 0
        if side == self._side:
            return
        self._side = side
        why = f"spread z-score {z:.3f}"
        ctx.target_position(self._a, side * p.quantity, tag="pairs_spread", reason=why)
        ctx.target_position(
            self._b, -side * p.quantity * p.hedge_ratio, tag="pairs_spread", reason=why
        )
