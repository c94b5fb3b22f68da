"""`FastPrices` answers GET /market/prices exactly as the declared FastAPI route would."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

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


class _Reads:
    """A price read that answers b"1", b"2", ... and waits for `gate` while it is clear."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.count = 0

    async def __call__(self) -> bytes:
        await self.gate.wait()
        self.count += 1
        return str(self.count).encode()


async def test_price_answer_when_half_the_cache_time_old_is_served_while_a_read_runs_behind(
    api_world_factory: WorldFactory,
) -> None:
    world = await api_world_factory(price_cache_s=1.0)
    now = [100.0]
    world.state.monotonic = lambda: now[0]
    read = _Reads()
    first = await world.state.prices_json(read)  # read 1 at 100.0
    read.gate.clear()  # Redis held from here

    now[0] = 100.5
    at_half = await asyncio.wait_for(world.state.prices_json(read), 1.0)  # read 2 behind
    read.gate.set()
    await asyncio.sleep(0.01)
    read.gate.clear()
    now[0] = 101.2  # the answer of read 2 (started at 100.5) is 0.7 s old
    fresh = await asyncio.wait_for(world.state.prices_json(read), 1.0)  # read 3 behind
    now[0] = 101.5  # 1.0 s since read 2 started: a whole cache time
    waiting = asyncio.ensure_future(world.state.prices_json(read))
    await asyncio.sleep(0.01)
    waited = not waiting.done()
    read.gate.set()

    assert (first, at_half, fresh) == (b"1", b"1", b"2")
    assert waited
    assert await asyncio.wait_for(waiting, 1.0) == b"3"
    assert read.count == 3


@pytest.mark.parametrize("exported", [True, False])
async def test_request_spans_when_tracing_exports_or_not_are_made_or_skipped(
    api_world_factory: WorldFactory, monkeypatch: pytest.MonkeyPatch, exported: bool
) -> None:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    if exported:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    world = await _world(api_world_factory)
    headers = await world.headers("ann", Role.READ_PORTFOLIO)
    app = create_app(world.state)
    # Added after the app was built: spans it makes from here on would be seen.
    if not exported:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    exporter.clear()  # the log-in's spans

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        response = await client.get(PRICES, headers=headers)

    assert response.status_code == 200
    # FastAPI names its server span after the method (FastPrices answers before routing).
    assert ("GET" in {span.name for span in exporter.get_finished_spans()}) is exported
