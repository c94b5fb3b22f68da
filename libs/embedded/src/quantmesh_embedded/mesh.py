"""Every stage of the mesh in one process, on one in-memory bus and one clock."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import Clock
from quantmesh_common.health import HealthServer
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.settings import ServiceSettings
from quantmesh_common.topics import registry


@dataclass
class _Stage:
    service: Service[Any]
    ctx: ServiceContext[Any]


class EmbeddedMesh:
    """The stages' own `setup` code, wired to one InMemoryBus instead of Kafka.

    This is the one-code-path promise: a backtest, a replay or the demo runs the very
    handlers the services run, so what was backtested is what trades. Nothing is served on
    HTTP; delivery happens when the caller runs `bus.run_until_idle()`.
    """

    def __init__(self, clock: Clock, *, retain: bool = False) -> None:
        self.clock = clock
        self.bus = InMemoryBus("embedded", registry(), clock, retain=retain)
        self._stages: list[_Stage] = []

    def add(
        self,
        service_cls: type[Service[Any]],
        settings: ServiceSettings,
        factory: Callable[[Any], Service[Any]] | None = None,
    ) -> Service[Any]:
        """Add one stage, configured by `settings` (its bus setting is ignored: memory).

        `factory` builds the service from the final settings when it needs more than them
        (e.g. a subclass taking extra arguments); by default `service_cls(settings)`.
        """
        name = service_cls.name
        settings = settings.model_copy(update={"service_name": name, "bus": "memory"})
        service = (factory or service_cls)(settings)
        health = HealthServer(name, version=service_cls.version)  # never started
        ctx = ServiceContext(settings=settings, bus=self.bus, clock=self.clock, health=health)
        self._stages.append(_Stage(service, ctx))
        return service

    async def start(self) -> None:
        """Run every stage's setup, then join its subscriptions in the order stages were added."""
        for stage in self._stages:
            await stage.service.setup(stage.ctx)
            if stage.ctx.tasks:
                names = ", ".join(name for name, _ in stage.ctx.tasks)
                raise RuntimeError(
                    f"{stage.service.name} wants background tasks ({names}), which the embedded "
                    "mesh does not run: its clock only moves when the driver moves it"
                )
            for subscription in stage.ctx.subscriptions:
                await subscription.start()

    async def stop(self) -> None:
        """Deliver what is pending, then tear every stage down."""
        await self.bus.run_until_idle()
        for stage in reversed(self._stages):
            await stage.service.teardown(stage.ctx)
        await self.bus.close()

    @property
    def services(self) -> Sequence[Service[Any]]:
        """The stages, in the order they were added."""
        return [stage.service for stage in self._stages]
