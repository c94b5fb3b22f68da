"""Accounts, orders to Kafka, positions and balances from the projection, market data, control."""

from __future__ import annotations

from decimal import Decimal

import pytest

from quantmesh_api.security import Role
from quantmesh_common.messages import (
    ControlAction,
    ControlCommand,
    OrderIntent,
    OrderType,
    PortfolioSnapshot,
    Position,
    PositionSide,
    Side,
)
from quantmesh_common.topics import Topic

from .conftest import T0_NS, ApiWorld

TRADER = (Role.READ_PORTFOLIO, Role.EXECUTE_TRADES)


@pytest.fixture
def world(api_world: ApiWorld) -> ApiWorld:
    """The app of the test."""
    return api_world


async def _account(world: ApiWorld, headers: dict[str, str], venue: str = "SIM") -> str:
    response = await world.client.post(
        "/api/v1/accounts",
        headers=headers,
        json={"name": "paper", "capital": "10000", "currency": "USDT", "venue": venue},
    )
    assert response.status_code == 201, response.text
    account_id: str = response.json()["account_id"]
    return account_id


def _intents(world: ApiWorld) -> list[OrderIntent]:
    return [e.payload for e in world.bus.messages(Topic.ORDERS_INTENTS)]


def _commands(world: ApiWorld) -> list[ControlCommand]:
    return [e.payload for e in world.bus.messages(Topic.CONTROL)]


async def _apply_position(world: ApiWorld, account_id: str, quantity: str) -> None:
    position = Position(
        account_id=account_id,
        instrument_id="BTC-USDT.SIM",
        side=PositionSide.of(Decimal(quantity)),
        quantity=Decimal(quantity),
        avg_entry_price=Decimal("100"),
        ts_event=T0_NS,
    )
    envelope = await world.bus.publish(Topic.PORTFOLIO_UPDATES, position)
    world.state.projection.apply(envelope)


async def test_create_account_when_valid_is_listed_for_its_owner_only(world: ApiWorld) -> None:
    ann = await world.headers("ann", *TRADER)
    bob = await world.headers("bob", *TRADER)

    account_id = await _account(world, ann)
    anns = (await world.client.get("/api/v1/accounts", headers=ann)).json()
    bobs = (await world.client.get("/api/v1/accounts", headers=bob)).json()

    assert [a["account_id"] for a in anns] == [account_id]
    assert anns[0]["starting_capital"] == "10000"
    assert anns[0]["mode"] == "PAPER"
    assert bobs == []


async def test_other_users_account_when_read_or_traded_is_404(world: ApiWorld) -> None:
    ann = await world.headers("ann", *TRADER)
    bob = await world.headers("bob", *TRADER)
    account_id = await _account(world, ann)

    read = await world.client.get(f"/api/v1/accounts/{account_id}/positions", headers=bob)
    trade = await world.client.post(
        f"/api/v1/accounts/{account_id}/orders",
        headers=bob,
        json={"instrument_id": "BTC-USDT.SIM", "side": "BUY", "quantity": "1"},
    )

    assert read.status_code == 404
    assert trade.status_code == 404
    assert trade.json() == {"detail": f"ACCOUNT_NOT_FOUND: account_id={account_id}"}
    assert _intents(world) == []


async def test_submit_order_when_valid_sends_the_intent_to_risk(world: ApiWorld) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)

    response = await world.client.post(
        f"/api/v1/accounts/{account_id}/orders",
        headers=ann,
        json={
            "instrument_id": "BTC-USDT.SIM",
            "side": "BUY",
            "order_type": "LIMIT",
            "quantity": "0.5",
            "limit_price": "100.5",
        },
    )

    [intent] = _intents(world)
    assert response.status_code == 202
    assert response.json()["client_order_id"] == intent.client_order_id
    assert intent.account_id == account_id
    assert (intent.side, intent.order_type) == (Side.BUY, OrderType.LIMIT)
    assert (intent.quantity, intent.limit_price) == (Decimal("0.5"), Decimal("100.5"))
    assert intent.strategy_id == "api"


async def test_submit_order_when_by_notional_divides_by_the_latest_price(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)
    world.kv.prices["BTC-USDT.SIM"] = {"price": "300", "ts": str(T0_NS)}

    response = await world.client.post(
        f"/api/v1/accounts/{account_id}/orders",
        headers=ann,
        json={"instrument_id": "BTC-USDT.SIM", "side": "BUY", "notional": "100"},
    )

    assert response.status_code == 202
    # 100 / 300 = 0.333... cut down to 8 decimals.
    assert _intents(world)[0].quantity == Decimal("0.33333333")


async def test_submit_order_when_notional_has_no_price_is_422(world: ApiWorld) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)

    response = await world.client.post(
        f"/api/v1/accounts/{account_id}/orders",
        headers=ann,
        json={"instrument_id": "BTC-USDT.SIM", "side": "BUY", "notional": "100"},
    )

    assert response.status_code == 422
    assert response.json() == {"detail": "NO_REFERENCE_PRICE: instrument_id=BTC-USDT.SIM"}


async def test_submit_order_when_limit_lacks_its_price_is_422_saying_so(
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
            "order_type": "LIMIT",
            "quantity": "1",
        },
    )

    assert response.status_code == 422
    assert response.json() == {"detail": "INVALID_ORDER: a LIMIT order needs limit_price"}


async def test_submit_order_when_venue_differs_from_the_accounts_is_422(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)

    response = await world.client.post(
        f"/api/v1/accounts/{account_id}/orders",
        headers=ann,
        json={"instrument_id": "BTC-USDT.BINANCE", "side": "BUY", "quantity": "1"},
    )

    assert response.status_code == 422
    assert response.json()["detail"].startswith("INSTRUMENT_NOT_ON_ACCOUNT_VENUE")


async def test_submit_order_when_quantity_and_notional_both_given_is_422(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)

    response = await world.client.post(
        f"/api/v1/accounts/{account_id}/orders",
        headers=ann,
        json={"instrument_id": "BTC-USDT.SIM", "side": "BUY", "quantity": "1", "notional": "5"},
    )

    assert response.status_code == 422
    assert "exactly one of quantity and notional" in response.text


async def test_submit_order_when_idempotency_key_repeats_sends_one_intent(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)
    body = {"instrument_id": "BTC-USDT.SIM", "side": "SELL", "quantity": "2"}
    headers = {**ann, "Idempotency-Key": "order-42"}

    first = await world.client.post(
        f"/api/v1/accounts/{account_id}/orders", headers=headers, json=body
    )
    second = await world.client.post(
        f"/api/v1/accounts/{account_id}/orders", headers=headers, json=body
    )

    assert first.status_code == second.status_code == 202
    assert second.json() == first.json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert len(_intents(world)) == 1


async def test_submit_order_when_idempotency_key_is_reused_for_another_body_is_422(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)
    headers = {**ann, "Idempotency-Key": "order-42"}
    url = f"/api/v1/accounts/{account_id}/orders"

    await world.client.post(
        url,
        headers=headers,
        json={"instrument_id": "BTC-USDT.SIM", "side": "SELL", "quantity": "2"},
    )
    other = await world.client.post(
        url,
        headers=headers,
        json={"instrument_id": "BTC-USDT.SIM", "side": "SELL", "quantity": "3"},
    )

    assert other.status_code == 422
    assert other.json()["detail"].startswith("IDEMPOTENCY_KEY_REUSED")
    assert len(_intents(world)) == 1


async def test_positions_when_the_portfolio_published_one_are_listed(world: ApiWorld) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)
    await _apply_position(world, account_id, "1.5")

    response = await world.client.get(f"/api/v1/accounts/{account_id}/positions", headers=ann)

    [position] = response.json()
    assert position["instrument_id"] == "BTC-USDT.SIM"
    assert position["quantity"] == "1.5"
    assert position["side"] == "LONG"


async def test_close_position_when_long_sells_the_whole_quantity_reduce_only(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)
    await _apply_position(world, account_id, "1.5")

    response = await world.client.post(
        f"/api/v1/accounts/{account_id}/positions/BTC-USDT.SIM/close", headers=ann
    )

    [intent] = _intents(world)
    assert response.status_code == 202
    assert (intent.side, intent.quantity, intent.reduce_only) == (Side.SELL, Decimal("1.5"), True)
    assert intent.order_type is OrderType.MARKET


async def test_close_position_when_flat_is_404(world: ApiWorld) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)

    response = await world.client.post(
        f"/api/v1/accounts/{account_id}/positions/BTC-USDT.SIM/close", headers=ann
    )

    assert response.status_code == 404
    assert response.json() == {"detail": "NO_OPEN_POSITION: instrument_id=BTC-USDT.SIM"}


async def test_balances_and_performance_when_snapshots_arrived_come_from_them(
    world: ApiWorld,
) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)
    for i, equity in enumerate(["10000", "11000", "9900"]):
        snapshot = PortfolioSnapshot(
            account_id=account_id,
            base_currency="USDT",
            balances={"USDT": Decimal(equity)},
            equity=Decimal(equity),
            ts_event=T0_NS + i * 86_400 * 1_000_000_000,
        )
        world.state.projection.apply(await world.bus.publish(Topic.PORTFOLIO_SNAPSHOTS, snapshot))

    balances = (
        await world.client.get(f"/api/v1/accounts/{account_id}/balances", headers=ann)
    ).json()
    performance = (
        await world.client.get(f"/api/v1/accounts/{account_id}/performance", headers=ann)
    ).json()

    assert balances["balances"] == {"USDT": "9900"}
    assert balances["equity"] == "9900"
    assert performance["points"] == 3
    assert performance["total_return"] == pytest.approx(-0.01)  # 9900 / 10000 - 1
    assert performance["max_drawdown"] == pytest.approx(0.1)  # 11000 -> 9900, a depth


async def test_orders_and_trades_when_stored_are_listed_newest_first(world: ApiWorld) -> None:
    ann = await world.headers("ann", *TRADER)
    account_id = await _account(world, ann)
    base = {
        "venue_order_id": None,
        "account_id": account_id,
        "strategy_id": "api",
        "instrument_id": "BTC-USDT.SIM",
        "side": "BUY",
        "order_type": "MARKET",
        "quantity": Decimal(1),
        "filled_quantity": Decimal(0),
        "avg_fill_price": None,
        "limit_price": None,
        "stop_price": None,
        "time_in_force": "GTC",
        "reduce_only": False,
        "reason": None,
        "tag": "",
        "ts_last": T0_NS,
    }
    world.store.orders += [
        {**base, "client_order_id": "o1", "status": "FILLED", "ts_init": T0_NS},
        {**base, "client_order_id": "o2", "status": "ACCEPTED", "ts_init": T0_NS + 1},
    ]

    everything = await world.client.get(f"/api/v1/accounts/{account_id}/orders", headers=ann)
    open_only = await world.client.get(
        f"/api/v1/accounts/{account_id}/orders", headers=ann, params={"open_only": "true"}
    )
    one = await world.client.get(f"/api/v1/accounts/{account_id}/orders/o1", headers=ann)

    assert [o["client_order_id"] for o in everything.json()] == ["o2", "o1"]
    assert [o["client_order_id"] for o in open_only.json()] == ["o2"]
    assert one.json()["status"] == "FILLED"


async def test_latest_prices_when_recorded_return_the_24h_stats(world: ApiWorld) -> None:
    headers = await world.headers("ann", Role.READ_PORTFOLIO)
    world.kv.prices["BTC-USDT.SIM"] = {
        "price": "101",
        "ts": str(T0_NS),
        "open_24h": "100",
        "change_24h": "1",
        "change_pct_24h": "1.0000",
        "high_24h": "102",
        "low_24h": "99",
        "volume_24h": "12.5",
    }

    response = await world.client.get("/api/v1/market/prices", headers=headers)

    [row] = response.json()
    assert row["instrument_id"] == "BTC-USDT.SIM"
    assert (row["price"], row["change_pct_24h"], row["volume_24h"]) == ("101", "1.0000", "12.5")


async def test_bars_when_range_is_given_return_the_bars_inside_it(world: ApiWorld) -> None:
    headers = await world.headers("ann", Role.READ_PORTFOLIO)
    minute = 60 * 1_000_000_000
    for i in range(3):
        world.store.bars.append(
            {
                "instrument_id": "BTC-USDT.SIM",
                "interval": "1m",
                "ts_open": T0_NS + i * minute,
                "ts_close": T0_NS + (i + 1) * minute,
                "open": Decimal(1),
                "high": Decimal(2),
                "low": Decimal(1),
                "close": Decimal(2),
                "volume": Decimal(3),
                "trades": None,
            }
        )

    response = await world.client.get(
        "/api/v1/market/bars",
        headers=headers,
        params={
            "instrument_id": "BTC-USDT.SIM",
            "interval": "1m",
            "start_ns": T0_NS + minute,
            "end_ns": T0_NS + 3 * minute,
        },
    )

    assert [b["ts_open"] for b in response.json()] == [T0_NS + minute, T0_NS + 2 * minute]


async def test_control_routes_when_called_publish_the_commands(world: ApiWorld) -> None:
    admin = await world.headers("root", Role.ADMIN)

    calls = [
        await world.client.post("/api/v1/strategies/sma-1/halt", headers=admin),
        await world.client.post("/api/v1/strategies/sma-1/resume", headers=admin),
        await world.client.post(
            "/api/v1/market/collector/start", headers=admin, json={"symbols": ["BTC/USDT"]}
        ),
        await world.client.post("/api/v1/market/collector/stop", headers=admin),
        await world.client.post("/api/v1/risk/kill-switch", headers=admin, json={"engaged": True}),
        await world.client.post(
            "/api/v1/risk/circuit-breaker/reset", headers=admin, json={"account_id": "acc-1"}
        ),
    ]

    assert [c.status_code for c in calls] == [202] * 6
    assert [(c.action, c.target) for c in _commands(world)] == [
        (ControlAction.HALT_STRATEGY, "sma-1"),
        (ControlAction.RESUME_STRATEGY, "sma-1"),
        (ControlAction.COLLECTOR_START, "marketdata"),
        (ControlAction.COLLECTOR_STOP, "marketdata"),
        (ControlAction.KILL_SWITCH_ON, "*"),
        (ControlAction.RESET_CIRCUIT_BREAKER, "acc-1"),
    ]
    assert all(c.issued_by == "api:root" for c in _commands(world))


async def test_strategies_when_one_is_halted_say_so(world: ApiWorld) -> None:
    admin = await world.headers("root", Role.ADMIN)
    await world.client.post("/api/v1/strategies/sma-1/halt", headers=admin)

    response = await world.client.get("/api/v1/strategies", headers=admin)

    (strategy,) = response.json()
    assert (strategy["strategy_id"], strategy["halted"], strategy["announced"]) == (
        "sma-1",
        True,
        False,
    )
