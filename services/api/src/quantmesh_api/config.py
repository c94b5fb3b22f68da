"""Configuration of the api stage: the shared QM_* settings plus the gateway's own."""

from __future__ import annotations

import secrets
from typing import Annotated

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import NoDecode

from quantmesh_common.settings import ServiceSettings

#: Port of the stage's health and metrics server; QM_HTTP_PORT overrides it.
DEFAULT_HTTP_PORT = 8000
#: The shortest JWT secret accepted outside development (HS256 wants at least 256 bits).
MIN_JWT_SECRET_LENGTH = 32


class ApiSettings(ServiceSettings):
    """Settings of the api gateway (REST + WebSocket on QM_API_PORT, health on QM_HTTP_PORT)."""

    http_port: int = Field(
        default=DEFAULT_HTTP_PORT, ge=0, le=65535, description="health + metrics server"
    )
    api_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="REST/WebSocket port; default QM_HTTP_PORT + 1 (0 when QM_HTTP_PORT is 0)",
    )
    jwt_secret: SecretStr | None = Field(
        default=None, description="HS256 key of access tokens; required outside development"
    )
    access_token_ttl_s: int = Field(default=900, ge=10, le=86_400)
    refresh_token_ttl_s: int = Field(default=7 * 86_400, ge=60, le=90 * 86_400)
    bootstrap_admin_user: str | None = Field(default=None, min_length=1, max_length=64)
    bootstrap_admin_password: SecretStr | None = None
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    rate_limit_user_per_min: int = Field(default=600, ge=1)
    rate_limit_ip_per_min: int = Field(default=1200, ge=1)
    idempotency_ttl_s: int = Field(default=86_400, ge=1)
    ws_queue_size: int = Field(default=256, ge=1, le=100_000)
    price_poll_interval_s: float = Field(default=1.0, gt=0, le=3600)
    #: How long one read of every latest price serves `GET /market/prices` (0: every request
    #: reads Redis); prices change on trades, far more slowly than this endpoint is polled.
    price_cache_s: float = Field(default=0.25, ge=0, le=60)
    redis_prefix: str = Field(default="qm:api:", min_length=1)
    md_redis_prefix: str = Field(default="qm:md:", min_length=1)
    publish_timeout_s: float = Field(default=10.0, gt=0)
    #: How stale this instance's copy of the token deny-list may get: a logout elsewhere
    #: refuses its token here for every request starting this long (+ one Redis round trip)
    #: after the logout answered.
    deny_sync_s: float = Field(default=0.1, ge=0, le=60)
    #: How often this instance adds its rate-limit counts to Redis and reads the totals back.
    rate_limit_sync_s: float = Field(default=0.1, ge=0, le=60)
    #: How long a strategy configuration request waits for the signals stage's answer before
    #: answering 202 (pending) instead of 200 (applied) or 422 (refused).
    strategy_config_wait_s: float = Field(default=5.0, ge=0, le=60)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _check_jwt_secret(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        environment = info.data.get("environment", "development")
        if environment == "development":
            return value
        if value is None:
            raise ValueError(f"is required when QM_ENVIRONMENT={environment}")
        if len(value.get_secret_value()) < MIN_JWT_SECRET_LENGTH:
            raise ValueError(
                f"must be at least {MIN_JWT_SECRET_LENGTH} characters "
                f"(QM_ENVIRONMENT={environment})"
            )
        return value

    @field_validator("bootstrap_admin_password")
    @classmethod
    def _check_admin_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 8:
            raise ValueError("must be at least 8 characters")
        return value

    def effective_api_port(self) -> int:
        """The REST/WebSocket port: QM_API_PORT, else the health port + 1 (0 stays 0)."""
        if self.api_port is not None:
            return self.api_port
        return self.http_port + 1 if self.http_port else 0

    def jwt_key(self) -> str:
        """The JWT signing key; in development without one, a random key for this process."""
        if self.jwt_secret is not None:
            return self.jwt_secret.get_secret_value()
        return _DEV_KEY


#: Tokens signed with it die with the process: fine for development, refused elsewhere.
_DEV_KEY = secrets.token_urlsafe(48)
