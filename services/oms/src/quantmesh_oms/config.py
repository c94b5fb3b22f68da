"""Configuration of the oms stage: the shared QM_* settings with the stage's own port."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from pydantic import Field, field_validator

from quantmesh_common.settings import ServiceSettings
from quantmesh_oms.algo import parse_hourly_profile

#: Port of the stage's health and metrics server; QM_HTTP_PORT overrides it.
DEFAULT_HTTP_PORT = 8104


class OmsSettings(ServiceSettings):
    """Settings of the oms stage: the shared ones plus the VWAP volume profile."""

    http_port: int = Field(
        default=DEFAULT_HTTP_PORT, ge=0, le=65535, description="health + metrics server"
    )
    oms_vwap_profile: str | None = Field(
        default=None,
        description="24 comma-separated weights (UTC hours 0..23) for VWAP slices; unset: bars",
    )
    oms_vwap_lookback_days: int = Field(
        default=5, ge=1, le=365, description="days of recorded bars in a VWAP volume profile"
    )
    oms_vwap_bar_interval: str = Field(
        default="1m", pattern=r"^[1-9][0-9]*[smhd]$", description="bars of the VWAP profile"
    )

    oms_keep_terminal: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="terminal orders kept in memory (with PostgreSQL); older ones are re-read",
    )
    oms_forget_terminal: bool = Field(
        default=False,
        description="without PostgreSQL: store nothing and forget terminal orders past "
        "oms_keep_terminal (one-process backtests, which never redeliver nor restart)",
    )
    oms_topic_prefix: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9._-]*$",
        description="prefix of every topic the stage reads and writes and of its consumer groups "
        "(isolated runs: tests, benches)",
    )

    @field_validator("oms_vwap_profile")
    @classmethod
    def _check_profile(cls, value: str | None) -> str | None:
        if value:
            try:
                parse_hourly_profile(value)
            except InvalidOperation as exc:
                raise ValueError("weights must be decimal numbers") from exc
        return value or None

    def vwap_hourly_profile(self) -> tuple[Decimal, ...] | None:
        """Return the configured hourly VWAP weights, or None."""
        return parse_hourly_profile(self.oms_vwap_profile) if self.oms_vwap_profile else None
