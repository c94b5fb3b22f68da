"""Risk limits as the risk stage publishes them: all for ADMIN, one's own account otherwise."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_api.security import Role
from quantmesh_common.messages import RiskLimitsStatus
from quantmesh_common.testing import stubs

from .conftest import T0_NS, ApiWorld


def _status(account_id: str, **overrides: Any) -> RiskLimitsStatus:
    values: dict[str, Any] = {
        "account_id": account_id,
        "configured": account_id == "*",
        "limits": {"max_order_quantity": "2", "max_daily_loss": "1000", "instruments": {}},
        "opening_equity": None,
        "base_currency": None,
        "ts_event": T0_NS,
    }
    values.update(overrides)
    return stubs.risk_limits_status(**values)


async def _account(world: ApiWorld, headers: dict[str, str]) -> str:
    response = await world.client.post(
        "/api/v1/accounts",
        headers=headers,
        json={"name": "paper", "capital": "50000", "currency": "USDT"},
    )
    assert response.status_code == 201, response.text
    account_id: str = response.json()["account_id"]
    return account_id


@pytest.fixture
def world(api_world: ApiWorld) -> ApiWorld:
    api_world.state.risk_limits.apply(_status("*", kill_switch_targets=["strat-9"]))
    return api_world


async def test_admin_when_listing_limits_gets_the_default_first_then_accounts(
    world: ApiWorld,
) -> None:
    admin = await world.headers("root", Role.ADMIN)
    world.state.risk_limits.apply(_status("acc-b", configured=True))
    world.state.risk_limits.apply(_status("acc-a", breaker_tripped=True))

    response = await world.client.get("/api/v1/risk/limits", headers=admin)

    assert response.status_code == 200
    assert [(s["account_id"], s["breaker_tripped"]) for s in response.json()] == [
        ("*", False),
        ("acc-a", True),
        ("acc-b", False),
    ]
    assert response.json()[0]["limits"]["max_daily_loss"] == "1000"


async def test_owner_when_the_account_has_its_own_status_sees_it_with_decimals_as_strings(
    world: ApiWorld,
) -> None:
    trader = await world.headers("trader", Role.READ_PORTFOLIO, Role.EXECUTE_TRADES)
    account_id = await _account(world, trader)
    world.state.risk_limits.apply(
        _status(
            account_id,
            opening_equity=Decimal("50000"),
            base_currency="USDT",
            breaker_tripped=True,
            breaker_cause="DAILY_LOSS_LIMIT_BREACHED",
            breaker_details={"daily_loss": "1200"},
            breaker_ts_ns=T0_NS + 5,
            ts_event=T0_NS + 5,
        )
    )

    response = await world.client.get(f"/api/v1/accounts/{account_id}/risk-limits", headers=trader)

    assert response.status_code == 200
    body = response.json()
    assert (body["account_id"], body["from_default"], body["opening_equity"]) == (
        account_id,
        False,
        "50000",
    )
    assert (body["breaker_tripped"], body["breaker_cause"], body["breaker_details"]) == (
        True,
        "DAILY_LOSS_LIMIT_BREACHED",
        {"daily_loss": "1200"},
    )


async def test_owner_when_risk_knows_nothing_of_the_account_gets_the_default(
    world: ApiWorld,
) -> None:
    trader = await world.headers("trader", Role.READ_PORTFOLIO, Role.EXECUTE_TRADES)
    account_id = await _account(world, trader)
    world.state.risk_limits.apply(
        _status("*", kill_switch_targets=[account_id], ts_event=T0_NS + 1)
    )

    response = await world.client.get(f"/api/v1/accounts/{account_id}/risk-limits", headers=trader)

    body = response.json()
    assert (body["account_id"], body["from_default"], body["configured"]) == (
        account_id,
        True,
        False,
    )
    # The kill switch engaged for this account by name, though risk has no status of it.
    assert (body["kill_switch"], body["limits"]["max_order_quantity"]) == (True, "2")


async def test_other_user_when_reading_an_accounts_limits_gets_404(world: ApiWorld) -> None:
    owner = await world.headers("owner", Role.READ_PORTFOLIO, Role.EXECUTE_TRADES)
    other = await world.headers("other", Role.READ_PORTFOLIO)
    account_id = await _account(world, owner)

    response = await world.client.get(f"/api/v1/accounts/{account_id}/risk-limits", headers=other)

    assert response.status_code == 404
    assert response.json()["detail"] == f"ACCOUNT_NOT_FOUND: account_id={account_id}"


async def test_owner_when_risk_published_nothing_yet_gets_404_with_the_reason(
    api_world: ApiWorld,
) -> None:
    trader = await api_world.headers("trader", Role.READ_PORTFOLIO, Role.EXECUTE_TRADES)
    account_id = await _account(api_world, trader)

    response = await api_world.client.get(
        f"/api/v1/accounts/{account_id}/risk-limits", headers=trader
    )

    assert response.status_code == 404
    assert response.json()["detail"] == (
        "RISK_LIMITS_UNKNOWN: the risk stage has published no limits"
    )


def test_book_when_an_older_status_arrives_keeps_the_newer(world: ApiWorld) -> None:
    book = world.state.risk_limits
    book.apply(_status("acc-1", breaker_tripped=True, ts_event=T0_NS + 10))

    kept = book.apply(_status("acc-1", breaker_tripped=False, ts_event=T0_NS + 5))

    status = book.get("acc-1")
    assert kept is False
    assert status is not None
    assert status.breaker_tripped is True
