"""Fixtures of the api tests: the app over in-memory stores, a retaining bus and a test clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from quantmesh_api.app import create_app
from quantmesh_api.config import ApiSettings
from quantmesh_api.kv import MemoryKv
from quantmesh_api.security import Role, hash_password
from quantmesh_api.state import ApiState
from quantmesh_api.store import MemoryApiStore, User
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.testing.postgres import fresh_schema, server_dsn_for_tests

#: 2024-01-01T00:00:00Z: the test clock's start.
T0_NS = 1_704_067_200 * 1_000_000_000
PASSWORD = "correct horse battery"


@dataclass
class ApiWorld:
    """The app and what it runs on, for one test."""

    state: ApiState
    store: MemoryApiStore
    kv: MemoryKv
    bus: InMemoryBus
    clock: SimulatedClock
    client: httpx.AsyncClient

    async def user(self, username: str, *roles: Role) -> User:
        """Create a user holding `roles`."""
        user = User(f"u-{username}", username, hash_password(PASSWORD), frozenset(roles))
        await self.store.create_user(user)
        return user

    async def login(self, username: str) -> dict[str, str]:
        """Log in and return the token pair."""
        response = await self.client.post(
            "/api/v1/auth/token", data={"username": username, "password": PASSWORD}
        )
        assert response.status_code == 200, response.text
        pair: dict[str, str] = response.json()
        return pair

    async def headers(self, username: str, *roles: Role) -> dict[str, str]:
        """Create a user with `roles`, log in, return its Authorization header."""
        await self.user(username, *roles)
        pair = await self.login(username)
        return {"Authorization": f"Bearer {pair['access_token']}"}


def make_settings(**overrides: object) -> ApiSettings:
    """Settings of a test app: in-memory bus, a fixed JWT secret."""
    values: dict[str, object] = {
        "bus": "memory",
        "jwt_secret": "test-secret-that-is-long-enough-for-hs256",
        "database_url": None,
        "redis_url": None,
    }
    values.update(overrides)
    return ApiSettings(**values)  # type: ignore[arg-type]


WorldFactory = Callable[..., Awaitable[ApiWorld]]


@pytest.fixture
async def api_world_factory() -> AsyncIterator[WorldFactory]:
    """Build ApiWorlds with settings overrides; closes their clients afterwards."""
    clients: list[httpx.AsyncClient] = []

    async def build(**overrides: object) -> ApiWorld:
        settings = make_settings(**overrides)
        store = MemoryApiStore()
        kv = MemoryKv()
        clock = SimulatedClock(T0_NS)
        bus = InMemoryBus("api", clock=clock, retain=True)
        state = ApiState(settings=settings, store=store, kv=kv, bus=bus, clock=clock)
        transport = httpx.ASGITransport(app=create_app(state))
        client = httpx.AsyncClient(transport=transport, base_url="http://testserver")
        clients.append(client)
        return ApiWorld(state, store, kv, bus, clock, client)

    yield build
    for client in clients:
        await client.aclose()


@pytest.fixture
async def api_world(api_world_factory: WorldFactory) -> ApiWorld:
    """An ApiWorld with default settings."""
    return await api_world_factory()


@pytest.fixture
def api_dsn() -> Iterator[str]:
    """A fresh migrated schema of quantmesh_test; dropped afterwards (skips without one)."""
    server = server_dsn_for_tests()
    if server is None:
        pytest.skip("QM_DATABASE_URL is not set")
    with fresh_schema(server, "qm_test_api", migrate=True) as dsn:
        yield dsn
