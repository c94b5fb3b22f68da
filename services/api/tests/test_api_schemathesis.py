"""Property-based requests from the served OpenAPI schema: no 5xx, responses match the schema."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from quantmesh_api.app import create_app
from quantmesh_api.kv import MemoryKv
from quantmesh_api.security import Role, hash_password, issue_access_token
from quantmesh_api.state import ApiState
from quantmesh_api.store import Account, MemoryApiStore, User
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.testing import stubs

from .conftest import T0_NS, make_settings

_clock = SimulatedClock(T0_NS)
_store = MemoryApiStore()
_store.users["u-root"] = User(
    "u-root", "root", hash_password("root-password"), frozenset({Role.ADMIN})
)
_store.accounts["pa-1"] = Account(
    "pa-1", "u-root", "", "SIM", "USDT", "PAPER", Decimal(1000), T0_NS
)
_kv = MemoryKv()
_kv.prices["BTC-USDT.SIM"] = {"price": "100", "ts": str(T0_NS)}
_settings = make_settings(
    rate_limit_user_per_min=10**9, rate_limit_ip_per_min=10**9, strategy_config_wait_s=0
)
_state = ApiState(_settings, _store, _kv, InMemoryBus("api"), _clock)
# An announced strategy, so configuring one reaches the command (answered 202: no stage here).
_state.strategies.apply(
    stubs.strategy_status(
        strategy_id="s-1",
        param_schema={"additionalProperties": False, "properties": {"fast": {"type": "integer"}}},
    )
)
_token, _ = issue_access_token(
    _settings.jwt_key(),
    user_id="u-root",
    username="root",
    roles=frozenset({Role.ADMIN}),
    now_s=T0_NS // 10**9,
    ttl_s=86_400,
)

schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", create_app(_state))


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_when_fuzzed_never_fails_and_matches_its_schema(case: schemathesis.Case[Any]) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Bearer {_token}"},
        checks=[not_a_server_error, response_schema_conformance],
    )
