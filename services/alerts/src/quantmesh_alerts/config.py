"""Configuration of the alerts stage: its port, its rules, its channels and their secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from quantmesh_alerts.rules import (
    RuleError,
    RuleSet,
    ServiceUnhealthyRule,
    default_rules,
    parse_rules,
)
from quantmesh_common.settings import ServiceSettings

#: Port of the stage's health and metrics server; QM_HTTP_PORT overrides it.
DEFAULT_HTTP_PORT = 8107


def _read_rules_file(path: Path) -> RuleSet:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleError(f"cannot be read ({exc.strerror or exc})") from None
    return parse_rules(text)


def _http_url(value: str | None) -> str | None:
    if value is not None and (
        urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc
    ):
        raise ValueError("must be an http:// or https:// URL")
    return value


class AlertsSettings(ServiceSettings):
    """Settings of the alerts stage.

    Rules come from `QM_ALERT_RULES_FILE` (a YAML file) or `QM_ALERT_RULES` (the YAML itself),
    else the built-in defaults (every kind, to the log). A channel is configured by its
    variables; a rule naming a channel that is not configured stops the service at start.
    """

    http_port: int = Field(
        default=DEFAULT_HTTP_PORT, ge=0, le=65535, description="health + metrics server"
    )

    alert_rules_file: Path | None = Field(default=None, description="YAML rule set file")
    alert_rules: str | None = Field(default=None, description="YAML rule set, inline")
    alert_history_size: int = Field(default=1000, ge=1, description="notifications kept")
    alert_flush_interval_s: float = Field(
        default=60.0, gt=0, description="how often held-back counts of quiet keys are reported"
    )
    alert_check_interval_s: float = Field(
        default=5.0, gt=0, description="how often stale_market_data rules are checked"
    )

    alert_health_urls: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="name=url pairs, comma-separated: readiness URLs service_unhealthy probes",
    )
    alert_health_interval_s: float = Field(default=10.0, gt=0, description="between probes")
    alert_health_timeout_s: float = Field(default=2.0, gt=0, description="per probe")
    alert_lag_interval_s: float = Field(
        default=30.0, gt=0, description="how often consumer_lag rules measure (Kafka only)"
    )

    alert_webhook_url: str | None = None
    alert_webhook_secret: SecretStr | None = None
    alert_webhook_timeout_s: float = Field(default=5.0, gt=0)
    alert_webhook_retries: int = Field(default=3, ge=0, le=10)
    alert_webhook_backoff_s: float = Field(default=0.5, ge=0)

    telegram_api_url: str = "https://api.telegram.org"
    telegram_bot_token: SecretStr | None = None
    telegram_chat_id: str | None = None

    smtp_host: str | None = None
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_from: str | None = None
    smtp_to: Annotated[list[str], NoDecode] = Field(default_factory=list)
    smtp_starttls: bool = True
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_timeout_s: float = Field(default=10.0, gt=0)

    _rules: RuleSet = PrivateAttr(default_factory=RuleSet)

    @field_validator("alert_rules_file")
    @classmethod
    def _check_rules_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            _read_rules_file(value)
        return value

    @field_validator("alert_rules")
    @classmethod
    def _check_rules(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rules(value)
        return value

    @field_validator("alert_webhook_url", "telegram_api_url")
    @classmethod
    def _check_urls(cls, value: str | None) -> str | None:
        return _http_url(value)

    @field_validator("alert_health_urls", mode="before")
    @classmethod
    def _parse_health_urls(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        pairs: dict[str, str] = {}
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            name, sep, url = part.partition("=")
            name, url = name.strip(), url.strip()
            if not sep or not name or not url:
                raise ValueError(f"{part!r} is not name=url")
            if name in pairs:
                raise ValueError(f"names {name} twice")
            pairs[name] = url
        return pairs

    @field_validator("alert_health_urls")
    @classmethod
    def _check_health_urls(cls, value: dict[str, str]) -> dict[str, str]:
        for name, url in value.items():
            try:
                _http_url(url)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return value

    @field_validator("smtp_to", mode="before")
    @classmethod
    def _split_recipients(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _resolve(self) -> Self:
        if self.alert_rules_file is not None and self.alert_rules is not None:
            raise ValueError("set QM_ALERT_RULES_FILE or QM_ALERT_RULES, not both")
        if self.alert_webhook_url and self.alert_webhook_secret is None:
            raise ValueError("QM_ALERT_WEBHOOK_SECRET is required when QM_ALERT_WEBHOOK_URL is set")
        self._rules = self.read_rules()
        return self

    def read_rules(self) -> RuleSet:
        """The rule set read from its source now, checked against the configured channels and
        health URLs; ValueError naming the source and the problem (a reload calls it again)."""
        if self.alert_rules_file is not None:
            source = "QM_ALERT_RULES_FILE"
            try:
                rules = _read_rules_file(self.alert_rules_file)
            except ValueError as exc:
                raise ValueError(f"{source} {self.alert_rules_file}: {exc}") from None
        elif self.alert_rules is not None:
            source, rules = "QM_ALERT_RULES", parse_rules(self.alert_rules)
        else:
            source, rules = "the defaults", default_rules()
        missing = sorted(rules.channels() - set(self.configured_channels()))
        if missing:
            raise ValueError(
                f"the rules of {source} send to {', '.join(missing)}, not configured "
                f"({'; '.join(_CHANNEL_VARIABLES[name] for name in missing)})"
            )
        for rule in rules.rules:
            unknown = sorted(set(getattr(rule, "services", ())) - set(self.alert_health_urls))
            if isinstance(rule, ServiceUnhealthyRule) and unknown:
                raise ValueError(
                    f"rule {rule.name} of {source} watches {', '.join(unknown)}, which "
                    "QM_ALERT_HEALTH_URLS does not name"
                )
        return rules

    @property
    def rules(self) -> RuleSet:
        """The rule set in force."""
        return self._rules

    def configured_channels(self) -> list[str]:
        """The channels whose variables are set."""
        names = ["log"]
        if self.alert_webhook_url:
            names.append("webhook")
        if self.telegram_bot_token is not None and self.telegram_chat_id:
            names.append("telegram")
        if self.smtp_host and self.smtp_from and self.smtp_to:
            names.append("email")
        return names


_CHANNEL_VARIABLES = {
    "log": "",
    "webhook": "set QM_ALERT_WEBHOOK_URL and QM_ALERT_WEBHOOK_SECRET",
    "telegram": "set QM_TELEGRAM_BOT_TOKEN and QM_TELEGRAM_CHAT_ID",
    "email": "set QM_SMTP_HOST, QM_SMTP_FROM and QM_SMTP_TO",
}
