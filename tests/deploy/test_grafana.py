"""Grafana provisioning and dashboards: they parse, and every PromQL names exported metrics."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
PROVISIONING = GRAFANA_DIR / "provisioning"
# Grafana's interval variables, replaced by a duration of the same kind for promtool.
GRAFANA_INTERVALS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def _load_prometheus_helpers() -> ModuleType:
    # The same helpers as test_prometheus.py; pytest's importlib mode gives tests no package.
    spec = importlib.util.spec_from_file_location(
        "_qm_test_prometheus_helpers", Path(__file__).with_name("test_prometheus.py")
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


helpers = _load_prometheus_helpers()


def _load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included."""
    found = []
    for panel in dashboard.get("panels", []):
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def _expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every Prometheus target of every panel."""
    return [
        (f"panel {panel['id']} {panel['title']!r} target {target['refId']}", target["expr"])
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def _variable_metrics(dashboard: dict[str, Any]) -> set[str]:
    """Metric names the template variables' label_values(...) queries read."""
    names = set()
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        names.update(re.findall(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,", text))
    return names


def _for_promtool(expr: str) -> str:
    for variable, duration in GRAFANA_INTERVALS.items():
        expr = expr.replace(variable, duration)
    return expr


@pytest.fixture(scope="module")
def promtool() -> str:
    path: str | None = helpers.find_promtool()
    if path is None:
        pytest.skip("no promtool: run tools/get-promtool.sh, or set QM_PROMTOOL")
    return path


@pytest.fixture(scope="module")
def datasource_uids() -> dict[str, str]:
    with (PROVISIONING / "datasources" / "quantmesh.yml").open() as fh:
        doc = yaml.safe_load(fh)
    return {source["uid"]: source["type"] for source in doc["datasources"]}


@pytest.fixture(params=DASHBOARDS, ids=[path.stem for path in DASHBOARDS])
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    path: Path = request.param
    return _load(path)


def test_provisioning_when_parsed_defines_prometheus_and_postgres_with_fixed_uids(
    datasource_uids: dict[str, str],
) -> None:
    # Arrange / Act
    kinds = set(datasource_uids.values())

    # Assert
    assert datasource_uids["prometheus"] == "prometheus"
    assert "postgres" in datasource_uids
    assert kinds == {"prometheus", "grafana-postgresql-datasource"}


def test_provisioning_when_parsed_keeps_the_database_password_out_of_the_file() -> None:
    # Arrange
    with (PROVISIONING / "datasources" / "quantmesh.yml").open() as fh:
        doc = yaml.safe_load(fh)

    # Act
    (postgres,) = (s for s in doc["datasources"] if s["uid"] == "postgres")

    # Assert
    assert re.fullmatch(r"\$\{\w+\}", postgres["secureJsonData"]["password"])


def test_provisioning_when_parsed_loads_dashboards_from_files() -> None:
    # Arrange
    with (PROVISIONING / "dashboards" / "quantmesh.yml").open() as fh:
        doc = yaml.safe_load(fh)

    # Act
    (provider,) = doc["providers"]

    # Assert
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")


def test_dashboards_when_listed_are_the_ones_operations_need_with_unique_uids() -> None:
    # Arrange / Act
    uids = [_load(path)["uid"] for path in DASHBOARDS]

    # Assert
    assert len(uids) == len(set(uids))
    assert {"qm-mesh-overview", "qm-runtime", "qm-trading", "qm-marketdata", "qm-api"} <= set(uids)


def test_dashboard_when_it_reads_postgres_names_only_tables_the_migrations_create(
    dashboard: dict[str, Any],
) -> None:
    # Arrange
    migrations = " ".join(
        path.read_text(encoding="utf-8").lower()
        for path in (ROOT / "libs" / "common" / "migrations").glob("V*.sql")
    )
    created = set(re.findall(r"create table (?:if not exists )?(\w+)", migrations))

    # Act
    used = {
        table
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
        for table in re.findall(r"\bfrom\s+(\w+)", target.get("rawSql", "").lower())
    }

    # Assert
    assert used <= created, sorted(used - created)


def test_dashboard_when_parsed_has_unique_panel_ids_and_titles(
    dashboard: dict[str, Any],
) -> None:
    # Arrange
    panels = _panels(dashboard)

    # Act
    ids = [panel["id"] for panel in panels]

    # Assert
    assert dashboard["title"]
    assert dashboard["uid"]
    assert panels
    assert len(ids) == len(set(ids)), sorted(ids)
    assert all(panel.get("title") for panel in panels)


def test_dashboard_when_scanned_refers_only_to_provisioned_datasources(
    dashboard: dict[str, Any], datasource_uids: dict[str, str]
) -> None:
    # Arrange
    refs = [p.get("datasource") for p in _panels(dashboard) if p["type"] != "row"]
    refs += [t.get("datasource") for p in _panels(dashboard) for t in p.get("targets", [])]
    refs += [v.get("datasource") for v in dashboard["templating"]["list"]]

    # Act
    unknown = [ref for ref in refs if not ref or datasource_uids.get(ref["uid"]) != ref["type"]]

    # Assert
    assert unknown == []


def test_dashboard_when_scanned_uses_only_metrics_the_code_exports(
    dashboard: dict[str, Any],
) -> None:
    # Arrange: no external metric here, a panel must show something a service serves.
    exported: frozenset[str] = helpers.exported_metric_names()

    # Act
    unknown = {
        where: sorted(names - exported)
        for where, expr in _expressions(dashboard)
        if (names := helpers.promql_metric_names(expr)) - exported
    }
    unknown_variables = _variable_metrics(dashboard) - exported

    # Assert
    assert _expressions(dashboard)
    assert unknown == {}
    assert unknown_variables == set()


def test_mesh_overview_when_scanned_shows_throughput_dead_letters_latency_and_health() -> None:
    # Arrange
    overview = _load(GRAFANA_DIR / "dashboards" / "mesh-overview.json")

    # Act
    used: set[str] = set()
    for _where, expr in _expressions(overview):
        used |= helpers.promql_metric_names(expr)

    # Assert
    assert used >= {
        "quantmesh_bus_messages_consumed_total",
        "quantmesh_bus_messages_produced_total",
        "quantmesh_bus_dead_letters_total",
        "quantmesh_bus_handler_seconds_bucket",
        "quantmesh_service_up",
        "quantmesh_service_info",
    }


def test_dashboard_expressions_when_checked_as_recording_rules_parse(
    dashboard: dict[str, Any], promtool: str, tmp_path: Path
) -> None:
    # Arrange: `promtool check rules` parses each expression without a server.
    expressions = _expressions(dashboard)
    rules = [
        {"record": f"qm_panel_check_{index}", "expr": _for_promtool(expr)}
        for index, (_where, expr) in enumerate(expressions)
    ]
    rules_file = tmp_path / "panels.rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))

    # Act
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )

    # Assert
    where = "\n".join(f"qm_panel_check_{i}: {w}" for i, (w, _e) in enumerate(expressions))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{where}"
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
