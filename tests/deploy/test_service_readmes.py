"""Each stage's README agrees with its code: status, declared topics and default port."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path


def _declared_topics(stage: str) -> tuple[str, ...]:
    module = importlib.import_module(f"quantmesh_{stage}.service")
    (service_cls,) = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and getattr(obj, "name", None) == stage
    ]
    consumes: tuple[str, ...] = getattr(service_cls, "consumes")  # noqa: B009 - untyped lookup
    produces: tuple[str, ...] = getattr(service_cls, "produces")  # noqa: B009
    return (*consumes, *produces)


def test_readme_when_read_lists_every_declared_topic_and_the_default_port(
    repo_root: Path, stage: str, stage_port: Callable[[str], int]
) -> None:
    # Arrange
    readme = (repo_root / "services" / stage / "README.md").read_text()

    # Act
    missing = [t for t in _declared_topics(stage) if f"| `{t}` |" not in readme]

    # Assert
    assert missing == []
    assert f"| `QM_HTTP_PORT` | `{stage_port(stage)}` |" in readme


def test_readme_when_read_states_the_skeleton_status_of_the_code(
    repo_root: Path, stage: str
) -> None:
    # Arrange
    readme = (repo_root / "services" / stage / "README.md").read_text()
    module = importlib.import_module(f"quantmesh_{stage}.service")

    # Act
    issue = getattr(module, "HANDLERS_ISSUE", None)

    # Assert
    if issue is None:  # the handlers have landed: the README must stop calling it a skeleton
        assert "skeleton — handlers arrive" not in readme
    else:
        assert f"skeleton — handlers arrive with issue {issue}" in readme
