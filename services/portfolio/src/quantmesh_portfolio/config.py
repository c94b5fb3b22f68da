"""Configuration of the portfolio stage: shared QM_* settings plus cash, currency, snapshots."""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from quantmesh_common.settings import ServiceSettings

#: Port of the stage's health and metrics server; QM_HTTP_PORT overrides it.
DEFAULT_HTTP_PORT = 8106

_CURRENCY_RE = re.compile(r"^[A-Z0-9]{1,32}$")


def _default_cash() -> dict[str, Decimal]:
    return {"USDT": Decimal(100_000)}


class PortfolioSettings(ServiceSettings):
    """Settings of the portfolio stage."""

    http_port: int = Field(
        default=DEFAULT_HTTP_PORT, ge=0, le=65535, description="health + metrics server"
    )
    base_currency: str = Field(
        default="USDT",
        pattern=r"^[A-Z0-9]{1,32}$",
        description="currency of equity and P&L in snapshots (QM_BASE_CURRENCY)",
    )
    # NoDecode: the JSON is parsed by the validator below, so a bad value is reported as
    # QM_STARTING_CASH=... rather than as a settings-source error, and numbers stay exact.
    starting_cash: Annotated[dict[str, Decimal], NoDecode] = Field(
        default_factory=_default_cash,
        description='cash of a new account, JSON {"USDT": "100000"} (QM_STARTING_CASH)',
    )
    snapshot_interval_s: float = Field(
        default=60.0,
        ge=0.001,
        le=31_536_000,
        allow_inf_nan=False,
        description="event time between portfolio snapshots (QM_SNAPSHOT_INTERVAL_S)",
    )

    performance_interval_s: float = Field(
        default=3600.0,
        ge=0.001,
        le=31_536_000,
        allow_inf_nan=False,
        description="event time between performance reports (QM_PERFORMANCE_INTERVAL_S)",
    )
    performance_confidence: float = Field(
        default=0.95,
        gt=0.5,
        lt=1,
        allow_inf_nan=False,
        description="confidence of VaR and CVaR in reports (QM_PERFORMANCE_CONFIDENCE)",
    )
    performance_risk_free: float = Field(
        default=0.0,
        ge=-1,
        le=1,
        allow_inf_nan=False,
        description="annual risk-free rate of Sharpe and Sortino (QM_PERFORMANCE_RISK_FREE)",
    )
    portfolio_performance: bool = Field(
        default=True,
        description="track round trips and equity curves and publish performance reports; "
        "false for one-process backtests (they compute their own)",
    )
    portfolio_keep_fills: int = Field(
        default=100_000,
        ge=1,
        le=100_000_000,
        description="applied fill keys kept in memory with PostgreSQL; older ones are looked up",
    )
    portfolio_topic_prefix: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9._-]*$",
        description="prefix of every topic the stage reads and writes and of its consumer group "
        "(isolated runs: tests, benches)",
    )
    performance_trips: int = Field(
        default=20,
        ge=0,
        le=1000,
        description="latest round trips listed in a report (QM_PERFORMANCE_TRIPS)",
    )

    @field_validator("starting_cash", mode="before")
    @classmethod
    def _parse_starting_cash(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value, parse_float=Decimal, parse_int=Decimal)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f'is not valid JSON ({exc.msg}); e.g. {{"USDT": "100000"}}'
                ) from None
        if not isinstance(value, dict):
            raise ValueError('must be a JSON object of currency to amount, e.g. {"USDT": "100000"}')
        cash: dict[str, Decimal] = {}
        for currency, amount in value.items():
            if not isinstance(currency, str) or not _CURRENCY_RE.match(currency):
                raise ValueError(f"currency {currency!r} is not an upper-case code such as USDT")
            try:
                exact = Decimal(amount) if isinstance(amount, str | int | Decimal) else None
            except InvalidOperation:
                exact = None
            if exact is None or not exact.is_finite() or exact < 0:
                raise ValueError(
                    f"amount {amount!r} of {currency} is not a finite, non-negative decimal"
                )
            cash[currency] = exact
        return cash

    @property
    def snapshot_interval_ns(self) -> int:
        """Return the snapshot interval in nanoseconds."""
        return round(self.snapshot_interval_s * 1_000_000_000)

    @property
    def performance_interval_ns(self) -> int:
        """Return the performance report interval in nanoseconds."""
        return round(self.performance_interval_s * 1_000_000_000)
