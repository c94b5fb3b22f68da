"""`bollinger_breakout`: follow a close outside the bands; exit when price returns to the mid."""

from __future__ import annotations

from decimal import Decimal

from pydantic import Field

from quantmesh_common.messages import Bar
from quantmesh_signals.indicators import Bollinger
from quantmesh_signals.strategy import Strategy, StrategyContext, StrategyParams


class BollingerBreakoutParams(StrategyParams):
    """Parameters of `bollinger_breakout`."""

    period: int = Field(default=20, ge=2, description="Bars in the bands' window.")
    k: float = Field(default=2.0, gt=0, description="Band width in standard deviations.")
    quantity: Decimal = Field(default=Decimal(1), gt=0, description="Position size, base units.")
    allow_short: bool = Field(default=False, description="Short a break below the lower band.")


class BollingerBreakout(Strategy[BollingerBreakoutParams]):
    """Per instrument, on bar closes, against the bands of the `period` bars *before* this one
    (a bar inside its own window would damp its own breakout):

    - close > upper -> target +quantity; close < lower -> target -quantity if shorting is
      allowed (else nothing);
    - long and close < mid, or short and close > mid -> target 0.
    """

    def on_start(self, ctx: StrategyContext) -> None:
        p = self.params
        self._bands = {i: Bollinger(p.period, p.k) for i in ctx.instruments}

    def on_bar(self, bar: Bar, ctx: StrategyContext) -> None:
        instrument = bar.instrument_id
        bands = self._bands[instrument].value
        self._bands[instrument].update(bar.close)
        if bands is None:
            return
        p = self.params
        close = float(bar.close)
        held = ctx.target(instrument) or Decimal(0)
        target = held
        if close > bands.upper:
            target, why = p.quantity, "close above upper band"
        elif close < bands.lower and p.allow_short:
            target, why = -p.quantity, "close below lower band"
        elif (held > 0 and close < bands.mid) or (held < 0 and close > bands.mid):
            target, why = Decimal(0), "close back across the mid band"
        if target != held:
            ctx.target_position(instrument, target, tag="bollinger_breakout", reason=why)
