"""Static checks of docker-compose.yml: builds, dependencies, stage coverage and healthchecks."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

INFRA = ("kafka", "timescaledb", "redis")
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = compose["services"]
    assert isinstance(services, dict)
    return services


def _built(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in _services(compose).items() if "build" in svc}


def _depends(svc: dict[str, Any]) -> dict[str, dict[str, str]]:
    deps = svc.get("depends_on", {})
    # The short form is a list of names; normalise it to the long form.
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    assert isinstance(deps, dict)
    return deps


def test_compose_builds_when_parsed_context_and_dockerfile_exist(
    compose: dict[str, Any], repo_root: Path
) -> None:
    # Arrange
    built = _built(compose)

    # Act
    missing = []
    for name, svc in built.items():
        context = repo_root / svc["build"]["context"]
        dockerfile = context / svc["build"].get("dockerfile", "Dockerfile")
        if not context.is_dir() or not dockerfile.is_file():
            missing.append(f"{name}: {dockerfile}")

    # Assert
    assert built, "no service builds an image"
    assert missing == []


def test_compose_builds_when_parsed_service_arg_names_a_stage_folder(
    compose: dict[str, Any], repo_root: Path
) -> None:
    # Arrange
    built = _built(compose)

    # Act
    args = {name: svc["build"].get("args", {}).get("SERVICE") for name, svc in built.items()}

    # Assert
    bad = {
        name: arg
        for name, arg in args.items()
        if not arg or not (repo_root / "services" / arg / "pyproject.toml").is_file()
    }
    assert bad == {}


def test_compose_depends_on_when_parsed_targets_exist_with_valid_conditions(
    compose: dict[str, Any],
) -> None:
    # Arrange
    services = _services(compose)

    # Act
    problems = []
    for name, svc in services.items():
        for target, spec in _depends(svc).items():
            condition = spec.get("condition", "service_started")
            if target not in services:
                problems.append(f"{name} -> {target}: no such service")
            elif condition not in DEPENDS_CONDITIONS:
                problems.append(f"{name} -> {target}: unknown condition {condition}")
            elif condition == "service_healthy" and "test" not in services[target].get(
                "healthcheck", {}
            ):
                problems.append(f"{name} -> {target}: waits for health it never reports")

    # Assert
    assert problems == []


def test_compose_mesh_when_parsed_runs_every_stage_on_its_port_without_a_profile(
    compose: dict[str, Any], stage: str, stage_port: Callable[[str], int]
) -> None:
    # Arrange
    services = _services(compose)
    port = stage_port(stage)

    # Act
    svc = services.get(stage)

    # Assert
    assert svc is not None, f"stage {stage} is missing from docker-compose.yml"
    assert svc["build"]["args"]["SERVICE"] == stage
    assert "profiles" not in svc, "`docker compose up` must start the whole mesh"
    assert f"127.0.0.1:{port}:{port}" in svc["ports"]
    assert "test" in svc["healthcheck"]
    assert _depends(svc)["topics-init"]["condition"] == "service_completed_successfully"
    for infra in INFRA:
        assert _depends(svc)[infra]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", INFRA)
def test_compose_infrastructure_when_parsed_has_a_healthcheck(
    compose: dict[str, Any], name: str
) -> None:
    # Arrange
    svc = _services(compose)[name]

    # Act
    healthcheck = svc.get("healthcheck", {})

    # Assert
    assert not healthcheck.get("disable", False)
    assert healthcheck.get("test"), f"{name} has no healthcheck test"
    assert "profiles" not in svc, f"{name} must start without a profile"


def test_compose_kafka_when_parsed_is_single_node_kraft_4_1_1_without_auto_create(
    compose: dict[str, Any],
) -> None:
    # Arrange
    kafka = _services(compose)["kafka"]

    # Act
    env = kafka["environment"]

    # Assert
    assert kafka["image"] == "apache/kafka:4.1.1"
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == 1
    assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == 1
    listeners = {item.split("://")[0] for item in env["KAFKA_LISTENERS"].split(",")}
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in listeners


def test_compose_topics_init_when_parsed_runs_declared_commands_after_infra(
    compose: dict[str, Any], repo_root: Path
) -> None:
    # Arrange
    init = _services(compose)["topics-init"]
    with (repo_root / "libs" / "common" / "pyproject.toml").open("rb") as fh:
        scripts = tomllib.load(fh)["project"]["scripts"]

    # Act
    command = " ".join(init["entrypoint"])

    # Assert
    assert "quantmesh-topics create" in command
    assert "quantmesh-migrate" in command
    assert {"quantmesh-topics", "quantmesh-migrate"} <= set(scripts)
    assert _depends(init)["kafka"]["condition"] == "service_healthy"
    assert _depends(init)["timescaledb"]["condition"] == "service_healthy"
    assert init["environment"]["QM_KAFKA_BOOTSTRAP"] == "kafka:9092"


def _bind_mounts(svc: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of each bind mount (named volumes left out)."""
    mounts = []
    for item in svc.get("volumes", []):
        host, container = item.split(":")[:2]
        if host.startswith((".", "/")):
            mounts.append((host, container))
    return mounts


def test_compose_bind_mounts_when_parsed_name_files_in_the_repository(
    compose: dict[str, Any], repo_root: Path
) -> None:
    # Arrange
    mounts = [
        (name, host) for name, svc in _services(compose).items() for host, _ in _bind_mounts(svc)
    ]

    # Act
    missing = [(name, host) for name, host in mounts if not (repo_root / host).exists()]

    # Assert
    assert mounts
    assert missing == []


def test_compose_observability_when_parsed_wires_traces_metrics_and_dashboards(
    compose: dict[str, Any], repo_root: Path
) -> None:
    # Arrange
    services = _services(compose)
    with (
        repo_root / "deploy" / "grafana" / "provisioning" / "dashboards" / "quantmesh.yml"
    ).open() as fh:
        provider_path = yaml.safe_load(fh)["providers"][0]["options"]["path"]
    with (repo_root / "deploy" / "otel" / "collector.yaml").open() as fh:
        collector = yaml.safe_load(fh)

    # Act
    grafana_mounts = dict(_bind_mounts(services["grafana"]))
    prometheus_mounts = dict(_bind_mounts(services["prometheus"]))
    otlp_http = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]

    # Assert: every stage sends traces to the collector's OTLP/HTTP port ...
    for stage in (
        name
        for name, svc in services.items()
        if svc.get("build", {}).get("args", {}).get("SERVICE")
    ):
        endpoint = services[stage]["environment"]["QM_OTLP_ENDPOINT"]
        assert endpoint == f"http://otel-collector:{otlp_http.rsplit(':', 1)[1]}", stage
    # ... the collector forwards them to Jaeger, through components it declares ...
    (pipeline,) = collector["service"]["pipelines"].values()
    for kind in ("receivers", "processors", "exporters"):
        assert set(pipeline[kind]) <= set(collector[kind]), kind
    assert collector["exporters"]["otlp/jaeger"]["endpoint"].startswith("jaeger:")
    # ... Prometheus loads the compose scrape config and the rules ...
    assert (
        prometheus_mounts["./deploy/prometheus/prometheus.compose.yml"]
        == "/etc/prometheus/prometheus.yml"
    )
    assert prometheus_mounts["./deploy/prometheus/rules"] == "/etc/prometheus/rules"
    # ... and Grafana finds the dashboards where its provider looks.
    assert grafana_mounts["./deploy/grafana/dashboards"] == provider_path
    assert grafana_mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert services["grafana"]["environment"]["QM_PROMETHEUS_URL"] == "http://prometheus:9090"


def test_compose_prometheus_config_when_parsed_scrapes_every_stage_by_service_name(
    repo_root: Path, stages: list[str], stage_port: Callable[[str], int]
) -> None:
    # Arrange
    with (repo_root / "deploy" / "prometheus" / "prometheus.compose.yml").open() as fh:
        config = yaml.safe_load(fh)

    # Act
    (job,) = config["scrape_configs"]
    targets = {static["labels"]["stage"]: static["targets"] for static in job["static_configs"]}

    # Assert
    assert job["job_name"] == "quantmesh"
    assert targets == {stage: [f"{stage}:{stage_port(stage)}"] for stage in stages}
