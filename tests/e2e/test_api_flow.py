"""The api in front of the order flow, every stage its own process on the real stack.

risk, oms, execution (simulated venue) and portfolio run as in production, the api beside
them (`quantmesh-api`); prices are trade ticks published on `md.ticks` for a fresh
instrument, as the marketdata stage would. An admin registers a user, who logs in, opens a
paper account, buys, sees the fill on the WebSocket and the position in REST, protects it
with a stop-loss that the next ticks trigger, and finds the position closed and the stop in
the order history. A second user can neither read nor trade the first one's account.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest
import websockets
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.messages import AggressorSide, Tick, TickKind
from quantmesh_common.topics import Topic
from tests.e2e.conftest import Mesh, free_port, kafka_bootstrap
from tests.e2e.orderflow import wait_groups_free

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ADMIN_PASSWORD = "e2e-admin-password"
PASSWORD = "e2e-user-password"
#: A fresh api replays the update topics from their start before it sees new updates (on a
#: shared broker, everything other runs wrote): waits on what it pushes are generous.
WAIT_S = 420.0
STAGES = ("risk", "oms", "execution", "portfolio")


def _stage_env(database_url: str) -> dict[str, dict[str, str]]:
    common = {
        "QM_KAFKA_BOOTSTRAP": kafka_bootstrap(),
        "QM_DATABASE_URL": database_url,
        "QM_LOG_LEVEL": "WARNING",
    }
    return {
        "risk": {**common, "QM_RISK_LIMITS": "{}"},
        "oms": common,
        "execution": {**common, "QM_VENUE": "SIM"},
        "portfolio": {**common, "QM_SNAPSHOT_INTERVAL_S": "1"},
    }


class Feed:
    """Publishes trade ticks of one instrument on md.ticks, stamped with the wall clock."""

    def __init__(self, instrument_id: str) -> None:
        self.instrument_id = instrument_id
        self.bus = KafkaBus("e2e-api-feed", kafka_bootstrap())
        self.count = 0

    async def trade(self, price: str) -> None:
        self.count += 1
        now = time.time_ns()
        tick = Tick(
            instrument_id=self.instrument_id,
            venue="SIM",
            kind=TickKind.TRADE,
            price=Decimal(price),
            size=Decimal("5"),
            aggressor_side=AggressorSide.BUYER,
            trade_id=f"t{self.count}",
            ts_event=now,
            ts_init=now,
        )
        await self.bus.publish(Topic.MD_TICKS, tick, key=self.instrument_id)
        await self.bus.flush()


def _ticks_end() -> dict[int, int]:
    """The end offset of every md.ticks partition now."""
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap(), "group.id": "e2e-api-probe"})
    try:
        metadata = consumer.list_topics(Topic.MD_TICKS, timeout=10)
        return {
            p: consumer.get_watermark_offsets(TopicPartition(Topic.MD_TICKS, p), timeout=10)[1]
            for p in metadata.topics[Topic.MD_TICKS].partitions
        }
    finally:
        consumer.close()


def _committed(group: str) -> dict[int, int]:
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap()})
    request = ConsumerGroupTopicPartitions(group)
    [future] = admin.list_consumer_group_offsets([request]).values()
    return {
        tp.partition: tp.offset
        for tp in future.result().topic_partitions
        if tp.topic == Topic.MD_TICKS
    }


async def _stage_has_read(group: str, ends: dict[int, int], timeout: float) -> None:
    """Wait until `group` committed md.ticks up to `ends` (it has applied those ticks)."""
    deadline = time.monotonic() + timeout
    committed: dict[int, int] = {}
    while time.monotonic() < deadline:
        committed = await asyncio.to_thread(_committed, group)
        if all(committed.get(p, -1) >= end for p, end in ends.items() if end > 0):
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{group} did not read md.ticks up to {ends}: {committed}")


class Socket:
    """A WebSocket client that collects every message in the background."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.messages: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.connection:
                self.messages.append(json.loads(raw))

    async def first(self, match: Callable[[dict[str, Any]], bool], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((m for m in self.messages if match(m)), None)
            if found is not None:
                return found
            if self.task.done():
                raise AssertionError(f"the WebSocket closed: {self.messages[-3:]}")
            await asyncio.sleep(0.2)
        raise AssertionError(f"no matching WebSocket message in {timeout}s: {self.messages[-5:]}")


async def _until(
    fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float, what: str
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await fetch()
        if done(last):
            return last
        await asyncio.sleep(0.5)
    shown = f"{last.status_code} {last.text[:500]}" if isinstance(last, httpx.Response) else last
    raise AssertionError(f"{what}: not reached in {timeout}s; last {shown!r}")


@pytest.fixture
async def api_mesh(mesh: Mesh, database_url: str) -> tuple[Mesh, str]:
    """risk, oms, execution, portfolio and the api as processes (the mesh stops them)."""
    busy = await wait_groups_free(kafka_bootstrap(), timeout=120.0)
    if busy:
        pytest.skip(f"another order-flow run holds the stages' consumer groups: {busy}")
    env = _stage_env(database_url)
    for stage in STAGES:
        await mesh.start(stage, env[stage])
    api_port = free_port()
    prefix = f"qme2e:api:{uuid.uuid4().hex[:8]}:"
    await mesh.start(
        "api",
        {
            "QM_KAFKA_BOOTSTRAP": kafka_bootstrap(),
            "QM_DATABASE_URL": database_url,
            "QM_REDIS_URL": os.environ["QM_REDIS_URL"],
            "QM_API_PORT": str(api_port),
            "QM_JWT_SECRET": "e2e-" + uuid.uuid4().hex + uuid.uuid4().hex,
            "QM_ENVIRONMENT": "test",
            "QM_BOOTSTRAP_ADMIN_USER": "admin",
            "QM_BOOTSTRAP_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "QM_REDIS_PREFIX": prefix,
            "QM_MD_REDIS_PREFIX": prefix + "md:",
            "QM_LOG_LEVEL": "WARNING",
        },
    )
    await mesh.wait_ready()
    return mesh, f"127.0.0.1:{api_port}"


async def _login(client: httpx.AsyncClient, username: str, password: str) -> dict[str, str]:
    response = await client.post(
        "/api/v1/auth/token", data={"username": username, "password": password}
    )
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def test_api_flow_when_user_buys_and_stop_triggers_fill_position_and_stop_are_seen(
    api_mesh: tuple[Mesh, str],
) -> None:
    mesh, host = api_mesh
    tag = uuid.uuid4().hex[:10].upper()
    instrument = f"E2EAPI{tag}-USDT.SIM"
    feed = Feed(instrument)
    await feed.bus.start()
    async with httpx.AsyncClient(base_url=f"http://{host}", timeout=60.0) as client:
        # An admin registers two traders.
        admin = await _login(client, "admin", ADMIN_PASSWORD)
        for name in ("alice", "bob"):
            created = await client.post(
                "/api/v1/users",
                json={
                    "username": f"{name}-{tag}",
                    "password": PASSWORD,
                    "roles": ["READ_PORTFOLIO", "EXECUTE_TRADES"],
                },
                headers=admin,
            )
            assert created.status_code == 201, created.text
        alice = await _login(client, f"alice-{tag}", PASSWORD)
        bob = await _login(client, f"bob-{tag}", PASSWORD)
        opened = await client.post(
            "/api/v1/accounts", json={"capital": "100000", "currency": "USDT"}, headers=alice
        )
        assert opened.status_code == 201, opened.text
        account = opened.json()["account_id"]
        base = f"/api/v1/accounts/{account}"

        # Prices first: a market order needs a last trade at the simulated venue.
        for _ in range(3):
            await feed.trade("100")
        await _stage_has_read("execution-sim", await asyncio.to_thread(_ticks_end), WAIT_S)
        token = alice["Authorization"].removeprefix("Bearer ")
        async with websockets.connect(f"ws://{host}/api/v1/ws?token={token}") as connection:
            socket = Socket(connection)
            hello = await socket.first(lambda m: m["channel"] == "hello", 60.0)
            assert hello["data"]["accounts"] == [account]

            bought = await client.post(
                f"{base}/orders",
                json={"instrument_id": instrument, "side": "BUY", "quantity": "2"},
                headers={**alice, "Idempotency-Key": f"buy-{tag}"},
            )
            assert bought.status_code == 202, bought.text
            entry = bought.json()["client_order_id"]

            fill = await socket.first(
                lambda m: m["channel"] == "fills" and m["data"]["client_order_id"] == entry,
                WAIT_S,
            )
            assert fill["account_id"] == account
            assert Decimal(fill["data"]["last_qty"]) == Decimal("2")
            assert Decimal(fill["data"]["last_price"]) == Decimal("100")

            positions = await _until(
                lambda: client.get(f"{base}/positions", headers=alice),
                lambda r: r.status_code == 200 and r.json(),
                WAIT_S,
                "the position in REST",
            )
            [position] = positions.json()
            assert (position["instrument_id"], Decimal(position["quantity"])) == (
                instrument,
                Decimal("2"),
            )

            # The other trader can neither see nor trade this account.
            assert (await client.get(base, headers=bob)).status_code == 404
            assert (await client.get(f"{base}/positions", headers=bob)).status_code == 404
            assert (await client.get(f"{base}/orders", headers=bob)).status_code == 404
            stolen = await client.post(
                f"{base}/orders",
                json={"instrument_id": instrument, "side": "SELL", "quantity": "2"},
                headers=bob,
            )
            assert stolen.status_code == 404, stolen.text
            closed_by_bob = await client.post(f"{base}/positions/{instrument}/close", headers=bob)
            assert closed_by_bob.status_code == 404

            # A stop-loss at 95, then the price falls through it.
            protected = await client.post(
                f"{base}/positions/{instrument}/protect",
                json={"stop_loss": "95"},
                headers=alice,
            )
            assert protected.status_code == 202, protected.text
            [stop] = protected.json()
            stop_id = stop["client_order_id"]
            await _until(
                lambda: client.get(f"{base}/orders/{stop_id}", headers=alice),
                lambda r: r.status_code == 200 and r.json()["status"] == "ACCEPTED",
                WAIT_S,
                "the stop-loss working at the venue",
            )
            for price in ("97", "94", "94"):
                await feed.trade(price)

            stop_fill = await socket.first(
                lambda m: m["channel"] == "fills" and m["data"]["client_order_id"] == stop_id,
                WAIT_S,
            )
            assert Decimal(stop_fill["data"]["last_qty"]) == Decimal("2")
            assert Decimal(stop_fill["data"]["last_price"]) == Decimal("94")

        history = await _until(
            lambda: client.get(f"{base}/orders", headers=alice),
            lambda r: (
                r.status_code == 200
                and {o["client_order_id"]: o["status"] for o in r.json()}.get(stop_id) == "FILLED"
            ),
            WAIT_S,
            "the filled stop-loss in the order history",
        )
        orders = {o["client_order_id"]: o for o in history.json()}
        assert orders[entry]["status"] == "FILLED"
        assert (orders[stop_id]["side"], orders[stop_id]["order_type"]) == ("SELL", "STOP")
        assert Decimal(orders[stop_id]["filled_quantity"]) == Decimal("2")
        assert orders[stop_id]["reduce_only"] is True
        await _until(
            lambda: client.get(f"{base}/positions", headers=alice),
            lambda r: r.status_code == 200 and r.json() == [],
            # The portfolio publishes the position with the fill just seen: no replay to wait for.
            120.0,
            "the position closed in REST",
        )
        # Bob's order history of the account is as closed to him as the account.
        assert (await client.get(f"{base}/trades", headers=bob)).status_code == 404
    await feed.bus.close()
    assert [s.name for s in mesh.stages.values() if s.returncode is not None] == []
