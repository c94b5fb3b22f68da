"""Account openings, cancel and amend one order, OCO exits on orders and positions."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_api import oco
from quantmesh_api.security import Role
from quantmesh_common.messages import (
    AccountOpened,
    Order,
    OrderIntent,
    OrderRequest,
    OrderRequestAction,
    OrderStatus,
    OrderType,
    Position,
    PositionSide,
    Side,
)
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic

from .conftest import T0_NS, ApiWorld

TRADER = (Role.READ_PORTFOLIO, Role.EXECUTE_TRADES)
D = Decimal


@pytest.fixture
def world(api_world: ApiWorld) -> ApiWorld:
    """The app of the test."""
    return api_world


async def _account(world: ApiWorld, headers: dict[str, str], capital: str = "10000") -> str:
    response = await world.client.post(
        "/api/v1/accounts", headers=headers, json={"capital": capital, "currency": "USDT"}
    )
    assert response.status_code == 201, response.text
    account_id: str = response.json()["account_id"]
    return account_id


def _stored_order(account_id: str, client_order_id: str, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "client_order_id": client_order_id,
        "venue_order_id": None,
        "account_id": account_id,
        "strategy_id": "api",
        "instrument_id": "BTC-USDT.SIM",
        "side": "SELL",
        "order_type": "LIMIT",
        "quantity": D(2),
        "filled_quantity": D(0),
        "avg_fill_price": None,
        "limit_price": D(120),
        "stop_price": None,
        "time_in_force": "GTC",
        "reduce_only": True,
        "status": "ACCEPTED",
        "reason": None,
        "tag": "",
        "ts_init": T0_NS,
        "ts_last": T0_NS,
    }
    row.update(fields)
    return row


def _requests(world: ApiWorld) -> list[OrderRequest]:
    return [e.payload for e in world.bus.messages(Topic.ORDERS_REQUESTS)]


def _intents(world: ApiWorld) -> list[OrderIntent]:
    return [e.payload for e in world.bus.messages(Topic.ORDERS_INTENTS)]


async def _position(world: ApiWorld, account_id: str, quantity: str) -> None:
    position = Position(
        account_id=account_id,
        instrument_id="BTC-USDT.SIM",
        side=PositionSide.of(D(quantity)),
        quantity=D(quantity),
        avg_entry_price=D(100),
        ts_event=T0_NS,
    )
    world.state.projection.apply(await world.bus.publish(Topic.PORTFOLIO_UPDATES, position))


# -------------------------------------------------------------------- account opening --


async def test_create_account_when_valid_publishes_its_opening_keyed_by_account(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)

    account_id = await _account(world, ann, capital="25000.50")

    [record] = world.bus.records(Topic.ACCOUNTS)
    assert record.envelope is not None
    opened = record.envelope.payload
    assert isinstance(opened, AccountOpened)
    assert record.key == account_id
    assert (opened.account_id, opened.owner, opened.venue) == (account_id, "u-ann", "SIM")
    assert opened.base_currency == "USDT"
    assert opened.starting_cash == {"USDT": D("25000.50")}
    assert opened.ts_event == T0_NS


# --------------------------------------------------------------------- cancel / amend --


async def test_cancel_order_when_working_sends_a_cancel_request_to_the_oms(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)
    world.store.orders.append(_stored_order(account_id, "o1"))

    response = await world.client.delete(f"/api/v1/accounts/{account_id}/orders/o1", headers=ann)

    [request] = _requests(world)
    [record] = world.bus.records(Topic.ORDERS_REQUESTS)
    assert response.status_code == 202
    assert response.json()["request_id"] == request.request_id
    assert request.action is OrderRequestAction.CANCEL
    assert (request.account_id, request.client_order_id) == (account_id, "o1")
    assert request.requested_by == "api:ann"
    assert record.key == account_id


async def test_amend_order_when_working_sends_a_replace_with_the_new_terms(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)
    world.store.orders.append(_stored_order(account_id, "o1"))

    response = await world.client.patch(
        f"/api/v1/accounts/{account_id}/orders/o1",
        headers=ann,
        json={"quantity": "1.5", "limit_price": "125"},
    )

    [request] = _requests(world)
    assert response.status_code == 202
    assert request.action is OrderRequestAction.REPLACE
    assert (request.new_quantity, request.new_limit_price) == (D("1.5"), D(125))
    assert request.new_stop_price is None


async def test_amend_order_when_nothing_changes_is_422(world: ApiWorld) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)
    world.store.orders.append(_stored_order(account_id, "o1"))

    response = await world.client.patch(
        f"/api/v1/accounts/{account_id}/orders/o1", headers=ann, json={}
    )

    assert response.status_code == 422
    assert _requests(world) == []


async def test_cancel_order_when_already_filled_is_409_and_sends_nothing(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)
    world.store.orders.append(_stored_order(account_id, "o1", status="FILLED"))

    response = await world.client.delete(f"/api/v1/accounts/{account_id}/orders/o1", headers=ann)

    assert response.status_code == 409
    assert response.json() == {"detail": "ORDER_NOT_WORKING: client_order_id=o1, status=FILLED"}
    assert _requests(world) == []


async def test_cancel_order_when_of_another_account_is_404(world: ApiWorld) -> None:
    ann = await world.headers("ann", *TRADER)
    bob = await world.headers("bob", *TRADER)
    anns = await _account(world, ann)
    bobs = await _account(world, bob)
    world.store.orders.append(_stored_order(bobs, "o-bob"))

    foreign_account = await world.client.delete(
        f"/api/v1/accounts/{bobs}/orders/o-bob", headers=ann
    )
    foreign_order = await world.client.delete(f"/api/v1/accounts/{anns}/orders/o-bob", headers=ann)

    assert foreign_account.status_code == 404
    assert foreign_order.status_code == 404
    assert foreign_order.json() == {"detail": "ORDER_NOT_FOUND: client_order_id=o-bob"}
    assert _requests(world) == []


async def test_cancel_order_when_idempotency_key_repeats_sends_the_same_request_id(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)
    world.store.orders.append(_stored_order(account_id, "o1"))
    url = f"/api/v1/accounts/{account_id}/orders/o1"

    await world.client.delete(url, headers={**ann, "Idempotency-Key": "k1"})
    await world.client.delete(url, headers={**ann, "Idempotency-Key": "k1"})

    first, second = _requests(world)
    assert first.request_id == second.request_id  # the OMS applies it once


# ------------------------------------------------------------------------------- OCO --


async def test_submit_order_when_exits_are_given_asks_the_oms_for_oco_legs(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)

    response = await world.client.post(
        f"/api/v1/accounts/{account_id}/orders",
        headers=ann,
        json={
            "instrument_id": "BTC-USDT.SIM",
            "side": "BUY",
            "quantity": "1",
            "stop_loss": "90",
            "take_profit": "120",
        },
    )

    [intent] = _intents(world)
    assert response.status_code == 202
    assert (response.json()["stop_loss"], response.json()["take_profit"]) == ("90", "120")
    assert (intent.stop_loss_price, intent.take_profit_price) == (D(90), D(120))


async def test_submit_order_when_exits_are_inverted_for_a_buy_is_422(world: ApiWorld) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)

    response = await world.client.post(
        f"/api/v1/accounts/{account_id}/orders",
        headers=ann,
        json={
            "instrument_id": "BTC-USDT.SIM",
            "side": "BUY",
            "quantity": "1",
            "stop_loss": "120",
            "take_profit": "90",
        },
    )

    assert response.status_code == 422
    assert response.json()["detail"].startswith("INVALID_ORDER: stop_loss_price 120")
    assert _intents(world) == []


async def test_protect_position_when_short_sends_linked_buy_stop_and_buy_limit(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)
    await _position(world, account_id, "-2")

    response = await world.client.post(
        f"/api/v1/accounts/{account_id}/positions/BTC-USDT.SIM/protect",
        headers=ann,
        json={"stop_loss": "110", "take_profit": "90"},
    )

    stop, take = _intents(world)
    assert response.status_code == 202
    assert (stop.order_type, stop.side, stop.stop_price) == (OrderType.STOP, Side.BUY, D(110))
    assert (take.order_type, take.side, take.limit_price) == (OrderType.LIMIT, Side.BUY, D(90))
    assert stop.quantity == take.quantity == D(2)
    assert stop.reduce_only
    assert take.reduce_only
    assert (stop.tag, take.tag) == (oco.PROTECT_SL, oco.PROTECT_TP)
    base = stop.client_order_id.removesuffix(":SL")
    assert take.client_order_id == base + ":TP"


async def test_protect_position_when_exits_do_not_fit_a_long_is_422_and_sends_nothing(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)
    await _position(world, account_id, "2")

    response = await world.client.post(
        f"/api/v1/accounts/{account_id}/positions/BTC-USDT.SIM/protect",
        headers=ann,
        json={"stop_loss": "110", "take_profit": "90"},
    )

    assert response.status_code == 422
    assert response.json()["detail"].startswith("EXITS_DO_NOT_FIT_POSITION")
    assert _intents(world) == []


def _leg(account_id: str, leg: str, status: OrderStatus, filled: str) -> Order:
    return Order(
        client_order_id=f"api-p1:{leg}",
        account_id=account_id,
        strategy_id="api",
        instrument_id="BTC-USDT.SIM",
        side=Side.SELL,
        order_type=OrderType.STOP if leg == "SL" else OrderType.LIMIT,
        quantity=D(2),
        filled_quantity=D(filled),
        avg_fill_price=D(95) if D(filled) else None,
        stop_price=D(95) if leg == "SL" else None,
        limit_price=D(120) if leg == "TP" else None,
        reduce_only=True,
        status=status,
        tag=oco.PROTECT_SL if leg == "SL" else oco.PROTECT_TP,
        ts_init=T0_NS,
        ts_last=T0_NS,
    )


async def test_protect_leg_when_filled_cancels_the_other_leg(world: ApiWorld) -> None:
    world.store.orders.append(_stored_order("acc-1", "api-p1:TP", tag=oco.PROTECT_TP))

    request = await oco.follow(world.state, _leg("acc-1", "SL", OrderStatus.FILLED, "2"))

    assert request is not None
    assert _requests(world) == [request]
    assert request.action is OrderRequestAction.CANCEL
    assert request.client_order_id == "api-p1:TP"
    assert request.request_id == "api-p1:TP:OCO-CANCEL"


async def test_protect_leg_when_partly_filled_resizes_the_other_to_the_position_left(
    world: ApiWorld,
) -> None:
    world.store.orders.append(_stored_order("acc-1", "api-p1:TP", tag=oco.PROTECT_TP))

    request = await oco.follow(
        world.state, _leg("acc-1", "SL", OrderStatus.PARTIALLY_FILLED, "0.5")
    )

    assert request is not None
    assert request.action is OrderRequestAction.REPLACE
    assert request.new_quantity == D("1.5")  # 2 - 0.5 left in the position
    assert request.request_id == "api-p1:TP:OCO-0.5"


async def test_protect_leg_when_the_other_is_no_longer_working_sends_nothing(
    world: ApiWorld,
) -> None:
    world.store.orders.append(
        _stored_order("acc-1", "api-p1:TP", tag=oco.PROTECT_TP, status="CANCELED")
    )

    request = await oco.follow(world.state, _leg("acc-1", "SL", OrderStatus.FILLED, "2"))

    assert request is None
    assert _requests(world) == []


def test_sibling_of_when_an_order_is_not_a_filled_protect_leg_is_none() -> None:
    unfilled = _leg("acc-1", "SL", OrderStatus.ACCEPTED, "0")
    other_tag = _leg("acc-1", "SL", OrderStatus.FILLED, "2").model_copy(update={"tag": "manual"})

    assert oco.sibling_of(unfilled) is None
    assert oco.sibling_of(other_tag) is None


# ----------------------------------------------------------------------- performance --


async def test_performance_when_the_portfolio_stored_a_report_serves_its_trade_figures(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)
    report = stubs.performance_report(
        account_id=account_id,
        report_id=f"PERF:{account_id}:{T0_NS}",
        trades=4,
        wins=3,
        losses=1,
        win_rate=0.75,
        profit_factor=float("inf"),
        mean_mae_fraction=0.01,
        mean_mfe_fraction=0.03,
    )
    world.store.performance[account_id] = json.loads(report.model_dump_json())

    response = await world.client.get(f"/api/v1/accounts/{account_id}/performance", headers=ann)

    body = response.json()
    assert response.status_code == 200
    assert body["source"] == "portfolio"
    assert (body["trades"], body["wins"], body["losses"]) == (4, 3, 1)
    assert body["win_rate"] == 0.75
    assert body["profit_factor"] == "Infinity"  # no losing trade's loss to divide by
    assert body["expectancy"] == "100"
    assert (body["mean_mae_fraction"], body["mean_mfe_fraction"]) == (0.01, 0.03)
    assert body["round_trips"][0]["mae"] == "100"
    assert body["total_return"] == 0.001


async def test_performance_when_no_report_is_stored_falls_back_to_the_snapshots(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)

    response = await world.client.get(f"/api/v1/accounts/{account_id}/performance", headers=ann)

    body = response.json()
    assert body["source"] == "snapshots"
    assert body["points"] == 0
    assert body["win_rate"] is None


async def test_performance_when_a_strategy_is_named_serves_that_strategys_report(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)
    whole = stubs.performance_report(account_id=account_id, trades=9)
    sma = stubs.performance_report(
        account_id=account_id, strategy_id="sma-btc", trades=2, wins=1, losses=1, win_rate=0.5
    )
    rsi = stubs.performance_report(account_id=account_id, strategy_id="rsi-eth", trades=5)
    world.store.performance[account_id] = json.loads(whole.model_dump_json())
    for report in (sma, rsi):
        key = (account_id, str(report.strategy_id))
        world.store.strategy_performance[key] = json.loads(report.model_dump_json())
    url = f"/api/v1/accounts/{account_id}/performance"

    one = await world.client.get(url, headers=ann, params={"strategy_id": "sma-btc"})
    account = await world.client.get(url, headers=ann)
    listed = await world.client.get(url + "/strategies", headers=ann)
    missing = await world.client.get(url, headers=ann, params={"strategy_id": "nope"})

    assert (one.json()["strategy_id"], one.json()["trades"], one.json()["win_rate"]) == (
        "sma-btc",
        2,
        0.5,
    )
    assert (account.json()["strategy_id"], account.json()["trades"]) == (None, 9)
    assert [(p["strategy_id"], p["trades"]) for p in listed.json()] == [
        ("rsi-eth", 5),
        ("sma-btc", 2),
    ]
    assert missing.status_code == 404
    assert missing.json()["detail"] == (
        f"PERFORMANCE_NOT_FOUND: account_id={account_id}, strategy_id=nope"
    )


async def test_strategy_performance_when_the_account_is_someone_elses_is_404(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)
    bob = await world.headers("bob", *TRADER)
    account_id = await _account(world, ann)
    report = stubs.performance_report(account_id=account_id, strategy_id="sma-btc")
    world.store.strategy_performance[(account_id, "sma-btc")] = json.loads(report.model_dump_json())
    url = f"/api/v1/accounts/{account_id}/performance"

    one = await world.client.get(url, headers=bob, params={"strategy_id": "sma-btc"})
    listed = await world.client.get(url + "/strategies", headers=bob)

    assert (one.status_code, listed.status_code) == (404, 404)


# ------------------------------------------------------------------------ price cache --


def _price(price: str) -> dict[str, str]:
    return {"price": price, "ts": str(T0_NS)}


@pytest.mark.parametrize(("cache_s", "second_price"), [(60.0, "101"), (0.0, "102")])
async def test_latest_prices_when_cached_serve_one_read_for_the_cache_time(
    api_world_factory: Any, cache_s: float, second_price: str
) -> None:
    world = await api_world_factory(price_cache_s=cache_s)
    headers = await world.headers("ann", Role.READ_PORTFOLIO)
    world.kv.prices["BTC-USDT.SIM"] = _price("101")
    first = await world.client.get("/api/v1/market/prices", headers=headers)
    world.kv.prices["BTC-USDT.SIM"] = _price("102")

    second = await world.client.get("/api/v1/market/prices", headers=headers)
    one = await world.client.get(
        "/api/v1/market/prices", headers=headers, params={"instrument_id": "BTC-USDT.SIM"}
    )

    assert first.json()[0]["price"] == "101"
    assert second.json()[0]["price"] == second_price
    assert second.headers["content-type"] == "application/json"
    assert one.json()[0]["price"] == "102"  # a chosen list is always read fresh
