"""Configuration of the risk stage: the shared QM_* settings, its port, limits and instruments."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from quantmesh_common.messages import Instrument
from quantmesh_common.settings import ServiceSettings
from quantmesh_risk.limits import RiskConfig
from quantmesh_risk.sizing import SizingConfig

#: Port of the stage's health and metrics server; QM_HTTP_PORT overrides it.
DEFAULT_HTTP_PORT = 8103


class RiskSettings(ServiceSettings):
    """Settings of the risk stage.

    `QM_RISK_LIMITS` is a JSON RiskConfig (`{"default": {...}, "accounts": {"acc-1": {...}}}`);
    `QM_RISK_INSTRUMENTS` a JSON list of Instrument reference data (tick, lot, minimums): it
    overrides the venue's rules (`ref.instruments`) for the instruments it names.
    Both are validated at start: a bad value exits 2 with a line naming the variable.
    """

    http_port: int = Field(
        default=DEFAULT_HTTP_PORT, ge=0, le=65535, description="health + metrics server"
    )
    # NoDecode: the JSON is parsed by the validators below, so a syntax error is a validation
    # error of this field, reported under its variable's name like any other.
    risk_limits: Annotated[RiskConfig, NoDecode] = Field(
        default_factory=RiskConfig, description="limits per account (JSON)"
    )
    risk_instruments: Annotated[list[Instrument], NoDecode] = Field(
        default_factory=list, description="instrument rules (JSON list)"
    )

    risk_sizing: Annotated[SizingConfig, NoDecode] = Field(
        default_factory=SizingConfig,
        description="sizing of target-position intents per account and strategy (JSON)",
    )

    risk_var_horizon_s: float = Field(
        default=60.0,
        ge=0.001,
        le=31_536_000,
        allow_inf_nan=False,
        description="VaR return horizon: one return per bucket of this many seconds",
    )
    risk_var_window: int = Field(
        default=500, ge=2, le=100_000, description="returns kept per instrument for VaR"
    )
    risk_topic_prefix: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9._-]*$",
        description="prefix of every topic the stage reads and writes and of its consumer groups "
        "(isolated runs: tests, benches)",
    )
    risk_keep_ids: int | None = Field(
        default=200_000,
        ge=1,
        le=100_000_000,
        description="fill keys and closed order ids remembered (newest); unset: all",
    )

    @property
    def var_horizon_ns(self) -> int:
        """Return the VaR horizon in nanoseconds."""
        return round(self.risk_var_horizon_s * 1_000_000_000)

    @field_validator("risk_limits", "risk_instruments", "risk_sizing", mode="before")
    @classmethod
    def _parse_json(cls, value: Any) -> Any:
        if not isinstance(value, str | bytes):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"is not valid JSON ({exc})") from None

    @field_validator("risk_instruments")
    @classmethod
    def _unique_instruments(cls, value: list[Instrument]) -> list[Instrument]:
        ids = [i.instrument_id for i in value]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"lists {', '.join(duplicates)} more than once")
        return value
