"""Static checks of the root Dockerfile, .dockerignore and the container healthcheck script."""

from __future__ import annotations

import http.server
import importlib.util
import json
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        word, _, rest = stripped.partition(" ")
        pairs.append((word.upper(), rest.strip()))
    return pairs


@pytest.fixture(scope="module")
def instructions(repo_root: Path) -> list[tuple[str, str]]:
    return _instructions(repo_root / "Dockerfile")


def test_dockerfile_when_parsed_is_multi_stage_and_requires_service(
    instructions: list[tuple[str, str]],
) -> None:
    # Arrange
    froms = [args for word, args in instructions if word == "FROM"]

    # Act
    stage_names = [args.split(" AS ")[-1] for args in froms if " AS " in args]

    # Assert
    assert {"builder", "runtime"} <= set(stage_names)
    assert stage_names[-1] == "runtime", "the last stage is the image that ships"
    assert ("ARG", "SERVICE") in instructions
    assert any(word == "RUN" and 'test -n "${SERVICE}"' in args for word, args in instructions), (
        "a build without --build-arg SERVICE must fail, not produce an empty image"
    )


def test_dockerfile_when_parsed_syncs_only_the_stage_frozen_without_dev(
    instructions: list[tuple[str, str]],
) -> None:
    # Arrange
    runs = [args for word, args in instructions if word == "RUN"]

    # Act
    sync = [args for args in runs if "uv sync" in args]

    # Assert
    assert len(sync) == 1
    for flag in ("--frozen", "--no-dev", '--package "quantmesh-${SERVICE}"'):
        assert flag in sync[0]


def test_dockerfile_runtime_when_parsed_runs_as_uid_10001_with_exec_form_entrypoint(
    instructions: list[tuple[str, str]],
) -> None:
    # Arrange
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    runtime = instructions[last_from:]

    # Act
    users = [args for word, args in runtime if word == "USER"]
    entrypoints = [args for word, args in runtime if word == "ENTRYPOINT"]
    healthchecks = [args for word, args in runtime if word == "HEALTHCHECK"]

    # Assert
    assert users == ["10001:10001"]
    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0]) == ["quantmesh-service"]
    assert len(healthchecks) == 1
    assert "/app/healthcheck.py" in healthchecks[0]
    assert any(
        word == "ENV" and "QM_MIGRATIONS_DIR=/app/migrations" in args for word, args in runtime
    )


def test_dockerfile_when_parsed_copies_only_files_that_exist(
    instructions: list[tuple[str, str]], repo_root: Path
) -> None:
    # Arrange
    runs = " ".join(args for word, args in instructions if word == "RUN")

    # Act
    copied = re.findall(r"\bcp (?:-r )?(\S+) ", runs)

    # Assert
    assert copied == ["tools/healthcheck.py", "libs/common/migrations"]
    assert (repo_root / copied[0]).is_file()
    assert sorted((repo_root / copied[1]).glob("V*.sql")), "no migrations to ship"


def test_dockerignore_when_read_excludes_venv_caches_git_and_local_stack(repo_root: Path) -> None:
    # Arrange
    lines = (repo_root / ".dockerignore").read_text().splitlines()

    # Act
    patterns = {line.strip() for line in lines if line.strip() and not line.startswith("#")}

    # Assert
    assert {".git", ".venv", "**/__pycache__", ".mypy_cache", "deploy/local/.stack"} <= patterns
    # The build needs these, so they must never be ignored.
    assert not {"uv.lock", "pyproject.toml", "libs", "services", "tools"} & patterns


# -- tools/healthcheck.py against a real HTTP server --------------------------------------------


def _load_healthcheck(repo_root: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "qm_healthcheck", repo_root / "tools" / "healthcheck.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_healthcheck_when_healthz_answers_200_exits_0(
    repo_root: Path, http_server: http.server.HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange
    healthcheck = _load_healthcheck(repo_root)
    monkeypatch.setattr(_Handler, "status", 200)
    monkeypatch.setenv("QM_HTTP_PORT", str(http_server.server_address[1]))

    # Act
    code = healthcheck.main()

    # Assert
    assert code == 0


def test_healthcheck_when_healthz_answers_503_exits_1(
    repo_root: Path, http_server: http.server.HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange
    healthcheck = _load_healthcheck(repo_root)
    monkeypatch.setattr(_Handler, "status", 503)
    monkeypatch.setenv("QM_HTTP_PORT", str(http_server.server_address[1]))

    # Act
    code = healthcheck.main()

    # Assert
    assert code == 1


def test_healthcheck_when_nothing_listens_on_the_default_port_exits_1(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange
    healthcheck = _load_healthcheck(repo_root)
    port_file = tmp_path / "http-port"
    port_file.write_text(f"{_free_port()}\n")
    monkeypatch.setattr(healthcheck, "DEFAULT_PORT_FILE", port_file)
    monkeypatch.delenv("QM_HTTP_PORT", raising=False)

    # Act
    code = healthcheck.main()

    # Assert
    assert code == 1
