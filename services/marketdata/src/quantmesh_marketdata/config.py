"""Configuration of the marketdata stage: the shared QM_* settings plus the feed's own."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from quantmesh_common.messages import InstrumentId, bar_interval_ns
from quantmesh_common.settings import ServiceSettings

#: Port of the stage's health and metrics server; QM_HTTP_PORT overrides it.
DEFAULT_HTTP_PORT = 8101


class MarketDataSettings(ServiceSettings):
    """Settings of the marketdata stage (QM_FEED, QM_INSTRUMENTS, ...)."""

    http_port: int = Field(
        default=DEFAULT_HTTP_PORT, ge=0, le=65535, description="health + metrics server"
    )
    feed: Literal["none", "synthetic"] = Field(
        default="none", description="where prices come from; venues and replay come later"
    )
    instruments: str = Field(
        default="BTC-USDT.SIM", description="comma-separated instrument ids BASE-QUOTE.VENUE"
    )
    feed_rate: float = Field(default=10.0, gt=0, le=100_000, description="ticks/s per instrument")
    bar_interval: str = Field(default="1m", description="time bars aggregated from the ticks")
    seed: int = Field(default=1, description="seed of the synthetic feed")
    start_price: Decimal = Field(default=Decimal("100"), gt=0)
    volatility: float = Field(default=0.5, ge=0, le=10, description="annualised")
    feed_autostart: bool = Field(default=True, description="start feeding without a command")
    recorder: Literal["off", "on"] = Field(
        default="off", description="record md.ticks/md.bars to PostgreSQL, latest prices to Redis"
    )
    recorder_batch_rows: int = Field(default=10_000, ge=1, le=1_000_000, description="rows/flush")
    recorder_flush_ms: int = Field(default=250, ge=1, le=600_000, description="max age of a row")
    redis_prefix: str = Field(default="qm:md:", min_length=1, description="Redis key prefix")

    @field_validator("recorder", mode="before")
    @classmethod
    def _normalise_switch(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            return {"true": "on", "1": "on", "false": "off", "0": "off"}.get(value, value)
        return value

    @field_validator("recorder")
    @classmethod
    def _recorder_needs_stores(cls, value: str, info: ValidationInfo) -> str:
        # database_url and redis_url are declared in ServiceSettings, so they are in info.data.
        if value == "on":
            missing = [
                f"QM_{field.upper()}"
                for field in ("database_url", "redis_url")
                if not info.data.get(field)
            ]
            if missing:
                raise ValueError(f"QM_RECORDER=on needs {' and '.join(missing)}")
        return value

    @field_validator("instruments")
    @classmethod
    def _check_instruments(cls, value: str) -> str:
        ids = [part.strip() for part in value.split(",") if part.strip()]
        if not ids:
            raise ValueError("needs at least one instrument id")
        for instrument_id in ids:
            InstrumentId.parse(instrument_id)
        return ",".join(ids)

    @field_validator("bar_interval")
    @classmethod
    def _check_interval(cls, value: str) -> str:
        bar_interval_ns(value)
        return value

    def instrument_ids(self) -> list[str]:
        """The configured instrument ids."""
        return self.instruments.split(",")
