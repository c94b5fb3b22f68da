"""Alert rules: loading and validation, matching per kind, dedupe keys, throttling, flush."""

from __future__ import annotations

from decimal import Decimal

import pytest

from quantmesh_alerts.rules import (
    DeadLetter,
    DrawdownRule,
    RuleEngine,
    RuleError,
    default_rules,
    parse_rules,
)
from quantmesh_common.messages import (
    AlertSeverity,
    ControlAction,
    ExecType,
    OrderStatus,
    RiskDecision,
)
from quantmesh_common.testing import stubs

S = stubs.SECOND_NS
T0 = stubs.TS


def engine(yaml_text: str) -> RuleEngine:
    return RuleEngine(parse_rules(yaml_text).rules, own_source="alerts")


def denial(reason: str = "NOTIONAL_EXCEEDS_MAX_PER_ORDER", account: str = "acc-1") -> RiskDecision:
    intent = stubs.order_intent(account_id=account)
    return stubs.risk_rejection(intent=intent, reason=reason)


# -- loading ----------------------------------------------------------------------------------


def test_parse_rules_when_valid_yaml_builds_each_kind_with_its_defaults() -> None:
    rules = parse_rules(
        """
        rules:
          - {name: a, kind: order_denied, reasons: [KILL_SWITCH_ENGAGED]}
          - {name: b, kind: drawdown, max_drawdown_pct: 12.5, channels: [log, webhook]}
        """
    ).rules

    assert [r.name for r in rules] == ["a", "b"]
    assert rules[0].key_template == "{rule}:{account_id}:{reason}"
    assert rules[0].throttle_ns == 300 * S
    assert isinstance(rules[1], DrawdownRule)
    assert rules[1].severity is AlertSeverity.CRITICAL
    assert rules[1].channels == ("log", "webhook")


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("rules: [", "is not valid YAML"),
        ("- a list", "must be a mapping"),
        ("rules: [{name: a, kind: nope}]", "does not match any of the expected tags"),
        ("rules: [{name: a, kind: drawdown}]", "max_drawdown_pct: Field required"),
        ("rules: [{name: a, kind: drawdown, max_drawdown_pct: 0}]", "greater than 0"),
        ("rules: [{name: a, kind: dlq, dedupe_key: '{account_id}'}]", "uses {account_id}"),
        ("rules: [{name: a, kind: dlq, channels: [pager]}]", "channels"),
        ("rules: [{name: a, kind: dlq, throttle: 5}]", "Extra inputs are not permitted"),
        ("rules: [{name: a, kind: dlq}, {name: a, kind: alert}]", "names a more than once"),
        ("rules: [{name: a, kind: order_denied, reasons: [lower]}]", "reasons"),
        ("rules: [{name: a, kind: stale_market_data}]", "stale_market_data.max_age_s: Field req"),
        ("rules: [{name: a, kind: stale_market_data, max_age_s: 0}]", "greater than 0"),
        (
            "rules: [{name: a, kind: stale_market_data, max_age_s: 5, dedupe_key: '{account_id}'}]",
            "uses {account_id}",
        ),
        ("rules: [{name: a, kind: consumer_lag, max_lag: 5}]", "consumer_lag.groups: Field req"),
        ("rules: [{name: a, kind: consumer_lag, groups: [], max_lag: 5}]", "at least 1 item"),
        ("rules: [{name: a, kind: consumer_lag, groups: [oms]}]", "max_lag: Field required"),
    ],
)
def test_parse_rules_when_invalid_raises_saying_what_and_where(text: str, phrase: str) -> None:
    with pytest.raises(RuleError) as raised:
        parse_rules(text)

    assert phrase in str(raised.value)


def test_default_rules_when_loaded_cover_every_kind_to_the_log_only() -> None:
    rules = default_rules().rules

    assert {r.kind_name() for r in rules} == {
        "order_denied",
        "order_rejected",
        "drawdown",
        "alert",
        "dlq",
        "control",
        "stale_market_data",
        "service_unhealthy",
    }
    assert default_rules().channels() == {"log"}


# -- matching ---------------------------------------------------------------------------------


def test_order_denied_when_reason_filter_matches_notifies_with_reason_and_values() -> None:
    rules = engine(
        "rules: [{name: ks, kind: order_denied, reasons: [NOTIONAL_EXCEEDS_MAX_PER_ORDER]}]"
    )

    [n] = rules.evaluate(denial(), T0, event_id="e1")

    assert (n.rule, n.code, n.severity) == ("ks", "ORDER_DENIED", AlertSeverity.WARNING)
    assert n.dedupe_key == "ks:acc-1:NOTIONAL_EXCEEDS_MAX_PER_ORDER"
    assert "max_notional=1000, notional=5000.01" in n.message
    assert n.details["reason"] == "NOTIONAL_EXCEEDS_MAX_PER_ORDER"
    assert n.account_id == "acc-1"


def test_order_denied_when_reason_is_not_in_the_filter_is_silent() -> None:
    rules = engine("rules: [{name: ks, kind: order_denied, reasons: [KILL_SWITCH_ENGAGED]}]")

    out = rules.evaluate(denial(), T0, event_id="e1")

    assert out == []


def test_order_denied_when_decision_is_an_approval_is_silent() -> None:
    rules = engine("rules: [{name: d, kind: order_denied}]")

    out = rules.evaluate(stubs.risk_decision(), T0, event_id="e1")

    assert out == []


def test_venue_rejected_when_report_is_rejected_notifies_with_venue_reason() -> None:
    rules = engine("rules: [{name: v, kind: order_rejected, dedupe_key: '{venue}:{reason}'}]")
    report = stubs.order_accepted(
        exec_type=ExecType.REJECTED,
        order_status=OrderStatus.REJECTED,
        leaves_qty=Decimal(0),
        reason="INSUFFICIENT_BALANCE",
    )

    [n] = rules.evaluate(report, T0, event_id="e1")

    assert n.code == "ORDER_REJECTED_BY_VENUE"
    assert n.dedupe_key == "SIM:INSUFFICIENT_BALANCE"
    assert "rejected by the venue: INSUFFICIENT_BALANCE" in n.message


def test_venue_rejected_when_report_is_a_fill_is_silent() -> None:
    rules = engine("rules: [{name: v, kind: order_rejected}]")

    out = rules.evaluate(stubs.execution_report(), T0, event_id="e1")

    assert out == []


@pytest.mark.parametrize(
    ("drawdown", "fires"),
    [("0.1", False), ("0.1001", True), ("0.05", False), ("0.5", True)],
)
def test_drawdown_when_beyond_the_limit_fires_and_at_the_limit_does_not(
    drawdown: str, fires: bool
) -> None:
    rules = engine("rules: [{name: dd, kind: drawdown, max_drawdown_pct: 10}]")
    snapshot = stubs.portfolio_snapshot(drawdown=Decimal(drawdown))

    out = rules.evaluate(snapshot, T0, event_id="e1")

    assert bool(out) is fires


def test_drawdown_when_fired_reports_the_percentage_to_two_places() -> None:
    rules = engine("rules: [{name: dd, kind: drawdown, max_drawdown_pct: 10}]")
    # peak 100100.00, equity 100095.100: drawdown 0.1234 -> 12.34 %
    snapshot = stubs.portfolio_snapshot(drawdown=Decimal("0.1234"))

    [n] = rules.evaluate(snapshot, T0, event_id="e1")

    assert n.severity is AlertSeverity.CRITICAL
    assert n.details["drawdown_pct"] == "12.34"
    assert "drawdown 12.34% is beyond 10%" in n.message


def test_alert_forward_when_at_or_above_min_severity_keeps_the_alert_severity() -> None:
    rules = engine("rules: [{name: fw, kind: alert, min_severity: WARNING}]")

    critical = rules.evaluate(
        stubs.alert(severity=AlertSeverity.CRITICAL, code="BREAKER_TRIPPED"), T0, event_id="e1"
    )
    info = rules.evaluate(stubs.alert(severity=AlertSeverity.INFO), T0, event_id="e2")

    assert [(n.severity, n.code) for n in critical] == [(AlertSeverity.CRITICAL, "BREAKER_TRIPPED")]
    assert info == []


def test_alert_forward_when_alert_comes_from_this_service_is_never_renotified() -> None:
    rules = engine("rules: [{name: fw, kind: alert}]")

    out = rules.evaluate(stubs.alert(source_service="alerts"), T0, event_id="e1")

    assert out == []


def test_alert_forward_when_code_and_source_filters_miss_is_silent() -> None:
    rules = engine("rules: [{name: fw, kind: alert, codes: [STALE_DATA], sources: [marketdata]}]")

    wrong_code = rules.evaluate(stubs.alert(source_service="marketdata"), T0, event_id="e1")
    wrong_source = rules.evaluate(stubs.alert(code="STALE_DATA"), T0, event_id="e2")
    right = rules.evaluate(
        stubs.alert(source_service="marketdata", code="STALE_DATA"), T0, event_id="e3"
    )

    assert (wrong_code, wrong_source, len(right)) == ([], [], 1)


def test_dead_letter_when_topic_is_watched_notifies_and_keys_by_topic() -> None:
    rules = engine("rules: [{name: dl, kind: dlq, topics: [exec.reports]}]")
    letter = DeadLetter("exec.reports", "exec.report", "execution", stubs.execution_report())
    other = DeadLetter("md.ticks", "md.tick", "marketdata", stubs.tick())

    [n] = rules.evaluate(letter, T0, event_id="e1")
    ignored = rules.evaluate(other, T0, event_id="e2")

    assert (n.code, n.dedupe_key, n.account_id) == ("DEAD_LETTER", "dl:exec.reports", "acc-1")
    assert ignored == []


def test_control_when_action_is_watched_notifies_who_did_it() -> None:
    rules = engine("rules: [{name: ks, kind: control, actions: [KILL_SWITCH_ON]}]")

    [n] = rules.evaluate(stubs.control_command(), T0, event_id="e1")
    off = rules.evaluate(
        stubs.control_command(action=ControlAction.KILL_SWITCH_OFF), T0, event_id="e2"
    )

    assert n.code == "CONTROL_KILL_SWITCH_ON"
    assert n.message == "KILL_SWITCH_ON on * by ops@example.com: drill"
    assert off == []


def test_evaluate_when_two_rules_match_returns_one_notification_each() -> None:
    rules = engine(
        """
        rules:
          - {name: all-denials, kind: order_denied, channels: [log]}
          - {name: page, kind: order_denied, channels: [telegram], severity: CRITICAL}
        """
    )

    out = rules.evaluate(denial(), T0, event_id="e1")

    assert [(n.rule, n.channels, n.severity) for n in out] == [
        ("all-denials", ("log",), AlertSeverity.WARNING),
        ("page", ("telegram",), AlertSeverity.CRITICAL),
    ]


# -- de-duplication and throttling ------------------------------------------------------------


def test_throttle_when_same_key_repeats_in_window_reports_the_count_in_the_next_one() -> None:
    rules = engine("rules: [{name: d, kind: order_denied, throttle_s: 60}]")

    first = rules.evaluate(denial(), T0, event_id="e1")
    held = [rules.evaluate(denial(), T0 + i * S, event_id=f"e{i}") for i in range(2, 5)]
    at_window_end = rules.evaluate(denial(), T0 + 60 * S, event_id="e5")

    assert [n.suppressed for n in first] == [0]
    assert held == [[], [], []]
    assert [n.suppressed for n in at_window_end] == [3]
    assert rules.suppressed_total == 3


def test_throttle_when_keys_differ_each_key_has_its_own_window() -> None:
    rules = engine("rules: [{name: d, kind: order_denied, throttle_s: 60}]")

    a = rules.evaluate(denial(account="acc-1"), T0, event_id="e1")
    b = rules.evaluate(denial(account="acc-2"), T0 + S, event_id="e2")

    assert [n.dedupe_key for n in a + b] == [
        "d:acc-1:NOTIONAL_EXCEEDS_MAX_PER_ORDER",
        "d:acc-2:NOTIONAL_EXCEEDS_MAX_PER_ORDER",
    ]


def test_throttle_when_window_is_zero_notifies_every_event() -> None:
    rules = engine("rules: [{name: d, kind: order_denied, throttle_s: 0}]")

    out = [rules.evaluate(denial(), T0, event_id=f"e{i}") for i in range(3)]

    assert [len(batch) for batch in out] == [1, 1, 1]


def test_dedupe_key_when_template_drops_the_account_throttles_across_accounts() -> None:
    rules = engine("rules: [{name: d, kind: order_denied, dedupe_key: '{reason}'}]")

    a = rules.evaluate(denial(account="acc-1"), T0, event_id="e1")
    b = rules.evaluate(denial(account="acc-2"), T0 + S, event_id="e2")

    assert (len(a), b) == (1, [])


def test_evaluate_when_event_id_is_redelivered_neither_notifies_nor_counts() -> None:
    rules = engine("rules: [{name: d, kind: order_denied, throttle_s: 60}]")

    first = rules.evaluate(denial(), T0, event_id="e1")
    again = rules.evaluate(denial(), T0 + S, event_id="e1")

    assert (len(first), again, rules.suppressed_total) == (1, [], 0)


def test_flush_when_window_is_over_with_held_events_reports_them_once() -> None:
    rules = engine("rules: [{name: d, kind: order_denied, throttle_s: 60}]")
    rules.evaluate(denial(), T0, event_id="e1")
    rules.evaluate(denial(), T0 + S, event_id="e2")
    rules.evaluate(denial(), T0 + 2 * S, event_id="e3")

    early = rules.flush(T0 + 59 * S)
    [summary] = rules.flush(T0 + 60 * S)
    later = rules.flush(T0 + 120 * S)

    assert early == []
    assert summary.suppressed == 2
    assert summary.message.startswith("2 more since the last notification; last: order O-1")
    assert later == []
    assert rules.pending_keys() == []
