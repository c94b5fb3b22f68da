"""Risk limits per account, with per-instrument overrides: the shape of QM_RISK_LIMITS."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from quantmesh_common.envelope import Money
from quantmesh_common.messages import Identifier, InstrumentIdStr

#: A limit on a size or a value: strictly positive; absent (None) means no limit.
Limit = Annotated[Money, Field(gt=0)]
#: A percentage limit: above 0, at most 100.
Percent = Annotated[Money, Field(gt=0, le=100)]
#: How VaR is estimated: from the empirical quantile, from a Gaussian fit, or the larger of both.
VarMethod = Literal["historical", "parametric", "max"]


class InstrumentLimits(BaseModel):
    """Overrides of an account's limits for one instrument; unset fields keep the account's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_order_quantity: Limit | None = Field(default=None, description="Base units per order.")
    max_order_notional: Limit | None = Field(default=None, description="Quote value per order.")
    max_position: Limit | None = Field(
        default=None, description="Largest absolute position after the order, base units."
    )
    price_collar_bps: Limit | None = Field(
        default=None, description="Largest deviation of a limit/stop price from the last price."
    )


class RiskLimits(InstrumentLimits):
    """One account's limits: account-wide values plus per-instrument overrides.

    A limit left unset (None) is not checked.
    """

    max_open_orders: int | None = Field(default=None, ge=0, description="Working orders at once.")
    max_daily_loss: Limit | None = Field(
        default=None,
        description="Loss since the UTC day's opening equity (base currency): trips the breaker.",
    )
    max_drawdown_pct: Percent | None = Field(
        default=None, description="Drawdown from the equity peak, in %, that trips the breaker."
    )
    max_gross_exposure: Limit | None = Field(
        default=None, description="Sum of |position| x price over instruments after the order."
    )
    max_net_exposure: Limit | None = Field(
        default=None, description="|Sum of signed position x price| after the order."
    )
    max_orders_per_strategy: int | None = Field(
        default=None, ge=1, description="Approved orders per strategy within the rate window."
    )
    order_rate_window_s: float = Field(
        default=1.0, gt=0, le=86_400, allow_inf_nan=False, description="Order rate window, s."
    )
    max_var: Limit | None = Field(
        default=None, description="VaR of the post-trade positions (quote currency), one horizon."
    )
    var_method: VarMethod = "historical"
    var_confidence: float = Field(default=0.99, gt=0.5, lt=1, allow_inf_nan=False)
    var_min_observations: int = Field(
        default=20, ge=2, description="Fewer common returns than this: VAR_INSUFFICIENT_HISTORY."
    )
    allow_unknown_instruments: bool = Field(
        default=True,
        description="Trade instruments without reference data (their tick/lot rules unchecked).",
    )
    instruments: dict[InstrumentIdStr, InstrumentLimits] = Field(default_factory=dict)

    def for_instrument(self, instrument_id: str) -> EffectiveLimits:
        """Return the limits that apply to orders in `instrument_id`."""
        override = self.instruments.get(instrument_id)

        def pick(name: str) -> Decimal | None:
            value: Decimal | None = getattr(override, name) if override is not None else None
            return value if value is not None else getattr(self, name)

        return EffectiveLimits(
            max_order_quantity=pick("max_order_quantity"),
            max_order_notional=pick("max_order_notional"),
            max_position=pick("max_position"),
            price_collar_bps=pick("price_collar_bps"),
            max_open_orders=self.max_open_orders,
            allow_unknown_instruments=self.allow_unknown_instruments,
        )

    @property
    def has_loss_limits(self) -> bool:
        """Return True if a daily loss or drawdown limit can trip this account's breaker."""
        return self.max_daily_loss is not None or self.max_drawdown_pct is not None


@dataclass(frozen=True, slots=True)
class EffectiveLimits:
    """The limits of one account for one instrument, overrides applied."""

    max_order_quantity: Decimal | None = None
    max_order_notional: Decimal | None = None
    max_position: Decimal | None = None
    price_collar_bps: Decimal | None = None
    max_open_orders: int | None = None
    allow_unknown_instruments: bool = True


class RiskConfig(BaseModel):
    """Every account's limits: `default`, and per account the fields that differ from it.

    An account entry inherits each field it does not set from `default`; its `instruments`
    entries replace the default's entry of the same instrument, and add to the others.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    default: RiskLimits = Field(default_factory=RiskLimits)
    accounts: dict[Identifier, RiskLimits] = Field(default_factory=dict)

    def limits_for(self, account_id: str) -> RiskLimits:
        """Return the limits of `account_id` (the default's, merged with its own entry)."""
        own = self.accounts.get(account_id)
        if own is None:
            return self.default
        changes = {name: getattr(own, name) for name in own.model_fields_set}
        changes["instruments"] = {**self.default.instruments, **own.instruments}
        return self.default.model_copy(update=changes)

    @property
    def is_unlimited(self) -> bool:
        """Return True if no numeric limit is configured anywhere."""
        every = [self.default, *self.accounts.values()]
        numeric = (
            "max_order_quantity",
            "max_order_notional",
            "max_position",
            "price_collar_bps",
            "max_daily_loss",
            "max_drawdown_pct",
            "max_gross_exposure",
            "max_net_exposure",
            "max_orders_per_strategy",
            "max_var",
        )
        return all(getattr(limits, name) is None for limits in every for name in numeric) and all(
            limits.max_open_orders is None and not limits.instruments for limits in every
        )
