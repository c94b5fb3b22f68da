"""Alert rules over events, with de-duplication and throttling: pure logic, time passed in.

A rule set is YAML (`QM_ALERT_RULES_FILE` or inline `QM_ALERT_RULES`)::

    rules:
      - name: kill-switch-denials
        kind: order_denied          # RiskDecision on orders.rejected
        reasons: [KILL_SWITCH_ENGAGED]
        severity: CRITICAL
        channels: [log, telegram]
        dedupe_key: "{account_id}:{reason}"
        throttle_s: 300             # at most one notification per key per 5 minutes

`RuleEngine.evaluate(event, now_ns)` returns the notifications an event causes. Events that a
throttle window holds back are counted, and the count travels with the key's next notification
(or with `flush`, once the window is over and nothing else came).
"""

from __future__ import annotations

import string
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import ROUND_HALF_EVEN, Decimal
from fnmatch import fnmatchcase
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from quantmesh_common.envelope import Event
from quantmesh_common.messages import (
    Alert,
    AlertSeverity,
    ControlAction,
    ControlCommand,
    ExecType,
    ExecutionReport,
    InstrumentId,
    PortfolioSnapshot,
    ReasonCode,
    RiskDecision,
)

#: The channels a rule may name.
ChannelName = Literal["log", "webhook", "telegram", "email"]
CHANNEL_NAMES: tuple[str, ...] = ("log", "webhook", "telegram", "email")

#: Severities in increasing urgency (StrEnum order is declaration order, but be explicit).
_SEVERITY_RANK = {AlertSeverity.INFO: 0, AlertSeverity.WARNING: 1, AlertSeverity.CRITICAL: 2}

#: What a missing value renders as in a dedupe key.
_MISSING = "-"


class RuleError(ValueError):
    """A rule set that cannot be loaded: bad YAML, an unknown kind, a bad template."""


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


class _Rule(BaseModel):
    """What every rule has: a name, channels, a dedupe key template and a throttle window."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Placeholders a dedupe key template of this kind may use (besides `rule` and `kind`).
    KEY_FIELDS: ClassVar[frozenset[str]] = frozenset()
    #: The dedupe key when the rule names none.
    DEFAULT_KEY: ClassVar[str] = "{rule}"

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][\w.-]*$")]
    channels: tuple[ChannelName, ...] = Field(default=("log",), min_length=1)
    dedupe_key: str | None = Field(default=None, description="str.format template; see KEY_FIELDS")
    throttle_s: float = Field(default=300.0, ge=0, description="0: no throttling")

    @field_validator("channels")
    @classmethod
    def _unique_channels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("names a channel twice")
        return value

    @field_validator("dedupe_key")
    @classmethod
    def _known_placeholders(cls, value: str | None) -> str | None:
        if value is None:
            return None
        allowed = cls.KEY_FIELDS | {"rule", "kind"}
        try:
            parsed = list(string.Formatter().parse(value))
        except ValueError as exc:
            raise ValueError(f"is not a valid template ({exc})") from None
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if name not in allowed or spec or conversion:
                raise ValueError(
                    f"uses {{{name}}}; a {cls.kind_name()} rule knows only "
                    + ", ".join(f"{{{n}}}" for n in sorted(allowed))
                )
        return value

    @classmethod
    def kind_name(cls) -> str:
        """The `kind` this rule class stands for."""
        return str(cls.model_fields["kind"].default)

    @property
    def key_template(self) -> str:
        """The dedupe key template in force."""
        return self.dedupe_key if self.dedupe_key is not None else self.DEFAULT_KEY

    @property
    def throttle_ns(self) -> int:
        """The throttle window in nanoseconds."""
        return int(self.throttle_s * 1_000_000_000)


_ORDER_FIELDS = frozenset(
    {"account_id", "strategy_id", "instrument_id", "venue", "client_order_id", "reason"}
)


class OrderDeniedRule(_Rule):
    """Risk denied an order intent (a RiskDecision on `orders.rejected`)."""

    KEY_FIELDS = _ORDER_FIELDS
    DEFAULT_KEY = "{rule}:{account_id}:{reason}"

    kind: Literal["order_denied"] = "order_denied"
    severity: AlertSeverity = AlertSeverity.WARNING
    reasons: tuple[ReasonCode, ...] = Field(default=(), description="empty: every reason")


class VenueRejectedRule(_Rule):
    """The venue rejected an order (an ExecutionReport with exec_type REJECTED)."""

    KEY_FIELDS = _ORDER_FIELDS
    DEFAULT_KEY = "{rule}:{account_id}:{instrument_id}"

    kind: Literal["order_rejected"] = "order_rejected"
    severity: AlertSeverity = AlertSeverity.WARNING


class DrawdownRule(_Rule):
    """An account's drawdown (PortfolioSnapshot.drawdown) went beyond `max_drawdown_pct` %."""

    KEY_FIELDS = frozenset({"account_id"})
    DEFAULT_KEY = "{rule}:{account_id}"

    kind: Literal["drawdown"] = "drawdown"
    severity: AlertSeverity = AlertSeverity.CRITICAL
    max_drawdown_pct: Decimal = Field(gt=0, le=100, allow_inf_nan=False)
    accounts: tuple[str, ...] = Field(default=(), description="empty: every account")


class AlertForwardRule(_Rule):
    """An Alert another stage published on `alerts`, forwarded with its own severity."""

    KEY_FIELDS = frozenset({"source_service", "code", "account_id", "instrument_id", "severity"})
    DEFAULT_KEY = "{rule}:{source_service}:{code}:{account_id}"

    kind: Literal["alert"] = "alert"
    min_severity: AlertSeverity = AlertSeverity.INFO
    codes: tuple[ReasonCode, ...] = Field(default=(), description="empty: every code")
    sources: tuple[str, ...] = Field(default=(), description="empty: every stage")


class DeadLetterRule(_Rule):
    """A message arrived on a `<topic>.dlq` dead-letter topic."""

    KEY_FIELDS = frozenset({"topic", "schema", "source"})
    DEFAULT_KEY = "{rule}:{topic}"

    kind: Literal["dlq"] = "dlq"
    severity: AlertSeverity = AlertSeverity.WARNING
    topics: tuple[str, ...] = Field(
        default=(), description="source topics (without .dlq) to watch; empty: every topic"
    )


class ControlRule(_Rule):
    """An operator command on `control` (kill switch engaged, breaker reset, ...)."""

    KEY_FIELDS = frozenset({"action", "target", "issued_by"})
    DEFAULT_KEY = "{rule}:{action}:{target}"

    kind: Literal["control"] = "control"
    severity: AlertSeverity = AlertSeverity.WARNING
    actions: tuple[ControlAction, ...] = Field(default=(), description="empty: every action")


class StaleMarketDataRule(_Rule):
    """An instrument that was trading has had no tick on `md.ticks` for over `max_age_s`.

    Checked on a timer (`check_market_data`): once per episode, and a recovery notice (INFO)
    when ticks come back, unless `notify_recovery` is false.
    """

    KEY_FIELDS = frozenset({"instrument_id", "venue", "state"})
    DEFAULT_KEY = "{rule}:{instrument_id}:{state}"

    kind: Literal["stale_market_data"] = "stale_market_data"
    severity: AlertSeverity = AlertSeverity.WARNING
    max_age_s: float = Field(gt=0, allow_inf_nan=False)
    instruments: tuple[str, ...] = Field(default=(), description="empty: every instrument seen")
    notify_recovery: bool = True

    @property
    def max_age_ns(self) -> int:
        """`max_age_s` in nanoseconds."""
        return int(self.max_age_s * 1_000_000_000)


class ServiceUnhealthyRule(_Rule):
    """A probed stage (QM_ALERT_HEALTH_URLS) failed `failures` readiness probes in a row.

    Once per episode; SERVICE_RECOVERED (INFO) at its first good probe after, unless
    `notify_recovery` is false.
    """

    KEY_FIELDS = frozenset({"service", "state"})
    DEFAULT_KEY = "{rule}:{service}:{state}"

    kind: Literal["service_unhealthy"] = "service_unhealthy"
    severity: AlertSeverity = AlertSeverity.CRITICAL
    failures: int = Field(default=3, ge=1, description="probes failed in a row before alerting")
    services: tuple[str, ...] = Field(default=(), description="empty: every probed service")
    notify_recovery: bool = True


class ConsumerLagRule(_Rule):
    """A consumer group of `groups` lags more than `max_lag` messages behind on a topic.

    A group given as a glob pattern (`*` for every group on the broker, `oms*`, `risk?`)
    covers every group it matches, found anew at each measurement.

    Measured on Kafka every QM_ALERT_LAG_INTERVAL_S (committed offset against the high
    watermark, summed over the topic's partitions); once per episode, and CONSUMER_LAG_CLEARED
    (INFO) when back at or under `max_lag`, unless `notify_recovery` is false.
    """

    KEY_FIELDS = frozenset({"group", "topic", "state"})
    DEFAULT_KEY = "{rule}:{group}:{topic}:{state}"

    kind: Literal["consumer_lag"] = "consumer_lag"
    severity: AlertSeverity = AlertSeverity.WARNING
    groups: tuple[str, ...] = Field(
        min_length=1, description="consumer group ids to measure, or glob patterns of them"
    )
    max_lag: int = Field(ge=0, description="messages behind that are still fine")
    notify_recovery: bool = True


Rule = Annotated[
    OrderDeniedRule
    | VenueRejectedRule
    | DrawdownRule
    | AlertForwardRule
    | DeadLetterRule
    | ControlRule
    | StaleMarketDataRule
    | ServiceUnhealthyRule
    | ConsumerLagRule,
    Field(discriminator="kind"),
]


class RuleSet(BaseModel):
    """The rules of one alerts service; names are unique."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: tuple[Rule, ...] = ()

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, value: tuple[_Rule, ...]) -> tuple[_Rule, ...]:
        names = [r.name for r in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"names {', '.join(duplicates)} more than once")
        return value

    def channels(self) -> set[str]:
        """Every channel some rule sends to."""
        return {c for rule in self.rules for c in rule.channels}


#: The rules in force when neither QM_ALERT_RULES nor QM_ALERT_RULES_FILE is set: every kind,
#: to the log only (no secret is needed to start).
DEFAULT_RULES_YAML = """
rules:
  - {name: order-denied, kind: order_denied, throttle_s: 60}
  - {name: order-rejected-by-venue, kind: order_rejected, throttle_s: 60}
  - {name: drawdown, kind: drawdown, max_drawdown_pct: 10, throttle_s: 3600}
  - {name: stage-alerts, kind: alert, min_severity: WARNING, throttle_s: 60}
  - {name: dead-letters, kind: dlq, throttle_s: 300}
  - {name: kill-switch, kind: control, actions: [KILL_SWITCH_ON, KILL_SWITCH_OFF], throttle_s: 0}
  - {name: stale-market-data, kind: stale_market_data, max_age_s: 60, throttle_s: 300}
  - {name: service-unhealthy, kind: service_unhealthy, failures: 3, throttle_s: 300}
"""


def parse_rules(text: str) -> RuleSet:
    """Parse and validate a YAML rule set; RuleError says what is wrong and where."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleError(f"is not valid YAML ({' '.join(str(exc).split())})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RuleError("must be a mapping with a `rules` list")
    try:
        return RuleSet.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            where = ".".join(str(p) for p in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        raise RuleError("; ".join(problems)) from None


def default_rules() -> RuleSet:
    """The rule set used when none is configured."""
    return parse_rules(DEFAULT_RULES_YAML)


# --------------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message seen on a dead-letter topic: which topic, what schema, who produced it, and
    why which stage dead-lettered it (empty when the record carries no such headers)."""

    topic: str
    schema: str
    source: str
    payload: Event | None = None
    error: str = ""
    error_type: str = ""
    dead_lettered_by: str = ""


@dataclass(frozen=True, slots=True)
class Notification:
    """One message to a human, and the channels it goes to."""

    notification_id: str
    rule: str
    kind: str
    severity: AlertSeverity
    code: str
    message: str
    dedupe_key: str
    channels: tuple[str, ...]
    ts_ns: int
    #: Events of this key that the throttle held back since the key's previous notification.
    suppressed: int = 0
    event_id: str | None = None
    account_id: str | None = None
    instrument_id: str | None = None
    details: Mapping[str, str] = field(default_factory=dict)

    @property
    def title(self) -> str:
        """One short line: severity, code and account."""
        who = f" {self.account_id}" if self.account_id else ""
        return f"[quantmesh] {self.severity} {self.code}{who}"

    def text(self) -> str:
        """The human-readable body (Telegram, e-mail)."""
        lines = [self.title, self.message]
        if self.suppressed:
            lines.append(f"({self.suppressed} similar suppressed since the previous notification)")
        lines += [f"{k}: {v}" for k, v in sorted(self.details.items())]
        lines.append(f"rule: {self.rule}  key: {self.dedupe_key}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form (webhook body, log line, history)."""
        return {
            "notification_id": self.notification_id,
            "rule": self.rule,
            "kind": self.kind,
            "severity": str(self.severity),
            "code": self.code,
            "message": self.message,
            "dedupe_key": self.dedupe_key,
            "channels": list(self.channels),
            "ts_ns": self.ts_ns,
            "suppressed": self.suppressed,
            "event_id": self.event_id,
            "account_id": self.account_id,
            "instrument_id": self.instrument_id,
            "details": dict(self.details),
        }


@dataclass(frozen=True, slots=True)
class _Match:
    """What a rule makes of an event before de-duplication and throttling."""

    severity: AlertSeverity
    code: str
    message: str
    key_fields: Mapping[str, str | None]
    account_id: str | None = None
    instrument_id: str | None = None
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _Window:
    opened_ns: int
    last: Notification
    suppressed: int = 0


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------


def _venue_of(instrument_id: str) -> str | None:
    try:
        return InstrumentId.parse(instrument_id).venue
    except ValueError:
        return None


def _match(rule: _Rule, event: Event | DeadLetter, own_source: str) -> _Match | None:
    """Return what `rule` makes of `event`, or None if the rule does not apply."""
    if isinstance(rule, OrderDeniedRule):
        if not isinstance(event, RiskDecision) or event.approved:
            return None
        if rule.reasons and event.reason not in rule.reasons:
            return None
        intent = event.intent
        return _Match(
            rule.severity,
            "ORDER_DENIED",
            f"order {intent.client_order_id} of {event.account_id} ({intent.instrument_id}) "
            f"denied by risk: {event.reason_text}",
            {
                "account_id": event.account_id,
                "strategy_id": intent.strategy_id,
                "instrument_id": intent.instrument_id,
                "venue": _venue_of(intent.instrument_id),
                "client_order_id": intent.client_order_id,
                "reason": event.reason,
            },
            event.account_id,
            intent.instrument_id,
            {"reason": event.reason or "", **event.details},
        )
    if isinstance(rule, VenueRejectedRule):
        if not isinstance(event, ExecutionReport) or event.exec_type is not ExecType.REJECTED:
            return None
        reason = event.reason or "no reason given"
        return _Match(
            rule.severity,
            "ORDER_REJECTED_BY_VENUE",
            f"order {event.client_order_id} of {event.account_id} ({event.instrument_id}) "
            f"rejected by the venue: {reason}",
            {
                "account_id": event.account_id,
                "strategy_id": event.strategy_id,
                "instrument_id": event.instrument_id,
                "venue": _venue_of(event.instrument_id),
                "client_order_id": event.client_order_id,
                "reason": event.reason,
            },
            event.account_id,
            event.instrument_id,
            {"reason": reason, "client_order_id": event.client_order_id},
        )
    if isinstance(rule, DrawdownRule):
        if not isinstance(event, PortfolioSnapshot):
            return None
        if rule.accounts and event.account_id not in rule.accounts:
            return None
        drawdown_pct = event.drawdown * 100
        if drawdown_pct <= rule.max_drawdown_pct:  # "beyond" X %: the boundary itself is fine
            return None
        shown = drawdown_pct.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)
        return _Match(
            rule.severity,
            "DRAWDOWN_EXCEEDED",
            f"account {event.account_id} drawdown {shown}% is beyond {rule.max_drawdown_pct}% "
            f"(equity {event.equity} {event.base_currency}, peak {event.peak_equity})",
            {"account_id": event.account_id},
            event.account_id,
            None,
            {
                "drawdown_pct": str(shown),
                "max_drawdown_pct": str(rule.max_drawdown_pct),
                "equity": str(event.equity),
                "peak_equity": str(event.peak_equity),
            },
        )
    if isinstance(rule, AlertForwardRule):
        if not isinstance(event, Alert):
            return None
        # Never re-notify an alert this service raised itself (no feedback loop).
        if event.source_service == own_source:
            return None
        if _SEVERITY_RANK[event.severity] < _SEVERITY_RANK[rule.min_severity]:
            return None
        if rule.codes and event.code not in rule.codes:
            return None
        if rule.sources and event.source_service not in rule.sources:
            return None
        return _Match(
            event.severity,
            event.code,
            f"{event.source_service}: {event.message}",
            {
                "source_service": event.source_service,
                "code": event.code,
                "account_id": event.account_id,
                "instrument_id": event.instrument_id,
                "severity": str(event.severity),
            },
            event.account_id,
            event.instrument_id,
            {"source_service": event.source_service, **event.details},
        )
    if isinstance(rule, DeadLetterRule):
        if not isinstance(event, DeadLetter):
            return None
        if rule.topics and event.topic not in rule.topics:
            return None
        by = f" by {event.dead_lettered_by}" if event.dead_lettered_by else ""
        why = f": {event.error}" if event.error else ""
        return _Match(
            rule.severity,
            "DEAD_LETTER",
            f"a {event.schema} message from {event.source} was dead-lettered{by} "
            f"({event.topic}.dlq){why}",
            {"topic": event.topic, "schema": event.schema, "source": event.source},
            getattr(event.payload, "account_id", None),
            getattr(event.payload, "instrument_id", None),
            {
                "topic": event.topic,
                "schema": event.schema,
                "source": event.source,
                "error_type": event.error_type,
                "error": event.error,
                "dead_lettered_by": event.dead_lettered_by,
            },
        )
    if isinstance(rule, ControlRule):
        if not isinstance(event, ControlCommand):
            return None
        if rule.actions and event.action not in rule.actions:
            return None
        why = f": {event.reason}" if event.reason else ""
        return _Match(
            rule.severity,
            f"CONTROL_{event.action}",
            f"{event.action} on {event.target} by {event.issued_by}{why}",
            {"action": str(event.action), "target": event.target, "issued_by": event.issued_by},
            None,
            None,
            {"target": event.target, "issued_by": event.issued_by, **event.params},
        )
    return None


def _seconds(ns: int) -> str:
    return f"{ns / 1_000_000_000:.1f}"


def _stale_match(
    rule: StaleMarketDataRule,
    instrument: str,
    last_ns: int,
    age_ns: int,
    change: Literal["began", "ended"],
) -> _Match:
    fields = {"instrument_id": instrument, "venue": _venue_of(instrument)}
    details = {"last_data_ns": str(last_ns), "max_age_s": str(rule.max_age_s)}
    if change == "began":
        return _Match(
            rule.severity,
            "STALE_MARKET_DATA",
            f"no market data for {instrument} for {_seconds(age_ns)}s "
            f"(more than {rule.max_age_s}s)",
            {**fields, "state": "stale"},
            None,
            instrument,
            {**details, "age_s": _seconds(age_ns)},
        )
    return _Match(
        AlertSeverity.INFO,
        "MARKET_DATA_RESUMED",
        f"market data for {instrument} resumed",
        {**fields, "state": "resumed"},
        None,
        instrument,
        details,
    )


def _health_match(
    rule: ServiceUnhealthyRule,
    service: str,
    url: str,
    error: str | None,
    failures: int,
    change: Literal["began", "ended"],
) -> _Match:
    details = {"service": service, "url": url, "failures": str(failures)}
    if change == "began":
        return _Match(
            rule.severity,
            "SERVICE_UNHEALTHY",
            f"{service} failed {failures} readiness probes in a row ({url}): {error}",
            {"service": service, "state": "unhealthy"},
            None,
            None,
            {**details, "error": error or ""},
        )
    return _Match(
        AlertSeverity.INFO,
        "SERVICE_RECOVERED",
        f"{service} is ready again ({url}) after {failures} failed probes",
        {"service": service, "state": "recovered"},
        None,
        None,
        details,
    )


def _lag_match(
    rule: ConsumerLagRule, group: str, topic: str, lag: int, change: Literal["began", "ended"]
) -> _Match:
    details = {"group": group, "topic": topic, "lag": str(lag), "max_lag": str(rule.max_lag)}
    if change == "began":
        return _Match(
            rule.severity,
            "CONSUMER_LAG",
            f"consumer group {group} is {lag} messages behind on {topic} "
            f"(more than {rule.max_lag})",
            {"group": group, "topic": topic, "state": "lagging"},
            None,
            None,
            details,
        )
    return _Match(
        AlertSeverity.INFO,
        "CONSUMER_LAG_CLEARED",
        f"consumer group {group} caught up on {topic} ({lag} behind)",
        {"group": group, "topic": topic, "state": "cleared"},
        None,
        None,
        details,
    )


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


class RuleEngine:
    """Applies a rule set to events: matching, dedupe keys, throttle windows, redelivery guard.

    `own_source` is this service's name: Alerts it published itself are never forwarded again.
    `seen_capacity` bounds the event ids remembered to ignore a redelivered event.
    """

    def __init__(
        self,
        rules: Iterable[_Rule],
        *,
        own_source: str = "alerts",
        seen_capacity: int = 100_000,
    ) -> None:
        self.rules: tuple[_Rule, ...] = tuple(rules)
        self.own_source = own_source
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seen_capacity = seen_capacity
        self._windows: dict[tuple[str, str], _Window] = {}
        #: Subjects (instruments, services, group/topic pairs) in a bad episode, per rule.
        self._episodes: dict[str, set[str]] = {}
        #: When each instrument last had market data (UTC ns), for stale_market_data rules.
        self._md_last: dict[str, int] = {}
        #: Ticks older than this when read cannot make any instrument fresh.
        self._md_horizon_ns = max(
            (r.max_age_ns for r in self.rules if isinstance(r, StaleMarketDataRule)), default=0
        )
        #: Per probed service: (failed probes in a row, time of the first of them).
        self._probe_failures: dict[str, tuple[int, int]] = {}
        #: When each lag episode began, per (rule, group/topic).
        self._lag_since: dict[tuple[str, str], int] = {}
        #: Events held back by a throttle window, in total.
        self.suppressed_total = 0

    def replace_rules(self, rules: Iterable[_Rule]) -> None:
        """Put `rules` in force (a reload). A rule kept as it was (same name, same definition)
        keeps its throttle windows and open episodes; the state of every other rule goes, so
        a changed rule starts afresh. What was seen (event ids, market data) is kept."""
        before = {rule.name: rule for rule in self.rules}
        self.rules = tuple(rules)
        kept = {rule.name for rule in self.rules if before.get(rule.name) == rule}
        self._windows = {k: v for k, v in self._windows.items() if k[0] in kept}
        self._episodes = {k: v for k, v in self._episodes.items() if k in kept}
        self._lag_since = {k: v for k, v in self._lag_since.items() if k[0] in kept}
        self._md_horizon_ns = max(
            (r.max_age_ns for r in self.rules if isinstance(r, StaleMarketDataRule)), default=0
        )

    def evaluate(
        self, event: Event | DeadLetter, now_ns: int, *, event_id: str | None = None
    ) -> list[Notification]:
        """Return the notifications `event` causes at time `now_ns` (UTC ns).

        An `event_id` already evaluated (a redelivery) causes nothing, and is not counted.
        """
        if event_id is not None:
            if event_id in self._seen:
                return []
            self._seen[event_id] = None
            if len(self._seen) > self._seen_capacity:
                self._seen.popitem(last=False)
        out: list[Notification] = []
        for rule in self.rules:
            match = _match(rule, event, self.own_source)
            if match is None:
                continue
            sent = self._notify(rule, match, event_id, now_ns)
            if sent is not None:
                out.append(sent)
        return out

    def _notify(
        self, rule: _Rule, match: _Match, event_id: str | None, now_ns: int
    ) -> Notification | None:
        """The notification `match` makes, unless its throttle window holds it back."""
        fields = {k: _MISSING if v is None else v for k, v in match.key_fields.items()}
        key = rule.key_template.format(rule=rule.name, kind=rule.kind_name(), **fields)
        notification = Notification(
            notification_id=f"{event_id or now_ns}:{rule.name}",
            rule=rule.name,
            kind=rule.kind_name(),
            severity=match.severity,
            code=match.code,
            message=match.message,
            dedupe_key=key,
            channels=tuple(rule.channels),
            ts_ns=now_ns,
            event_id=event_id,
            account_id=match.account_id,
            instrument_id=match.instrument_id,
            details=dict(match.details),
        )
        return self._throttle(rule, notification, now_ns)

    def _episode(self, rule: _Rule, subject: str, bad: bool) -> Literal["began", "ended"] | None:
        """Track whether `subject` is in a bad episode for `rule`: "began", "ended" or None."""
        open_ = self._episodes.setdefault(rule.name, set())
        if bad and subject not in open_:
            open_.add(subject)
            return "began"
        if not bad and subject in open_:
            open_.discard(subject)
            return "ended"
        return None

    # -- market data --------------------------------------------------------------------------

    def watches_market_data(self) -> bool:
        """Whether some rule needs `saw_market_data` fed."""
        return any(isinstance(rule, StaleMarketDataRule) for rule in self.rules)

    def saw_market_data(self, instrument_id: str, ts_ns: int, now_ns: int) -> None:
        """Note market data for `instrument_id` stamped `ts_ns`, read at `now_ns`: O(1).

        A tick already older than every rule's `max_age_s` when read is ignored: it says
        nothing about the instrument trading now (a fresh consumer group reads the topic's
        whole history first), and an instrument known only from such ticks is not watched.
        """
        if now_ns - ts_ns > self._md_horizon_ns:
            return
        if ts_ns > self._md_last.get(instrument_id, 0):
            self._md_last[instrument_id] = ts_ns

    def check_market_data(self, now_ns: int) -> list[Notification]:
        """Notify instruments whose data went stale, and (once) those whose data came back.

        Only instruments seen at least once count: one that never traded is not stale.
        """
        out: list[Notification] = []
        for rule in self.rules:
            if not isinstance(rule, StaleMarketDataRule):
                continue
            for instrument, last_ns in self._md_last.items():
                if rule.instruments and instrument not in rule.instruments:
                    continue
                age_ns = now_ns - last_ns
                change = self._episode(rule, instrument, age_ns > rule.max_age_ns)
                if change is None or (change == "ended" and not rule.notify_recovery):
                    continue
                match = _stale_match(rule, instrument, last_ns, age_ns, change)
                # The episode's id is its last tick: a check repeated after a restart is the
                # same notification, so the store does not keep (nor send) it twice.
                sent = self._notify(rule, match, f"{change}:{instrument}:{last_ns}", now_ns)
                if sent is not None:
                    out.append(sent)
        return out

    # -- service health ------------------------------------------------------------------------

    def probes_services(self) -> bool:
        """Whether some rule needs `probe_result` fed."""
        return any(isinstance(rule, ServiceUnhealthyRule) for rule in self.rules)

    def probe_result(
        self, service: str, url: str, error: str | None, now_ns: int
    ) -> list[Notification]:
        """Take one readiness probe of `service` (`error` None: it answered 2xx).

        A rule fires when the failures in a row reach its `failures`, once per episode, and
        notifies the recovery at the first good probe after.
        """
        previous, first_ns = self._probe_failures.get(service, (0, now_ns))
        if error is None:
            self._probe_failures.pop(service, None)
            failures = 0
        else:
            failures = previous + 1
            self._probe_failures[service] = (failures, first_ns)
        out: list[Notification] = []
        for rule in self.rules:
            if not isinstance(rule, ServiceUnhealthyRule):
                continue
            if rule.services and service not in rule.services:
                continue
            change = self._episode(rule, service, error is not None and failures >= rule.failures)
            if change is None or (change == "ended" and not rule.notify_recovery):
                continue
            match = _health_match(rule, service, url, error, failures or previous, change)
            # The episode is named by its first failed probe: stable across the probes of it.
            sent = self._notify(rule, match, f"{change}:{service}:{first_ns}", now_ns)
            if sent is not None:
                out.append(sent)
        return out

    # -- consumer lag --------------------------------------------------------------------------

    def lag_groups(self) -> list[str]:
        """The consumer groups some consumer_lag rule measures, sorted."""
        return sorted(
            {g for rule in self.rules if isinstance(rule, ConsumerLagRule) for g in rule.groups}
        )

    def lag_measured(self, lags: Mapping[tuple[str, str], int], now_ns: int) -> list[Notification]:
        """Take one measurement: messages behind per (group, topic).

        A (group, topic) missing from `lags` (nothing committed, or not measured this time)
        changes nothing.
        """
        out: list[Notification] = []
        for rule in self.rules:
            if not isinstance(rule, ConsumerLagRule):
                continue
            for (group, topic), lag in sorted(lags.items()):
                if not any(fnmatchcase(group, g) for g in rule.groups):
                    continue
                subject = f"{group}/{topic}"
                change = self._episode(rule, subject, lag > rule.max_lag)
                if change == "began":
                    self._lag_since[(rule.name, subject)] = now_ns
                since_ns = self._lag_since.get((rule.name, subject), now_ns)
                if change == "ended":
                    del self._lag_since[(rule.name, subject)]
                if change is None or (change == "ended" and not rule.notify_recovery):
                    continue
                match = _lag_match(rule, group, topic, lag, change)
                sent = self._notify(rule, match, f"{change}:{subject}:{since_ns}", now_ns)
                if sent is not None:
                    out.append(sent)
        return out

    def _throttle(
        self, rule: _Rule, notification: Notification, now_ns: int
    ) -> Notification | None:
        slot = (rule.name, notification.dedupe_key)
        window = self._windows.get(slot)
        if window is not None and now_ns < window.opened_ns + rule.throttle_ns:
            window.suppressed += 1
            self.suppressed_total += 1
            return None
        suppressed = window.suppressed if window is not None else 0
        sent = replace(notification, suppressed=suppressed)
        if rule.throttle_ns > 0:
            self._windows[slot] = _Window(now_ns, sent)
        else:
            self._windows.pop(slot, None)
        return sent

    def flush(self, now_ns: int) -> list[Notification]:
        """Report the keys whose window is over with events still held back in it.

        Each gets one notification (a copy of its last one, marked with the count) and a new
        window; keys whose window is over with nothing held back are forgotten.
        """
        rules = {rule.name: rule for rule in self.rules}
        out: list[Notification] = []
        for slot, window in list(self._windows.items()):
            rule = rules[slot[0]]
            if now_ns < window.opened_ns + rule.throttle_ns:
                continue
            if window.suppressed == 0:
                del self._windows[slot]
                continue
            last = window.last
            summary = replace(
                last,
                notification_id=f"{last.notification_id}:flush:{now_ns}",
                message=f"{window.suppressed} more since the last notification; last: "
                + last.message,
                suppressed=window.suppressed,
                ts_ns=now_ns,
            )
            # The window keeps the original notification, so summaries never nest.
            self._windows[slot] = _Window(now_ns, last)
            out.append(summary)
        return out

    def pending_keys(self) -> Sequence[tuple[str, str]]:
        """The (rule, dedupe key) pairs with an open throttle window."""
        return list(self._windows)
