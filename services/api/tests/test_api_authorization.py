"""Every route refuses a missing, expired, tampered or under-privileged caller."""

from __future__ import annotations

import re

import pytest

from quantmesh_api.app import create_app
from quantmesh_api.kv import MemoryKv
from quantmesh_api.security import Role, issue_access_token
from quantmesh_api.state import ApiState
from quantmesh_api.store import MemoryApiStore
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock

from .conftest import T0_NS, ApiWorld, make_settings

#: Routes anyone may call: they are how one gets a token.
PUBLIC = {("POST", "/api/v1/auth/token"), ("POST", "/api/v1/auth/refresh")}
R, E, M, A = Role.READ_PORTFOLIO, Role.EXECUTE_TRADES, Role.MANAGE_STRATEGIES, Role.ADMIN
ACC = "/api/v1/accounts/{account_id}"
POS = ACC + "/positions/{instrument_id}"
#: The role each protected route needs, as the README's table says (None: any caller).
NEEDS: dict[tuple[str, str], Role | None] = {
    ("POST", "/api/v1/auth/logout"): None,
    ("GET", "/api/v1/me"): None,
    ("POST", "/api/v1/api-keys"): None,
    ("GET", "/api/v1/api-keys"): None,
    ("DELETE", "/api/v1/api-keys/{key_id}"): None,
    ("POST", "/api/v1/users"): A,
    ("GET", "/api/v1/users"): A,
    ("POST", "/api/v1/accounts"): E,
    ("GET", "/api/v1/accounts"): R,
    ("GET", ACC): R,
    ("GET", ACC + "/positions"): R,
    ("GET", ACC + "/balances"): R,
    ("GET", ACC + "/performance"): R,
    ("GET", ACC + "/performance/strategies"): R,
    ("POST", ACC + "/orders"): E,
    ("GET", ACC + "/orders"): R,
    ("GET", ACC + "/orders/{client_order_id}"): R,
    ("POST", ACC + "/orders/cancel-all"): E,
    ("DELETE", ACC + "/orders/{client_order_id}"): E,
    ("PATCH", ACC + "/orders/{client_order_id}"): E,
    ("GET", ACC + "/trades"): R,
    ("POST", POS + "/close"): E,
    ("POST", POS + "/protect"): E,
    ("GET", "/api/v1/market/prices"): R,
    ("GET", "/api/v1/market/bars"): R,
    ("GET", "/api/v1/market/collector"): R,
    ("POST", "/api/v1/market/collector/start"): M,
    ("POST", "/api/v1/market/collector/stop"): M,
    ("GET", "/api/v1/strategies"): R,
    ("GET", "/api/v1/strategies/{strategy_id}"): R,
    ("PATCH", "/api/v1/strategies/{strategy_id}"): M,
    ("PUT", "/api/v1/strategies/{strategy_id}"): M,
    ("POST", "/api/v1/strategies/{strategy_id}/halt"): M,
    ("POST", "/api/v1/strategies/{strategy_id}/resume"): M,
    ("POST", "/api/v1/risk/kill-switch"): A,
    ("GET", "/api/v1/risk/limits"): A,
    ("GET", ACC + "/risk-limits"): R,
    ("POST", "/api/v1/risk/circuit-breaker/reset"): A,
}


def _routes() -> list[tuple[str, str]]:
    state = ApiState(
        make_settings(), MemoryApiStore(), MemoryKv(), InMemoryBus("t"), SimulatedClock(T0_NS)
    )
    paths = create_app(state).openapi()["paths"]
    routes = [(m.upper(), p) for p, ops in paths.items() for m in ops]
    return sorted(r for r in routes if r not in PUBLIC)


ROUTES = _routes()


def _concrete(path: str, account_id: str) -> str:
    path = path.replace("{account_id}", account_id).replace("{instrument_id}", "BTC-USDT.SIM")
    return re.sub(r"\{[a-z_]+\}", "x1", path)


def test_routes_when_listed_each_declare_the_role_the_readme_says() -> None:
    assert set(ROUTES) == set(NEEDS)


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_route_when_no_credentials_is_401(
    api_world: ApiWorld, method: str, path: str
) -> None:
    response = await api_world.client.request(method, _concrete(path, "pa-x"), json={})

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_route_when_token_is_expired_tampered_or_foreign_is_401(
    api_world: ApiWorld, method: str, path: str
) -> None:
    secret = api_world.state.settings.jwt_key()
    roles = frozenset({Role.ADMIN})
    expired, _ = issue_access_token(
        secret, user_id="u", username="u", roles=roles, now_s=T0_NS // 10**9 - 3600, ttl_s=60
    )
    valid, _ = issue_access_token(
        secret, user_id="u", username="u", roles=roles, now_s=T0_NS // 10**9, ttl_s=60
    )
    head, payload, signature = valid.split(".")
    tampered = f"{head}.{payload}.{signature[:-4]}AAAA"
    foreign, _ = issue_access_token(
        "another-key-" * 4, user_id="u", username="u", roles=roles, now_s=T0_NS // 10**9, ttl_s=60
    )

    statuses = [
        (
            await api_world.client.request(
                method,
                _concrete(path, "pa-x"),
                json={},
                headers={"Authorization": f"Bearer {token}"},
            )
        ).status_code
        for token in (expired, tampered, foreign, "not-a-jwt")
    ]

    assert statuses == [401, 401, 401, 401]


@pytest.mark.parametrize(("method", "path"), [r for r in ROUTES if NEEDS.get(r) is not None])
async def test_route_when_caller_lacks_its_role_is_403(
    api_world: ApiWorld, method: str, path: str
) -> None:
    needed = NEEDS[(method, path)]
    # Every role except ADMIN and the one the route needs.
    held = [r for r in Role if r is not needed and r is not Role.ADMIN]
    headers = await api_world.headers("weak", *held)

    response = await api_world.client.request(
        method, _concrete(path, "pa-x"), json={}, headers=headers
    )

    assert response.status_code == 403
    assert response.json()["detail"].startswith("FORBIDDEN: this route needs role")
