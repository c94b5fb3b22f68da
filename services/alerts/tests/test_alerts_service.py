"""The alerts stage on the in-memory bus: events in, notifications out, throttled; settings."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from quantmesh_alerts.channels import SIGNATURE_HEADER, verify
from quantmesh_alerts.config import AlertsSettings
from quantmesh_alerts.service import DLQ_TOPICS, EVENT_TOPICS, HANDLERS_ISSUE, AlertsService
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.envelope import Envelope, encode
from quantmesh_common.messages import AlertSeverity
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.settings import CONFIG_ERROR_EXIT_CODE, load_settings
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic, dlq, registry

from .conftest import T0, Stage, running, settle

S = stubs.SECOND_NS

RULES = """
rules:
  - {name: denied, kind: order_denied, throttle_s: 60}
  - {name: venue, kind: order_rejected, throttle_s: 0}
  - {name: dd, kind: drawdown, max_drawdown_pct: 10}
  - {name: forward, kind: alert, min_severity: WARNING, throttle_s: 0}
  - {name: dlq, kind: dlq, throttle_s: 0}
"""


@pytest.fixture
async def stage() -> AsyncIterator[Stage]:
    async with running(alert_rules=RULES) as started:
        yield started


# -- declaration ------------------------------------------------------------------------------


def test_declared_topics_are_the_rule_inputs_and_every_dead_letter_topic() -> None:
    dead_letter_topics = [dlq(spec.name) for spec in registry()]

    assert AlertsService.consumes[: len(EVENT_TOPICS)] == (
        Topic.ORDERS_REJECTED,
        Topic.EXEC_REPORTS,
        Topic.PORTFOLIO_SNAPSHOTS,
        Topic.ALERTS,
        Topic.CONTROL,
    )
    assert sorted(DLQ_TOPICS) == sorted(dead_letter_topics)
    assert AlertsService.produces == ()


def test_handlers_issue_when_handlers_exist_is_none() -> None:
    assert HANDLERS_ISSUE is None


# -- events to notifications ------------------------------------------------------------------


async def test_denial_when_published_is_notified_and_stored(stage: Stage) -> None:
    await stage.send(Topic.ORDERS_REJECTED, stubs.risk_rejection())

    [sent] = stage.channel.sent
    assert (sent.rule, sent.code, sent.dedupe_key) == (
        "denied",
        "ORDER_DENIED",
        "denied:acc-1:NOTIONAL_EXCEEDS_MAX_PER_ORDER",
    )
    [stored] = stage.service.history.recent()
    assert stored.notification == sent
    assert stored.outcome == {"log": "sent"}


async def test_denials_when_repeated_in_window_notify_once_then_report_the_count(
    stage: Stage,
) -> None:
    for i in range(3):
        await stage.send(Topic.ORDERS_REJECTED, stubs.risk_rejection(decision_id=f"D-{i}"))
        stage.clock.advance(10)
    stage.clock.advance(40)  # 70 s after the first: its 60 s window is over
    await stage.send(Topic.ORDERS_REJECTED, stubs.risk_rejection(decision_id="D-9"))

    assert [n.suppressed for n in stage.channel.sent] == [0, 2]


async def test_event_when_redelivered_is_notified_once(stage: Stage) -> None:
    envelope = await stage.send(Topic.EXEC_REPORTS, stubs.order_accepted(exec_type="REJECTED"))

    await stage.bus.publish_envelope(Topic.EXEC_REPORTS, envelope)
    await stage.bus.run_until_idle()

    assert [n.code for n in stage.channel.sent] == ["ORDER_REJECTED_BY_VENUE"]


async def test_fill_and_shallow_drawdown_when_published_notify_nothing(stage: Stage) -> None:
    await stage.send(Topic.EXEC_REPORTS, stubs.execution_report())
    await stage.send(Topic.PORTFOLIO_SNAPSHOTS, stubs.portfolio_snapshot())

    assert stage.channel.sent == []


async def test_drawdown_when_beyond_limit_notifies_critical(stage: Stage) -> None:
    await stage.send(Topic.PORTFOLIO_SNAPSHOTS, stubs.portfolio_snapshot(drawdown="0.25"))

    [sent] = stage.channel.sent
    assert (sent.code, sent.severity) == ("DRAWDOWN_EXCEEDED", AlertSeverity.CRITICAL)
    assert sent.details["drawdown_pct"] == "25.00"


async def test_alerts_when_from_other_stages_are_forwarded_and_own_ones_are_not(
    stage: Stage,
) -> None:
    await stage.send(Topic.ALERTS, stubs.alert(alert_id="A-1", source_service="risk"))
    await stage.send(Topic.ALERTS, stubs.alert(alert_id="A-2", source_service="alerts"))
    await stage.send(Topic.ALERTS, stubs.alert(alert_id="A-3", severity=AlertSeverity.INFO))

    assert [(n.code, n.details["source_service"]) for n in stage.channel.sent] == [
        ("ORDER_REJECTED", "risk")
    ]


async def test_handler_failure_elsewhere_when_dead_lettered_is_notified_with_its_topic(
    stage: Stage,
) -> None:
    def broken(_envelope: Envelope[Any]) -> None:
        raise RuntimeError("boom")

    subscription = stage.bus.subscribe("some-stage", [Topic.MD_TICKS], broken)
    await subscription.start()

    await stage.send(Topic.MD_TICKS, stubs.tick())

    # The dead letter's own headers say where it failed, who failed it and why.
    [sent] = stage.channel.sent
    assert sent.code == "DEAD_LETTER"
    assert sent.dedupe_key == "dlq:md.ticks"
    assert sent.details == {
        "topic": "md.ticks",
        "schema": "md.tick",
        "source": "test",
        "error_type": "handler",
        "error": "RuntimeError: boom",
        "dead_lettered_by": "test",
    }
    assert sent.message == (
        "a md.tick message from test was dead-lettered by test (md.ticks.dlq): RuntimeError: boom"
    )


async def test_malformed_bytes_when_dead_lettered_are_notified_although_they_never_decode(
    stage: Stage,
) -> None:
    # Arrange: a consumer of orders.approved, which gets bytes that are not an envelope.
    handled: list[Envelope[Any]] = []
    await stage.bus.subscribe("some-stage", [Topic.ORDERS_APPROVED], handled.append).start()

    # Act
    await stage.bus.publish_raw(Topic.ORDERS_APPROVED, b"{not json", key="acc-1")
    await stage.bus.run_until_idle()

    # Assert
    [sent] = stage.channel.sent
    assert handled == []
    assert sent.code == "DEAD_LETTER"
    assert sent.dedupe_key == "dlq:orders.approved"
    assert sent.details["topic"] == "orders.approved"
    assert sent.details["schema"] == "undecodable"
    assert sent.details["source"] == "unknown"
    assert sent.details["error_type"] == "decode"
    assert sent.details["error"].startswith("DecodeError: ")
    assert sent.details["dead_lettered_by"] == "test"


async def test_record_when_put_on_a_dead_letter_topic_by_hand_is_notified_from_its_envelope(
    stage: Stage,
) -> None:
    # Arrange: a tool (not the bus) writes an envelope straight to a dead-letter topic, with
    # no failure headers: the topic comes from the twin's name, schema and producer from it.
    envelope = Envelope.wrap(stubs.tick(), source="replayer", ts_event=T0, ts_init=T0)

    # Act
    await stage.bus.publish_raw(dlq(Topic.MD_TICKS), encode(envelope))
    await stage.bus.run_until_idle()

    # Assert
    [sent] = stage.channel.sent
    assert sent.details == {
        "topic": "md.ticks",
        "schema": "md.tick",
        "source": "replayer",
        "error_type": "",
        "error": "",
        "dead_lettered_by": "",
    }
    assert sent.instrument_id == stubs.tick().instrument_id


async def test_flush_task_when_window_ends_reports_the_held_back_denials(stage: Stage) -> None:
    await settle()  # the flush loop is now asleep until T0 + 60 s
    await stage.send(Topic.ORDERS_REJECTED, stubs.risk_rejection(decision_id="D-1"))
    stage.clock.advance(5)
    await stage.send(Topic.ORDERS_REJECTED, stubs.risk_rejection(decision_id="D-2"))

    stage.clock.advance(55)
    await settle()

    assert [n.suppressed for n in stage.channel.sent] == [0, 1]
    assert stage.channel.sent[1].message.startswith("1 more since the last notification")


# -- a real channel from the settings ---------------------------------------------------------


async def test_webhook_from_settings_when_denial_arrives_receives_a_signed_post() -> None:
    bodies: list[tuple[bytes, str]] = []

    async def hook(request: web.Request) -> web.Response:
        bodies.append((await request.read(), request.headers[SIGNATURE_HEADER]))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = web.AppRunner(app, access_log=None)
    await server.setup()
    await web.TCPSite(server, "127.0.0.1", 0).start()
    host, port = server.addresses[0][:2]
    settings = AlertsSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        database_url=None,
        alert_rules="rules: [{name: d, kind: order_denied, channels: [log, webhook]}]",
        alert_webhook_url=f"http://{host}:{port}/hook",
        alert_webhook_secret="whsec-test",
    )
    bus = InMemoryBus("test", clock=SimulatedClock(T0))
    service = AlertsService(settings)
    runner = ServiceRunner(service, settings, bus=bus, clock=bus.clock, pump=False)
    await runner.start()
    try:
        await bus.publish(Topic.ORDERS_REJECTED, stubs.risk_rejection())
        await bus.run_until_idle()
    finally:
        await runner.stop()
        await server.cleanup()

    [(body, signature)] = bodies
    assert verify(b"whsec-test", body, signature)
    assert json.loads(body)["code"] == "ORDER_DENIED"
    [stored] = service.history.recent()
    assert stored.outcome == {"log": "sent", "webhook": "sent"}


# -- settings ---------------------------------------------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in (
        "QM_ALERT_RULES",
        "QM_ALERT_RULES_FILE",
        "QM_ALERT_WEBHOOK_URL",
        "QM_ALERT_HEALTH_URLS",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QM_BUS", "memory")
    return monkeypatch


def test_settings_when_rules_file_is_valid_load_its_rules(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - {name: dd, kind: drawdown, max_drawdown_pct: 7.5}\n")
    env.setenv("QM_ALERT_RULES_FILE", str(path))

    settings = load_settings(AlertsSettings)

    assert [r.name for r in settings.rules.rules] == ["dd"]


def test_settings_when_no_rules_are_set_use_the_defaults(env: pytest.MonkeyPatch) -> None:
    settings = load_settings(AlertsSettings)

    assert len(settings.rules.rules) == 8


@pytest.mark.parametrize(
    ("variables", "phrase"),
    [
        ({"QM_ALERT_RULES_FILE": "/nonexistent/rules.yaml"}, "QM_ALERT_RULES_FILE="),
        ({"QM_ALERT_RULES": "rules: [{name: a, kind: drawdown}]"}, "max_drawdown_pct"),
        (
            {"QM_ALERT_RULES": "rules: [{name: a, kind: stale_market_data}]"},
            "QM_ALERT_RULES",
        ),
        (
            {"QM_ALERT_RULES": "rules: [{name: a, kind: dlq, channels: [telegram]}]"},
            "QM_ALERT_RULES send to telegram, not configured",
        ),
        (
            {"QM_ALERT_WEBHOOK_URL": "http://127.0.0.1:9/hook"},
            "QM_ALERT_WEBHOOK_SECRET is required",
        ),
        ({"QM_ALERT_WEBHOOK_URL": "ftp://x/hook"}, "QM_ALERT_WEBHOOK_URL='ftp://x/hook'"),
        ({"QM_ALERT_HEALTH_URLS": "risk"}, "QM_ALERT_HEALTH_URLS"),
        ({"QM_ALERT_HEALTH_URLS": "risk=ftp://x/readyz"}, "risk: must be an http://"),
        (
            {
                "QM_ALERT_HEALTH_URLS": "risk=http://127.0.0.1:8103/readyz",
                "QM_ALERT_RULES": "rules: [{name: up, kind: service_unhealthy, services: [oms]}]",
            },
            "watches oms, which QM_ALERT_HEALTH_URLS does not name",
        ),
        (
            {"QM_ALERT_RULES": "rules: [{name: up, kind: service_unhealthy, failures: 0}]"},
            "failures",
        ),
    ],
)
def test_settings_when_invalid_exit_2_naming_the_variable(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variables: dict[str, str],
    phrase: str,
) -> None:
    for name, value in variables.items():
        env.setenv(name, value)

    with pytest.raises(SystemExit) as exited:
        load_settings(AlertsSettings)

    assert exited.value.code == CONFIG_ERROR_EXIT_CODE
    assert phrase in capsys.readouterr().err


def test_settings_when_rules_file_is_bad_yaml_say_where(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - {name: a, kind: dlq\n")
    env.setenv("QM_ALERT_RULES_FILE", str(path))

    with pytest.raises(SystemExit):
        load_settings(AlertsSettings)

    err = capsys.readouterr().err
    assert f"QM_ALERT_RULES_FILE='{path}' is not valid YAML" in err
    assert "line 3" in err


def test_settings_when_health_urls_are_name_url_pairs_map_each_name_to_its_url(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv(
        "QM_ALERT_HEALTH_URLS", " risk=http://127.0.0.1:8103/readyz , oms=http://h:8104/readyz,"
    )

    settings = load_settings(AlertsSettings)

    assert settings.alert_health_urls == {
        "risk": "http://127.0.0.1:8103/readyz",
        "oms": "http://h:8104/readyz",
    }


def test_settings_when_smtp_to_is_a_list_split_it_on_commas(env: pytest.MonkeyPatch) -> None:
    env.setenv("QM_SMTP_HOST", "127.0.0.1")
    env.setenv("QM_SMTP_FROM", "alerts@quantmesh.test")
    env.setenv("QM_SMTP_TO", "ops@quantmesh.test, risk@quantmesh.test")

    settings = load_settings(AlertsSettings)

    assert settings.smtp_to == ["ops@quantmesh.test", "risk@quantmesh.test"]
    assert settings.configured_channels() == ["log", "email"]


# -- reloading the rules (control RELOAD_CONFIG) ------------------------------------------------

DENIALS_ONLY = "rules: [{name: denied, kind: order_denied, throttle_s: 0}]"
DRAWDOWN_ONLY = "rules: [{name: dd, kind: drawdown, max_drawdown_pct: 10}]"


@pytest.fixture
async def file_stage(tmp_path: Path) -> AsyncIterator[tuple[Stage, Path]]:
    """The stage with its rules in a file (QM_ALERT_RULES_FILE), denials only at first."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(DENIALS_ONLY)
    async with running(alert_rules_file=rules) as started:
        yield started, rules


def _reload(target: str = "alerts", command_id: str = "C-1") -> Any:
    return stubs.control_command(action="RELOAD_CONFIG", target=target, command_id=command_id)


async def test_reload_when_the_file_changed_puts_the_new_rules_in_force(
    file_stage: tuple[Stage, Path],
) -> None:
    stage, rules = file_stage
    rules.write_text(DRAWDOWN_ONLY)

    await stage.send(Topic.CONTROL, _reload())
    await stage.send(Topic.ORDERS_REJECTED, stubs.risk_rejection(decision_id="D-1"))
    await stage.send(Topic.PORTFOLIO_SNAPSHOTS, stubs.portfolio_snapshot(drawdown="0.25"))

    assert [n.rule for n in stage.channel.sent] == ["dd"]  # no denial rule any more


async def test_reload_when_the_new_file_is_invalid_keeps_the_rules_in_force(
    file_stage: tuple[Stage, Path], caplog: pytest.LogCaptureFixture
) -> None:
    stage, rules = file_stage
    rules.write_text("rules: [{name: dd, kind: drawdown}]")  # max_drawdown_pct missing

    await stage.send(Topic.CONTROL, _reload())
    await stage.send(Topic.ORDERS_REJECTED, stubs.risk_rejection(decision_id="D-1"))

    assert [n.rule for n in stage.channel.sent] == ["denied"]
    assert "alert rules not reloaded" in caplog.text
    assert "max_drawdown_pct" in caplog.text


async def test_reload_when_a_new_rule_needs_a_watcher_not_started_keeps_the_rules(
    file_stage: tuple[Stage, Path], caplog: pytest.LogCaptureFixture
) -> None:
    stage, rules = file_stage
    rules.write_text("rules: [{name: stale, kind: stale_market_data, max_age_s: 5}]")

    await stage.send(Topic.CONTROL, _reload())
    await stage.send(Topic.ORDERS_REJECTED, stubs.risk_rejection(decision_id="D-1"))

    assert [n.rule for n in stage.channel.sent] == ["denied"]
    assert "stale_market_data rules need a watcher" in caplog.text


async def test_reload_when_meant_for_another_stage_changes_nothing(
    file_stage: tuple[Stage, Path],
) -> None:
    stage, rules = file_stage
    rules.write_text(DRAWDOWN_ONLY)

    await stage.send(Topic.CONTROL, _reload(target="risk"))
    await stage.send(Topic.ORDERS_REJECTED, stubs.risk_rejection(decision_id="D-1"))

    assert [n.rule for n in stage.channel.sent] == ["denied"]


async def test_reload_when_a_rule_is_unchanged_keeps_its_throttle_window(
    file_stage: tuple[Stage, Path],
) -> None:
    stage, rules = file_stage
    rules.write_text(
        "rules: [{name: denied, kind: order_denied, throttle_s: 60},"
        " {name: dd, kind: drawdown, max_drawdown_pct: 10}]"
    )
    await stage.send(Topic.CONTROL, _reload(command_id="C-1"))
    await stage.send(Topic.ORDERS_REJECTED, stubs.risk_rejection(decision_id="D-1"))

    await stage.send(Topic.CONTROL, _reload(command_id="C-2"))  # the same file again
    await stage.send(Topic.ORDERS_REJECTED, stubs.risk_rejection(decision_id="D-2"))

    # the second denial falls in the first one's 60 s window, which the reload kept
    assert [n.rule for n in stage.channel.sent] == ["denied"]
