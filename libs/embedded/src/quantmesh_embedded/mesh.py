"""Every stage of the mesh in one process, on one in-memory bus and one clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import Clock, SimulatedClock
from quantmesh_common.health import HealthServer
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.settings import ServiceSettings
from quantmesh_common.topics import registry


class DrivenClock(SimulatedClock):
    """A SimulatedClock that notes when an advance woke a timer (a sleeping task).

    `EmbeddedMesh.settle()` yields to the event loop only then: a backtest step with no
    timer due costs no pass of the loop.
    """

    def __init__(self, start_ns: int = 0) -> None:
        super().__init__(start_ns)
        self.woke = False

    def call_at(self, when_ns: int, callback: Callable[[], None]) -> None:
        """Run `callback` when the clock reaches `when_ns`, and note that it ran."""

        def fire() -> None:
            self.woke = True
            callback()

        super().call_at(when_ns, fire)


@dataclass
class _Stage:
    service: Service[Any]
    ctx: ServiceContext[Any]


class EmbeddedMesh:
    """The stages' own `setup` code, wired to one InMemoryBus instead of Kafka.

    This is the one-code-path promise: a backtest, a replay or the demo runs the very
    handlers the services run, so what was backtested is what trades. Nothing is served on
    HTTP; delivery happens when the caller runs `settle()` (or `bus.run_until_idle()` when
    no stage has a background task).
    """

    def __init__(self, clock: Clock, *, retain: bool = False) -> None:
        self.clock = clock
        self.bus = InMemoryBus("embedded", registry(), clock, retain=retain)
        self._stages: list[_Stage] = []
        self._tasks: list[asyncio.Task[None]] = []

    def add(
        self,
        service_cls: type[Service[Any]],
        settings: ServiceSettings,
        factory: Callable[[Any], Service[Any]] | None = None,
    ) -> Service[Any]:
        """Add one stage, configured by `settings` (bus: memory; no database, no Redis).

        `factory` builds the service from the final settings when it needs more than them
        (e.g. a subclass taking extra arguments); by default `service_cls(settings)`.
        """
        name = service_cls.name
        # One process keeps no outside state: a QM_DATABASE_URL or QM_REDIS_URL in the
        # environment (e.g. the local stack's) must not make a stage want its database.
        settings = settings.model_copy(
            update={"service_name": name, "bus": "memory", "database_url": None, "redis_url": None}
        )
        service = (factory or service_cls)(settings)
        health = HealthServer(name, version=service_cls.version)  # never started
        ctx = ServiceContext(settings=settings, bus=self.bus, clock=self.clock, health=health)
        self._stages.append(_Stage(service, ctx))
        return service

    async def start(self) -> None:
        """Run every stage's setup, join its subscriptions, then start its background tasks.

        Tasks run as asyncio tasks on the mesh's clock: on a SimulatedClock a task's `sleep`
        ends only when the driver advances the clock, and it then runs at the driver's next
        `settle()` (so timers such as GTD expiry fire at the simulated time, not the wall's).
        """
        for stage in self._stages:
            await stage.service.setup(stage.ctx)
            for subscription in stage.ctx.subscriptions:
                await subscription.start()
        for stage in self._stages:
            for name, factory in stage.ctx.tasks:
                self._tasks.append(
                    asyncio.create_task(factory(), name=f"{stage.service.name}-{name}")
                )
        if self._tasks:
            # Run each task to its first sleep now, so its timers count from the start time.
            await asyncio.sleep(0)

    @property
    def has_tasks(self) -> bool:
        """True if some stage runs a background task (the driver must `settle()`)."""
        return bool(self._tasks)

    async def settle(self) -> None:
        """Let tasks the clock woke run, then deliver everything pending; re-raise a crash."""
        clock = self.clock
        if self._tasks and (not isinstance(clock, DrivenClock) or clock.woke):
            if isinstance(clock, DrivenClock):
                clock.woke = False
            # A woken task is ready: one pass of the loop runs it to its next sleep; a second
            # covers one that awaited something the first pass completed.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            for task in self._tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise RuntimeError(f"{task.get_name()} crashed") from task.exception()
        await self.bus.run_until_idle()

    async def stop(self) -> None:
        """Deliver what is pending, stop the tasks, then tear every stage down.

        A task's crash is not raised here (settle() raises it): stopping always completes.
        """
        await self.bus.run_until_idle()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for stage in reversed(self._stages):
            await stage.service.teardown(stage.ctx)
        await self.bus.close()

    @property
    def services(self) -> Sequence[Service[Any]]:
        """The stages, in the order they were added."""
        return [stage.service for stage in self._stages]
