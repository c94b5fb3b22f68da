"""Returns per instrument on a fixed horizon, and the VaR of a set of positions over them.

Prices (trade ticks, quote mids, bar closes) are sampled on buckets of one horizon: the last
price seen in a bucket closes it, and the return of a bucket is its close over the previous
bucket's close, minus one. A gap with no prices gives no return (the next return spans it).

The VaR of positions `q_i` at prices `p_i` is taken over the P&L they would have made in each
bucket where every instrument with a position has a return: `pnl_b = sum_i q_i p_i r_ib`.
Historical VaR is minus the (1 - c) quantile of that P&L, parametric VaR `z_c sd - mean`
(`quantmesh_common.performance`); both are amounts in the quote currency, a loss positive.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from quantmesh_common.performance import historical_var, parametric_var

VAR_METHODS = ("historical", "parametric", "max")


class ReturnSeries:
    """One instrument's returns per horizon bucket, the last `window` of them."""

    def __init__(self, horizon_ns: int, window: int) -> None:
        self.horizon_ns = horizon_ns
        self.returns: deque[tuple[int, float]] = deque(maxlen=window)
        self._bucket: int | None = None
        self._last_ts = 0
        self._price: Decimal | None = None
        self._previous_close: Decimal | None = None

    def observe(self, ts_ns: int, price: Decimal) -> None:
        """Take a price; one older than the last one taken is ignored."""
        if ts_ns < self._last_ts:
            return
        bucket = ts_ns // self.horizon_ns
        if self._bucket is not None and bucket > self._bucket:
            close = self._price
            assert close is not None
            previous = self._previous_close
            if previous is not None:
                self.returns.append((self._bucket, float(close / previous) - 1.0))
            self._previous_close = close
        self._bucket = bucket
        self._last_ts = ts_ns
        self._price = price

    def by_bucket(self) -> dict[int, float]:
        """Return the returns keyed by bucket number."""
        return dict(self.returns)


@dataclass(frozen=True, slots=True)
class VarEstimate:
    """VaR of some positions: the amount (a loss, positive) and the P&L samples behind it."""

    var: float | None
    observations: int


def portfolio_pnl(
    values: Mapping[str, Decimal], returns: Mapping[str, Mapping[int, float]]
) -> list[float]:
    """Return the P&L per bucket of positions worth `values` (signed, quote currency).

    Only buckets where every instrument with a non-zero value has a return count.
    """
    held = {i: float(v) for i, v in values.items() if v}
    if not held:
        return []
    series = [returns.get(i, {}) for i in held]
    common = set(series[0]).intersection(*series[1:])
    weights = list(held.values())
    return [
        sum(w * s[bucket] for w, s in zip(weights, series, strict=True))
        for bucket in sorted(common)
    ]


def value_at_risk(pnl: list[float], method: str, confidence: float) -> float | None:
    """Return the VaR of P&L samples by `method` (historical, parametric or their max)."""
    if method == "historical":
        return historical_var(pnl, confidence)
    if method == "parametric":
        return parametric_var(pnl, confidence)
    if method == "max":
        both = (historical_var(pnl, confidence), parametric_var(pnl, confidence))
        known = [v for v in both if v is not None]
        return max(known) if known else None
    raise ValueError(f"unknown VaR method {method!r}; expected one of {VAR_METHODS}")


def estimate(
    values: Mapping[str, Decimal],
    returns: Mapping[str, Mapping[int, float]],
    method: str,
    confidence: float,
) -> VarEstimate:
    """Return the VaR of positions worth `values` over the instruments' common returns."""
    pnl = portfolio_pnl(values, returns)
    return VarEstimate(value_at_risk(pnl, method, confidence) if pnl else None, len(pnl))
