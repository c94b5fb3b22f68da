"""serve(): a fault a broker outage caused restarts the service in place; any other exits 1."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any, ClassVar

import pytest

from quantmesh_common.bus.base import BusUnavailableError
from quantmesh_common.runtime import FAILURE_EXIT_CODE, Service, ServiceContext, serve
from quantmesh_common.settings import ServiceSettings

pytestmark = pytest.mark.usefixtures("no_qm_env")


def _settings(**overrides: Any) -> ServiceSettings:
    values: dict[str, Any] = {
        "service_name": "restarting",
        "bus": "memory",
        "http_host": "127.0.0.1",
        "http_port": 0,
        "health_check_interval_s": 0.05,
        "shutdown_timeout_s": 5.0,
    }
    values.update(overrides)
    return ServiceSettings(**values)


class FlakyService(Service[ServiceSettings]):
    """Its first `failures` instances fail with `error`; the next one runs until SIGTERM."""

    name = "restarting"
    failures: ClassVar[int] = 1
    error: ClassVar[type[Exception]] = BusUnavailableError
    instances: ClassVar[list[FlakyService]] = []
    serving: ClassVar[asyncio.Event]

    def __init__(self, settings: ServiceSettings) -> None:
        super().__init__(settings)
        self.number = len(FlakyService.instances)
        FlakyService.instances.append(self)

    async def setup(self, ctx: ServiceContext[ServiceSettings]) -> None:
        ctx.add_task(self._work, "work")

    async def _work(self) -> None:
        if self.number < FlakyService.failures:
            raise FlakyService.error(f"instance {self.number}: the broker went away")
        FlakyService.serving.set()
        await asyncio.Event().wait()


@pytest.fixture
def flaky() -> type[FlakyService]:
    FlakyService.instances = []
    FlakyService.serving = asyncio.Event()
    return FlakyService


async def _terminate_once_serving(service: type[FlakyService]) -> None:
    await asyncio.wait_for(service.serving.wait(), 30.0)
    os.kill(os.getpid(), signal.SIGTERM)  # serve() handles it on its loop, as in a process


async def test_serve_when_a_broker_outage_faults_the_service_restarts_a_fresh_instance(
    flaky: type[FlakyService],
) -> None:
    # Arrange
    flaky.failures, flaky.error = 2, BusUnavailableError
    settings = _settings(restart_attempts=3)

    # Act
    stopper = asyncio.create_task(_terminate_once_serving(flaky))
    code = await asyncio.wait_for(serve(flaky(settings), settings), 60.0)
    await stopper

    # Assert
    assert code == 0
    assert [service.number for service in flaky.instances] == [0, 1, 2]
    assert len({id(service) for service in flaky.instances}) == 3


async def test_serve_when_a_fault_is_not_an_outage_exits_1_without_restarting(
    flaky: type[FlakyService],
) -> None:
    # Arrange
    flaky.failures, flaky.error = 1, RuntimeError
    settings = _settings(restart_attempts=3)

    # Act
    code = await asyncio.wait_for(serve(flaky(settings), settings), 60.0)

    # Assert
    assert code == FAILURE_EXIT_CODE
    assert len(flaky.instances) == 1


async def test_serve_when_outages_outlast_the_restart_attempts_exits_1(
    flaky: type[FlakyService],
) -> None:
    # Arrange
    flaky.failures, flaky.error = 10, BusUnavailableError
    settings = _settings(restart_attempts=1)

    # Act
    code = await asyncio.wait_for(serve(flaky(settings), settings), 60.0)

    # Assert
    assert code == FAILURE_EXIT_CODE
    assert len(flaky.instances) == 2
