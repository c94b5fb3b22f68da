"""deploy/k8s: the base is the chart rendered as committed; the overlays build and validate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.deploy.manifests import KUBE_VERSION, find_tool, parse, run_tool, schema_errors

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
OVERLAYS = ["dev", "prod"]


def _render_base(helm: str, chart_dir: Path) -> str:
    """What `make k8s` writes to deploy/k8s/base/quantmesh.yaml."""
    return run_tool(
        [
            helm, "template", "quantmesh", str(chart_dir), "--namespace", "quantmesh",
            "--kube-version", KUBE_VERSION, "-f", str(K8S / "base" / "values.yaml"),
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def kustomize() -> str:
    path = find_tool("kustomize")
    if path is None:
        pytest.skip("no kustomize binary: run tools/get-kustomize.sh (builds v5.7.1)")
    return path


@pytest.fixture(scope="module")
def built(kustomize: str) -> dict[str, list[dict[str, Any]]]:
    return {
        name: parse(run_tool([kustomize, "build", str(K8S / "overlays" / name)]))
        for name in OVERLAYS
    }


def _named(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def _env(deployment: dict[str, Any]) -> dict[str, str | None]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {item["name"]: item.get("value") for item in container["env"]}


def test_base_when_chart_rendered_again_equals_the_committed_manifests(chart_dir: Path) -> None:
    # Arrange
    helm = find_tool("helm")
    if helm is None:
        pytest.skip("no helm binary: run tools/get-helm.sh")
    committed = (K8S / "base" / "quantmesh.yaml").read_text()

    # Act
    fresh = _render_base(helm, chart_dir)

    # Assert
    assert fresh == committed, "deploy/k8s/base/quantmesh.yaml is stale: run `make k8s`"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_when_built_validates_against_kubernetes_schemas(
    built: dict[str, list[dict[str, Any]]], overlay: str, stages: list[str]
) -> None:
    # Arrange
    docs = built[overlay]

    # Act
    errors = schema_errors(docs)

    # Assert
    assert errors == []
    assert sorted(_named(docs, "Deployment")) == stages
    assert {doc["metadata"]["namespace"] for doc in docs} == {f"quantmesh-{overlay}"}


def test_dev_overlay_when_built_runs_one_small_debug_replica_without_autoscaling(
    built: dict[str, list[dict[str, Any]]], stage: str
) -> None:
    # Arrange
    docs = built["dev"]

    # Act
    deployment = _named(docs, "Deployment")[stage]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]

    # Assert
    assert _named(docs, "HorizontalPodAutoscaler") == {}
    assert deployment["spec"]["replicas"] == 1
    assert container["resources"]["requests"] == {"cpu": "25m", "memory": "128Mi"}
    assert _env(deployment)["QM_LOG_LEVEL"] == "DEBUG"
    assert _env(deployment)["QM_ENVIRONMENT"] == "development"


def test_prod_overlay_when_built_keeps_two_replicas_of_each_autoscaled_stage(
    built: dict[str, list[dict[str, Any]]],
) -> None:
    # Arrange
    docs = built["prod"]

    # Act
    hpas = _named(docs, "HorizontalPodAutoscaler")
    deployments = _named(docs, "Deployment")

    # Assert
    assert sorted(hpas) == ["api", "oms", "portfolio", "risk"]
    assert {hpa["spec"]["minReplicas"] for hpa in hpas.values()} == {2}
    assert all("replicas" not in deployments[name]["spec"] for name in hpas)
    assert _env(deployments["oms"])["QM_ENVIRONMENT"] == "production"
    assert deployments["oms"]["spec"]["template"]["spec"]["containers"][0]["resources"][
        "requests"
    ] == {"cpu": "500m", "memory": "384Mi"}
