"""A real service process: probes over HTTP, JSON logs on stdout, SIGTERM, exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from .conftest import EXAMPLE_SERVICE, PYTHON, clean_env, closed_port, free_port, http_get

# Importing the runtime in a fresh interpreter takes seconds on a small CI machine.
START_TIMEOUT_S = 60.0


@dataclass
class ServiceProcess:
    """The example service running as a child process, its stdout parsed as it arrives."""

    process: asyncio.subprocess.Process
    port: int
    lines: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def read_stdout(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            text = raw.decode().rstrip("\n")
            self.raw.append(text)
            self.lines.append(json.loads(text))  # every stdout line must be one JSON object

    async def wait_for(
        self, predicate: Callable[[], bool], timeout_s: float = START_TIMEOUT_S
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self.process.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"condition not met; output so far: {self.raw[-10:]}")
            await asyncio.sleep(0.05)

    async def wait_http(self, path: str, status: int = 200) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        last: object = None
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                break
            try:
                got, _, body = await http_get(self.url(path), timeout_s=2.0)
                if got == status:
                    return body
                last = (got, body)
            except OSError as exc:
                last = exc
            await asyncio.sleep(0.1)
        raise AssertionError(f"{path} never answered {status}: last={last!r}, log={self.raw[-10:]}")

    async def finish(self, timeout_s: float = 30.0) -> int:
        code = await asyncio.wait_for(self.process.wait(), timeout_s)
        if self.reader is not None:
            await asyncio.wait_for(self.reader, 5.0)
        return code

    def messages(self) -> list[str]:
        return [str(line.get("message")) for line in self.lines]


async def _start(**env: str) -> ServiceProcess:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        PYTHON,
        str(EXAMPLE_SERVICE),
        env=clean_env(QM_HTTP_HOST="127.0.0.1", QM_HTTP_PORT=str(port), **env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    service = ServiceProcess(process, port)
    service.reader = asyncio.create_task(service.read_stdout())
    return service


@pytest.fixture
async def processes() -> AsyncIterator[list[ServiceProcess]]:
    """Collects started processes and kills any a failed test left running."""
    started: list[ServiceProcess] = []
    yield started
    for service in started:
        if service.process.returncode is None:
            service.process.kill()
            await service.process.wait()


async def test_service_process_when_sigterm_after_serving_stops_cleanly_with_exit_0(
    processes: list[ServiceProcess],
) -> None:
    # Arrange
    service = await _start(QM_BUS="memory")
    processes.append(service)

    # Act
    health = await service.wait_http("/healthz")
    ready = await service.wait_http("/readyz")
    _, content_type, metrics = await http_get(service.url("/metrics"))
    await service.wait_for(lambda: "handled tick" in service.messages())
    service.process.send_signal(signal.SIGTERM)
    code = await service.finish()

    # Assert
    assert json.loads(health)["status"] == "ok"
    assert json.loads(ready)["failing"] == []
    assert content_type.startswith("text/plain")
    assert 'quantmesh_service_up{service="example"} 1.0' in metrics
    assert 'quantmesh_service_info{service="example",version="0.1.0"} 1.0' in metrics
    assert code == 0
    published = next(x for x in service.lines if x["message"] == "published tick")
    handled = next(x for x in service.lines if x["message"] == "handled tick")
    assert handled["correlation_id"] == published["published_event_id"]
    assert handled["service"] == "example"
    stopped, exiting = service.lines[-2:]
    assert stopped["message"] == "service example stopped"
    assert stopped["state"] == "stopped"
    assert stopped["clean"] is True
    assert (exiting["message"], exiting["exit_code"]) == ("process exiting", 0)
    assert "received SIGTERM; stopping" in service.messages()


async def test_service_process_when_dependency_unreachable_exits_1_naming_it(
    processes: list[ServiceProcess],
) -> None:
    port = closed_port()
    service = await _start(
        QM_BUS="memory",
        QM_DATABASE_URL=f"postgresql://quantmesh:hunter2@127.0.0.1:{port}/quantmesh",
        QM_STARTUP_TIMEOUT_S="1",
    )
    processes.append(service)

    code = await service.finish(timeout_s=START_TIMEOUT_S)

    assert code == 1
    [error] = [x for x in service.lines if "cannot start" in x["message"]]
    assert error["level"] == "ERROR"
    assert (
        f"postgres unreachable at postgresql://quantmesh:***@127.0.0.1:{port}/quantmesh"
        in (error["message"])
    )
    assert all("hunter2" not in line for line in service.raw)


async def test_service_process_when_sigterm_while_waiting_for_dependencies_exits_0_quickly(
    processes: list[ServiceProcess],
) -> None:
    service = await _start(
        QM_BUS="memory",
        QM_DATABASE_URL=f"postgresql://quantmesh:quantmesh@127.0.0.1:{closed_port()}/quantmesh",
        QM_STARTUP_TIMEOUT_S="120",
    )
    processes.append(service)
    await service.wait_http("/healthz")  # live while it waits for PostgreSQL
    not_ready, _, _ = await http_get(service.url("/readyz"))

    started = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    code = await service.finish()

    assert not_ready == 503
    assert code == 0
    assert time.monotonic() - started < 10.0
    assert "service example stopped before it finished starting" in service.messages()


async def test_service_process_when_config_invalid_exits_2_before_logging(
    processes: list[ServiceProcess],
) -> None:
    service = await _start(QM_BUS="memory", QM_SHUTDOWN_TIMEOUT_S="soon")
    processes.append(service)

    code = await service.finish(timeout_s=START_TIMEOUT_S)
    assert service.process.stderr is not None
    stderr = (await service.process.stderr.read()).decode()

    assert code == 2
    assert (
        stderr.strip() == "configuration error: QM_SHUTDOWN_TIMEOUT_S='soon' is not a valid number"
    )
    assert service.lines == []


@pytest.mark.integration
async def test_service_process_when_on_kafka_postgres_redis_is_ready_and_handles_ticks(
    processes: list[ServiceProcess],
) -> None:
    # Arrange: the topics exist (creating them is idempotent)
    from quantmesh_common.bus.kafka import ensure_topics
    from quantmesh_common.topics import registry

    bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
    await asyncio.get_running_loop().run_in_executor(None, ensure_topics, bootstrap, registry())
    service = await _start(
        QM_BUS="kafka",
        QM_KAFKA_BOOTSTRAP=bootstrap,
        QM_DATABASE_URL=os.environ["QM_DATABASE_URL"],
        QM_REDIS_URL=os.environ["QM_REDIS_URL"],
        QM_HEALTH_CHECK_INTERVAL_S="1",
        QM_SHUTDOWN_TIMEOUT_S="5",
        # A collector that is down must not hold up the stop.
        QM_OTLP_ENDPOINT=f"http://127.0.0.1:{closed_port()}",
    )
    processes.append(service)

    # Act
    ready = json.loads(await service.wait_http("/readyz"))
    await service.wait_for(lambda: "handled tick" in service.messages())
    service.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = await service.finish()
    stop_s = time.monotonic() - signalled

    # Assert
    assert set(ready["checks"]) >= {"lifecycle", "kafka", "postgres", "redis", "subscriptions"}
    assert ready["failing"] == []
    assert code == 0
    # Within the 5 s shutdown timeout plus the trace exporter's 2 s flush to the dead collector.
    assert stop_s < 7.5
    handled = next(x for x in service.lines if x["message"] == "handled tick")
    assert len(handled["trace_id"]) == 32  # the Kafka bus's consumer span is in the log line
    stopped = next(x for x in service.lines if x["message"] == "service example stopped")
    assert stopped["clean"] is True
