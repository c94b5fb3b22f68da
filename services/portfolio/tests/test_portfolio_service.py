"""Tests of the portfolio skeleton: declared topics, settings from the env, start and stop."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from quantmesh_common.runtime import ComponentState, ServiceRunner
from quantmesh_common.settings import CONFIG_ERROR_EXIT_CODE, load_settings
from quantmesh_common.topics import Topic, registry
from quantmesh_portfolio import __main__ as entry
from quantmesh_portfolio.config import DEFAULT_HTTP_PORT, PortfolioSettings
from quantmesh_portfolio.service import HANDLERS_ISSUE, PortfolioService


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment with no stray QM_* variables, on the in-memory bus."""
    for var in (
        "QM_HTTP_PORT",
        "QM_HTTP_HOST",
        "QM_DATABASE_URL",
        "QM_REDIS_URL",
        "QM_SERVICE_NAME",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QM_BUS", "memory")
    return monkeypatch


def test_declared_topics_when_checked_are_registered_and_match_the_design() -> None:
    # Arrange
    topics = registry()

    # Act
    unknown = [
        t for t in (*PortfolioService.consumes, *PortfolioService.produces) if t not in topics
    ]

    # Assert
    assert unknown == []
    assert PortfolioService.consumes == (
        Topic.EXEC_REPORTS,
        Topic.MD_TICKS,
        Topic.MD_BARS,
        Topic.CONTROL,
    )
    assert PortfolioService.produces == (Topic.PORTFOLIO_UPDATES, Topic.PORTFOLIO_SNAPSHOTS)
    assert not set(PortfolioService.consumes) & set(PortfolioService.produces), (
        "a stage must not consume its own output"
    )


def test_service_class_when_inspected_names_the_stage_and_its_settings() -> None:
    # Arrange / Act
    service_cls = PortfolioService

    # Assert
    assert service_cls.name == "portfolio"
    assert service_cls.settings_class is PortfolioSettings
    assert DEFAULT_HTTP_PORT == 8106
    assert HANDLERS_ISSUE == 4


def test_settings_when_env_is_empty_use_the_stage_port(clean_env: pytest.MonkeyPatch) -> None:
    # Arrange (clean_env)

    # Act
    settings = load_settings(PortfolioSettings)

    # Assert
    assert settings.http_port == 8106
    assert settings.bus == "memory"


def test_settings_when_env_sets_port_and_bootstrap_read_them(
    clean_env: pytest.MonkeyPatch,
) -> None:
    # Arrange
    clean_env.setenv("QM_BUS", "kafka")
    clean_env.setenv("QM_KAFKA_BOOTSTRAP", "broker-1:9092,broker-2:9092")
    clean_env.setenv("QM_HTTP_PORT", "18106")

    # Act
    settings = load_settings(PortfolioSettings)

    # Assert
    assert settings.http_port == 18106
    assert settings.kafka_bootstrap == "broker-1:9092,broker-2:9092"


@pytest.mark.parametrize(
    ("value", "phrase"),
    [("not-a-port", "is not a valid integer"), ("70000", "less than or equal to 65535")],
)
def test_settings_when_port_is_bad_exit_2_naming_the_variable(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str, phrase: str
) -> None:
    # Arrange
    clean_env.setenv("QM_HTTP_PORT", value)

    # Act
    with pytest.raises(SystemExit) as exited:
        load_settings(PortfolioSettings)

    # Assert
    assert exited.value.code == CONFIG_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert f"QM_HTTP_PORT={value!r}" in err
    assert phrase in err


def test_console_script_when_port_is_bad_exits_2_naming_the_variable(
    clean_env: pytest.MonkeyPatch,
) -> None:
    # Arrange
    script = Path(sys.executable).parent / "quantmesh-portfolio"
    clean_env.setenv("QM_HTTP_PORT", "eighty")

    # Act
    result = subprocess.run([str(script)], capture_output=True, text=True, timeout=60, check=False)

    # Assert
    assert result.returncode == CONFIG_ERROR_EXIT_CODE
    assert "QM_HTTP_PORT='eighty' is not a valid integer" in result.stderr
    (ep,) = entry_points(group="console_scripts", name="quantmesh-portfolio")
    assert ep.load() is entry.main


async def test_service_when_started_on_memory_bus_subscribes_nothing_and_answers_healthz(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Arrange
    settings = PortfolioSettings(
        bus="memory", http_host="127.0.0.1", http_port=0, database_url=None, redis_url=None
    )
    runner = ServiceRunner(PortfolioService(settings), settings)
    caplog.set_level(logging.WARNING, logger="quantmesh.portfolio")

    # Act
    await runner.start()
    try:
        url = f"http://127.0.0.1:{runner.health.port}/healthz"
        status = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).status)
        state = runner.state
        subscriptions = list(runner.ctx.subscriptions) if runner.ctx else None
    finally:
        stopped_cleanly = await runner.stop()

    # Assert
    assert state is ComponentState.RUNNING
    assert subscriptions == []
    assert status == 200
    assert stopped_cleanly
    assert "portfolio has no handlers yet (issue 4)" in caplog.text
