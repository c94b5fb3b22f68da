"""At most once per client order id: the guarded handler, its sent-log, crashes and redeliveries."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.base import DeliveryOptions, SubscriptionState
from quantmesh_common.bus.kafka import KafkaBus, ensure_topics
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.messages import (
    BookLevel,
    CommandType,
    ExecType,
    ExecutionReport,
    OrderCommand,
    OrderType,
    Side,
)
from quantmesh_common.storage.postgres import create_pool
from quantmesh_common.testing import stubs
from quantmesh_common.testing.postgres import fresh_schema, server_dsn_for_tests
from quantmesh_common.testing.stubs import TS
from quantmesh_common.topics import Topic, TopicRegistry, TopicSpec
from quantmesh_execution.guarded import GuardedExecutionHandler
from quantmesh_execution.outputs import OutputLog
from quantmesh_execution.sentlog import MemorySentLog, PostgresSentLog, SentEntry
from quantmesh_execution.simulated import SimulatedVenue
from quantmesh_execution.venue import AsyncVenueAdapter

D = Decimal
_ids = itertools.count(1)


class Crash(BaseException):
    """A process dying: not an Exception, so the bus neither dead-letters nor commits."""


class CrashAfterVenueCall(AsyncVenueAdapter):
    """The simulated venue, but the first SUBMIT 'kills the process' once the venue has it."""

    def __init__(self, venue: SimulatedVenue) -> None:
        super().__init__(venue)
        self.crashed = False

    async def submit(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        reports = await super().submit(command, now_ns)
        if not self.crashed:
            self.crashed = True
            raise Crash("killed after the venue call, before the Kafka commit")
        return reports


def sim_with_book() -> SimulatedVenue:
    sim = SimulatedVenue(id_prefix="SIM")
    sim.on_book(
        stubs.book_snapshot(
            asks=[
                BookLevel(price=D("50000.20"), size=D("0.5")),
                BookLevel(price=D("50000.30"), size=D("1")),
            ],
            bids=[],
        )
    )
    return sim


def market_buy(quantity: str = "1", **overrides: Any) -> OrderCommand:
    n = next(_ids)
    fields: dict[str, Any] = {
        "command_id": f"C-{n}",
        "client_order_id": f"O-{n}",
        "order_type": OrderType.MARKET,
        "limit_price": None,
        "side": Side.BUY,
        "quantity": D(quantity),
        "ts_event": TS,
    }
    return stubs.order_command(**{**fields, **overrides})


def kinds(reports: list[ExecutionReport]) -> list[ExecType]:
    return [r.exec_type for r in reports]


# -- unit: the handler on its own ----------------------------------------------------------------


async def test_submit_when_client_order_id_is_new_is_claimed_then_sent() -> None:
    sim = sim_with_book()
    log = MemorySentLog()
    handler = GuardedExecutionHandler(AsyncVenueAdapter(sim), log)
    order = market_buy()

    reports = await handler.reports_for(order)

    assert kinds(reports) == [ExecType.ACCEPTED, ExecType.PARTIAL_FILL, ExecType.FILL]
    assert log.entries[("SIM", order.client_order_id)] == SentEntry(
        "SIM", order.client_order_id, order.account_id, order.command_id, "SIM"
    )


async def test_second_submit_when_id_already_sent_is_not_sent_and_gets_the_venue_history() -> None:
    sim = sim_with_book()
    handler = GuardedExecutionHandler(AsyncVenueAdapter(sim), MemorySentLog())
    order = market_buy()
    first = await handler.reports_for(order)

    again = await handler.reports_for(order.model_copy(update={"command_id": "C-again"}))

    assert len(sim.ledger.orders) == 1
    assert kinds(again) == [ExecType.ACCEPTED, ExecType.PARTIAL_FILL, ExecType.FILL]
    assert [r.trade_id for r in again] == [r.trade_id for r in first]


async def test_submit_when_claimed_but_venue_never_got_it_is_rejected_not_sent() -> None:
    # Arrange: the crash came between the sent-log write and the venue call.
    sim = sim_with_book()
    log = MemorySentLog()
    order = market_buy()
    await log.claim(order, "SIM")
    handler = GuardedExecutionHandler(AsyncVenueAdapter(sim), log)

    reports = await handler.reports_for(order)

    assert kinds(reports) == [ExecType.REJECTED]
    assert reports[0].reason == (
        f"ORDER_NOT_FOUND_AT_VENUE: client_order_id={order.client_order_id}, route=SIM"
    )
    assert sim.ledger.orders == []


def query_of(order: OrderCommand, **overrides: Any) -> OrderCommand:
    fields: dict[str, Any] = {
        "command_id": f"{order.client_order_id}:QUERY:start-1",
        "command_type": CommandType.QUERY,
        "side": None,
        "order_type": None,
        "quantity": None,
        "time_in_force": None,
    }
    return order.model_copy(update={**fields, **overrides})


class RouteRecorder(AsyncVenueAdapter):
    """The simulated venue, remembering which route each history lookup asked."""

    def __init__(self, venue: SimulatedVenue) -> None:
        super().__init__(venue)
        self.routes: list[str | None] = []

    async def history(
        self, command: OrderCommand, route: str | None, now_ns: int
    ) -> list[ExecutionReport]:
        self.routes.append(route)
        return await super().history(command, route, now_ns)


async def test_query_when_order_was_sent_asks_its_route_and_republishes_the_same_reports() -> None:
    sim = sim_with_book()
    venue = RouteRecorder(sim)
    handler = GuardedExecutionHandler(venue, MemorySentLog())
    order = market_buy()
    sent = await handler.reports_for(order)

    answer = await handler.reports_for(query_of(order))

    assert answer == sent
    assert [r.report_id for r in answer] == ["SIM-R1", "SIM-R2", "SIM-R3"]
    assert venue.routes == ["SIM"]
    assert len(sim.ledger.orders) == 1


async def test_query_when_id_belongs_to_another_account_is_unknown_order() -> None:
    sim = sim_with_book()
    handler = GuardedExecutionHandler(AsyncVenueAdapter(sim), MemorySentLog())
    order = market_buy()
    await handler.reports_for(order)

    [answer] = await handler.reports_for(query_of(order, account_id="intruder"))

    assert answer.exec_type is ExecType.REJECTED
    assert answer.reason == f"UNKNOWN_ORDER: client_order_id={order.client_order_id}, venue=SIM"
    assert answer.account_id == "intruder"


async def test_query_when_never_sent_is_unknown_order_and_nothing_is_claimed() -> None:
    sim = sim_with_book()
    log = MemorySentLog()
    handler = GuardedExecutionHandler(AsyncVenueAdapter(sim), log)
    order = market_buy()

    [answer] = await handler.reports_for(query_of(order))

    assert (answer.exec_type, answer.report_id) == (
        ExecType.REJECTED,
        f"{order.client_order_id}:QUERY:start-1-R",
    )
    assert log.entries == {}
    assert sim.ledger.orders == []


async def test_memory_bus_when_crash_after_venue_call_redelivery_publishes_history() -> None:
    sim = sim_with_book()
    log = MemorySentLog()
    bus = InMemoryBus("execution", clock=SimulatedClock(TS), retain=True)
    crashing = bus.subscribe(
        "execution-sim",
        [Topic.ORDERS_COMMANDS],
        GuardedExecutionHandler(CrashAfterVenueCall(sim), log),
        transactional=True,
    )
    await crashing.start()
    order = market_buy()
    await bus.publish(Topic.ORDERS_COMMANDS, order)
    await bus.run_until_idle()
    assert crashing.state is SubscriptionState.FAILED
    assert bus.messages(Topic.EXEC_REPORTS) == []
    restarted = bus.subscribe(
        "execution-sim",
        [Topic.ORDERS_COMMANDS],
        GuardedExecutionHandler(AsyncVenueAdapter(sim), log),
        transactional=True,
    )
    await restarted.start()

    await bus.run_until_idle()

    published = [e.payload for e in bus.messages(Topic.EXEC_REPORTS)]
    assert kinds(published) == [ExecType.ACCEPTED, ExecType.PARTIAL_FILL, ExecType.FILL]
    assert [r.trade_id for r in published if r.is_fill] == [f.trade_id for f in sim.ledger.fills]
    assert len(sim.ledger.orders) == 1


# -- integration: real PostgreSQL sent-log, real Kafka transactions ------------------------------

#: Test consumers notice a dead member quickly; 6 s is the broker's minimum session timeout.
_CONSUMER = {"session.timeout.ms": 6_000, "heartbeat.interval.ms": 500}


def _delivery(idempotent: bool) -> DeliveryOptions:
    return {"output_after_batch": True} if idempotent else {"transactional": True}


async def _eventually(predicate: Any, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)


@pytest.mark.integration
@pytest.mark.parametrize("idempotent", [False, True], ids=["transactional", "idempotent"])
async def test_submit_when_crash_after_venue_call_before_kafka_commit_reaches_venue_once(
    idempotent: bool,
) -> None:
    # Arrange: unique topics and group, a fresh migrated schema, a venue outliving "the process".
    # Idempotent delivery (QM_ORDER_FLOW_DELIVERY): no transaction, each process's output log.

    bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
    server = server_dsn_for_tests()
    assert server is not None
    suffix = uuid.uuid4().hex[:10]
    commands, reports_topic = f"qmtest.exec-cmd.{suffix}", f"qmtest.exec-rep.{suffix}"
    registry = TopicRegistry(
        [
            TopicSpec(commands, OrderCommand, "account_id", 1),
            TopicSpec(reports_topic, ExecutionReport, "account_id", 1),
        ]
    )
    await asyncio.to_thread(ensure_topics, bootstrap, registry)
    sim = sim_with_book()
    order = market_buy(client_order_id=f"O-{suffix}")
    with fresh_schema(server, "qm_exec", migrate=True) as dsn:
        pool = await create_pool(dsn)
        bus = KafkaBus("qmtest-exec", bootstrap, registry, consumer_config=_CONSUMER)
        await bus.start()
        seen: list[ExecutionReport] = []
        try:
            group = f"qmtest.exec.{suffix}"
            outputs = OutputLog("SIM", pool) if idempotent else None
            if outputs is not None:
                await outputs.start()
            first = bus.subscribe(
                group,
                [commands],
                GuardedExecutionHandler(
                    CrashAfterVenueCall(sim),
                    PostgresSentLog(pool),
                    reports_topic=reports_topic,
                    outputs=outputs,
                ),
                on_batch=outputs.flush if outputs else None,
                **_delivery(idempotent),
            )
            await first.start()
            reader = bus.subscribe(
                f"{group}.reader", [reports_topic], lambda env: seen.append(env.payload)
            )
            await reader.start()
            await bus.publish(commands, order)
            await bus.flush()
            await _eventually(lambda: first.state is SubscriptionState.FAILED)
            await first.stop()

            # Act: the restarted stage gets the uncommitted SUBMIT again.
            outputs = OutputLog("SIM", pool) if idempotent else None
            if outputs is not None:
                await outputs.start()
            second = bus.subscribe(
                group,
                [commands],
                GuardedExecutionHandler(
                    AsyncVenueAdapter(sim),
                    PostgresSentLog(pool),
                    reports_topic=reports_topic,
                    outputs=outputs,
                ),
                on_batch=outputs.flush if outputs else None,
                **_delivery(idempotent),
            )
            await second.start()
            await _eventually(lambda: any(r.exec_type is ExecType.FILL for r in seen))
            await asyncio.sleep(2.0)  # room for a duplicate to show up; none may
            logged = await pool.fetch("SELECT client_order_id, route FROM execution_sent_orders")
        finally:
            await bus.close()
            await pool.close()

    # Assert: one order and two fills at the venue; its history published once, nothing else.
    assert len(sim.ledger.orders) == 1
    assert kinds(seen) == [ExecType.ACCEPTED, ExecType.PARTIAL_FILL, ExecType.FILL]
    assert [(r.last_qty, r.last_price, r.trade_id) for r in seen if r.is_fill] == [
        (D("0.5"), D("50000.20"), "SIM-T1"),
        (D("0.5"), D("50000.30"), "SIM-T2"),
    ]
    assert [(row["client_order_id"], row["route"]) for row in logged] == [
        (order.client_order_id, "SIM")
    ]


@pytest.mark.integration
async def test_service_when_database_set_guards_submits_and_refuses_an_unmigrated_schema() -> None:
    from quantmesh_common.testing.harness import StageHarness
    from quantmesh_execution.config import ExecutionSettings
    from quantmesh_execution.service import ExecutionService

    server = server_dsn_for_tests()
    assert server is not None
    settings = ExecutionSettings(
        bus="memory", http_port=0, database_url="postgresql://unused", redis_url=None
    )
    with fresh_schema(server, "qm_exec", migrate=True) as dsn:
        pool = await create_pool(dsn)
        try:
            service = ExecutionService(settings)
            await StageHarness(service, now_ns=TS, pg=pool).start()
            assert isinstance(service.handler, GuardedExecutionHandler)
        finally:
            await pool.close()
    with fresh_schema(server, "qm_exec", migrate=False) as dsn:
        pool = await create_pool(dsn)
        try:
            with pytest.raises(RuntimeError, match="run quantmesh-migrate"):
                await StageHarness(ExecutionService(settings), now_ns=TS, pg=pool).start()
        finally:
            await pool.close()
