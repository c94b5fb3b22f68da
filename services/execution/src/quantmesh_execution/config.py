"""Configuration of the execution stage: the shared QM_* settings, the venue and its simulation."""

from __future__ import annotations

import importlib.util
import os
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, ValidationInfo, field_validator, model_validator

from quantmesh_common.settings import ServiceSettings

#: Port of the stage's health and metrics server; QM_HTTP_PORT overrides it.
DEFAULT_HTTP_PORT = 8105

SlippageKind = Literal["none", "fixed_bps", "sqrt_impact"]
SentLogKind = Literal["auto", "postgres", "none"]
VenueKind = Literal["sim", "ccxt"]


class ExecutionSettings(ServiceSettings):
    """Settings of the execution stage (each field `foo` is read from `QM_FOO`)."""

    http_port: int = Field(
        default=DEFAULT_HTTP_PORT, ge=0, le=65535, description="health + metrics server"
    )
    venue: str = Field(
        default="SIM",
        pattern=r"^[A-Z][A-Z0-9_]*$",
        max_length=32,
        description="venue id served: commands and market data of other venues are ignored",
    )
    sim_maker_fee: Decimal = Field(
        default=Decimal("0.001"),
        ge=Decimal("-0.01"),
        le=Decimal("0.1"),
        allow_inf_nan=False,
        description="maker fee rate as a fraction; negative is a rebate",
    )
    sim_taker_fee: Decimal = Field(
        default=Decimal("0.001"),
        ge=0,
        le=Decimal("0.1"),
        allow_inf_nan=False,
        description="taker fee rate as a fraction",
    )
    sim_slippage: SlippageKind = Field(default="none", description="none, fixed_bps, sqrt_impact")
    sim_slippage_bps: Decimal = Field(
        default=Decimal(0), ge=0, le=1000, allow_inf_nan=False, description="for fixed_bps"
    )
    sim_impact_k: Decimal = Field(
        default=Decimal(1), ge=0, le=100, allow_inf_nan=False, description="for sqrt_impact"
    )
    sim_impact_sigma: Decimal = Field(
        default=Decimal("0.02"),
        ge=0,
        le=10,
        allow_inf_nan=False,
        description="daily volatility as a fraction, for sqrt_impact",
    )
    sim_impact_adv: Decimal | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="average daily volume in base units; required for sqrt_impact",
    )
    sim_latency_ms: Decimal = Field(
        default=Decimal(0),
        ge=0,
        le=60_000,
        allow_inf_nan=False,
        description="delay before a command reaches the simulated venue",
    )
    sim_market_waits_for_trade: bool = Field(
        default=False,
        description="a market order reaching the simulated venue waits for the next trade "
        "print and fills on it (bar backtests: the last print between bars is a stale close)",
    )

    sim_keep_closed: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="closed orders the simulated venue keeps in memory when the sent-log is on",
    )
    sim_forget_closed: bool = Field(
        default=False,
        description="bound the simulated venue's closed orders by sim_keep_closed without the "
        "sent-log too (one-process backtests, which never resend a client order id)",
    )
    exec_sent_log: SentLogKind = Field(
        default="auto",
        description="where SUBMITs are recorded before the venue call: postgres, none, or "
        "auto (postgres when QM_DATABASE_URL is set)",
    )

    exec_venue: VenueKind = Field(
        default="sim", description="sim (the simulated venue) or ccxt (a live venue via ccxt)"
    )
    exec_ccxt_exchange: str | None = Field(
        default=None,
        description="ccxt exchange id for QM_EXEC_VENUE=ccxt, e.g. binance (required then)",
    )
    exec_ccxt_sandbox: bool = Field(default=False, description="use the venue's testnet")
    exec_ccxt_base_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^/\s]+/?$",
        description="send every API request to this scheme://host:port (a proxy, a stand-in)",
    )
    exec_ccxt_timeout_ms: int = Field(
        default=10_000, ge=100, le=120_000, description="ccxt request timeout"
    )

    @field_validator("exec_venue", "exec_ccxt_exchange", mode="before")
    @classmethod
    def _lower_names(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("exec_ccxt_exchange")
    @classmethod
    def _known_exchange(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            if info.data.get("exec_venue") == "ccxt":
                raise ValueError("is required when QM_EXEC_VENUE=ccxt")
            return None
        if not value.isidentifier() or value not in ccxt_exchange_ids():
            raise ValueError(f"is not a ccxt exchange id (e.g. binance, kraken): {value!r}")
        return value

    @model_validator(mode="after")
    def _readable_secret_files(self) -> Self:
        # A missing secret file must stop the service at start, naming its variable; the
        # values themselves are read (and kept out of logs) by live.Credentials.
        if self.exec_venue != "ccxt" or self.exec_ccxt_exchange is None:
            return self
        prefix = f"QM_{self.exec_ccxt_exchange.upper()}_API_"
        for name in ("KEY", "SECRET", "PASSWORD"):
            var = f"{prefix}{name}_FILE"
            path = os.environ.get(var)
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"{var}: cannot read the secret file {path}")
        return self

    @property
    def uses_sent_log(self) -> bool:
        """True when SUBMITs go through the PostgreSQL sent-log."""
        if self.exec_sent_log == "auto":
            return self.database_url is not None
        return self.exec_sent_log == "postgres"

    @field_validator("venue", mode="before")
    @classmethod
    def _upper_venue(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("sim_slippage", mode="before")
    @classmethod
    def _lower_slippage(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("sim_impact_adv")
    @classmethod
    def _adv_for_sqrt_impact(cls, value: Decimal | None, info: ValidationInfo) -> Decimal | None:
        if value is None and info.data.get("sim_slippage") == "sqrt_impact":
            raise ValueError("is required when QM_SIM_SLIPPAGE=sqrt_impact")
        return value

    @property
    def sim_latency_ns(self) -> int:
        """The simulated latency in nanoseconds."""
        return int(self.sim_latency_ms * 1_000_000)


def ccxt_exchange_ids() -> frozenset[str]:
    """The exchange ids ccxt's async support offers, found without importing ccxt (slow)."""
    spec = importlib.util.find_spec("ccxt")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    folder = Path(next(iter(spec.submodule_search_locations))) / "async_support"
    return frozenset(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
