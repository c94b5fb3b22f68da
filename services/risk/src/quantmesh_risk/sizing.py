"""Position sizing of target-position intents: fixed, fraction of equity, volatility-targeted.

A strategy that names a target position gives its direction (the sign) and, optionally, a
size; a sizing policy replaces the size. Per account and strategy (`QM_RISK_SIZING`):

- `none`: the target as the strategy gave it (the default).
- `fixed`: `quantity` base units.
- `fraction`: a position worth `fraction` of equity: `equity x fraction / price`.
- `volatility` (rolling sigma): a position whose one-horizon volatility is `target_volatility`
  of equity: `equity x target_volatility / (sigma x price)`, sigma the sample standard
  deviation of the instrument's last `volatility_window` returns on the VaR horizon
  (`QM_RISK_VAR_HORIZON_S`).
- `atr`: a position that loses `risk_fraction` of equity on a move of `atr_multiple` ATRs:
  `equity x risk_fraction / (atr_multiple x ATR)`, ATR the mean true range of the last
  `atr_period` bars (`md.bars`; a bar's true range needs the previous close).

The size is rounded down to the instrument's lot (to 1e-8 without reference data); a target of
zero (flat) is never resized. Equity is the account's as risk follows it (portfolio snapshots
and updates), else the policy's `capital` until the first snapshot, in the same currency as
prices (one quote currency is assumed, as for exposure). A limit or stop price is the price of
the intent; otherwise the last price.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from decimal import ROUND_DOWN, Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantmesh_common.envelope import Money
from quantmesh_common.messages import Bar, Identifier
from quantmesh_risk.checks import RiskDenial, fmt

SizingMethod = Literal["none", "fixed", "fraction", "volatility", "atr"]
_Positive = Annotated[Money, Field(gt=0)]
_UNKNOWN_LOT = Decimal("0.00000001")
#: Bars' true ranges kept per instrument (the longest ATR period allowed).
MAX_ATR_PERIOD = 1_000


class SizingPolicy(BaseModel):
    """How to size the target positions of an account or a strategy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: SizingMethod = "none"
    quantity: _Positive | None = Field(default=None, description="fixed: base units.")
    fraction: Annotated[Money, Field(gt=0, le=10)] | None = Field(
        default=None, description="fraction: of equity (above 1 is leverage)."
    )
    target_volatility: Annotated[Money, Field(gt=0, le=1)] | None = Field(
        default=None, description="volatility: the position's one-horizon sigma over equity."
    )
    volatility_window: int = Field(default=20, ge=2, le=100_000)
    risk_fraction: Annotated[Money, Field(gt=0, le=1)] | None = Field(
        default=None, description="atr: equity lost on a move of atr_multiple ATRs."
    )
    atr_period: int = Field(default=14, ge=1, le=MAX_ATR_PERIOD)
    atr_multiple: _Positive = Decimal(1)
    capital: _Positive | None = Field(
        default=None, description="Equity to size with until the portfolio has reported one."
    )

    @model_validator(mode="after")
    def _complete(self) -> SizingPolicy:
        needs = {
            "fixed": "quantity",
            "fraction": "fraction",
            "volatility": "target_volatility",
            "atr": "risk_fraction",
        }.get(self.method)
        if needs is not None and getattr(self, needs) is None:
            raise ValueError(f"sizing method {self.method!r} needs {needs}")
        return self


class SizingConfig(BaseModel):
    """Policies: `default`, per account, per strategy (a strategy's wins over its account's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    default: SizingPolicy = Field(default_factory=SizingPolicy)
    accounts: dict[Identifier, SizingPolicy] = Field(default_factory=dict)
    strategies: dict[Identifier, SizingPolicy] = Field(default_factory=dict)

    def policy_for(self, account_id: str, strategy_id: str) -> SizingPolicy:
        """Return the policy of a strategy's intents in an account."""
        return self.strategies.get(strategy_id) or self.accounts.get(account_id) or self.default


class TrueRanges:
    """One instrument's bar true ranges, for the ATR."""

    def __init__(self) -> None:
        self.ranges: deque[Decimal] = deque(maxlen=MAX_ATR_PERIOD)
        self._previous_close: Decimal | None = None
        self._last_close_ts = -1

    def on_bar(self, bar: Bar) -> None:
        """Take a closed bar (an older or repeated one is ignored)."""
        if bar.ts_close <= self._last_close_ts:
            return
        self._last_close_ts = bar.ts_close
        previous = self._previous_close
        if previous is not None:
            self.ranges.append(
                max(bar.high - bar.low, abs(bar.high - previous), abs(bar.low - previous))
            )
        self._previous_close = bar.close

    def atr(self, period: int) -> Decimal | None:
        """Return the mean true range of the last `period` bars, or None with fewer."""
        if len(self.ranges) < period:
            return None
        last = list(self.ranges)[-period:]
        return sum(last, Decimal(0)) / period


def rolling_sigma(returns: Sequence[float], window: int) -> float | None:
    """Return the sample standard deviation of the last `window` returns; None with fewer."""
    if len(returns) < window:
        return None
    last = returns[-window:]
    mean = math.fsum(last) / window
    return math.sqrt(math.fsum((r - mean) ** 2 for r in last) / (window - 1))


def floor_to_lot(quantity: Decimal, lot_size: Decimal | None) -> Decimal:
    """Round a non-negative quantity down to whole lots (1e-8 when the lot is unknown)."""
    lot = lot_size or _UNKNOWN_LOT
    return (quantity / lot).to_integral_value(rounding=ROUND_DOWN) * lot


def sized_target(
    policy: SizingPolicy,
    target: Decimal,
    *,
    instrument_id: str,
    equity: Decimal | None,
    price: Decimal | None,
    returns: Sequence[float] = (),
    true_ranges: TrueRanges | None = None,
    lot_size: Decimal | None = None,
) -> RiskDenial | Decimal:
    """Return the target resized by `policy` (keeping its sign), or why it cannot be sized."""
    method = policy.method
    if method == "none" or not target:
        return target
    if equity is None:
        equity = policy.capital
    size: Decimal
    if method == "fixed":
        assert policy.quantity is not None
        size = policy.quantity
    else:
        if equity is None:
            return RiskDenial("SIZING_NO_EQUITY", {"method": method})
        if equity <= 0:
            return RiskDenial("SIZING_NO_EQUITY", {"method": method, "equity": fmt(equity)})
        if price is None:
            return RiskDenial(
                "NO_REFERENCE_PRICE", {"instrument_id": instrument_id, "needed_for": "sizing"}
            )
        if method == "fraction":
            assert policy.fraction is not None
            size = equity * policy.fraction / price
        elif method == "volatility":
            assert policy.target_volatility is not None
            sigma = rolling_sigma(returns, policy.volatility_window)
            if sigma is None:
                return RiskDenial(
                    "SIZING_INSUFFICIENT_HISTORY",
                    {
                        "method": method,
                        "returns": str(len(returns)),
                        "needed": str(policy.volatility_window),
                    },
                )
            if sigma <= 0:
                return RiskDenial("SIZING_ZERO_VOLATILITY", {"method": method})
            size = equity * policy.target_volatility / (Decimal(repr(sigma)) * price)
        else:
            assert policy.risk_fraction is not None
            atr = true_ranges.atr(policy.atr_period) if true_ranges is not None else None
            if atr is None:
                have = len(true_ranges.ranges) if true_ranges is not None else 0
                return RiskDenial(
                    "SIZING_INSUFFICIENT_HISTORY",
                    {"method": method, "bars": str(have), "needed": str(policy.atr_period)},
                )
            if atr <= 0:
                return RiskDenial("SIZING_ZERO_VOLATILITY", {"method": method})
            size = equity * policy.risk_fraction / (policy.atr_multiple * atr)
    rounded = floor_to_lot(size, lot_size)
    if not rounded:
        return RiskDenial(
            "SIZED_QUANTITY_BELOW_LOT",
            {"method": method, "size": fmt(size), "lot_size": fmt(lot_size or _UNKNOWN_LOT)},
        )
    return rounded if target > 0 else -rounded
