"""The service runtime: the base every service uses to start, run and stop the same way.

A service declares its handlers; the runner gives it configuration, JSON logs, tracing, a bus
(Kafka or in-memory), optional PostgreSQL and Redis clients, `/healthz`, `/readyz` and
`/metrics`, and a graceful stop on SIGTERM::

    class RiskService(Service[RiskSettings]):
        name = "risk"
        settings_class = RiskSettings

        async def setup(self, ctx: ServiceContext[RiskSettings]) -> None:
            ctx.subscribe("risk", [Topic.ORDERS_INTENTS], self.on_intent, transactional=True)

    def main() -> None:
        run(RiskService, RiskSettings)
"""

from __future__ import annotations

import asyncio
import enum
import functools
import gc
import inspect
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import suppress
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Generic,
    NoReturn,
    Protocol,
    TypeVar,
    runtime_checkable,
)

from prometheus_client import Enum as EnumMetric

from quantmesh_common import __version__
from quantmesh_common.bus.base import (
    AssignHook,
    BatchHook,
    Bus,
    BusUnavailableError,
    Handler,
    RawHandler,
    RevokeHook,
    Subscription,
    SubscriptionState,
)
from quantmesh_common.clock import Clock, WallClock
from quantmesh_common.health import (
    SERVICE_UP,
    DependencyUnavailableError,
    HealthServer,
    ReadinessCheck,
    wait_for_dependency,
)
from quantmesh_common.logs import (
    configure_logging,
    correlation_id_var,
    event_id_var,
)
from quantmesh_common.settings import ServiceSettings, load_settings, redact_url
from quantmesh_common.telemetry import configure_tracing, shutdown_tracing

if TYPE_CHECKING:
    from quantmesh_common.storage.redis import RedisClient
    from quantmesh_common.topics import TopicRegistry

log = logging.getLogger(__name__)

S = TypeVar("S", bound=ServiceSettings)

#: Exit status when the service failed at start or faulted while running.
FAILURE_EXIT_CODE = 1


class ComponentState(enum.Enum):
    """Where a component is in its life cycle."""

    READY = "ready"  # built, not started
    STARTING = "starting"  # connecting to dependencies, joining consumer groups
    RUNNING = "running"  # serving, every readiness check passes
    DEGRADED = "degraded"  # serving, but a readiness check fails (e.g. the DB is unreachable)
    STOPPING = "stopping"  # draining in-flight work, committing, closing connections
    STOPPED = "stopped"  # stopped cleanly (terminal)
    FAULTED = "faulted"  # failed; the process should exit non-zero and be restarted (terminal)


#: The only legal life-cycle transitions; anything else raises InvalidStateTransitionError.
TRANSITIONS: Mapping[ComponentState, frozenset[ComponentState]] = {
    ComponentState.READY: frozenset({ComponentState.STARTING, ComponentState.STOPPED}),
    ComponentState.STARTING: frozenset(
        {ComponentState.RUNNING, ComponentState.STOPPING, ComponentState.FAULTED}
    ),
    ComponentState.RUNNING: frozenset(
        {ComponentState.DEGRADED, ComponentState.STOPPING, ComponentState.FAULTED}
    ),
    ComponentState.DEGRADED: frozenset(
        {ComponentState.RUNNING, ComponentState.STOPPING, ComponentState.FAULTED}
    ),
    ComponentState.STOPPING: frozenset({ComponentState.STOPPED, ComponentState.FAULTED}),
    ComponentState.STOPPED: frozenset(),
    ComponentState.FAULTED: frozenset(),
}

SERVICE_STATE = EnumMetric(
    "quantmesh_service_state",
    "Life-cycle state of the service.",
    ["service"],
    states=[state.value for state in ComponentState],
)


class InvalidStateTransitionError(RuntimeError):
    """A life-cycle transition that the transition table does not allow."""


class Lifecycle:
    """A component's state, changed only along TRANSITIONS; listeners hear every change."""

    def __init__(
        self,
        name: str,
        on_change: Callable[[ComponentState, ComponentState], None] | None = None,
    ) -> None:
        self.name = name
        self._state = ComponentState.READY
        self._on_change = on_change

    @property
    def state(self) -> ComponentState:
        """The current state."""
        return self._state

    def can(self, target: ComponentState) -> bool:
        """Return True if moving to `target` is legal from the current state."""
        return target in TRANSITIONS[self._state]

    def transition(self, target: ComponentState) -> None:
        """Move to `target`; raises InvalidStateTransitionError if the table forbids it."""
        current = self._state
        if target not in TRANSITIONS[current]:
            raise InvalidStateTransitionError(
                f"{self.name}: illegal transition {current.name} -> {target.name}"
            )
        self._state = target
        if self._on_change is not None:
            self._on_change(current, target)


class ServiceContext(Generic[S]):
    """What `Service.setup` gets: the bus, clock, settings, logger and optional stores.

    Handlers registered with `subscribe` and tasks added with `add_task` are started by the
    runner once `setup` returns, and stopped by it on shutdown.
    """

    def __init__(
        self,
        *,
        settings: S,
        bus: Bus,
        clock: Clock,
        health: HealthServer,
        pg: Any | None = None,
        redis: RedisClient | None = None,
    ) -> None:
        self.settings = settings
        self.service_name = settings.service_name
        self.bus = bus
        self.clock = clock
        self.health = health
        #: The asyncpg pool, when QM_DATABASE_URL is set.
        self.pg = pg
        #: The redis.asyncio client, when QM_REDIS_URL is set.
        self.redis = redis
        self.logger = logging.getLogger(f"quantmesh.{settings.service_name}")
        self.subscriptions: list[Subscription] = []
        self.tasks: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = []

    def subscribe(
        self,
        group: str,
        topics: Sequence[str],
        handler: Handler,
        *,
        transactional: bool = False,
        output_after_batch: bool = False,
        on_batch: BatchHook | None = None,
        on_assign: AssignHook | None = None,
        on_revoke: RevokeHook | None = None,
        broadcast: bool = False,
    ) -> Subscription:
        """Run `handler` over `topics` as a member of consumer group `group`.

        Log lines written while an envelope is handled carry its correlation and event ids.
        `on_batch` is awaited once per consumed batch before its commit (see BatchHook),
        `on_assign` with newly assigned partitions before their first message (AssignHook),
        `on_revoke` with the partitions it gives up before another member gets them.
        `broadcast=True`: this instance reads every partition from now on (Bus.subscribe).
        `output_after_batch=True`: output only after `on_batch` stored the batch (Bus.subscribe).
        """
        subscription = self.bus.subscribe(
            group,
            topics,
            _with_log_context(handler),
            transactional=transactional,
            output_after_batch=output_after_batch,
            on_batch=on_batch,
            on_assign=on_assign,
            on_revoke=on_revoke,
            broadcast=broadcast,
        )
        self.subscriptions.append(subscription)
        return subscription

    def subscribe_raw(
        self,
        group: str,
        topics: Sequence[str],
        handler: RawHandler,
        *,
        on_batch: BatchHook | None = None,
    ) -> Subscription:
        """Run `handler` over every record of `topics` undecoded (see Bus.subscribe_raw)."""
        subscription = self.bus.subscribe_raw(group, topics, handler, on_batch=on_batch)
        self.subscriptions.append(subscription)
        return subscription

    def add_task(self, factory: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        """Run `factory()` in the background while the service runs; a crash faults the service."""
        self.tasks.append((name, factory))

    def add_readiness_check(self, name: str, check: ReadinessCheck) -> None:
        """Add a check that /readyz (and DEGRADED detection) consults."""
        self.health.add_check(name, check)

    def require_pg(self) -> Any:
        """Return the PostgreSQL pool, or raise naming the variable that enables it."""
        if self.pg is None:
            raise RuntimeError(f"{self.service_name} needs PostgreSQL: set QM_DATABASE_URL")
        return self.pg

    def require_redis(self) -> RedisClient:
        """Return the Redis client, or raise naming the variable that enables it."""
        if self.redis is None:
            raise RuntimeError(f"{self.service_name} needs Redis: set QM_REDIS_URL")
        return self.redis


def _with_log_context(handler: Handler) -> Handler:
    """Wrap `handler` so logs inside it carry the envelope's ids; keeps it sync or async."""
    # The variables set and reset inline, not through bind_envelope's generator-based context
    # manager: this runs for every message a stage consumes, and the generator cost ~1.5 us.
    set_correlation, reset_correlation = correlation_id_var.set, correlation_id_var.reset
    set_event, reset_event = event_id_var.set, event_id_var.reset
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - async callable objects
    ):

        @functools.wraps(handler)
        async def async_wrapper(envelope: Any) -> Any:
            correlation = set_correlation(envelope.correlation_id)
            event = set_event(envelope.event_id)
            try:
                return await handler(envelope)  # type: ignore[misc]
            finally:
                reset_event(event)
                reset_correlation(correlation)

        return async_wrapper

    @functools.wraps(handler)
    def sync_wrapper(envelope: Any) -> Any:
        correlation = set_correlation(envelope.correlation_id)
        event = set_event(envelope.event_id)
        try:
            return handler(envelope)
        finally:
            reset_event(event)
            reset_correlation(correlation)

    return sync_wrapper


class Service(Generic[S]):
    """Base of every service: declare `name` and `settings_class`, register handlers in `setup`.

    Domain logic stays in plain handlers; the service only wires them to topics.
    """

    #: The service's name: logs, metrics, envelope `source`, the default consumer-group prefix.
    name: ClassVar[str] = ""
    #: The settings class `run` builds when none is passed.
    settings_class: ClassVar[type[ServiceSettings]] = ServiceSettings
    #: Reported in `quantmesh_service_info` and the trace resource.
    version: ClassVar[str] = __version__
    #: The topic registry of the bus; None means the platform's registry.
    topic_registry: ClassVar[TopicRegistry | None] = None
    #: The topics the stage reads and writes: its README, the stage checks and the chart
    #: are held to these.
    consumes: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: S) -> None:
        self.settings = settings

    async def setup(self, ctx: ServiceContext[S]) -> None:
        """Register handlers (`ctx.subscribe`), background tasks and readiness checks."""

    async def teardown(self, ctx: ServiceContext[S]) -> None:
        """Release what `setup` acquired: after subscriptions stopped, before the bus closes."""


@runtime_checkable
class _Pumpable(Protocol):
    async def run_until_idle(self, max_messages: int | None = None) -> int: ...


class _KafkaProbe:
    """Asks the Kafka cluster for its brokers: the dependency wait and the readiness check."""

    def __init__(self, bootstrap: str, timeout_s: float = 1.5) -> None:
        self.bootstrap = bootstrap
        self.timeout_s = timeout_s
        self._admin: Any = None

    def _list(self) -> int:
        if self._admin is None:
            from confluent_kafka.admin import AdminClient

            self._admin = AdminClient({"bootstrap.servers": self.bootstrap})
        # DescribeCluster, not a metadata request for every topic: that one grows with the
        # cluster (1,350 topics: 23 ms of this process's CPU, and the broker's, every check).
        cluster = self._admin.describe_cluster(request_timeout=self.timeout_s)
        return len(cluster.result(timeout=self.timeout_s + 1.0).nodes)

    async def __call__(self) -> None:
        brokers = await asyncio.get_running_loop().run_in_executor(None, self._list)
        if brokers == 0:
            raise ConnectionError("the cluster reported no brokers")


def build_bus(
    settings: ServiceSettings, clock: Clock, registry: TopicRegistry | None = None
) -> Bus:
    """Build the bus the settings ask for (`QM_BUS`): Kafka, or in-memory for one process."""
    if settings.bus == "memory":
        from quantmesh_common.bus.memory import InMemoryBus

        return InMemoryBus(settings.service_name, registry=registry, clock=clock)
    from quantmesh_common.bus.kafka import KafkaBus

    if not settings.kafka_bootstrap:  # the settings validator already refuses this
        raise ValueError("QM_KAFKA_BOOTSTRAP is required when QM_BUS=kafka")
    return KafkaBus(
        settings.service_name,
        settings.kafka_bootstrap,
        registry=registry,
        clock=clock,
        batch_size=settings.consumer_batch_size,
        producer_config={"linger.ms": settings.producer_linger_ms},
        instance=settings.instance_id,
        broadcast_wait_ms=settings.broadcast_wait_ms,
    )


class ServiceRunner(Generic[S]):
    """Runs one service through its life cycle: start, serve, degrade/recover, stop.

    `bus` and `clock` may be injected (tests); otherwise they are built from the settings.
    `pump` drives an in-memory bus's deliveries in the background; it defaults to on when the
    runner built that bus itself (a test that injects one drives it with `run_until_idle`).
    """

    def __init__(
        self,
        service: Service[S],
        settings: S,
        *,
        bus: Bus | None = None,
        clock: Clock | None = None,
        pump: bool | None = None,
    ) -> None:
        if not settings.service_name:
            settings = settings.model_copy(update={"service_name": type(service).name})
            service.settings = settings
        self.service = service
        self.settings = settings
        self.name = settings.service_name
        self.clock: Clock = clock or WallClock()
        self._bus = bus
        self._owns_bus = bus is None
        self._pump_enabled = pump
        self.lifecycle = Lifecycle(self.name, self._on_state_change)
        self.health = HealthServer(
            self.name,
            version=type(service).version,
            host=settings.http_host,
            port=settings.http_port,
        )
        self.health.set_liveness(lambda: self.state is not ComponentState.FAULTED)
        self.health.add_check("lifecycle", self._lifecycle_check)
        self.ctx: ServiceContext[S] | None = None
        self.fault: str | None = None
        self.fault_error: BaseException | None = None
        self._faulted = asyncio.Event()
        self._pg: Any = None
        self._redis: RedisClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._monitor: asyncio.Task[None] | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._pump_stop = False
        self._started_at = 0.0
        SERVICE_STATE.labels(self.name).state(self.state.value)
        SERVICE_UP.labels(self.name).set(0)

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self) -> ComponentState:
        """The service's life-cycle state."""
        return self.lifecycle.state

    @property
    def bus(self) -> Bus:
        """The bus (after start)."""
        if self._bus is None:
            raise RuntimeError("the bus is created when the service starts")
        return self._bus

    def _on_state_change(self, old: ComponentState, new: ComponentState) -> None:
        SERVICE_STATE.labels(self.name).state(new.value)
        up = new in (ComponentState.RUNNING, ComponentState.DEGRADED)
        SERVICE_UP.labels(self.name).set(1 if up else 0)
        level = logging.ERROR if new is ComponentState.FAULTED else logging.INFO
        log.log(
            level,
            "service %s: %s -> %s",
            self.name,
            old.value,
            new.value,
            extra={"state": new.value, "previous_state": old.value},
        )

    def _lifecycle_check(self) -> None:
        if self.state not in (ComponentState.RUNNING, ComponentState.DEGRADED):
            raise RuntimeError(f"service is {self.state.value}")

    async def wait_faulted(self) -> None:
        """Return once the service has faulted (a crashed subscription or background task)."""
        await self._faulted.wait()

    def _set_fault(self, reason: str, exc: BaseException | None = None) -> None:
        if self.fault is not None:
            return
        self.fault = reason
        self.fault_error = exc
        log.error("service %s faulted: %s", self.name, reason, exc_info=exc)
        if self.lifecycle.can(ComponentState.FAULTED):
            self.lifecycle.transition(ComponentState.FAULTED)
        self._faulted.set()

    # -- start -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, set the service up, start its subscriptions and tasks; end RUNNING.

        Raises DependencyUnavailableError if a dependency stays unreachable for
        `startup_timeout_s` (the service is then FAULTED and everything opened is closed).
        If cancelled (a signal during start) it cleans up and ends STOPPED.
        """
        self.lifecycle.transition(ComponentState.STARTING)
        self._started_at = time.monotonic()
        log.info("starting service %s", self.name, extra={"bus": self.settings.bus})
        try:
            await self._start()
        except asyncio.CancelledError:
            self.lifecycle.transition(ComponentState.STOPPING)
            await self._cleanup(self.settings.shutdown_timeout_s)
            self.lifecycle.transition(ComponentState.STOPPED)
            raise
        except BaseException as exc:
            self._set_fault(
                f"start failed: {exc}",
                exc if not isinstance(exc, DependencyUnavailableError) else None,
            )
            await self._cleanup(self.settings.shutdown_timeout_s)
            raise
        self.lifecycle.transition(ComponentState.RUNNING)
        log.info(
            "service %s running",
            self.name,
            extra={
                "port": self.health.port,
                "subscriptions": [s.group for s in self.ctx.subscriptions] if self.ctx else [],
                "startup_s": round(time.monotonic() - self._started_at, 3),
            },
        )

    async def _start(self) -> None:
        settings = self.settings
        # Liveness answers while dependencies are awaited, so an orchestrator does not kill a
        # service that is merely waiting; readiness stays 503 until RUNNING.
        await self.health.start()
        await self._connect_dependencies()
        if self._bus is None:
            self._bus = build_bus(settings, self.clock, type(self.service).topic_registry)
        bus = self._bus
        await bus.start()
        ctx = ServiceContext(
            settings=settings,
            bus=bus,
            clock=self.clock,
            health=self.health,
            pg=self._pg,
            redis=self._redis,
        )
        self.ctx = ctx
        await self.service.setup(ctx)
        for subscription in ctx.subscriptions:
            await subscription.start()
        if ctx.subscriptions:
            self.health.add_check("subscriptions", self._subscriptions_check)
        pump = self._pump_enabled
        if pump is None:
            pump = self._owns_bus and settings.bus == "memory"
        if pump and isinstance(bus, _Pumpable):
            self._pump_task = asyncio.create_task(self._pump(bus), name=f"{self.name}-pump")
        for name, factory in ctx.tasks:
            task = asyncio.create_task(factory(), name=f"{self.name}-{name}")
            task.add_done_callback(functools.partial(self._task_done, name))
            self._tasks.append(task)
        self._monitor = asyncio.create_task(self._watch(), name=f"{self.name}-monitor")

    async def _connect_dependencies(self) -> None:
        settings = self.settings
        timeout_s = settings.startup_timeout_s
        waits: list[Awaitable[Any]] = []
        if self._owns_bus and settings.bus == "kafka" and settings.kafka_bootstrap:
            probe = _KafkaProbe(settings.kafka_bootstrap)
            waits.append(
                wait_for_dependency("kafka", settings.kafka_bootstrap, probe, timeout_s=timeout_s)
            )
            self.health.add_check("kafka", probe)
        if settings.database_url:
            waits.append(self._connect_pg(settings.database_url))
        if settings.redis_url:
            waits.append(self._connect_redis(settings.redis_url))
        results = await asyncio.gather(*waits, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for error in errors[1:]:
                log.error("%s", error)
            raise errors[0]

    async def _connect_pg(self, dsn: str) -> None:
        from quantmesh_common.storage import postgres

        settings = self.settings
        self._pg = await postgres.create_pool(
            dsn,
            settings.db_pool_min_size,
            settings.db_pool_max_size,
            timeout_s=settings.startup_timeout_s,
        )
        pool = self._pg
        self.health.add_check("postgres", lambda: postgres.ping(pool))
        log.info("connected to postgres at %s", redact_url(dsn))

    async def _connect_redis(self, url: str) -> None:
        from quantmesh_common.storage import redis as redis_storage

        self._redis = await redis_storage.create_redis(
            url, timeout_s=self.settings.startup_timeout_s
        )
        client = self._redis
        self.health.add_check("redis", lambda: redis_storage.ping(client))
        log.info("connected to redis at %s", redact_url(url))

    def _subscriptions_check(self) -> None:
        assert self.ctx is not None
        down = [
            f"{s.group}={s.state.value}"
            for s in self.ctx.subscriptions
            if s.state is not SubscriptionState.RUNNING
        ]
        if down:
            raise RuntimeError("not running: " + ", ".join(down))

    # -- running ---------------------------------------------------------------------------

    async def _pump(self, bus: _Pumpable) -> None:
        """Deliver an in-memory bus's messages as they are published."""
        while not self._pump_stop:
            delivered = await bus.run_until_idle(max_messages=1_000)
            if delivered == 0:
                await asyncio.sleep(0.005)

    def _task_done(self, name: str, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.state is ComponentState.STOPPING:
            return
        exc = task.exception()
        if exc is not None:
            self._set_fault(f"background task {name!r} crashed: {exc!r}", exc)

    async def _watch(self) -> None:
        """Fault on a failed subscription; flip RUNNING <-> DEGRADED on readiness checks."""
        interval = self.settings.health_check_interval_s
        next_check = time.monotonic() + interval
        while self.state in (
            ComponentState.RUNNING,
            ComponentState.DEGRADED,
            ComponentState.STARTING,
        ):
            await asyncio.sleep(min(0.25, interval))
            if self.ctx is not None:
                for subscription in self.ctx.subscriptions:
                    if subscription.state is SubscriptionState.FAILED:
                        self._set_fault(
                            f"subscription of group {subscription.group!r} failed: "
                            f"{subscription.error!r}",
                            subscription.error,
                        )
                        return
            if self._pump_task is not None and self._pump_task.done():
                exc = None if self._pump_task.cancelled() else self._pump_task.exception()
                self._set_fault(f"in-memory delivery stopped: {exc!r}", exc)
                return
            if time.monotonic() < next_check:
                continue
            next_check = time.monotonic() + interval
            ready, report = await self.health.readiness()
            failing = {name: r.get("error") for name, r in report.items() if not r["ok"]}
            if not ready and self.state is ComponentState.RUNNING:
                log.warning("service %s degraded", self.name, extra={"failing": failing})
                self.lifecycle.transition(ComponentState.DEGRADED)
            elif ready and self.state is ComponentState.DEGRADED:
                log.info("service %s recovered", self.name)
                self.lifecycle.transition(ComponentState.RUNNING)

    # -- stop ------------------------------------------------------------------------------

    async def stop(self) -> bool:
        """Drain and close everything within `shutdown_timeout_s`; return True if clean.

        Order: stop delivering, stop subscriptions (each finishes its in-flight batch and
        commits), the service's teardown, background tasks, the bus (flushing publishes),
        the stores, and last the health server (readiness already answers 503).
        """
        state = self.state
        if state in (ComponentState.STOPPED, ComponentState.STOPPING):
            return True
        if state is ComponentState.READY:
            self.lifecycle.transition(ComponentState.STOPPED)
            return True
        faulted = state is ComponentState.FAULTED
        if not faulted:
            self.lifecycle.transition(ComponentState.STOPPING)
        started = time.monotonic()
        clean = await self._cleanup(self.settings.shutdown_timeout_s)
        if not faulted:
            if clean:
                self.lifecycle.transition(ComponentState.STOPPED)
            else:
                self._set_fault("shutdown did not finish in time")
        log.info(
            "service %s stopped",
            self.name,
            extra={
                "state": self.state.value,
                "clean": clean and not faulted,
                "shutdown_s": round(time.monotonic() - started, 3),
            },
        )
        return clean and not faulted

    async def _cleanup(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self._release()
            return True
        except TimeoutError:
            log.error("shutdown exceeded %.1fs; closing what is left", timeout_s)
            await self._release_hard()
            return False

    async def _release(self) -> None:
        if self._monitor is not None and self._monitor is not asyncio.current_task():
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        if self._pump_task is not None:
            self._pump_stop = True
            await asyncio.gather(self._pump_task, return_exceptions=True)
        if self.ctx is not None:
            results = await asyncio.gather(
                *(s.stop() for s in self.ctx.subscriptions), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    log.error("subscription stop failed: %r", result, exc_info=result)
            try:
                await self.service.teardown(self.ctx)
            except Exception:
                log.exception("service teardown failed")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._bus is not None and self._owns_bus:
            try:
                await self._bus.close()
            except Exception:
                log.exception("closing the bus failed")
        await self._close_stores()
        await self.health.stop()

    async def _release_hard(self) -> None:
        for task in (self._monitor, self._pump_task, *self._tasks):
            if task is not None:
                task.cancel()
        await self._close_stores()
        await self.health.stop()

    async def _close_stores(self) -> None:
        pg, self._pg = self._pg, None
        if pg is not None:
            try:
                await asyncio.wait_for(pg.close(), 5.0)
            except Exception:
                log.exception("closing the postgres pool failed")
                pg.terminate()
        client, self._redis = self._redis, None
        if client is not None:
            try:
                await client.aclose()
            except Exception:
                log.exception("closing the redis client failed")


#: A service that ran this long before faulting starts its count of in-place restarts afresh.
_HEALTHY_RUN_S = 300.0


def _is_outage(exc: BaseException | None, restarted: bool) -> bool:
    """Whether a fault came from the broker being away (worth an in-place restart)."""
    from confluent_kafka import KafkaException

    if isinstance(exc, BusUnavailableError | KafkaException):
        return True
    # After an outage the broker may still be starting: a restart waiting for it in vain.
    return restarted and isinstance(exc, DependencyUnavailableError)


#: Seconds after a service process starts at which its heap is frozen (see `freeze_heap`).
FREEZE_AT_S = (15.0, 30.0, 60.0, 120.0, 240.0, 480.0)


async def freeze_heap(at_s: Sequence[float] = FREEZE_AT_S) -> None:
    """Move what the process built so far out of the cyclic GC's reach, at each of `at_s`.

    A stage's long-lived state (rebuilt orders, positions, caches, the imported modules) sits
    in the oldest generation, and every full collection walks all of it again and frees
    nothing there: 0.6-1.3 s per collection in the order-flow stages and up to 2.3 s in the
    api on the shared machine, each a stall of the event loop. `gc.freeze()` moves every
    object alive at that moment to a generation collections never walk. Refcounting still
    frees frozen objects; only cycles alive at a freeze and dead later are never collected,
    which a fixed, small number of freezes bounds.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    for at in at_s:
        await asyncio.sleep(max(0.0, started + at - loop.time()))
        gc.freeze()
    log.info("heap frozen: %d objects out of the cyclic GC", gc.get_freeze_count())


async def serve(service: Service[S], settings: S) -> int:
    """Run `service` until SIGTERM/SIGINT (exit 0) or a fault (exit 1); return the exit status.

    A fault that a broker outage caused restarts the service in place: a fresh instance of its
    class, rebuilt from what was committed exactly as a new process would be, after a backoff
    (1, 2, 4 ... 30 s, jittered), up to `restart_attempts` times in a row. Waiting for an
    orchestrator instead would mean its crash-loop backoff (minutes) for a blip of seconds.
    Any other fault exits 1.
    """
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop_requested.is_set():
            log.warning("received %s while stopping; still draining", sig.name)
            return
        log.info("received %s; stopping", sig.name, extra={"signal": sig.name})
        stop_requested.set()

    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    freezer = asyncio.create_task(freeze_heap(), name="gc-freeze") if settings.gc_freeze else None
    try:
        restarts = 0
        while True:
            runner = ServiceRunner(service, settings)
            began = time.monotonic()
            code = await _serve_once(runner, stop_requested)
            if code is not None:
                return code
            if time.monotonic() - began > _HEALTHY_RUN_S:
                restarts = 0
            if not _is_outage(runner.fault_error, restarts > 0):
                return FAILURE_EXIT_CODE
            if restarts >= settings.restart_attempts:
                log.error(
                    "service %s: broker outage outlasted %d in-place restarts; exiting",
                    runner.name,
                    restarts,
                )
                return FAILURE_EXIT_CODE
            restarts += 1
            delay = min(30.0, 2.0 ** (restarts - 1)) * random.uniform(0.5, 1.0)
            log.warning(
                "service %s restarting in place in %.1fs after a broker outage (%d of %d)",
                runner.name,
                delay,
                restarts,
                settings.restart_attempts,
                extra={"restart": restarts, "fault": runner.fault},
            )
            with suppress(TimeoutError):
                await asyncio.wait_for(stop_requested.wait(), delay)
            if stop_requested.is_set():
                return 0
            service = type(service)(settings)
    finally:
        if freezer is not None:
            freezer.cancel()
        for sig in signals:
            loop.remove_signal_handler(sig)
        shutdown_tracing()


async def _serve_once(runner: ServiceRunner[S], stop_requested: asyncio.Event) -> int | None:
    """Start and serve until a stop request (its exit code) or a fault (None, after stopping).

    A start that fails returns None when the failure may be an outage (the caller decides),
    else the failure exit code.
    """
    start = asyncio.create_task(runner.start(), name="start")
    stop_wait = asyncio.create_task(stop_requested.wait(), name="stop-requested")
    await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if not start.done():
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)
        stop_wait.cancel()
        log.info("service %s stopped before it finished starting", runner.name)
        return 0
    error = start.exception()
    if error is not None:
        stop_wait.cancel()
        log.error("service %s cannot start: %s", runner.name, error)
        runner.fault_error = error
        return None
    fault_wait = asyncio.create_task(runner.wait_faulted(), name="fault")
    await asyncio.wait({stop_wait, fault_wait}, return_when=asyncio.FIRST_COMPLETED)
    faulted = fault_wait.done() and not stop_requested.is_set()
    stop_wait.cancel()
    fault_wait.cancel()
    clean = await runner.stop()
    if faulted:
        return None
    return 0 if clean else FAILURE_EXIT_CODE


def run(service_cls: type[Service[S]], settings_cls: type[S] | None = None) -> NoReturn:
    """Run a service as a process: the body of every service's `main()`.

    Loads the settings (exit 2 naming the bad variable), configures JSON logs and tracing,
    then serves until SIGTERM/SIGINT and exits 0 after a clean stop, 1 on a failure.
    """
    cls: type[Any] = settings_cls or service_cls.settings_class
    settings = load_settings(cls)
    if not settings.service_name:
        settings = settings.model_copy(update={"service_name": service_cls.name})
    configure_logging(settings.service_name, settings.log_level)
    configure_tracing(
        settings.service_name,
        settings.otlp_endpoint,
        version=service_cls.version,
        environment=settings.environment,
    )
    code = asyncio.run(serve(service_cls(settings), settings))
    from quantmesh_common.bus import kafka

    # Everything that must outlive the process was made durable by the stop (commits, the
    # producers' flush, the stores closed). A thread still inside a Kafka or database call
    # would keep the interpreter from exiting (it joins executor threads at exit): an
    # abandoned consumer thread, or a call a cancelled start left running. Leave without
    # waiting for any of them.
    log.info(
        "process exiting",
        extra={"exit_code": code, "abandoned_threads": len(kafka.ABANDONED_THREADS)},
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def make_main(
    service_cls: type[Service[S]], settings_cls: type[S] | None = None
) -> Callable[[], None]:
    """Return a `main()` for a console-script entry point that runs `service_cls`."""

    def main() -> None:
        run(service_cls, settings_cls)

    main.__doc__ = f"Run the {service_cls.name or service_cls.__name__} service."
    return main
