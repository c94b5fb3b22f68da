"""`pairs_spread`: trade the z-score of the spread between two instruments."""

from __future__ import annotations

from decimal import Decimal

from pydantic import Field, model_validator

from quantmesh_common.messages import Bar
from quantmesh_signals.indicators import RollingStd
from quantmesh_signals.strategy import Strategy, StrategyContext, StrategyParams


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
    same time. z = (spread - mean) / sample std over the last `lookback` spreads, this one
    included. z > entry_z: short the spread (A -q, B +q*h); z < -entry_z: long it (A +q,
    B -q*h); |z| < exit_z while in a position: both legs to 0."""

    instrument_count = 2

    def on_start(self, ctx: StrategyContext) -> None:
        self._a, self._b = ctx.instruments
        self._std = RollingStd(self.params.lookback, sample=True)
        self._closes: dict[str, tuple[int, Decimal]] = {}
        self._side = 0  # +1 long spread, -1 short spread, 0 flat

    def on_bar(self, bar: Bar, ctx: StrategyContext) -> None:
        self._closes[bar.instrument_id] = (bar.ts_close, bar.close)
        a, b = self._closes.get(self._a), self._closes.get(self._b)
        if a is None or b is None or a[0] != b[0]:
            return
        del self._closes[self._a], self._closes[self._b]
        p = self.params
        spread = a[1] - p.hedge_ratio * b[1]
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
