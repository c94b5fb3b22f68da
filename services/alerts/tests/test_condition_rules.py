"""Rules over conditions the stage checks on a timer: stale market data (pure logic)."""

from __future__ import annotations

from quantmesh_alerts.rules import RuleEngine, parse_rules
from quantmesh_common.messages import AlertSeverity
from quantmesh_common.testing import stubs

S = stubs.SECOND_NS
T0 = stubs.TS
BTC = "BTC-USDT.BINANCE"
ETH = "ETH-USDT.BINANCE"


def engine(yaml_text: str) -> RuleEngine:
    return RuleEngine(parse_rules(yaml_text).rules, own_source="alerts")


STALE = "rules: [{name: md, kind: stale_market_data, max_age_s: 60, throttle_s: 0}]"


# -- stale market data ------------------------------------------------------------------------


def test_stale_when_instrument_is_quiet_beyond_max_age_notifies_once_per_episode() -> None:
    rules = engine(STALE)
    rules.saw_market_data(BTC, T0, T0)

    fresh = rules.check_market_data(T0 + 30 * S)
    stale = rules.check_market_data(T0 + 61 * S)
    still_stale = rules.check_market_data(T0 + 90 * S)

    assert fresh == []
    [sent] = stale
    assert (sent.code, sent.severity, sent.instrument_id) == (
        "STALE_MARKET_DATA",
        AlertSeverity.WARNING,
        BTC,
    )
    assert sent.message == f"no market data for {BTC} for 61.0s (more than 60.0s)"
    assert sent.dedupe_key == f"md:{BTC}:stale"
    assert sent.notification_id == f"began:{BTC}:{T0}:md"
    assert still_stale == []


def test_stale_when_age_is_exactly_max_age_is_not_stale() -> None:
    rules = engine(STALE)
    rules.saw_market_data(BTC, T0, T0)

    assert rules.check_market_data(T0 + 60 * S) == []


def test_stale_when_data_comes_back_notifies_the_recovery_once_as_info() -> None:
    rules = engine(STALE)
    rules.saw_market_data(BTC, T0, T0)
    rules.check_market_data(T0 + 61 * S)
    rules.saw_market_data(BTC, T0 + 95 * S, T0 + 95 * S)

    [resumed] = rules.check_market_data(T0 + 100 * S)
    again = rules.check_market_data(T0 + 105 * S)

    assert (resumed.code, resumed.severity) == ("MARKET_DATA_RESUMED", AlertSeverity.INFO)
    assert resumed.dedupe_key == f"md:{BTC}:resumed"
    assert again == []


def test_stale_when_recovery_notices_are_off_is_silent_on_recovery_and_fires_next_episode() -> None:
    rules = engine(
        "rules: [{name: md, kind: stale_market_data, max_age_s: 60, throttle_s: 0,"
        " notify_recovery: false}]"
    )
    rules.saw_market_data(BTC, T0, T0)
    first = rules.check_market_data(T0 + 61 * S)
    rules.saw_market_data(BTC, T0 + 70 * S, T0 + 70 * S)

    recovered = rules.check_market_data(T0 + 75 * S)
    second = rules.check_market_data(T0 + 131 * S)

    assert [n.code for n in first] == ["STALE_MARKET_DATA"]
    assert recovered == []
    assert [n.notification_id for n in second] == [f"began:{BTC}:{T0 + 70 * S}:md"]


def test_stale_when_instruments_are_listed_watches_only_those_it_has_seen() -> None:
    rules = engine(
        f"rules: [{{name: md, kind: stale_market_data, max_age_s: 60, instruments: [{BTC}]}}]"
    )
    rules.saw_market_data(ETH, T0, T0)

    assert rules.check_market_data(T0 + 61 * S) == []  # ETH not listed, BTC never traded


def test_stale_when_each_instrument_goes_quiet_notifies_each_with_its_own_age() -> None:
    rules = engine(STALE)
    rules.saw_market_data(BTC, T0, T0)
    rules.saw_market_data(ETH, T0 + 20 * S, T0 + 20 * S)

    sent = rules.check_market_data(T0 + 100 * S)

    assert sorted((n.instrument_id, n.details["age_s"]) for n in sent) == [
        (BTC, "100.0"),
        (ETH, "80.0"),
    ]


def test_stale_when_ticks_are_already_older_than_max_age_when_read_ignores_them() -> None:
    rules = engine(STALE)
    # A fresh consumer group reads the topic's history first: an hour-old tick.
    rules.saw_market_data(ETH, T0 - 3600 * S, T0)

    assert rules.check_market_data(T0 + 61 * S) == []


def test_stale_when_a_tick_arrives_out_of_order_keeps_the_newest_time() -> None:
    rules = engine(STALE)
    rules.saw_market_data(BTC, T0 + 30 * S, T0 + 30 * S)
    rules.saw_market_data(BTC, T0, T0 + 31 * S)

    assert rules.check_market_data(T0 + 89 * S) == []  # 59 s after the newest tick
    assert [n.details["age_s"] for n in rules.check_market_data(T0 + 91 * S)] == ["61.0"]


def test_stale_when_flapping_within_throttle_window_holds_the_second_episode_back() -> None:
    rules = engine("rules: [{name: md, kind: stale_market_data, max_age_s: 60, throttle_s: 600}]")
    rules.saw_market_data(BTC, T0, T0)
    first = rules.check_market_data(T0 + 61 * S)
    rules.saw_market_data(BTC, T0 + 70 * S, T0 + 70 * S)
    resumed = rules.check_market_data(T0 + 75 * S)

    second = rules.check_market_data(T0 + 131 * S)

    assert [n.code for n in first + resumed] == ["STALE_MARKET_DATA", "MARKET_DATA_RESUMED"]
    assert second == []
    assert rules.suppressed_total == 1


# -- service unhealthy ------------------------------------------------------------------------

HEALTH = "rules: [{name: up, kind: service_unhealthy, failures: 3, throttle_s: 0}]"
RISK_URL = "http://127.0.0.1:8103/readyz"


def test_unhealthy_when_probes_fail_n_times_in_a_row_notifies_once_then_recovery() -> None:
    rules = engine(HEALTH)

    below = [rules.probe_result("risk", RISK_URL, "HTTP 503", T0 + i * S) for i in range(2)]
    third = rules.probe_result("risk", RISK_URL, "HTTP 503", T0 + 2 * S)
    fourth = rules.probe_result("risk", RISK_URL, "HTTP 503", T0 + 3 * S)
    recovered = rules.probe_result("risk", RISK_URL, None, T0 + 4 * S)
    healthy = rules.probe_result("risk", RISK_URL, None, T0 + 5 * S)

    assert below == [[], []]
    [down] = third
    assert (down.code, down.severity, down.dedupe_key) == (
        "SERVICE_UNHEALTHY",
        AlertSeverity.CRITICAL,
        "up:risk:unhealthy",
    )
    assert down.message == f"risk failed 3 readiness probes in a row ({RISK_URL}): HTTP 503"
    assert down.notification_id == f"began:risk:{T0}:up"
    assert fourth == []
    [back] = recovered
    assert (back.code, back.severity) == ("SERVICE_RECOVERED", AlertSeverity.INFO)
    assert back.message == f"risk is ready again ({RISK_URL}) after 4 failed probes"
    assert healthy == []


def test_unhealthy_when_a_good_probe_interrupts_the_failures_starts_counting_again() -> None:
    rules = engine(HEALTH)
    results = ["HTTP 503", "HTTP 503", None, "HTTP 503", "HTTP 503"]

    sent = [rules.probe_result("risk", RISK_URL, error, T0) for error in results]

    assert sent == [[], [], [], [], []]


def test_unhealthy_when_services_are_listed_ignores_the_others() -> None:
    rules = engine(
        "rules: [{name: up, kind: service_unhealthy, failures: 1, services: [oms], throttle_s: 0}]"
    )

    risk = rules.probe_result("risk", RISK_URL, "HTTP 503", T0)
    oms = rules.probe_result("oms", "http://127.0.0.1:8104/readyz", "HTTP 503", T0)

    assert risk == []
    assert [n.details["service"] for n in oms] == ["oms"]


# -- consumer lag -----------------------------------------------------------------------------

LAG = "rules: [{name: lag, kind: consumer_lag, groups: [oms, risk], max_lag: 100, throttle_s: 0}]"


def test_lag_when_beyond_max_lag_notifies_once_per_group_and_topic_then_when_cleared() -> None:
    rules = engine(LAG)

    at_limit = rules.lag_measured({("oms", "orders.approved"): 100}, T0)
    beyond = rules.lag_measured({("oms", "orders.approved"): 101}, T0 + 30 * S)
    still = rules.lag_measured({("oms", "orders.approved"): 5_000}, T0 + 60 * S)
    unmeasured = rules.lag_measured({}, T0 + 90 * S)
    cleared = rules.lag_measured({("oms", "orders.approved"): 3}, T0 + 120 * S)

    assert at_limit == []
    [lagging] = beyond
    assert (lagging.code, lagging.severity, lagging.dedupe_key) == (
        "CONSUMER_LAG",
        AlertSeverity.WARNING,
        "lag:oms:orders.approved:lagging",
    )
    assert lagging.message == (
        "consumer group oms is 101 messages behind on orders.approved (more than 100)"
    )
    assert still == []
    assert unmeasured == []
    [caught_up] = cleared
    assert (caught_up.code, caught_up.severity) == ("CONSUMER_LAG_CLEARED", AlertSeverity.INFO)
    assert caught_up.notification_id == f"ended:oms/orders.approved:{T0 + 30 * S}:lag"


def test_lag_when_group_is_not_in_the_rule_is_ignored() -> None:
    rules = engine(LAG)

    assert rules.lag_measured({("portfolio", "exec.reports"): 10_000}, T0) == []


def test_lag_when_the_rule_gives_a_pattern_covers_every_group_it_matches() -> None:
    rules = engine(
        'rules: [{name: lag, kind: consumer_lag, groups: ["oms*"], max_lag: 10, throttle_s: 0}]'
    )

    out = rules.lag_measured(
        {("oms", "orders.approved"): 11, ("oms.control", "control"): 12, ("risk", "x"): 99}, T0
    )

    assert [n.details["group"] for n in out] == ["oms", "oms.control"]


def test_lag_groups_when_rules_name_groups_are_their_union_sorted() -> None:
    rules = engine(
        "rules: [{name: a, kind: consumer_lag, groups: [risk, oms], max_lag: 1},"
        " {name: b, kind: consumer_lag, groups: [oms, signals], max_lag: 9}]"
    )

    assert rules.lag_groups() == ["oms", "risk", "signals"]
