"""What every stage package must do, checked once per folder under services/.

A stage is `quantmesh_<name>` with `config.py` (its Settings and DEFAULT_HTTP_PORT),
`service.py` (one Service subclass declaring `consumes` and `produces`) and a console script
`quantmesh-<name>`. Stage-specific expectations live in each service's own tests.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

import pytest

from quantmesh_common.launcher import SERVICES
from quantmesh_common.runtime import ComponentState, Service, ServiceRunner
from quantmesh_common.settings import CONFIG_ERROR_EXIT_CODE, ServiceSettings, load_settings
from quantmesh_common.topics import registry

ROOT = Path(__file__).resolve().parents[2]
STAGES = sorted(p.parent.name for p in (ROOT / "services").glob("*/pyproject.toml"))


@dataclass(frozen=True)
class Stage:
    """One stage package, loaded."""

    name: str
    config: ModuleType
    service_cls: type[Service[ServiceSettings]]
    settings_cls: type[ServiceSettings]


def _load(name: str) -> Stage:
    config = importlib.import_module(f"quantmesh_{name}.config")
    module = importlib.import_module(f"quantmesh_{name}.service")
    [service_cls] = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, Service) and obj.__module__ == module.__name__
    ]
    return Stage(name, config, service_cls, service_cls.settings_class)


@pytest.fixture(params=STAGES)
def stage(request: pytest.FixtureRequest) -> Stage:
    """Each stage in turn."""
    return _load(str(request.param))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No stray QM_* variables; the in-memory bus."""
    for var in ("QM_HTTP_PORT", "QM_HTTP_HOST", "QM_DATABASE_URL", "QM_REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("QM_SERVICE_NAME", raising=False)
    monkeypatch.setenv("QM_BUS", "memory")
    return monkeypatch


def test_every_stage_of_the_design_has_a_package() -> None:
    assert set(STAGES) == set(SERVICES)


def test_stage_when_loaded_names_itself_and_its_settings(stage: Stage) -> None:
    assert stage.service_cls.name == stage.name
    assert issubclass(stage.settings_cls, ServiceSettings)
    assert SERVICES[stage.name] == stage.config.DEFAULT_HTTP_PORT


def test_declared_topics_are_registered_and_never_its_own_output(stage: Stage) -> None:
    declared = (*stage.service_cls.consumes, *stage.service_cls.produces)

    unknown = [topic for topic in declared if topic not in registry()]

    assert unknown == []
    assert not set(stage.service_cls.consumes) & set(stage.service_cls.produces)


def test_settings_when_env_is_empty_use_the_stage_port(
    stage: Stage, clean_env: pytest.MonkeyPatch
) -> None:
    settings = load_settings(stage.settings_cls)

    assert settings.http_port == SERVICES[stage.name]
    assert settings.bus == "memory"


def test_settings_when_env_sets_port_and_bootstrap_read_them(
    stage: Stage, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("QM_BUS", "kafka")
    clean_env.setenv("QM_KAFKA_BOOTSTRAP", "broker-1:9092,broker-2:9092")
    clean_env.setenv("QM_HTTP_PORT", "18100")

    settings = load_settings(stage.settings_cls)

    assert settings.http_port == 18100
    assert settings.kafka_bootstrap == "broker-1:9092,broker-2:9092"


@pytest.mark.parametrize(
    ("value", "phrase"),
    [("not-a-port", "is not a valid integer"), ("70000", "less than or equal to 65535")],
)
def test_settings_when_port_is_bad_exit_2_naming_the_variable(
    stage: Stage,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    value: str,
    phrase: str,
) -> None:
    clean_env.setenv("QM_HTTP_PORT", value)

    with pytest.raises(SystemExit) as exited:
        load_settings(stage.settings_cls)

    assert exited.value.code == CONFIG_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert f"QM_HTTP_PORT={value!r}" in err
    assert phrase in err


def test_console_script_when_port_is_bad_exits_2_naming_the_variable(
    stage: Stage, clean_env: pytest.MonkeyPatch
) -> None:
    script = Path(sys.executable).parent / f"quantmesh-{stage.name}"
    clean_env.setenv("QM_HTTP_PORT", "eighty")

    result = subprocess.run([str(script)], capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == CONFIG_ERROR_EXIT_CODE
    assert "QM_HTTP_PORT='eighty' is not a valid integer" in result.stderr
    (ep,) = entry_points(group="console_scripts", name=f"quantmesh-{stage.name}")
    assert ep.load() is importlib.import_module(f"quantmesh_{stage.name}.__main__").main


async def test_stage_on_memory_bus_starts_answers_healthz_and_subscribes_iff_it_has_handlers(
    stage: Stage, caplog: pytest.LogCaptureFixture
) -> None:
    settings = stage.settings_cls(
        bus="memory", http_host="127.0.0.1", http_port=0, database_url=None, redis_url=None
    )
    runner = ServiceRunner(stage.service_cls(settings), settings)
    caplog.set_level(logging.WARNING, logger=f"quantmesh.{stage.name}")

    await runner.start()
    try:
        url = f"http://127.0.0.1:{runner.health.port}/healthz"
        status = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).status)
        state = runner.state
        subscriptions = list(runner.ctx.subscriptions) if runner.ctx else None
    finally:
        stopped_cleanly = await runner.stop()

    assert state is ComponentState.RUNNING
    assert status == 200
    assert stopped_cleanly
    handlers_issue = importlib.import_module(f"quantmesh_{stage.name}.service").HANDLERS_ISSUE
    if handlers_issue is None:  # the stage has its handlers
        assert subscriptions
    else:  # a skeleton must say so, and consume nothing
        assert subscriptions == []
        assert f"{stage.name} has no handlers yet" in caplog.text
