"""The health server over real HTTP on an ephemeral port, and the bounded dependency wait."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest

from quantmesh_common.health import DependencyUnavailableError, HealthServer, wait_for_dependency

from .conftest import http_get


@pytest.fixture
async def server() -> AsyncIterator[HealthServer]:
    """A started health server for service 'healthtest' on a kernel-chosen port."""
    health = HealthServer("healthtest", version="9.9.9", host="127.0.0.1", port=0)
    health.check_timeout_s = 0.3
    await health.start()
    yield health
    await health.stop()


def _url(server: HealthServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def test_healthz_when_loop_alive_answers_200_ok(server: HealthServer) -> None:
    status, content_type, body = await http_get(_url(server, "/healthz"))

    assert status == 200
    assert content_type.startswith("application/json")
    assert json.loads(body)["status"] == "ok"


async def test_healthz_when_liveness_predicate_false_answers_503(server: HealthServer) -> None:
    server.set_liveness(lambda: False)

    status, _, body = await http_get(_url(server, "/healthz"))

    assert status == 503
    assert json.loads(body)["status"] == "error"


async def test_readyz_when_all_checks_pass_answers_200(server: HealthServer) -> None:
    async def db() -> None:
        await asyncio.sleep(0)

    server.add_check("bus", lambda: True)
    server.add_check("db", db)

    status, _, body = await http_get(_url(server, "/readyz"))

    report = json.loads(body)
    assert status == 200
    assert report["status"] == "ready"
    assert report["failing"] == []
    assert report["checks"] == {"bus": {"ok": True}, "db": {"ok": True}}


async def test_readyz_when_checks_fail_answers_503_naming_them(server: HealthServer) -> None:
    def broken() -> None:
        raise ConnectionError("connection refused")

    async def slow() -> None:
        await asyncio.sleep(5)

    server.add_check("bus", lambda: True)
    server.add_check("postgres", broken)
    server.add_check("redis", slow)
    server.add_check("subscriptions", lambda: False)

    started = time.monotonic()
    status, _, body = await http_get(_url(server, "/readyz"))
    elapsed = time.monotonic() - started

    report = json.loads(body)
    assert status == 503
    assert report["status"] == "not_ready"
    assert report["failing"] == ["postgres", "redis", "subscriptions"]
    assert report["checks"]["postgres"]["error"] == "ConnectionError: connection refused"
    assert report["checks"]["redis"]["error"] == "timed out after 0.3s"
    assert report["checks"]["bus"] == {"ok": True}
    assert elapsed < 2.0  # checks run concurrently, each bounded


async def test_metrics_when_scraped_serves_prometheus_text_with_service_info(
    server: HealthServer,
) -> None:
    status, content_type, body = await http_get(_url(server, "/metrics"))

    assert status == 200
    assert content_type.startswith("text/plain")
    assert "version=" in content_type
    assert 'quantmesh_service_info{service="healthtest",version="9.9.9"} 1.0' in body
    assert "process_cpu_seconds_total" in body
    assert "python_info" in body


async def test_health_server_when_port_zero_binds_an_ephemeral_port(server: HealthServer) -> None:
    assert 0 < server.port < 65536


async def test_wait_for_dependency_when_probe_recovers_returns_its_value() -> None:
    attempts = 0

    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ConnectionError("not yet")
        return "up"

    result = await wait_for_dependency("kafka", "broker:9092", flaky, timeout_s=10)

    assert result == "up"
    assert attempts == 3


async def test_wait_for_dependency_when_never_up_raises_naming_dependency_within_bound() -> None:
    async def down() -> None:
        raise ConnectionRefusedError("connection refused")

    started = time.monotonic()
    with pytest.raises(DependencyUnavailableError) as caught:
        await wait_for_dependency("postgres", "db:5432", down, timeout_s=1.0)
    elapsed = time.monotonic() - started

    message = str(caught.value)
    assert message.startswith("postgres unreachable at db:5432 after ")
    assert "ConnectionRefusedError: connection refused" in message
    assert caught.value.dependency == "postgres"
    assert elapsed < 3.5


async def test_wait_for_dependency_when_probe_hangs_times_out_each_attempt() -> None:
    async def hang() -> None:
        await asyncio.sleep(60)

    started = time.monotonic()
    with pytest.raises(DependencyUnavailableError, match="redis unreachable at cache:6379"):
        await wait_for_dependency("redis", "cache:6379", hang, timeout_s=1.0, attempt_timeout_s=0.3)

    assert time.monotonic() - started < 3.5
