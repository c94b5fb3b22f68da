"""Fixtures for the static deploy checks: repository paths, the stage list, parsed files."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _stage_names() -> list[str]:
    return sorted(p.parent.name for p in (ROOT / "services").glob("*/pyproject.toml"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that takes `stage` once per folder under services/."""
    if "stage" in metafunc.fixturenames:
        metafunc.parametrize("stage", _stage_names())


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return ROOT


@pytest.fixture(scope="session")
def stages() -> list[str]:
    """Every stage: a folder under services/ with a pyproject.toml."""
    return _stage_names()


@pytest.fixture(scope="session")
def stage_port() -> Callable[[str], int]:
    """Return a stage's default HTTP port from its config module, where it is defined once."""

    def port(stage: str) -> int:
        value = importlib.import_module(f"quantmesh_{stage}.config").DEFAULT_HTTP_PORT
        assert isinstance(value, int)
        return value

    return port


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    """docker-compose.yml, parsed (YAML anchors resolved)."""
    with (ROOT / "docker-compose.yml").open() as fh:
        data = yaml.safe_load(fh)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="session")
def chart_dir() -> Path:
    """The Helm chart."""
    return ROOT / "deploy" / "helm" / "quantmesh"


@pytest.fixture(scope="session")
def chart_values(chart_dir: Path) -> dict[str, Any]:
    """The chart's values.yaml, parsed."""
    with (chart_dir / "values.yaml").open() as fh:
        data = yaml.safe_load(fh)
    assert isinstance(data, dict)
    return data
