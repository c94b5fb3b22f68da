"""Helm chart checks: values cover every stage; with helm: lint, render, schema validation."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import KUBE_VERSION, find_tool, parse, run_tool, schema_errors

RELEASE = "qm"
KUBE = ["--kube-version", KUBE_VERSION]


@pytest.fixture(scope="module")
def helm() -> str:
    path = find_tool("helm")
    if path is None:
        pytest.skip(
            "no helm binary: set QM_HELM, put helm on PATH, or run tools/get-helm.sh "
            "(builds helm v3.19.0 into ~/.cache/quantmesh/bin)"
        )
    return path


def _template(helm: str, chart_dir: Path, *args: str) -> list[dict[str, Any]]:
    return parse(run_tool([helm, "template", RELEASE, str(chart_dir), *KUBE, *args]))


@pytest.fixture(scope="module")
def rendered(helm: str, chart_dir: Path) -> list[dict[str, Any]]:
    return _template(helm, chart_dir, "--namespace", "quantmesh")


@pytest.fixture(scope="module")
def rendered_all_features(helm: str, chart_dir: Path) -> list[dict[str, Any]]:
    return _template(helm, chart_dir, "-f", str(chart_dir / "ci" / "all-features-values.yaml"))


@pytest.fixture(scope="module")
def rendered_keda(helm: str, chart_dir: Path) -> list[dict[str, Any]]:
    return _template(helm, chart_dir, "-f", str(chart_dir / "ci" / "keda-values.yaml"))


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {
        doc["metadata"]["labels"]["app.kubernetes.io/component"]: doc
        for doc in docs
        if doc["kind"] == kind
    }


def test_values_when_parsed_have_one_block_per_stage_on_its_port(
    chart_values: dict[str, Any], stage: str, stage_port: Callable[[str], int]
) -> None:
    # Arrange
    services = chart_values["services"]

    # Act
    block = services.get(stage)

    # Assert
    assert block is not None, f"stage {stage} has no block under services: in values.yaml"
    assert block["port"] == stage_port(stage)
    assert block["create"] is True
    assert block["replicas"] >= 1
    assert {"requests", "limits"} <= set(block["resources"])


def test_values_when_parsed_name_no_stage_without_a_folder(
    chart_values: dict[str, Any], stages: list[str]
) -> None:
    # Arrange
    declared = set(chart_values["services"])

    # Act
    orphans = declared - set(stages)

    # Assert
    assert orphans == set()


def test_helm_lint_when_run_strict_passes(helm: str, chart_dir: Path) -> None:
    # Arrange
    command = [helm, "lint", "--strict", str(chart_dir), *KUBE]

    # Act
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("variant", ["rendered", "rendered_all_features", "rendered_keda"])
def test_helm_template_when_rendered_validates_against_kubernetes_schemas(
    variant: str, request: pytest.FixtureRequest
) -> None:
    # Arrange
    docs: list[dict[str, Any]] = request.getfixturevalue(variant)

    # Act
    errors = schema_errors(docs)

    # Assert
    assert docs
    assert errors == []


def test_helm_template_when_rendered_has_a_deployment_and_service_per_stage(
    rendered: list[dict[str, Any]], stages: list[str]
) -> None:
    # Arrange / Act
    deployments = _by_kind(rendered, "Deployment")
    services = _by_kind(rendered, "Service")

    # Assert
    assert sorted(deployments) == stages
    assert sorted(services) == stages
    assert {doc["kind"] for doc in rendered} == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "Job",
    }


def test_helm_deployment_when_rendered_probes_health_as_non_root_on_its_port(
    rendered: list[dict[str, Any]],
    stage: str,
    stage_port: Callable[[str], int],
    chart_values: dict[str, Any],
) -> None:
    # Arrange
    deployment = _by_kind(rendered, "Deployment")[stage]
    pod = deployment["spec"]["template"]["spec"]

    # Act
    (container,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}

    # Assert
    assert container["image"].endswith(f"/quantmesh-{stage}:0.1.0")
    extra = chart_values["services"][stage].get("extraPorts", [])
    assert container["ports"] == [
        {"name": "http", "containerPort": stage_port(stage), "protocol": "TCP"},
        *({"name": p["name"], "containerPort": p["port"], "protocol": "TCP"} for p in extra),
    ]
    assert env["QM_HTTP_PORT"] == str(stage_port(stage))
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= (pod_labels := deployment["spec"]["template"]["metadata"]["labels"]).items()
    ), pod_labels


def test_helm_service_when_rendered_selects_its_stage_pods_on_http(
    rendered: list[dict[str, Any]],
    stage: str,
    stage_port: Callable[[str], int],
    chart_values: dict[str, Any],
) -> None:
    # Arrange
    service = _by_kind(rendered, "Service")[stage]
    deployment = _by_kind(rendered, "Deployment")[stage]

    # Act
    selector = service["spec"]["selector"]

    # Assert
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    extra = chart_values["services"][stage].get("extraPorts", [])
    assert service["spec"]["ports"] == [
        {"name": "http", "port": stage_port(stage), "targetPort": "http", "protocol": "TCP"},
        *(
            {"name": p["name"], "port": p["port"], "targetPort": p["name"], "protocol": "TCP"}
            for p in extra
        ),
    ]


def test_helm_template_when_a_stage_is_disabled_omits_it(helm: str, chart_dir: Path) -> None:
    # Arrange
    command = [
        helm, "template", RELEASE, str(chart_dir), *KUBE,
        "--set", "services.alerts.create=false",
    ]  # fmt: skip

    # Act
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    # Assert
    components = {doc["metadata"]["labels"]["app.kubernetes.io/component"] for doc in docs}
    assert "alerts" not in components
    assert "risk" in components


def test_helm_template_when_database_secret_set_reads_url_from_it(
    helm: str, chart_dir: Path
) -> None:
    # Arrange
    command = [
        helm, "template", RELEASE, str(chart_dir), *KUBE,
        "--set", "connections.databaseUrlSecret.name=qm-db",
    ]  # fmt: skip

    # Act
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    # Assert
    for doc in (d for d in docs if d["kind"] == "Deployment"):
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        env = {item["name"]: item for item in container["env"]}
        assert env["QM_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "qm-db",
            "key": "database-url",
        }


def test_helm_pdb_when_rendered_selects_its_stage_and_allows_one_down(
    rendered: list[dict[str, Any]], stage: str
) -> None:
    # Arrange
    pdb = _by_kind(rendered, "PodDisruptionBudget")[stage]
    deployment = _by_kind(rendered, "Deployment")[stage]

    # Act
    selector = pdb["spec"]["selector"]["matchLabels"]

    # Assert
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1


def test_helm_migrations_when_rendered_run_before_install_with_the_database_secret(
    rendered: list[dict[str, Any]],
) -> None:
    # Arrange
    (job,) = (doc for doc in rendered if doc["kind"] == "Job")

    # Act
    annotations = job["metadata"]["annotations"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}

    # Assert
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert container["command"] == ["quantmesh-migrate"]
    assert env["QM_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "quantmesh-database"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_helm_template_when_migrations_lack_a_database_secret_fails_with_the_reason(
    helm: str, chart_dir: Path
) -> None:
    # Arrange
    command = [
        helm, "template", RELEASE, str(chart_dir), *KUBE,
        "--set", "connections.databaseUrlSecret.name=",
    ]  # fmt: skip

    # Act
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)

    # Assert
    assert result.returncode != 0
    assert "connections.databaseUrlSecret.name" in result.stderr


def test_helm_all_features_when_rendered_add_monitors_policies_and_hpas(
    rendered_all_features: list[dict[str, Any]], stages: list[str]
) -> None:
    # Arrange
    docs = rendered_all_features

    # Act
    monitors = _by_kind(docs, "ServiceMonitor")
    policies = _by_kind(docs, "NetworkPolicy")
    hpas = _by_kind(docs, "HorizontalPodAutoscaler")
    deployments = _by_kind(docs, "Deployment")

    # Assert
    assert sorted(monitors) == stages
    assert monitors["oms"]["spec"]["endpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    ]
    assert monitors["oms"]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sorted(policies) == stages
    assert sorted(hpas) == ["api", "risk"]
    assert hpas["api"]["spec"]["minReplicas"] == 2
    # The HPA owns the replica count of an autoscaled stage; the others keep theirs.
    assert "replicas" not in deployments["api"]["spec"]
    assert deployments["oms"]["spec"]["replicas"] == 1


def test_helm_network_policy_when_enabled_opens_only_the_api_to_everyone(
    rendered_all_features: list[dict[str, Any]],
) -> None:
    # Arrange
    policies = _by_kind(rendered_all_features, "NetworkPolicy")

    # Act
    api_rules = policies["api"]["spec"]["ingress"]
    oms_rules = policies["oms"]["spec"]["ingress"]

    # Assert
    assert len(oms_rules) == 1
    assert oms_rules[0]["from"][0] == {
        "podSelector": {"matchLabels": {"app.kubernetes.io/instance": RELEASE}}
    }
    # Everyone may reach the api's REST port; its health port only the release and Prometheus.
    assert {"ports": [{"port": "api", "protocol": "TCP"}]} in api_rules


def test_helm_secret_env_when_set_reads_each_variable_from_its_secret(
    rendered_all_features: list[dict[str, Any]], stage: str
) -> None:
    # Arrange
    deployment = _by_kind(rendered_all_features, "Deployment")[stage]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]

    # Act
    env = {item["name"]: item for item in container["env"]}

    # Assert
    assert env["QM_API_JWT_SECRET"] == {
        "name": "QM_API_JWT_SECRET",
        "valueFrom": {"secretKeyRef": {"name": "quantmesh-api", "key": "jwt-secret"}},
    }


def test_helm_external_secret_when_enabled_syncs_into_the_named_secret(
    rendered_all_features: list[dict[str, Any]],
) -> None:
    # Arrange / Act
    (external,) = (doc for doc in rendered_all_features if doc["kind"] == "ExternalSecret")

    # Assert
    assert external["spec"]["target"] == {"name": "quantmesh-database", "creationPolicy": "Owner"}
    assert external["spec"]["data"][0]["remoteRef"] == {
        "key": "quantmesh/postgres",
        "property": "url",
    }


def test_helm_keda_when_enabled_scales_on_the_stage_consumer_group_lag(
    rendered_keda: list[dict[str, Any]], chart_values: dict[str, Any]
) -> None:
    # Arrange
    scaled = _by_kind(rendered_keda, "ScaledObject")

    # Act
    oms_triggers = {t["type"]: t for t in scaled["oms"]["spec"]["triggers"]}

    # Assert
    assert sorted(scaled) == ["api", "oms", "signals"]
    assert [t["type"] for t in scaled["api"]["spec"]["triggers"]] == ["cpu"]
    assert _by_kind(rendered_keda, "HorizontalPodAutoscaler") == {}
    assert oms_triggers["kafka"]["metadata"]["consumerGroup"] == "oms"
    assert oms_triggers["kafka"]["metadata"]["lagThreshold"] == str(
        chart_values["services"]["oms"]["autoscaling"]["lagThreshold"]
    )
    assert oms_triggers["cpu"]["metadata"]["value"] == "75"
    assert scaled["oms"]["spec"]["scaleTargetRef"] == {"name": f"{RELEASE}-oms"}


def test_helm_template_when_min_replicas_exceed_max_fails_naming_the_stage(
    helm: str, chart_dir: Path
) -> None:
    # Arrange
    command = [
        helm, "template", RELEASE, str(chart_dir), *KUBE,
        "--set", "services.risk.autoscaling.enabled=true",
        "--set", "services.risk.autoscaling.minReplicas=5",
        "--set", "services.risk.autoscaling.maxReplicas=2",
    ]  # fmt: skip

    # Act
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)

    # Assert
    assert result.returncode != 0
    assert "services.risk.autoscaling: minReplicas 5 exceeds maxReplicas 2" in result.stderr
