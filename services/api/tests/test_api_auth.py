"""Login, token refresh with rotation, logout, API keys, and the configuration of secrets."""

from __future__ import annotations

import pytest

from quantmesh_api.config import ApiSettings
from quantmesh_api.security import (
    Role,
    TokenError,
    decode_access_token,
    issue_access_token,
    split_opaque_token,
)
from quantmesh_common.http_metrics import HTTP_REQUESTS
from quantmesh_common.settings import CONFIG_ERROR_EXIT_CODE, load_settings

from .conftest import PASSWORD, ApiWorld, WorldFactory

KEY = "k" * 40


def test_access_token_when_signed_and_decoded_returns_its_claims() -> None:
    token, _ = issue_access_token(
        KEY,
        user_id="u1",
        username="ann",
        roles=frozenset({Role.READ_PORTFOLIO}),
        now_s=1000,
        ttl_s=60,
    )

    claims = decode_access_token(KEY, token, now_s=1059)

    assert (claims.user_id, claims.username, claims.expires_s) == ("u1", "ann", 1060)
    assert claims.roles == frozenset({Role.READ_PORTFOLIO})


def test_access_token_when_expired_is_refused() -> None:
    token, _ = issue_access_token(
        KEY, user_id="u1", username="ann", roles=frozenset(), now_s=1000, ttl_s=60
    )

    with pytest.raises(TokenError, match="expired"):
        decode_access_token(KEY, token, now_s=1060)


def test_access_token_when_signed_with_another_key_is_refused() -> None:
    token, _ = issue_access_token(
        "x" * 40, user_id="u1", username="ann", roles=frozenset({Role.ADMIN}), now_s=1000, ttl_s=60
    )

    with pytest.raises(TokenError, match="invalid token"):
        decode_access_token(KEY, token, now_s=1001)


def test_opaque_token_when_malformed_does_not_split() -> None:
    assert split_opaque_token("qmk_0123456789abcdef_s3cr_et", "qmk") == (
        "0123456789abcdef",
        "s3cr_et",
    )
    assert split_opaque_token("qmr_0123456789abcdef_secret", "qmk") is None
    assert split_opaque_token("qmk_short_secret", "qmk") is None


def test_settings_when_production_lacks_jwt_secret_exit_2_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QM_ENVIRONMENT", "production")
    monkeypatch.setenv("QM_BUS", "memory")
    monkeypatch.delenv("QM_JWT_SECRET", raising=False)

    with pytest.raises(SystemExit) as exited:
        load_settings(ApiSettings)

    assert exited.value.code == CONFIG_ERROR_EXIT_CODE
    assert "QM_JWT_SECRET is required when QM_ENVIRONMENT=production" in capsys.readouterr().err


def test_settings_when_production_jwt_secret_is_short_exit_2_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QM_ENVIRONMENT", "production")
    monkeypatch.setenv("QM_BUS", "memory")
    monkeypatch.setenv("QM_JWT_SECRET", "too-short-secret")

    with pytest.raises(SystemExit) as exited:
        load_settings(ApiSettings)

    err = capsys.readouterr().err
    assert exited.value.code == CONFIG_ERROR_EXIT_CODE
    assert "QM_JWT_SECRET" in err
    assert "at least 32 characters" in err
    assert "too-short-secret" not in err


def test_settings_when_api_port_unset_follow_the_health_port() -> None:
    assert ApiSettings(bus="memory", http_port=8000).effective_api_port() == 8001
    assert ApiSettings(bus="memory", http_port=0).effective_api_port() == 0
    assert ApiSettings(bus="memory", api_port=9000).effective_api_port() == 9000


async def test_login_when_password_is_wrong_is_401(api_world: ApiWorld) -> None:
    await api_world.user("ann", Role.READ_PORTFOLIO)

    response = await api_world.client.post(
        "/api/v1/auth/token", data={"username": "ann", "password": "wrong password"}
    )

    assert response.status_code == 401
    assert response.json() == {"detail": "invalid username or password"}


async def test_login_when_user_is_unknown_is_401(api_world: ApiWorld) -> None:
    response = await api_world.client.post(
        "/api/v1/auth/token", data={"username": "nobody", "password": PASSWORD}
    )

    assert response.status_code == 401


async def test_me_when_logged_in_returns_the_roles(api_world: ApiWorld) -> None:
    headers = await api_world.headers("ann", Role.READ_PORTFOLIO, Role.EXECUTE_TRADES)

    response = await api_world.client.get("/api/v1/me", headers=headers)

    assert response.status_code == 200
    assert response.json()["roles"] == ["EXECUTE_TRADES", "READ_PORTFOLIO"]


async def test_access_token_when_clock_passes_expiry_is_401(api_world: ApiWorld) -> None:
    headers = await api_world.headers("ann", Role.READ_PORTFOLIO)
    api_world.clock.advance(901 * 1_000_000_000)  # default TTL 900 s

    response = await api_world.client.get("/api/v1/me", headers=headers)

    assert response.status_code == 401
    assert response.json() == {"detail": "token expired"}


async def test_refresh_when_used_rotates_and_the_new_token_works(api_world: ApiWorld) -> None:
    await api_world.user("ann", Role.READ_PORTFOLIO)
    first = await api_world.login("ann")

    rotated = await api_world.client.post(
        "/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]}
    )
    again = await api_world.client.post(
        "/api/v1/auth/refresh", json={"refresh_token": rotated.json()["refresh_token"]}
    )

    assert rotated.status_code == 200
    assert rotated.json()["refresh_token"] != first["refresh_token"]
    assert again.status_code == 200


async def test_refresh_when_a_rotated_token_is_reused_revokes_the_family(
    api_world: ApiWorld,
) -> None:
    await api_world.user("ann", Role.READ_PORTFOLIO)
    first = await api_world.login("ann")
    rotated = await api_world.client.post(
        "/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]}
    )

    reuse = await api_world.client.post(
        "/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]}
    )
    successor = await api_world.client.post(
        "/api/v1/auth/refresh", json={"refresh_token": rotated.json()["refresh_token"]}
    )

    assert reuse.status_code == 401
    assert "reused" in reuse.json()["detail"]
    assert successor.status_code == 401
    assert successor.json() == {"detail": "refresh token revoked"}


async def test_logout_when_done_denies_the_access_token_and_its_refresh_family(
    api_world: ApiWorld,
) -> None:
    await api_world.user("ann", Role.READ_PORTFOLIO)
    pair = await api_world.login("ann")
    headers = {"Authorization": f"Bearer {pair['access_token']}"}

    out = await api_world.client.post(
        "/api/v1/auth/logout", headers=headers, json={"refresh_token": pair["refresh_token"]}
    )
    after = await api_world.client.get("/api/v1/me", headers=headers)
    renewed = await api_world.client.post(
        "/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]}
    )

    assert out.status_code == 204
    assert after.status_code == 401
    assert after.json() == {"detail": "token revoked"}
    assert renewed.status_code == 401


async def test_api_key_when_scoped_to_read_cannot_trade(api_world: ApiWorld) -> None:
    headers = await api_world.headers("bot", Role.READ_PORTFOLIO, Role.EXECUTE_TRADES)
    created = await api_world.client.post(
        "/api/v1/api-keys", headers=headers, json={"name": "reader", "scopes": ["READ_PORTFOLIO"]}
    )
    key_headers = {"X-API-Key": created.json()["api_key"]}

    read = await api_world.client.get("/api/v1/accounts", headers=key_headers)
    trade = await api_world.client.post(
        "/api/v1/accounts", headers=key_headers, json={"capital": "1000"}
    )

    assert created.status_code == 201
    assert read.status_code == 200
    assert trade.status_code == 403
    assert trade.json() == {"detail": "FORBIDDEN: this route needs role EXECUTE_TRADES"}


async def test_api_key_when_scope_exceeds_the_callers_roles_is_403(api_world: ApiWorld) -> None:
    headers = await api_world.headers("ann", Role.READ_PORTFOLIO)

    response = await api_world.client.post(
        "/api/v1/api-keys", headers=headers, json={"scopes": ["ADMIN"]}
    )

    assert response.status_code == 403
    assert response.json() == {"detail": "SCOPE_NOT_HELD: ADMIN"}


async def test_api_key_when_revoked_is_401(api_world: ApiWorld) -> None:
    headers = await api_world.headers("bot", Role.READ_PORTFOLIO)
    created = (
        await api_world.client.post(
            "/api/v1/api-keys", headers=headers, json={"scopes": ["READ_PORTFOLIO"]}
        )
    ).json()

    revoked = await api_world.client.delete(
        f"/api/v1/api-keys/{created['key_id']}", headers=headers
    )
    response = await api_world.client.get(
        "/api/v1/accounts", headers={"X-API-Key": created["api_key"]}
    )

    assert revoked.status_code == 204
    assert response.status_code == 401


async def test_create_user_when_admin_then_the_user_can_log_in(api_world: ApiWorld) -> None:
    admin = await api_world.headers("root", Role.ADMIN)

    created = await api_world.client.post(
        "/api/v1/users",
        headers=admin,
        json={"username": "bob", "password": PASSWORD, "roles": ["EXECUTE_TRADES"]},
    )
    duplicate = await api_world.client.post(
        "/api/v1/users", headers=admin, json={"username": "bob", "password": PASSWORD}
    )
    pair = await api_world.login("bob")

    assert created.status_code == 201
    assert created.json()["roles"] == ["EXECUTE_TRADES"]
    assert "password" not in created.text
    assert duplicate.status_code == 409
    assert pair["token_type"] == "bearer"


async def test_rate_limit_when_user_exceeds_it_is_429_with_retry_after(
    api_world_factory: WorldFactory,
) -> None:
    world: ApiWorld = await api_world_factory(rate_limit_user_per_min=2)
    headers = await world.headers("ann", Role.READ_PORTFOLIO)

    statuses = [(await world.client.get("/api/v1/me", headers=headers)) for _ in range(3)]

    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert 1 <= int(statuses[2].headers["Retry-After"]) <= 60


async def test_rate_limit_when_ip_exceeds_it_is_429(api_world_factory: WorldFactory) -> None:
    world: ApiWorld = await api_world_factory(rate_limit_ip_per_min=2)

    statuses = [
        (
            await world.client.post("/api/v1/auth/token", data={"username": "x", "password": "y"})
        ).status_code
        for _ in range(3)
    ]

    assert statuses == [401, 401, 429]


async def test_responses_when_served_carry_security_headers(api_world: ApiWorld) -> None:
    response = await api_world.client.get("/api/v1/me")

    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert "default-src 'none'" in response.headers["content-security-policy"]


async def test_cors_when_origin_is_configured_is_allowed(api_world_factory: WorldFactory) -> None:
    world: ApiWorld = await api_world_factory(cors_origins=["https://ui.example"])

    allowed = await world.client.options(
        "/api/v1/me",
        headers={"Origin": "https://ui.example", "Access-Control-Request-Method": "GET"},
    )
    refused = await world.client.options(
        "/api/v1/me",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )

    assert allowed.headers["access-control-allow-origin"] == "https://ui.example"
    assert "access-control-allow-origin" not in refused.headers


async def test_metrics_when_requests_answered_count_them_by_route_template_and_status(
    api_world_factory: WorldFactory,
) -> None:
    # Arrange: a service name of its own, as the collectors are process-wide.
    world = await api_world_factory(service_name="api-metrics-test")
    headers = await world.headers("ann", Role.READ_PORTFOLIO)

    # Act
    await world.client.get("/api/v1/accounts/acc-1", headers=headers)
    await world.client.get("/api/v1/accounts/acc-2", headers=headers)
    await world.client.get("/api/v1/me")

    # Assert: two 404s under the route's template (never the raw ids), one 401 on /me.
    samples = {
        (s.labels["route"], s.labels["status"]): s.value
        for family in HTTP_REQUESTS.collect()
        for s in family.samples
        if s.name == "quantmesh_http_requests_total" and s.labels["service"] == "api-metrics-test"
    }
    assert samples.get(("/api/v1/accounts/{account_id}", "404")) == 2, samples
    assert samples[("/api/v1/me", "401")] == 1
    assert not any("acc-1" in route for route, _ in samples)
