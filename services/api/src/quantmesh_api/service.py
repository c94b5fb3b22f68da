"""The api stage service: serves the FastAPI app, keeps per-account projections of updates."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import uvicorn

from quantmesh_api import oco, seed
from quantmesh_api.app import create_app
from quantmesh_api.collector import job_public
from quantmesh_api.config import ApiSettings
from quantmesh_api.kv import Kv, MemoryKv, RedisKv
from quantmesh_api.live import HISTORY, Push
from quantmesh_api.security import Role, hash_password
from quantmesh_api.stalls import GcTimer, watch_loop
from quantmesh_api.state import ApiState
from quantmesh_api.store import ApiStore, ConflictError, MemoryApiStore, PostgresApiStore, User
from quantmesh_common.envelope import Envelope
from quantmesh_common.ids import new_id
from quantmesh_common.messages import CollectorStatus, Order, RiskLimitsStatus, StrategyStatus
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic

#: Seconds after start at which the heap built so far is frozen (see `_freeze_heap`).
FREEZE_AT_S = (15.0, 30.0, 60.0, 120.0, 240.0, 480.0)

#: The stage has its handlers (tests/stages checks that it then subscribes).
HANDLERS_ISSUE = None


async def _freeze_heap() -> None:
    """Move what the start-up replay built out of the cyclic GC's reach, a few times.

    The projections rebuilt from the update topics are long-lived; a full collection over
    them took 0.2-2.3 s on the shared machine (and found nothing to free), stalling every
    request. Refcounting still frees frozen objects; only cycles alive at a freeze and dead
    later are never collected, which a fixed number of freezes bounds.
    """
    started = asyncio.get_running_loop().time()
    for at in FREEZE_AT_S:
        await asyncio.sleep(max(0.0, started + at - asyncio.get_running_loop().time()))
        gc.freeze()
    logging.getLogger("quantmesh.api").info("heap frozen: %d objects", gc.get_freeze_count())


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service runtime owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ApiService(Service[ApiSettings]):
    """REST + WebSocket gateway: reads PostgreSQL/Redis, sends commands, pushes updates."""

    name = "api"
    settings_class = ApiSettings

    #: The updates folded into the projections (seeded from PostgreSQL at start, see setup).
    updates: ClassVar[tuple[str, ...]] = (
        Topic.ORDERS_UPDATES,
        Topic.EXEC_REPORTS,
        Topic.PORTFOLIO_UPDATES,
        Topic.PORTFOLIO_SNAPSHOTS,
        Topic.ALERTS,
    )
    consumes: ClassVar[tuple[str, ...]] = (
        *updates,
        Topic.MD_COLLECTOR,
        Topic.STRATEGIES,
        Topic.RISK_LIMITS,
    )
    produces: ClassVar[tuple[str, ...]] = (
        Topic.CONTROL,
        Topic.ORDERS_INTENTS,
        Topic.ORDERS_REQUESTS,
        Topic.ACCOUNTS,
    )

    def __init__(
        self,
        settings: ApiSettings,
        collector_topic: str = Topic.MD_COLLECTOR,
        strategies_topic: str = Topic.STRATEGIES,
        control_topic: str = Topic.CONTROL,
        risk_limits_topic: str = Topic.RISK_LIMITS,
    ) -> None:
        super().__init__(settings)
        self.risk_limits_topic = risk_limits_topic
        self.collector_topic = collector_topic
        self.strategies_topic = strategies_topic
        self.control_topic = control_topic
        self.state: ApiState | None = None
        self.port: int | None = None
        self._server: _EmbeddedServer | None = None
        self._served = asyncio.Event()
        self._oco_tasks: set[asyncio.Task[Any]] = set()
        self._gc_timer: GcTimer | None = None

    async def setup(self, ctx: ServiceContext[ApiSettings]) -> None:
        """Build the state, subscribe to the updates, bind the API port and serve on it."""
        settings = ctx.settings
        store: ApiStore
        if ctx.pg is not None:
            store = PostgresApiStore(ctx.pg)
        else:
            ctx.logger.warning("QM_DATABASE_URL is unset: users and accounts live in memory only")
            store = MemoryApiStore()
        kv: Kv
        if ctx.redis is not None:
            kv = RedisKv(ctx.redis, settings.redis_prefix, settings.md_redis_prefix)
        else:
            ctx.logger.warning(
                "QM_REDIS_URL is unset: rate limits, idempotency and the deny-list are per process"
            )
            kv = MemoryKv()
        if settings.jwt_secret is None:
            ctx.logger.warning("QM_JWT_SECRET is unset: tokens are signed with a per-process key")
        state = ApiState(
            settings=settings,
            store=store,
            kv=kv,
            bus=ctx.bus,
            clock=ctx.clock,
            control_topic=self.control_topic,
        )
        self.state = state
        await self._bootstrap_admin(ctx, state)
        # A group of its own per instance: every api instance sees every update (its clients
        # may watch any account). It starts at the topics' stable end after seeding from
        # PostgreSQL (`_start_from_store`), else at their beginning, replaying them.
        group = f"api.{uuid.uuid4().hex[:12]}"
        if ctx.pg is not None and settings.bus == "kafka" and settings.kafka_bootstrap:
            await self._start_from_store(ctx, state, group, settings.kafka_bootstrap)
        ctx.subscribe(group, list(self.updates), self.on_update)
        # The collector's job statuses are few (one partition, a status per job and step):
        # each instance reads them all from the beginning in a group of its own.
        ctx.subscribe(
            f"api.collector.{uuid.uuid4().hex[:12]}", [self.collector_topic], self.on_collector
        )
        # Likewise the strategies' statuses: a compacted topic, read whole at every start.
        ctx.subscribe(
            f"api.strategies.{uuid.uuid4().hex[:12]}", [self.strategies_topic], self.on_strategy
        )
        # And the risk stage's limits per account (compacted too).
        ctx.subscribe(
            f"api.risk.{uuid.uuid4().hex[:12]}", [self.risk_limits_topic], self.on_risk_limits
        )

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((settings.http_host, settings.effective_api_port()))
        except OSError:
            sock.close()
            raise
        sock.listen(2048)
        sock.setblocking(False)
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            create_app(state),
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            ws_max_size=64 * 1024,
        )
        self._server = _EmbeddedServer(config)
        server = self._server

        async def serve() -> None:
            try:
                await server.serve(sockets=[sock])
            finally:
                # Cancelled before teardown (an embedded mesh stops tasks first), uvicorn never
                # shut down: its listener still watches the socket's fd, and closing the fd
                # under it hands the loop's events for a later socket of that number to it.
                for listener in getattr(server, "servers", []):
                    listener.close()
                for connection in list(server.server_state.connections):
                    connection.shutdown()
                sock.close()
                self._served.set()

        ctx.add_task(serve, "http")
        ctx.add_task(lambda: self._poll_prices(state), "prices")
        ctx.add_task(_freeze_heap, "gc-freeze")
        service_name = settings.service_name or self.name
        ctx.add_task(lambda: watch_loop(service_name), "loop-lag")
        self._gc_timer = GcTimer(service_name)
        self._gc_timer.install()
        ctx.logger.info("api listening on %s:%d", settings.http_host, self.port)

    async def teardown(self, ctx: ServiceContext[ApiSettings]) -> None:
        """Let uvicorn finish in-flight requests and close its connections."""
        if self._gc_timer is not None:
            self._gc_timer.remove()
        if self._server is not None:
            self._server.should_exit = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._served.wait(), ctx.settings.shutdown_timeout_s / 2)

    async def _bootstrap_admin(self, ctx: ServiceContext[ApiSettings], state: ApiState) -> None:
        settings = ctx.settings
        if not settings.bootstrap_admin_user or settings.bootstrap_admin_password is None:
            return
        if await state.store.get_user_by_name(settings.bootstrap_admin_user) is not None:
            return
        user = User(
            new_id(),
            settings.bootstrap_admin_user,
            hash_password(settings.bootstrap_admin_password.get_secret_value()),
            frozenset({Role.ADMIN}),
        )
        with contextlib.suppress(ConflictError):  # another instance created it first
            await state.store.create_user(user)
            ctx.logger.info("created the bootstrap admin %s", user.username)

    async def _start_from_store(
        self, ctx: ServiceContext[ApiSettings], state: ApiState, group: str, bootstrap: str
    ) -> None:
        """Seed the projections from PostgreSQL and start `group` at the topics' stable end.

        Instead of replaying every update since the topics began (seed.py says why nothing is
        lost or applied twice). If the broker cannot say where its ends are, the group starts
        from the beginning as before.
        """
        loop = asyncio.get_running_loop()
        timeout_s = ctx.settings.startup_timeout_s
        topics = list(self.updates)
        try:
            ends = await loop.run_in_executor(None, seed.stable_ends, bootstrap, topics, timeout_s)
        except Exception as exc:
            ctx.logger.warning("start: the topics' ends are unknown; replaying them: %s", exc)
            return
        positions, snapshots = await seed.load(ctx.pg, state.projection, HISTORY)
        await loop.run_in_executor(None, seed.commit_start, bootstrap, group, ends)
        ctx.logger.info(
            "started from PostgreSQL",
            extra={"positions": positions, "snapshots": snapshots, "partitions": len(ends)},
        )
        pool = ctx.pg
        ctx.add_task(lambda: self._sweep_oco(pool), "oco-sweep")

    async def _sweep_oco(self, pool: Any) -> None:
        """Move the other leg of every protect leg that filled while no api followed it."""
        try:
            legs = await seed.filled_protect_legs(pool)
        except Exception:
            # Each leg's next update tries again (on_update), as after a missed one.
            logging.getLogger("quantmesh.api").exception("OCO: the start-up sweep failed")
            return
        for leg in legs:
            await self._follow_oco(leg)

    def on_update(self, envelope: Envelope[Any]) -> None:
        """Fold an update into the projections and push it to the WebSocket clients."""
        assert self.state is not None
        for push in self.state.projection.apply(envelope):
            self.state.hub.publish(push)
        payload = envelope.payload
        if isinstance(payload, Order) and oco.sibling_of(payload) is not None:
            task = asyncio.get_running_loop().create_task(self._follow_oco(payload))
            self._oco_tasks.add(task)
            task.add_done_callback(self._oco_tasks.discard)

    def on_collector(self, envelope: Envelope[Any]) -> None:
        """Keep a collection job's status if it is the job's newest; push it to the
        WebSocket clients (channel `collector`, as `GET /market/collector` lists it)."""
        assert self.state is not None
        status = envelope.payload
        state = self.state
        # The start-up read of the topic finds no client to push to: no public form built.
        kept = isinstance(status, CollectorStatus) and state.collector.apply(status)
        if kept and state.hub.clients:
            state.hub.publish(Push(None, "collector", job_public(status)))

    def on_strategy(self, envelope: Envelope[Any]) -> None:
        """Keep a strategy's status if it is its newest; answer a configuration waiting."""
        assert self.state is not None
        if isinstance(envelope.payload, StrategyStatus):
            self.state.strategies.apply(envelope.payload)

    def on_risk_limits(self, envelope: Envelope[Any]) -> None:
        """Keep an account's limits status if it is its newest."""
        assert self.state is not None
        if isinstance(envelope.payload, RiskLimitsStatus):
            self.state.risk_limits.apply(envelope.payload)

    async def _follow_oco(self, order: Order) -> None:
        assert self.state is not None
        try:
            await oco.follow(self.state, order)
        except Exception:
            # The next update of the leg (or a restart's replay) tries again.
            logging.getLogger("quantmesh.api").exception(
                "OCO: could not move the other leg",
                extra={"account_id": order.account_id, "client_order_id": order.client_order_id},
            )

    async def _poll_prices(self, state: ApiState) -> None:
        """Push changed latest prices to WebSocket clients (only while someone listens)."""
        seen: dict[str, str] = {}
        interval = state.settings.price_poll_interval_s
        while True:
            await asyncio.sleep(interval)
            if not state.hub.clients:
                continue
            try:
                rows = await state.kv.latest_prices(None)
            except Exception:
                continue  # Redis readiness is reported by /readyz; try again next tick
            for row in rows:
                instrument_id = row["instrument_id"]
                if seen.get(instrument_id) == row.get("ts"):
                    continue
                seen[instrument_id] = row.get("ts", "")
                state.hub.publish(Push(None, "prices", row))
