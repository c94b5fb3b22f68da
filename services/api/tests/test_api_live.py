"""Projections of the update topics and the WebSocket fan-out with back-pressure."""

from __future__ import annotations

from decimal import Decimal

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from quantmesh_api import live
from quantmesh_api.app import create_app
from quantmesh_api.live import Client, Hub, Projection, Push
from quantmesh_api.security import Role
from quantmesh_api.service import ApiService
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import Order, OrderStatus, OrderType, Side
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic

from .conftest import T0_NS, ApiWorld


def _order(account_id: str, status: OrderStatus, ts_last: int) -> Order:
    return Order(
        client_order_id="o1",
        account_id=account_id,
        strategy_id="api",
        instrument_id="BTC-USDT.SIM",
        side=Side.BUY,
        order_type=OrderType.MARKET,
        quantity=Decimal(1),
        status=status,
        ts_init=T0_NS,
        ts_last=ts_last,
    )


def _envelope(payload: Order) -> Envelope[Order]:
    return Envelope.wrap(payload, source="oms", ts_event=payload.ts_last, ts_init=payload.ts_last)


def test_projection_when_an_older_order_state_arrives_keeps_the_newer() -> None:
    projection = Projection()
    projection.apply(_envelope(_order("a1", OrderStatus.FILLED, T0_NS + 2)))

    pushes = projection.apply(_envelope(_order("a1", OrderStatus.ACCEPTED, T0_NS + 1)))

    assert pushes == []
    assert projection.view("a1").orders["o1"].status is OrderStatus.FILLED


def test_projection_when_more_orders_than_kept_forgets_the_oldest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(live, "ORDERS_KEPT", 2)
    projection = Projection()

    for n in (1, 2, 3):
        order = _order("a1", OrderStatus.ACCEPTED, T0_NS + n)
        projection.apply(_envelope(order.model_copy(update={"client_order_id": f"o{n}"})))

    assert list(projection.view("a1").orders) == ["o2", "o3"]


def test_hub_when_a_client_falls_behind_drops_it_and_serves_the_others() -> None:
    hub = Hub()
    slow = Client("u1", {"a1"}, admin=False, queue_size=2)
    fast = Client("u2", {"a1"}, admin=False, queue_size=10)
    hub.add(slow)
    hub.add(fast)

    delivered = [hub.publish(Push("a1", "orders", {"n": n})) for n in range(3)]

    assert delivered == [2, 2, 1]
    assert slow.dropped.is_set()
    assert hub.clients == {fast}
    assert fast.queue.qsize() == 3


def test_hub_when_push_is_for_another_account_skips_the_client() -> None:
    hub = Hub()
    client = Client("u1", {"a1"}, admin=False, queue_size=10)
    hub.add(client)

    delivered = hub.publish(Push("a2", "orders", {}))
    admin_only = hub.publish(Push(None, "alerts", {}))

    assert (delivered, admin_only) == (0, 0)


def test_hub_when_collector_status_is_pushed_reaches_every_client() -> None:
    hub = Hub()
    reader = Client("u1", set(), admin=False, queue_size=10)
    admin = Client("u2", set(), admin=True, queue_size=10)
    hub.add(reader)
    hub.add(admin)

    delivered = hub.publish(Push(None, "collector", {"job_id": "j1"}))

    assert delivered == 2
    assert reader.queue.get_nowait()["data"] == {"job_id": "j1"}


def test_service_when_a_collector_status_arrives_pushes_only_the_newest(
    api_world: ApiWorld,
) -> None:
    service = ApiService(api_world.state.settings)
    service.state = api_world.state
    client = Client("u1", set(), admin=False, queue_size=10)
    api_world.state.hub.add(client)
    newer = stubs.collector_status(job_id="j1", progress=0.5, fetched=500, ts_event=T0_NS + 2)
    older = stubs.collector_status(job_id="j1", progress=0.25, ts_event=T0_NS + 1)

    service.on_collector(stubs.envelope(newer))
    service.on_collector(stubs.envelope(older))

    assert client.queue.qsize() == 1
    message = client.queue.get_nowait()
    assert (message["channel"], message["account_id"]) == ("collector", None)
    assert (message["data"]["job_id"], message["data"]["progress"]) == ("j1", 0.5)
    assert message["data"]["fetched"] == 500


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_websocket_when_authenticated_receives_only_its_accounts_updates(
    api_world: ApiWorld,
) -> None:
    ann = await api_world.headers("ann", Role.READ_PORTFOLIO, Role.EXECUTE_TRADES)
    token = ann["Authorization"].removeprefix("Bearer ")
    account_id = (
        await api_world.client.post("/api/v1/accounts", headers=ann, json={"capital": "100"})
    ).json()["account_id"]
    other = await api_world.bus.publish(
        Topic.ORDERS_UPDATES, _order("someone-else", OrderStatus.ACCEPTED, T0_NS)
    )
    mine = await api_world.bus.publish(
        Topic.ORDERS_UPDATES, _order(account_id, OrderStatus.ACCEPTED, T0_NS)
    )

    with (
        TestClient(create_app(api_world.state)) as client,
        client.websocket_connect(f"/api/v1/ws?token={token}") as ws,
    ):
        hello = ws.receive_json()
        for envelope in (other, mine):
            for push in api_world.state.projection.apply(envelope):
                api_world.state.hub.publish(push)
        update = ws.receive_json()

    assert hello["data"]["accounts"] == [account_id]
    assert update["channel"] == "orders"
    assert update["account_id"] == account_id
    assert update["data"]["status"] == "ACCEPTED"


async def test_websocket_when_token_is_bad_is_closed_with_1008(api_world: ApiWorld) -> None:
    with (
        TestClient(create_app(api_world.state)) as client,
        client.websocket_connect("/api/v1/ws?token=nonsense") as ws,
        pytest.raises(WebSocketDisconnect) as closed,
    ):
        ws.receive_json()

    assert closed.value.code == 1008
