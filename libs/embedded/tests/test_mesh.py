"""EmbeddedMesh: stages' background tasks run on the mesh's clock; outside state is ignored."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, ClassVar

import pytest

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import AlertSeverity, Tick
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.settings import ServiceSettings
from quantmesh_common.topics import Topic
from quantmesh_embedded.mesh import DrivenClock, EmbeddedMesh

SECOND = 1_000_000_000
T0 = 1_700_000_000 * SECOND


class Ticker(Service[ServiceSettings]):
    """Publishes a tick every 5 s of its clock from a background task."""

    name: ClassVar[str] = "ticker"

    def __init__(self, settings: ServiceSettings) -> None:
        super().__init__(settings)
        self.saw_database: str | None = "unset"

    async def setup(self, ctx: ServiceContext[ServiceSettings]) -> None:
        self.saw_database = ctx.settings.database_url
        bus = ctx.bus

        async def beat() -> None:
            n = 0
            while True:
                await ctx.clock.sleep(5)
                n += 1
                tick = Tick(
                    instrument_id="BTC-USDT.SIM",
                    venue="SIM",
                    price=Decimal(100 + n),
                    size=Decimal(1),
                    trade_id=f"t{n}",
                    ts_event=ctx.clock.now_ns(),
                    ts_init=ctx.clock.now_ns(),
                )
                await bus.publish(Topic.MD_TICKS, tick)

        ctx.add_task(beat, "beat")


class Crasher(Service[ServiceSettings]):
    """A background task that fails once its clock moves."""

    name: ClassVar[str] = "crasher"

    async def setup(self, ctx: ServiceContext[ServiceSettings]) -> None:
        async def boom() -> None:
            await ctx.clock.sleep(1)
            raise ValueError(str(AlertSeverity.CRITICAL))

        ctx.add_task(boom, "boom")


async def _collect(bus: InMemoryBus) -> list[Tick]:
    seen: list[Tick] = []

    def keep(envelope: Envelope[Any]) -> None:
        seen.append(envelope.payload)

    await bus.subscribe("test.ticks", [Topic.MD_TICKS], keep).start()
    return seen


async def test_settle_when_the_clock_passes_a_tasks_sleep_runs_it_at_the_simulated_time() -> None:
    # Arrange
    clock = SimulatedClock(T0)
    mesh = EmbeddedMesh(clock)
    mesh.add(Ticker, ServiceSettings(bus="memory"))
    seen = await _collect(mesh.bus)
    await mesh.start()

    # Act: to 4 s (nothing due), 12 s (the first 5 s sleep ended), 16 s, 17 s
    stops = [4, 12, 16, 17]
    counts = []
    for at in stops:
        clock.advance_to(T0 + at * SECOND)
        await mesh.settle()
        counts.append(len(seen))
    await mesh.stop()

    # Assert: a woken task runs at the settle, at that simulated time (12 s, not 5 s), and
    # sleeps again from there: due at 17 s, not at 16 s.
    assert counts == [0, 1, 1, 2]
    assert [(t.price, t.ts_event) for t in seen] == [
        (Decimal(101), T0 + 12 * SECOND),
        (Decimal(102), T0 + 17 * SECOND),
    ]
    assert mesh.has_tasks is False  # stopped


async def test_settle_when_a_task_crashed_raises_naming_it() -> None:
    # Arrange
    clock = SimulatedClock(T0)
    mesh = EmbeddedMesh(clock)
    mesh.add(Crasher, ServiceSettings(bus="memory"))
    await mesh.start()

    # Act / Assert
    clock.advance_to(T0 + 2 * SECOND)
    with pytest.raises(RuntimeError, match="crasher-boom crashed"):
        await mesh.settle()
    await mesh.stop()


async def test_add_when_the_environment_names_a_database_the_stage_sees_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange
    monkeypatch.setenv("QM_DATABASE_URL", "postgresql://u:p@127.0.0.1:1/x")
    mesh = EmbeddedMesh(SimulatedClock(T0))
    ticker = mesh.add(Ticker, ServiceSettings(bus="memory"))

    # Act
    await mesh.start()
    await mesh.stop()

    # Assert
    assert isinstance(ticker, Ticker)
    assert ticker.saw_database is None


def test_driven_clock_when_an_advance_fires_a_timer_notes_it_and_not_otherwise() -> None:
    # Arrange
    clock = DrivenClock(T0)
    fired: list[int] = []
    clock.call_at(T0 + 5 * SECOND, lambda: fired.append(clock.now_ns()))

    # Act
    clock.advance_to(T0 + 4 * SECOND)
    before = clock.woke
    clock.advance_to(T0 + 6 * SECOND)

    # Assert
    assert (before, clock.woke) == (False, True)
    assert fired == [T0 + 5 * SECOND]


async def test_settle_when_driven_clock_woke_a_task_runs_it_once() -> None:
    # Arrange
    clock = DrivenClock(T0)
    mesh = EmbeddedMesh(clock)
    mesh.add(Ticker, ServiceSettings(bus="memory"))
    seen = await _collect(mesh.bus)
    await mesh.start()

    # Act
    clock.advance_to(T0 + 3 * SECOND)
    await mesh.settle()
    clock.advance_to(T0 + 5 * SECOND)
    await mesh.settle()
    await mesh.stop()

    # Assert: one beat at 5 s; the flag was cleared by the settle that ran it
    assert [t.ts_event for t in seen] == [T0 + 5 * SECOND]
    assert clock.woke is False
