"""Shared helpers of the chart and manifest checks: find the tools, render, validate."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from tests.deploy.crd_schemas import CUSTOM_RESOURCES

CACHE_BIN = Path.home() / ".cache" / "quantmesh" / "bin"
# Render for, and validate against, one Kubernetes version, whatever helm binary is used.
KUBE_VERSION = "1.34.0"

Manifest = dict[str, Any]


def find_tool(name: str) -> str | None:
    """$QM_<NAME>, else <name> on PATH, else the binary tools/get-<name>.sh builds."""
    explicit = os.environ.get(f"QM_{name.upper()}")
    if explicit:
        return explicit
    on_path = shutil.which(name)
    if on_path:
        return on_path
    cached = CACHE_BIN / name
    return str(cached) if cached.is_file() and os.access(cached, os.X_OK) else None


def run_tool(command: list[str]) -> str:
    """Run a tool and return its stdout; a failure raises with the tool's own message."""
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stderr}")
    return result.stdout


def parse(text: str) -> list[Manifest]:
    """Every non-empty YAML document of a multi-document stream."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def schema_errors(docs: list[Manifest]) -> list[str]:
    """Validate built-in kinds with kubernetes-validate, custom resources with crd_schemas.

    A kind that neither knows is an error too: nothing the chart renders goes unchecked.
    """
    errors: list[str] = []
    for doc in docs:
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        custom = CUSTOM_RESOURCES.get((doc.get("apiVersion", ""), doc.get("kind", "")))
        if custom is not None:
            for error in jsonschema.Draft202012Validator(custom).iter_errors(doc):
                errors.append(f"{where}: {'/'.join(map(str, error.path))}: {error.message}")
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{where}: no schema for {doc.get('apiVersion')} {doc.get('kind')}")
    return errors
