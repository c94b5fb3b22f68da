"""Settings from QM_* variables: defaults, subclassing, and exit 2 with the bad variable named."""

from __future__ import annotations

import subprocess
import textwrap

import pytest
from pydantic import SecretStr, ValidationError

from quantmesh_common.settings import (
    CONFIG_ERROR_EXIT_CODE,
    ServiceSettings,
    format_validation_error,
    load_settings,
    redact_url,
)

from .conftest import PYTHON, clean_env

# A subclass with a secret, as a service would declare one; run in a child interpreter.
_CHILD = textwrap.dedent(
    """
    from pydantic import SecretStr
    from quantmesh_common.settings import ServiceSettings, load_settings

    class ApiSettings(ServiceSettings):
        http_port: int = 8180
        jwt_secret: SecretStr

    settings = load_settings(ApiSettings)
    print("loaded", settings.http_port, settings.bus)
    """
)


def _run_child(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-c", _CHILD],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class _ApiSettings(ServiceSettings):
    http_port: int = 8180
    jwt_secret: SecretStr


@pytest.mark.usefixtures("no_qm_env")
def test_settings_when_env_set_reads_prefixed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange
    monkeypatch.setenv("QM_BUS", "MEMORY")
    monkeypatch.setenv("QM_HTTP_PORT", "9123")
    monkeypatch.setenv("QM_LOG_LEVEL", "debug")
    monkeypatch.setenv("QM_SHUTDOWN_TIMEOUT_S", "2.5")
    monkeypatch.setenv("QM_REDIS_URL", "")

    # Act
    settings = load_settings(ServiceSettings)

    # Assert
    assert settings.bus == "memory"
    assert settings.http_port == 9123
    assert settings.log_level == "DEBUG"
    assert settings.shutdown_timeout_s == 2.5
    assert settings.redis_url is None  # empty counts as unset
    assert settings.environment == "development"


@pytest.mark.usefixtures("no_qm_env")
def test_subclass_settings_when_port_unset_uses_its_own_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QM_BUS", "memory")
    monkeypatch.setenv("QM_JWT_SECRET", "a-real-secret")

    settings = load_settings(_ApiSettings)

    assert settings.http_port == 8180
    assert settings.jwt_secret.get_secret_value() == "a-real-secret"


def test_load_settings_when_port_not_integer_exits_2_naming_variable() -> None:
    result = _run_child(QM_BUS="memory", QM_JWT_SECRET="s3cr3t-value", QM_HTTP_PORT="abc")

    assert result.returncode == CONFIG_ERROR_EXIT_CODE
    assert result.stderr.strip() == (
        "configuration error: QM_HTTP_PORT='abc' is not a valid integer"
    )
    assert "loaded" not in result.stdout


def test_load_settings_when_kafka_bus_without_bootstrap_exits_2_naming_variable() -> None:
    result = _run_child(QM_BUS="kafka", QM_JWT_SECRET="s3cr3t-value")

    assert result.returncode == CONFIG_ERROR_EXIT_CODE
    assert "QM_KAFKA_BOOTSTRAP is required when QM_BUS=kafka" in result.stderr


def test_load_settings_when_required_secret_missing_exits_2_naming_variable() -> None:
    result = _run_child(QM_BUS="memory")

    assert result.returncode == CONFIG_ERROR_EXIT_CODE
    assert result.stderr.strip() == "configuration error: QM_JWT_SECRET is required"


def test_load_settings_when_several_problems_writes_one_line_each() -> None:
    result = _run_child(
        QM_BUS="carrier-pigeon",
        QM_HTTP_PORT="70000",
        QM_JWT_SECRET="s3cr3t-value",
        QM_DATABASE_URL="mysql://u:p@h/db",
    )

    lines = result.stderr.strip().splitlines()
    assert result.returncode == CONFIG_ERROR_EXIT_CODE
    assert len(lines) == 3
    assert all(line.startswith("configuration error: QM_") for line in lines)
    assert any(line.startswith("configuration error: QM_BUS='carrier-pigeon'") for line in lines)
    # The child redeclares http_port as a plain int: the base's validator still bounds it.
    assert any("QM_HTTP_PORT='70000' must be a TCP port (0-65535)" in li for li in lines)
    assert any("QM_DATABASE_URL='mysql://u:***@h/db' must be a postgresql" in li for li in lines)


def test_load_settings_when_placeholder_secret_in_production_exits_2() -> None:
    result = _run_child(QM_BUS="memory", QM_ENVIRONMENT="production", QM_JWT_SECRET="changeme")

    assert result.returncode == CONFIG_ERROR_EXIT_CODE
    assert "QM_JWT_SECRET='***' holds a placeholder secret" in result.stderr
    assert "changeme" not in result.stderr


def test_load_settings_when_config_valid_child_loads() -> None:
    result = _run_child(QM_BUS="memory", QM_JWT_SECRET="s3cr3t-value")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded 8180 memory"


@pytest.mark.usefixtures("no_qm_env")
def test_settings_when_placeholder_secret_in_development_is_accepted() -> None:
    settings = _ApiSettings(bus="memory", jwt_secret=SecretStr("changeme"))

    assert settings.jwt_secret.get_secret_value() == "changeme"


@pytest.mark.usefixtures("no_qm_env")
def test_settings_when_database_password_is_placeholder_outside_development_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        ServiceSettings(
            bus="memory",
            environment="test",
            database_url="postgresql://qm:changethis@db:5432/qm",
        )

    lines = format_validation_error(ServiceSettings, caught.value)
    assert lines == [
        "configuration error: QM_DATABASE_URL='postgresql://qm:***@db:5432/qm' holds a "
        "placeholder secret; set a real one (refused when QM_ENVIRONMENT=test)"
    ]


@pytest.mark.usefixtures("no_qm_env")
def test_settings_when_bootstrap_malformed_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        ServiceSettings(kafka_bootstrap="localhost")

    assert (
        "QM_KAFKA_BOOTSTRAP='localhost' must be host:port"
        in format_validation_error(ServiceSettings, caught.value)[0]
    )


@pytest.mark.usefixtures("no_qm_env")
def test_settings_when_pool_max_below_min_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        ServiceSettings(bus="memory", db_pool_min_size=5, db_pool_max_size=2)

    assert format_validation_error(ServiceSettings, caught.value) == [
        "configuration error: QM_DB_POOL_MAX_SIZE=2 must be >= QM_DB_POOL_MIN_SIZE (5)"
    ]


@pytest.mark.usefixtures("no_qm_env")
def test_settings_when_port_out_of_range_names_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QM_HTTP_PORT", "-1")

    with pytest.raises(ValidationError) as caught:
        ServiceSettings(bus="memory")

    assert format_validation_error(ServiceSettings, caught.value) == [
        "configuration error: QM_HTTP_PORT='-1' must be greater than or equal to 0"
    ]


def test_redact_url_when_password_present_masks_it_only() -> None:
    assert redact_url("postgresql://qm:hunter2@db:5432/qm") == "postgresql://qm:***@db:5432/qm"
    assert redact_url("redis://cache:6379/0") == "redis://cache:6379/0"


@pytest.mark.usefixtures("no_qm_env")
@pytest.mark.parametrize(
    ("value", "options"),
    [
        (None, {"output_after_batch": True}),
        ("Idempotent", {"output_after_batch": True}),
        ("transactional", {"transactional": True}),
    ],
)
def test_order_flow_delivery_when_set_gives_the_main_subscriptions_options(
    monkeypatch: pytest.MonkeyPatch, value: str | None, options: dict[str, bool]
) -> None:
    # Arrange
    monkeypatch.setenv("QM_BUS", "memory")
    if value is not None:
        monkeypatch.setenv("QM_ORDER_FLOW_DELIVERY", value)

    # Act
    settings = load_settings(ServiceSettings)

    # Assert
    assert settings.order_flow_options() == options


def test_load_settings_when_order_flow_delivery_unknown_exits_2_naming_variable() -> None:
    result = _run_child(
        QM_BUS="memory", QM_JWT_SECRET="s3cr3t-value", QM_ORDER_FLOW_DELIVERY="exactly-once"
    )

    assert result.returncode == CONFIG_ERROR_EXIT_CODE
    assert "QM_ORDER_FLOW_DELIVERY" in result.stderr
    assert "transactional" in result.stderr
