"""Configuration of the marketdata stage: the shared QM_* settings plus the feed's own."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from quantmesh_common.messages import InstrumentId, bar_interval_ns
from quantmesh_common.settings import ServiceSettings
from quantmesh_marketdata.venue import (
    CHANNELS,
    VenueConfig,
    check_exchange_id,
    parse_url_overrides,
)

#: Port of the stage's health and metrics server; QM_HTTP_PORT overrides it.
DEFAULT_HTTP_PORT = 8101


class MarketDataSettings(ServiceSettings):
    """Settings of the marketdata stage (QM_FEED, QM_INSTRUMENTS, ...)."""

    http_port: int = Field(
        default=DEFAULT_HTTP_PORT, ge=0, le=65535, description="health + metrics server"
    )
    # A feed publishes in bulk (a replay at full speed, a venue's burst): batching pays.
    producer_linger_ms: float = Field(
        default=2.0, ge=0, le=1_000, description="batching delay of produced messages (0: latency)"
    )
    feed: Literal["none", "synthetic", "venue", "replay"] = Field(
        default="none",
        description="where prices come from: the GBM feed, a ccxt venue or a replayed file",
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
    replay_file: str = Field(
        default="", description="QM_FEED=replay: CSV of trades or OHLCV bars (first instrument)"
    )
    replay_speed: float = Field(
        default=0.0, ge=0, le=1_000_000, description="1 real time, N times faster, 0 at once"
    )
    marketdata_topic_prefix: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9._-]*$",
        description="prefix of every topic and consumer group of the stage (isolated runs)",
    )
    recorder: Literal["off", "on"] = Field(
        default="off", description="record md.ticks/md.bars to PostgreSQL, latest prices to Redis"
    )
    recorder_batch_rows: int = Field(default=10_000, ge=1, le=1_000_000, description="rows/flush")
    recorder_flush_ms: int = Field(default=250, ge=1, le=600_000, description="max age of a row")
    redis_prefix: str = Field(default="qm:md:", min_length=1, description="Redis key prefix")
    venue: str = Field(default="", description="ccxt exchange id, e.g. binance, bybit, okx")
    venue_symbols: str = Field(default="", description="comma-separated ccxt symbols, BTC/USDT")
    venue_channels: str = Field(default="trades", description="trades, ticker and/or book")
    venue_sandbox: bool = Field(default=False, description="the venue's testnet / sandbox")
    venue_book_depth: int = Field(default=20, ge=1, le=1000, description="levels per side")
    venue_stale_s: float = Field(default=30.0, gt=0, le=86_400, description="stale after")
    venue_backoff_s: float = Field(default=0.5, gt=0, le=60, description="first reconnect wait")
    venue_backoff_max_s: float = Field(default=30.0, gt=0, le=3_600, description="longest wait")
    venue_urls: str = Field(default="", description='JSON {"api.ws.spot": "ws://..."} overrides')
    venue_options: str = Field(default="", description="JSON object of ccxt exchange options")
    markets_cache_dir: str = Field(
        default=".cache/quantmesh/markets", min_length=1, description="markets metadata cache"
    )
    markets_max_age_h: float = Field(default=24.0, gt=0, description="refresh markets after")
    collector_state_dir: str = Field(
        default=".cache/quantmesh/collector", min_length=1, description="backfill cursors"
    )

    @field_validator("replay_file")
    @classmethod
    def _check_replay_file(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip()
        if info.data.get("feed") == "replay":
            if not value:
                raise ValueError("QM_FEED=replay needs the file to replay")
            if not Path(value).is_file():
                raise ValueError(f"{value} is not a readable file")
        return value

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

    @field_validator("venue")
    @classmethod
    def _check_venue(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip().lower()
        if info.data.get("feed") == "venue":
            if not value:
                raise ValueError("QM_FEED=venue needs a ccxt exchange id, e.g. binance")
            check_exchange_id(value)
        return value

    @field_validator("venue_symbols")
    @classmethod
    def _check_symbols(cls, value: str, info: ValidationInfo) -> str:
        symbols = [part.strip() for part in value.split(",") if part.strip()]
        if info.data.get("feed") == "venue" and not symbols:
            raise ValueError("QM_FEED=venue needs at least one symbol, e.g. BTC/USDT")
        return ",".join(symbols)

    @field_validator("venue_channels")
    @classmethod
    def _check_channels(cls, value: str) -> str:
        channels = [part.strip().lower() for part in value.split(",") if part.strip()]
        unknown = sorted(set(channels) - set(CHANNELS))
        if unknown or not channels:
            raise ValueError(f"channels are {', '.join(CHANNELS)}; got {value!r}")
        return ",".join(dict.fromkeys(channels))

    @field_validator("venue_urls")
    @classmethod
    def _check_urls(cls, value: str) -> str:
        parse_url_overrides(value)
        return value

    @field_validator("venue_options")
    @classmethod
    def _check_options(cls, value: str) -> str:
        if value.strip() and not isinstance(json.loads(value), dict):
            raise ValueError("must be a JSON object")
        return value

    def venue_config(self) -> VenueConfig:
        """The venue to stream from, as the streamer and backfill take it."""
        return VenueConfig(
            exchange_id=self.venue,
            symbols=tuple(s for s in self.venue_symbols.split(",") if s),
            channels=tuple(self.venue_channels.split(",")),
            sandbox=self.venue_sandbox,
            book_depth=self.venue_book_depth,
            options=json.loads(self.venue_options) if self.venue_options.strip() else {},
            url_overrides=parse_url_overrides(self.venue_urls),
        )

    def instrument_ids(self) -> list[str]:
        """The configured instrument ids."""
        return self.instruments.split(",")
