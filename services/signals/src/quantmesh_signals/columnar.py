"""Columnar strategies: a strategy's decisions over a whole bar history at once.

A strategy whose targets depend only on the bars it has seen (not on its fills, ticks or the
clock) may also offer `decide(series) -> Decisions`: the bars on whose close it would call
`ctx.target_position`, with the target and reason it would give. Backtests then run only
those bars' intents through risk, the OMS, the venue and the portfolio, instead of every bar
through every stage. A columnar form must be equal to the strategy's `on_bar` on every input,
warm-up included; `decisions_by_bar` runs `on_bar` over a series so tests can prove it.

Limits of the contract: one instrument, targets only (no `buy`/`sell`), market orders only,
no output from `on_start` (it may set up state), no `on_tick`/`on_fill`/`on_stop` at all. A
strategy outside them simply has no `decide`.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from quantmesh_common.messages import Bar, OrderIntent, OrderType, Signal
from quantmesh_signals.strategy import Strategy, StrategyContext


@dataclass(frozen=True)
class BarSeries:
    """One instrument's bars as columns: closing times (ns) and prices as floats.

    Floats are what the incremental indicators see too (`float(bar.close)`), so a columnar
    indicator over these columns meets the same numbers.
    """

    instrument_id: str
    ts_close: npt.NDArray[np.int64]
    open: npt.NDArray[np.float64]
    high: npt.NDArray[np.float64]
    low: npt.NDArray[np.float64]
    close: npt.NDArray[np.float64]
    volume: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.close)


@dataclass(frozen=True)
class Decisions:
    """Where a strategy asks for a target position: bar indices (ascending), targets, reasons."""

    index: npt.NDArray[np.int64]
    target: list[Decimal]
    reason: list[str]
    tag: str = ""

    def __post_init__(self) -> None:
        if not (len(self.index) == len(self.target) == len(self.reason)):
            raise ValueError("decisions need one target and one reason per index")

    def __len__(self) -> int:
        return len(self.index)


@runtime_checkable
class ColumnarStrategy(Protocol):
    """A strategy that can decide over a whole series at once."""

    def decide(self, series: BarSeries) -> Decisions:
        """Every decision `on_bar` would make over `series`, from a fresh start."""
        ...


def columnar_form(strategy: Strategy[Any], instruments: int = 1) -> ColumnarStrategy | None:
    """The strategy's columnar form, or None when it has none or the run is outside its limits.

    Only single-instrument, non-joint runs qualify; a strategy overriding `on_tick`,
    `on_fill` or `on_stop` acts on more than bars, so its `decide` (if any) is not trusted.
    """
    cls = type(strategy)
    if instruments != 1 or cls.joint or not isinstance(strategy, ColumnarStrategy):
        return None
    hooks = ("on_tick", "on_fill", "on_stop")
    if any(getattr(cls, hook) is not getattr(Strategy, hook) for hook in hooks):
        return None
    return strategy


def decisions_by_bar(strategy: Strategy[Any], series: BarSeries) -> Decisions:
    """Run `strategy.on_bar` over `series`, bar by bar, and collect its target decisions.

    The reference a columnar form is compared with. Each bar's prices are the shortest
    decimals of the series' floats, so `float(bar.close)` gives back the column's value.
    """
    instrument = series.instrument_id
    ctx = StrategyContext("columnar-check", "check", [instrument])
    strategy.on_start(ctx)
    ctx._drain()
    index: list[int] = []
    targets: list[Decimal] = []
    reasons: list[str] = []
    tags: set[str] = set()
    columns = zip(
        series.ts_close.tolist(),
        series.open.tolist(),
        series.high.tolist(),
        series.low.tolist(),
        series.close.tolist(),
        series.volume.tolist(),
        strict=True,
    )
    for i, (ts, o, h, lo, c, v) in enumerate(columns):
        close = Decimal(repr(c))
        bar = Bar.model_construct(
            instrument_id=instrument,
            interval="1m",
            open=Decimal(repr(o)),
            high=Decimal(repr(h)),
            low=Decimal(repr(lo)),
            close=close,
            volume=Decimal(repr(v)),
            ts_open=ts - 1,
            ts_close=ts,
        )
        ctx.now_ns = ts
        ctx._see_price(instrument, close)
        strategy.on_bar(bar, ctx)
        reason = ""
        for event in ctx._drain():
            if isinstance(event, Signal):
                reason = event.reason
            elif isinstance(event, OrderIntent):
                if event.target_position is None or event.order_type is not OrderType.MARKET:
                    raise ValueError("only market target intents have a columnar form")
                index.append(i)
                targets.append(event.target_position)
                reasons.append(reason)
                tags.add(event.tag)
    return Decisions(np.asarray(index, dtype=np.int64), targets, reasons, next(iter(tags), ""))


def regime_changes(
    difference: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Where the sign of `difference` changes, ignoring NaN and zero (they keep the regime).

    Returns (indices, new sign there); the first defined sign sets the regime without being
    a change.
    """
    defined = np.flatnonzero(~np.isnan(difference) & (difference != 0.0))
    signs = np.where(difference[defined] > 0, 1, -1).astype(np.int64)
    changed = np.flatnonzero(signs[1:] != signs[:-1]) + 1
    return defined[changed].astype(np.int64), signs[changed]
