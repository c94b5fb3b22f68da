"""`rsi_reversion`: buy when RSI is oversold, exit (or short) when it is overbought."""

from __future__ import annotations

from decimal import Decimal

import numpy as np
from pydantic import Field, model_validator

from quantmesh_common.messages import Bar
from quantmesh_signals.columnar import BarSeries, Decisions
from quantmesh_signals.indicators import RSI, rsi_batch
from quantmesh_signals.strategy import Strategy, StrategyContext, StrategyParams


class RsiReversionParams(StrategyParams):
    """Parameters of `rsi_reversion`."""

    period: int = Field(default=14, ge=1, description="Wilder RSI period, bars.")
    oversold: float = Field(default=30.0, gt=0, lt=100, description="Go long below this RSI.")
    overbought: float = Field(default=70.0, gt=0, lt=100, description="Exit above this RSI.")
    quantity: Decimal = Field(default=Decimal(1), gt=0, description="Position size, base units.")
    allow_short: bool = Field(default=False, description="Short when overbought, else go flat.")

    @model_validator(mode="after")
    def _ordered(self) -> RsiReversionParams:
        if self.oversold >= self.overbought:
            raise ValueError(
                f"oversold ({self.oversold}) must be below overbought ({self.overbought})"
            )
        return self


class RsiReversion(Strategy[RsiReversionParams]):
    """Per instrument, on bar closes: RSI < oversold -> target +quantity; RSI > overbought ->
    target -quantity if shorting is allowed, else 0. A target is sent only when it changes;
    between the thresholds the position is held. `decide` is the columnar form."""

    def on_start(self, ctx: StrategyContext) -> None:
        self._rsi = {i: RSI(self.params.period) for i in ctx.instruments}

    def on_bar(self, bar: Bar, ctx: StrategyContext) -> None:
        instrument = bar.instrument_id
        rsi = self._rsi[instrument].update(bar.close)
        if rsi is None:
            return
        p = self.params
        if rsi < p.oversold:
            target, why = p.quantity, f"RSI {rsi:.2f} below {p.oversold}"
        elif rsi > p.overbought:
            target = -p.quantity if p.allow_short else Decimal(0)
            why = f"RSI {rsi:.2f} above {p.overbought}"
        else:
            return
        if ctx.target(instrument) != target:
            ctx.target_position(instrument, target, tag="rsi_reversion", reason=why)

    def decide(self, series: BarSeries) -> Decisions:
        """Every target change over `series` at once (equal to `on_bar`)."""
        p = self.params
        rsi = rsi_batch(series.close, p.period)
        # Each bar past a threshold proposes a target (+1 long, -1 the overbought side);
        # a decision is a proposal that differs from the one before it.
        with np.errstate(invalid="ignore"):
            proposals = np.flatnonzero((rsi < p.oversold) | (rsi > p.overbought))
        sides = np.where(rsi[proposals] < p.oversold, 1, -1)
        changed = np.ones(len(sides), dtype=bool)
        changed[1:] = sides[1:] != sides[:-1]
        index = proposals[changed].astype(np.int64)
        low = -p.quantity if p.allow_short else Decimal(0)
        targets: list[Decimal] = []
        reasons: list[str] = []
        for value, side in zip(rsi[index].tolist(), sides[changed].tolist(), strict=True):
            if side > 0:
                targets.append(p.quantity)
                reasons.append(f"RSI {value:.2f} below {p.oversold}")
            else:
                targets.append(low)
                reasons.append(f"RSI {value:.2f} above {p.overbought}")
        return Decisions(index, targets, reasons, tag="rsi_reversion")
