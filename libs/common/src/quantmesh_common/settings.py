"""Service configuration from `QM_*` environment variables, validated once at start."""

from __future__ import annotations

import socket
import sys
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from quantmesh_common.bus.base import DeliveryOptions

ENV_PREFIX = "QM_"
#: Exit status of a service whose configuration is invalid (distinct from a runtime failure).
CONFIG_ERROR_EXIT_CODE = 2

#: Values that mark a secret nobody filled in; refused outside development.
PLACEHOLDER_SECRETS = frozenset(
    {
        "changeme",
        "change-me",
        "change_me",
        "changethis",
        "change-this",
        "placeholder",
        "secret",
        "password",
        "todo",
        "xxx",
    }
)

_SECRET_NAME_PARTS = ("password", "secret", "token", "api_key", "private_key")
_URL_FIELDS_WITH_CREDENTIALS = ("database_url", "redis_url")

#: A TCP port; use it when a subclass redeclares `http_port` with its own default.
Port = Annotated[int, Field(ge=0, le=65535)]

Environment = Literal["development", "test", "production"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
BusKind = Literal["kafka", "memory"]
#: How the order-flow stages (risk, oms, execution, portfolio) make a batch's effects and
#: output happen once: a Kafka transaction per batch, or their store written first and
#: redelivered inputs recognised by key (docs/delivery.md).
OrderFlowDelivery = Literal["transactional", "idempotent"]


class ServiceSettings(BaseSettings):
    """Settings every service shares; a service subclasses it to add its own fields.

    Each field `foo` is read from `QM_FOO`. A subclass sets its own defaults by redeclaring a
    field (e.g. `http_port: Port = 8103`). Secrets are `SecretStr` fields with no default, so a
    missing one stops the service at start; placeholder values ("changeme", ...) are refused
    outside development, also inside the passwords of `database_url` and `redis_url`.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,
        extra="ignore",
        validate_default=True,
    )

    service_name: str = Field(default="", description="defaults to the Service's name")
    environment: Environment = "development"
    log_level: LogLevel = "INFO"
    http_host: str = "0.0.0.0"
    http_port: Port = Field(default=8080, description="health + metrics server")
    bus: BusKind = "kafka"
    kafka_bootstrap: str | None = Field(default=None, description="host:port[,host:port...]")
    instance_id: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="stable id of this instance (a restart keeps it): its broadcast members' "
        "consumer groups end in it, so a restarted instance resumes where it left off",
    )
    database_url: str | None = Field(default=None, description="postgresql://user:pw@host/db")
    db_pool_min_size: int = Field(default=1, ge=0)
    db_pool_max_size: int = Field(default=10, ge=1)
    redis_url: str | None = Field(default=None, description="redis://host:port/db")
    otlp_endpoint: str | None = Field(default=None, description="OTLP/HTTP collector base URL")
    startup_timeout_s: float = Field(default=30.0, gt=0, description="wait for dependencies")
    shutdown_timeout_s: float = Field(default=10.0, gt=0)
    restart_attempts: int = Field(
        default=5, ge=0, description="in-place restarts in a row after a broker outage"
    )
    gc_freeze: bool = Field(
        default=True,
        description="move the heap built at start out of the cyclic GC's reach (a few times)",
    )
    health_check_interval_s: float = Field(default=5.0, gt=0)
    consumer_batch_size: int = Field(default=500, ge=1, le=100_000)
    #: 0: a message goes out at once. The stages are a latency path (three plain hops measured
    #: 13.1 ms p50 at 2 ms, 3.4 ms at 0, bench_txn_chain.py); librdkafka still batches what
    #: queues while a request is in flight, so bursts keep their rate. marketdata, which
    #: publishes feeds in bulk, sets 2.
    producer_linger_ms: float = Field(
        default=0.0, ge=0, le=1_000, description="batching delay of produced messages (0: latency)"
    )
    broadcast_wait_ms: int = Field(
        default=10,
        ge=0,
        le=1_000,
        description="how long a broadcast subscription (market data marks, reference data) "
        "lets the broker gather its fetch: fewer, larger batches for that much delay (0: none)",
    )
    order_flow_delivery: OrderFlowDelivery = Field(
        default="idempotent",
        description="risk, oms, execution and portfolio: 'idempotent' (store first, then "
        "publish; redeliveries recognised by key) or 'transactional' (a Kafka transaction per "
        "batch, 15-20 ms a hop more)",
    )

    def order_flow_options(self) -> DeliveryOptions:
        """The subscribe options of an order-flow stage's main subscription, as configured."""
        if self.order_flow_delivery == "idempotent":
            return DeliveryOptions(output_after_batch=True)
        return DeliveryOptions(transactional=True)

    @field_validator("log_level", "environment", "bus", "order_flow_delivery", mode="before")
    @classmethod
    def _normalise_case(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        value = value.strip()
        return value.upper() if info.field_name == "log_level" else value.lower()

    @field_validator("http_port")
    @classmethod
    def _check_port(cls, value: int) -> int:
        # Repeats the Port bounds: a subclass may redeclare the field as a plain int.
        if not 0 <= value <= 65535:
            raise ValueError("must be a TCP port (0-65535)")
        return value

    @field_validator("kafka_bootstrap")
    @classmethod
    def _check_kafka_bootstrap(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("bus") == "kafka" and not value:
            raise ValueError(f"is required when {ENV_PREFIX}BUS=kafka")
        if value:
            for server in value.split(","):
                host, sep, port = server.strip().rpartition(":")
                if not sep or not host or not port.isdigit():
                    raise ValueError(f"must be host:port[,host:port...] (bad entry {server!r})")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("otlp_endpoint")
    @classmethod
    def _check_otlp_endpoint(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("db_pool_max_size")
    @classmethod
    def _check_pool_sizes(cls, value: int, info: ValidationInfo) -> int:
        minimum = info.data.get("db_pool_min_size")
        if minimum is not None and value < minimum:
            raise ValueError(f"must be >= {ENV_PREFIX}DB_POOL_MIN_SIZE ({minimum})")
        return value

    @field_validator("*")
    @classmethod
    def _refuse_placeholder_secrets(cls, value: Any, info: ValidationInfo) -> Any:
        # `environment` is declared before every secret, so it is in info.data when they run.
        environment = info.data.get("environment")
        if environment is None or environment == "development":
            return value
        candidate: str | None = None
        if isinstance(value, SecretStr):
            candidate = value.get_secret_value()
        elif isinstance(value, str) and _is_secret_name(info.field_name or ""):
            candidate = value
        elif isinstance(value, str) and info.field_name in _URL_FIELDS_WITH_CREDENTIALS:
            candidate = urlsplit(value).password
        if candidate is not None and candidate.strip().lower() in PLACEHOLDER_SECRETS:
            raise ValueError(
                f"holds a placeholder secret; set a real one (refused when "
                f"{ENV_PREFIX}ENVIRONMENT={environment})"
            )
        return value


S = TypeVar("S", bound=ServiceSettings)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build `cls` from the environment; on invalid configuration exit with status 2.

    Each problem is written to stderr as one line naming the environment variable, e.g.
    `configuration error: QM_HTTP_PORT='abc' is not a valid integer`. Keyword overrides take
    precedence over the environment (tests, tools).
    """
    try:
        return cls(**overrides)
    except ValidationError as exc:
        lines = format_validation_error(cls, exc)
    except SettingsError as exc:  # e.g. a complex field whose value is not valid JSON
        lines = [f"configuration error: {exc}"]
    sys.stderr.write("".join(line + "\n" for line in lines))
    sys.stderr.flush()
    raise SystemExit(CONFIG_ERROR_EXIT_CODE)


def env_var_name(cls: type[BaseSettings], field: str) -> str:
    """Return the environment variable that feeds `field` of settings class `cls`."""
    info = cls.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, str):
        return info.validation_alias.upper()
    prefix = str(cls.model_config.get("env_prefix") or "")
    return (prefix + field).upper()


def format_validation_error(cls: type[BaseSettings], exc: ValidationError) -> list[str]:
    """Turn a settings ValidationError into one readable line per problem."""
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        loc = error.get("loc", ())
        message = _describe(error)
        if not loc:
            lines.append(f"configuration error: {message}")
            continue
        field = str(loc[0])
        var = env_var_name(cls, field) + "".join(f"[{part}]" for part in loc[1:])
        if error["type"] == "missing" or error.get("input") is None:
            lines.append(f"configuration error: {var} {message}")
        else:
            shown = _redact(cls, field, error["input"])
            if isinstance(error["input"], str):
                shown = repr(shown)
            lines.append(f"configuration error: {var}={shown} {message}")
    return lines


_PHRASES = {
    "missing": "is required",
    "int_parsing": "is not a valid integer",
    "int_from_float": "is not a valid integer",
    "float_parsing": "is not a valid number",
    "bool_parsing": "is not a valid boolean (use true or false)",
    "decimal_parsing": "is not a valid decimal number",
    "json_invalid": "is not valid JSON",
}


def _describe(error: Any) -> str:
    kind = error["type"]
    if kind in _PHRASES:
        return _PHRASES[kind]
    if kind == "literal_error":
        return f"is not one of {error.get('ctx', {}).get('expected', '?')}"
    message = str(error["msg"])
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    return message.replace("Input should be", "must be")


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(part in lowered for part in _SECRET_NAME_PARTS)


def _redact(cls: type[BaseSettings], field: str, value: Any) -> str:
    text = str(value)
    info = cls.model_fields.get(field)
    if _is_secret_name(field) or (info is not None and "SecretStr" in repr(info.annotation)):
        return "***"
    return redact_url(text)


def redact_url(url: str) -> str:
    """Return `url` with any password replaced by ***, for logs and error messages."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
