"""`FastPrices` answers GET /market/prices exactly as the declared FastAPI route would."""

from __future__ import annotations

import httpx
import pytest

from quantmesh_api.app import create_app
from quantmesh_api.security import Role
from quantmesh_api.state import ApiState

from .conftest import T0_NS, ApiWorld, WorldFactory

PRICES = "/api/v1/market/prices"
#: Headers that differ between two answers for reasons other than the code path.
_VARYING = {"date", "server"}


def _client(state: ApiState, *, fast: bool) -> httpx.AsyncClient:
    app = create_app(state, fast_prices=fast)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def _both(world: ApiWorld, headers: dict[str, str]) -> tuple[httpx.Response, ...]:
    async with _client(world.state, fast=True) as fast, _client(world.state, fast=False) as slow:
        return await fast.get(PRICES, headers=headers), await slow.get(PRICES, headers=headers)


def _comparable(response: httpx.Response) -> tuple[int, bytes, dict[str, str]]:
    headers = {k: v for k, v in response.headers.items() if k not in _VARYING}
    return response.status_code, response.content, headers


async def _world(factory: WorldFactory, **overrides: object) -> ApiWorld:
    world = await factory(**overrides)
    world.kv.prices["BTC-USDT.SIM"] = {"price": "101", "ts": str(T0_NS), "high_24h": "103"}
    return world


async def test_fast_prices_when_token_valid_answers_what_the_route_answers(
    api_world_factory: WorldFactory,
) -> None:
    world = await _world(api_world_factory)
    headers = await world.headers("ann", Role.READ_PORTFOLIO)

    fast, slow = await _both(world, headers)

    assert fast.status_code == 200
    assert fast.json()[0]["price"] == "101"
    assert _comparable(fast) == _comparable(slow)


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer not-a-jwt", "Basic YW5uOnB3", "Bearer"],
)
async def test_fast_prices_when_credentials_bad_refuses_as_the_route_does(
    api_world_factory: WorldFactory, authorization: str | None
) -> None:
    world = await _world(api_world_factory)
    headers = {"Authorization": authorization} if authorization else {}

    fast, slow = await _both(world, headers)

    assert fast.status_code == 401
    assert _comparable(fast) == _comparable(slow)


async def test_fast_prices_when_role_missing_is_403_as_the_route(
    api_world_factory: WorldFactory,
) -> None:
    world = await _world(api_world_factory)
    headers = await world.headers("bob", Role.MANAGE_STRATEGIES)

    fast, slow = await _both(world, headers)

    assert fast.status_code == 403
    assert _comparable(fast) == _comparable(slow)


async def test_fast_prices_when_token_logged_out_is_401_revoked(
    api_world_factory: WorldFactory,
) -> None:
    world = await _world(api_world_factory)
    headers = await world.headers("ann", Role.READ_PORTFOLIO)
    logout = await world.client.post("/api/v1/auth/logout", headers=headers, json={})
    assert logout.status_code == 204

    fast, slow = await _both(world, headers)

    assert (fast.status_code, fast.json()) == (401, {"detail": "token revoked"})
    assert _comparable(fast) == _comparable(slow)


async def test_fast_prices_when_api_key_scoped_serves_prices(
    api_world_factory: WorldFactory,
) -> None:
    world = await _world(api_world_factory)
    headers = await world.headers("ann", Role.READ_PORTFOLIO)
    created = await world.client.post(
        "/api/v1/api-keys", json={"name": "bot", "scopes": ["READ_PORTFOLIO"]}, headers=headers
    )
    assert created.status_code == 201, created.text

    fast, slow = await _both(world, {"X-API-Key": created.json()["api_key"]})

    assert fast.status_code == 200
    assert _comparable(fast) == _comparable(slow)


async def test_fast_prices_when_user_over_limit_is_429_with_retry_after(
    api_world_factory: WorldFactory,
) -> None:
    world = await _world(api_world_factory, rate_limit_user_per_min=3)
    headers = await world.headers("ann", Role.READ_PORTFOLIO)
    async with _client(world.state, fast=True) as fast:
        answers = [(await fast.get(PRICES, headers=headers)) for _ in range(4)]

    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[3].json() == {"detail": "RATE_LIMITED: too many requests for this user"}
    assert int(answers[3].headers["retry-after"]) >= 1
    assert answers[3].headers["x-content-type-options"] == "nosniff"
