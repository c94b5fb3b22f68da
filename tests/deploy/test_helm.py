"""Helm chart checks: values cover every stage; with helm: lint, render, schema validation."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

HELM_CACHE = Path.home() / ".cache" / "quantmesh" / "bin" / "helm"
RELEASE = "qm"
# Render for, and validate against, one Kubernetes version, whatever helm binary is used.
KUBE_VERSION = "1.34.0"
KUBE = ["--kube-version", KUBE_VERSION]


def _find_helm() -> str | None:
    """$QM_HELM, else helm on PATH, else the binary tools/get-helm.sh builds."""
    explicit = os.environ.get("QM_HELM")
    if explicit:
        return explicit
    on_path = shutil.which("helm")
    if on_path:
        return on_path
    return str(HELM_CACHE) if HELM_CACHE.is_file() and os.access(HELM_CACHE, os.X_OK) else None


@pytest.fixture(scope="module")
def helm() -> str:
    path = _find_helm()
    if path is None:
        pytest.skip(
            "no helm binary: set QM_HELM, put helm on PATH, or run tools/get-helm.sh "
            f"(builds helm v3.19.0 into {HELM_CACHE})"
        )
    return path


@pytest.fixture(scope="module")
def rendered(helm: str, chart_dir: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [helm, "template", RELEASE, str(chart_dir), "--namespace", "quantmesh", *KUBE],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


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


def test_helm_template_when_rendered_validates_against_kubernetes_schemas(
    rendered: list[dict[str, Any]],
) -> None:
    # Arrange
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (it belongs in the root dev group)",
    )

    # Act
    errors = []
    for doc in rendered:
        try:
            kv.validate(doc, KUBE_VERSION, strict=True)
        except kv.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")

    # Assert
    assert rendered
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
    assert {doc["kind"] for doc in rendered} == {"Deployment", "Service"}


def test_helm_deployment_when_rendered_probes_health_as_non_root_on_its_port(
    rendered: list[dict[str, Any]], stage: str, stage_port: Callable[[str], int]
) -> None:
    # Arrange
    deployment = _by_kind(rendered, "Deployment")[stage]
    pod = deployment["spec"]["template"]["spec"]

    # Act
    (container,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}

    # Assert
    assert container["image"].endswith(f"/quantmesh-{stage}:0.1.0")
    assert container["ports"] == [
        {"name": "http", "containerPort": stage_port(stage), "protocol": "TCP"}
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
    rendered: list[dict[str, Any]], stage: str, stage_port: Callable[[str], int]
) -> None:
    # Arrange
    service = _by_kind(rendered, "Service")[stage]
    deployment = _by_kind(rendered, "Deployment")[stage]

    # Act
    selector = service["spec"]["selector"]

    # Assert
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [
        {"name": "http", "port": stage_port(stage), "targetPort": "http", "protocol": "TCP"}
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
