"""`sma_cross`: long when the fast SMA crosses above the slow one; short or flat when below."""

from __future__ import annotations

from decimal import Decimal

from pydantic import Field, model_validator

from quantmesh_common.messages import Bar
from quantmesh_signals.columnar import BarSeries, Decisions, regime_changes
from quantmesh_signals.indicators import SMA, sma_batch
from quantmesh_signals.strategy import Strategy, StrategyContext, StrategyParams


class SmaCrossParams(StrategyParams):
    """Parameters of `sma_cross`."""

    fast: int = Field(default=10, ge=1, description="Bars in the fast average.")
    slow: int = Field(default=30, ge=2, description="Bars in the slow average.")
    quantity: Decimal = Field(default=Decimal(1), gt=0, description="Position size, base units.")
    allow_short: bool = Field(default=False, description="Short on a down-cross, else go flat.")

    @model_validator(mode="after")
    def _fast_below_slow(self) -> SmaCrossParams:
        if self.fast >= self.slow:
            raise ValueError(f"fast ({self.fast}) must be below slow ({self.slow})")
        return self


class SmaCross(Strategy[SmaCrossParams]):
    """Trades each of its instruments on its own, on bar closes.

    The regime is the sign of fast - slow (a tie keeps the previous regime); the first warm
    bar only sets it. A change of regime is a cross: up -> target +quantity, down -> target
    -quantity if shorting is allowed, else 0.

    `decide` is the columnar form (equal to `on_bar`, see quantmesh_signals.columnar).
    """

    def on_start(self, ctx: StrategyContext) -> None:
        p = self.params
        self._fast = {i: SMA(p.fast) for i in ctx.instruments}
        self._slow = {i: SMA(p.slow) for i in ctx.instruments}
        self._regime: dict[str, int] = {}

    def on_bar(self, bar: Bar, ctx: StrategyContext) -> None:
        instrument = bar.instrument_id
        fast = self._fast[instrument].update(bar.close)
        slow = self._slow[instrument].update(bar.close)
        if fast is None or slow is None or fast == slow:
            return
        regime = 1 if fast > slow else -1
        previous = self._regime.get(instrument)
        self._regime[instrument] = regime
        if previous is None or previous == regime:
            return
        p = self.params
        if regime > 0:
            ctx.target_position(
                instrument, p.quantity, tag="sma_cross", reason="fast SMA crossed above slow"
            )
        else:
            target = -p.quantity if p.allow_short else Decimal(0)
            ctx.target_position(
                instrument, target, tag="sma_cross", reason="fast SMA crossed below slow"
            )

    def decide(self, series: BarSeries) -> Decisions:
        """Every cross over `series` at once: the regime changes of fast - slow."""
        p = self.params
        fast = sma_batch(series.close, p.fast)
        slow = sma_batch(series.close, p.slow)
        index, signs = regime_changes(fast - slow)
        down = -p.quantity if p.allow_short else Decimal(0)
        up_reason, down_reason = "fast SMA crossed above slow", "fast SMA crossed below slow"
        ups = (signs > 0).tolist()
        return Decisions(
            index,
            [p.quantity if up else down for up in ups],
            [up_reason if up else down_reason for up in ups],
            tag="sma_cross",
        )
