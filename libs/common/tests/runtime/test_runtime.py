"""The service life cycle in-process on the in-memory bus: start, handle, degrade, fault, stop."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from typing import Any

import pytest

from quantmesh_common.bus.base import Emit, SubscriptionState
from quantmesh_common.bus.memory import InMemoryBus, InMemorySubscription
from quantmesh_common.envelope import Envelope
from quantmesh_common.health import DependencyUnavailableError
from quantmesh_common.logs import correlation_id_var, event_id_var
from quantmesh_common.runtime import (
    TRANSITIONS,
    ComponentState,
    InvalidStateTransitionError,
    Lifecycle,
    Service,
    ServiceContext,
    ServiceRunner,
    _with_log_context,
    freeze_heap,
)
from quantmesh_common.settings import ServiceSettings
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic

from .conftest import closed_port, http_get

pytestmark = pytest.mark.usefixtures("no_qm_env")

S = ComponentState


def _settings(name: str, **overrides: Any) -> ServiceSettings:
    values: dict[str, Any] = {
        "service_name": name,
        "bus": "memory",
        "http_host": "127.0.0.1",
        "http_port": 0,
        "health_check_interval_s": 0.05,
        "shutdown_timeout_s": 5.0,
    }
    values.update(overrides)
    return ServiceSettings(**values)


async def _eventually(predicate: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class EchoService(Service[ServiceSettings]):
    """Answers each tick with an alert; remembers the log context it saw."""

    name = "echo"

    def __init__(self, settings: ServiceSettings) -> None:
        super().__init__(settings)
        self.seen: list[tuple[str | None, str | None]] = []
        self.torn_down = False

    async def setup(self, ctx: ServiceContext[ServiceSettings]) -> None:
        ctx.subscribe("echo", [Topic.MD_TICKS], self.on_tick)

    def on_tick(self, env: Envelope[Any]) -> list[Emit]:
        self.seen.append((correlation_id_var.get(), event_id_var.get()))
        return [Emit(Topic.ALERTS, stubs.alert())]

    async def teardown(self, ctx: ServiceContext[ServiceSettings]) -> None:
        self.torn_down = True


# -- the transition table ------------------------------------------------------------------


def test_lifecycle_when_following_the_happy_path_reaches_stopped() -> None:
    changes: list[tuple[ComponentState, ComponentState]] = []
    lifecycle = Lifecycle("svc", lambda old, new: changes.append((old, new)))

    for target in (S.STARTING, S.RUNNING, S.DEGRADED, S.RUNNING, S.STOPPING, S.STOPPED):
        lifecycle.transition(target)

    assert lifecycle.state is S.STOPPED
    assert changes[0] == (S.READY, S.STARTING)
    assert changes[-1] == (S.STOPPING, S.STOPPED)


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ((), S.RUNNING),
        ((S.STARTING, S.RUNNING), S.STARTING),
        ((S.STARTING, S.RUNNING, S.STOPPING), S.RUNNING),
        ((S.STARTING, S.RUNNING, S.STOPPING, S.STOPPED), S.STARTING),
        ((S.STARTING, S.FAULTED), S.STOPPING),
        ((S.STARTING,), S.DEGRADED),
    ],
)
def test_lifecycle_when_transition_not_in_table_raises(
    path: tuple[ComponentState, ...], illegal: ComponentState
) -> None:
    lifecycle = Lifecycle("svc")
    for target in path:
        lifecycle.transition(target)
    before = lifecycle.state

    with pytest.raises(InvalidStateTransitionError, match=f"{before.name} -> {illegal.name}"):
        lifecycle.transition(illegal)

    assert lifecycle.state is before


def test_transition_table_when_inspected_has_only_terminal_stopped_and_faulted() -> None:
    terminal = {state for state, targets in TRANSITIONS.items() if not targets}

    assert set(TRANSITIONS) == set(ComponentState)
    assert terminal == {S.STOPPED, S.FAULTED}


# -- the runner ----------------------------------------------------------------------------


async def test_runner_when_started_on_memory_bus_handles_envelopes_with_log_context() -> None:
    # Arrange
    bus = InMemoryBus("echo", retain=True)
    service = EchoService(_settings("echo"))
    runner = ServiceRunner(service, service.settings, bus=bus)

    # Act
    await runner.start()
    ready_status, _, _ = await http_get(f"http://127.0.0.1:{runner.health.port}/readyz")
    envelope = await bus.publish(Topic.MD_TICKS, stubs.tick())
    await bus.run_until_idle()
    clean = await runner.stop()

    # Assert
    assert ready_status == 200
    assert service.seen == [(envelope.correlation_id, envelope.event_id)]
    [alert] = bus.messages(Topic.ALERTS)
    assert alert.causation_id == envelope.event_id
    assert alert.correlation_id == envelope.correlation_id
    assert clean is True
    assert runner.state is S.STOPPED
    assert service.torn_down is True
    assert runner.ctx is not None
    assert runner.ctx.subscriptions[0].state is SubscriptionState.STOPPED


async def test_runner_when_handler_is_sync_keeps_it_sync_on_the_memory_bus() -> None:
    bus = InMemoryBus("echo-sync")
    service = EchoService(_settings("echo-sync"))
    runner = ServiceRunner(service, service.settings, bus=bus)

    await runner.start()
    assert runner.ctx is not None
    subscription = runner.ctx.subscriptions[0]
    await runner.stop()

    assert isinstance(subscription, InMemorySubscription)
    assert subscription.is_async is False


async def test_runner_when_it_builds_the_memory_bus_pumps_deliveries_itself() -> None:
    service = EchoService(_settings("echo-pump"))
    runner = ServiceRunner(service, service.settings)
    await runner.start()

    await runner.bus.publish(Topic.MD_TICKS, stubs.tick())
    await _eventually(lambda: len(service.seen) == 1)
    clean = await runner.stop()

    assert clean is True
    assert runner.state is S.STOPPED


async def test_runner_when_readiness_check_fails_degrades_then_recovers() -> None:
    ok = {"flaky": True}

    class FlakyService(Service[ServiceSettings]):
        name = "flaky"

        async def setup(self, ctx: ServiceContext[ServiceSettings]) -> None:
            ctx.add_readiness_check("flaky", lambda: ok["flaky"])

    runner = ServiceRunner(FlakyService(_settings("flaky")), _settings("flaky"))
    await runner.start()
    url = f"http://127.0.0.1:{runner.health.port}/readyz"

    ok["flaky"] = False
    await _eventually(lambda: runner.state is S.DEGRADED)
    degraded_status, _, degraded_body = await http_get(url)
    ok["flaky"] = True
    await _eventually(lambda: runner.state is S.RUNNING)
    recovered_status, _, _ = await http_get(url)
    await runner.stop()

    assert degraded_status == 503
    assert '"failing": ["flaky"]' in degraded_body
    assert recovered_status == 200


async def test_runner_when_background_task_crashes_faults_and_fails_liveness() -> None:
    class CrashingService(Service[ServiceSettings]):
        name = "crashing"

        async def setup(self, ctx: ServiceContext[ServiceSettings]) -> None:
            async def boom() -> None:
                await asyncio.sleep(0.05)
                raise RuntimeError("feed lost")

            ctx.add_task(boom, "feed")

    runner = ServiceRunner(CrashingService(_settings("crashing")), _settings("crashing"))
    await runner.start()

    await asyncio.wait_for(runner.wait_faulted(), 3.0)
    live_status, _, _ = await http_get(f"http://127.0.0.1:{runner.health.port}/healthz")
    clean = await runner.stop()

    assert runner.state is S.FAULTED
    assert runner.fault is not None
    assert "feed lost" in runner.fault
    assert live_status == 503
    assert clean is False


async def test_runner_when_subscription_crashes_faults() -> None:
    class Crash(BaseException):
        """A consumer crash, not a poison message."""

    class CrashOnTick(Service[ServiceSettings]):
        name = "crash-on-tick"

        async def setup(self, ctx: ServiceContext[ServiceSettings]) -> None:
            def on_tick(env: Envelope[Any]) -> None:
                raise Crash("segfault-ish")

            ctx.subscribe("crash-on-tick", [Topic.MD_TICKS], on_tick)

    runner = ServiceRunner(CrashOnTick(_settings("crash-on-tick")), _settings("crash-on-tick"))
    await runner.start()

    await runner.bus.publish(Topic.MD_TICKS, stubs.tick())
    await asyncio.wait_for(runner.wait_faulted(), 3.0)
    await runner.stop()

    assert runner.state is S.FAULTED
    assert runner.fault is not None
    assert "crash-on-tick" in runner.fault


async def test_runner_when_dependency_unreachable_fails_start_naming_it() -> None:
    port = closed_port()
    settings = _settings(
        "needs-db",
        database_url=f"postgresql://qm:hunter2@127.0.0.1:{port}/qm",
        startup_timeout_s=1.0,
    )
    runner = ServiceRunner(EchoService(settings), settings)

    started = time.monotonic()
    with pytest.raises(DependencyUnavailableError) as caught:
        await runner.start()

    message = str(caught.value)
    assert message.startswith(f"postgres unreachable at postgresql://qm:***@127.0.0.1:{port}/qm")
    assert "hunter2" not in message
    assert runner.state is S.FAULTED
    assert time.monotonic() - started < 5.0


async def test_runner_when_shutdown_exceeds_timeout_ends_faulted_within_bound() -> None:
    class SlowTeardown(Service[ServiceSettings]):
        name = "slow"

        async def teardown(self, ctx: ServiceContext[ServiceSettings]) -> None:
            await asyncio.sleep(30)

    settings = _settings("slow", shutdown_timeout_s=0.5)
    runner = ServiceRunner(SlowTeardown(settings), settings)
    await runner.start()

    started = time.monotonic()
    clean = await runner.stop()

    assert clean is False
    assert runner.state is S.FAULTED
    assert time.monotonic() - started < 2.0


async def test_runner_when_started_twice_raises_illegal_transition() -> None:
    runner = ServiceRunner(EchoService(_settings("twice")), _settings("twice"))
    await runner.start()

    with pytest.raises(InvalidStateTransitionError):
        await runner.start()

    await runner.stop()
    assert runner.state is S.STOPPED


async def test_runner_when_stopped_before_start_goes_straight_to_stopped() -> None:
    runner = ServiceRunner(EchoService(_settings("never")), _settings("never"))

    clean = await runner.stop()

    assert clean is True
    assert runner.state is S.STOPPED


async def test_context_when_store_not_configured_names_the_variable() -> None:
    runner = ServiceRunner(EchoService(_settings("no-stores")), _settings("no-stores"))
    await runner.start()
    assert runner.ctx is not None

    with pytest.raises(RuntimeError, match="QM_DATABASE_URL"):
        runner.ctx.require_pg()
    with pytest.raises(RuntimeError, match="QM_REDIS_URL"):
        runner.ctx.require_redis()
    await runner.stop()


async def test_runner_when_settings_have_no_service_name_uses_the_service_name() -> None:
    settings = _settings("")
    runner = ServiceRunner(EchoService(settings), settings)

    await runner.start()
    assert runner.ctx is not None
    context_name = runner.ctx.service_name
    source = runner.bus.source
    await runner.stop()

    assert runner.name == "echo"
    assert context_name == "echo"
    assert source == "echo"


async def test_freeze_heap_when_its_times_pass_moves_live_objects_out_of_the_cyclic_gc() -> None:
    # Arrange: a long-lived structure with a reference cycle, as a stage's state has.
    state: dict[str, Any] = {"orders": [{"id": n} for n in range(1_000)]}
    state["self"] = state
    gc.unfreeze()
    before = gc.get_freeze_count()

    # Act
    try:
        await freeze_heap((0.0, 0.01))
        frozen = gc.get_freeze_count()
    finally:
        gc.unfreeze()  # other tests keep a normal collector

    # Assert: at least the state's 1,002 containers were alive and are now frozen.
    assert before == 0
    assert frozen >= 1_002
    assert state["self"] is state


async def test_log_context_when_the_handler_is_async_holds_across_its_awaits_and_is_reset() -> None:
    # Arrange: an async handler that looks at the log context before and after it awaits.
    seen: list[tuple[str | None, str | None]] = []

    async def handler(envelope: Envelope[Any]) -> None:
        seen.append((correlation_id_var.get(), event_id_var.get()))
        await asyncio.sleep(0)
        seen.append((correlation_id_var.get(), event_id_var.get()))

    wrapped = _with_log_context(handler)
    envelope = InMemoryBus("ctx").wrap(stubs.tick())
    before = (correlation_id_var.get(), event_id_var.get())

    # Act
    await wrapped(envelope)  # type: ignore[misc]

    # Assert
    ids = (envelope.correlation_id, envelope.event_id)
    assert seen == [ids, ids]
    assert (correlation_id_var.get(), event_id_var.get()) == before
