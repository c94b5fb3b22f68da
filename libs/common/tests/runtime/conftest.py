"""Fixtures for the runtime tests: free ports, HTTP probes, subprocess environments."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

HERE = Path(__file__).resolve().parent
EXAMPLE_SERVICE = HERE / "example_service.py"
PYTHON = sys.executable


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def closed_port() -> int:
    """A port with no listener, for 'dependency unreachable' tests."""
    return free_port()


async def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, str, str]:
    """GET `url`; return (status, content type header, body text)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


def clean_env(**overrides: str) -> dict[str, str]:
    """The current environment without QM_* variables, plus `overrides` (for subprocesses)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QM_")}
    env.update(overrides)
    return env


@pytest.fixture
def no_qm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every QM_* variable for an in-process settings test (restored afterwards)."""
    for key in list(os.environ):
        if key.startswith("QM_"):
            monkeypatch.delenv(key)
