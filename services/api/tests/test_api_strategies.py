"""Strategies as the signals stage announces them; configuring them through CONFIGURE_STRATEGY."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from quantmesh_api.security import Role
from quantmesh_api.strategies import StrategyBook, check_params
from quantmesh_common.envelope import Envelope, Event
from quantmesh_common.messages import ControlAction, ControlCommand, StrategyState, StrategyStatus
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic

from .conftest import T0_NS, ApiWorld, WorldFactory

SCHEMA: dict[str, Any] = {
    "additionalProperties": False,
    "properties": {
        "fast": {"type": "integer", "minimum": 1},
        "slow": {"type": "integer", "minimum": 2},
        "quantity": {"anyOf": [{"type": "number"}, {"type": "string"}]},
        "allow_short": {"type": "boolean"},
    },
    "type": "object",
}


def _status(**overrides: Any) -> StrategyStatus:
    values: dict[str, Any] = {
        "strategy_id": "sma-btc",
        "account_id": "paper-1",
        "instruments": ["BTC-USDT.SIM"],
        "params": {"fast": 2, "slow": 3, "quantity": "1", "allow_short": False},
        "param_schema": SCHEMA,
        "instance": "pod-1",
        "ts_event": T0_NS,
    }
    values.update(overrides)
    return stubs.strategy_status(**values)


def _commands(world: ApiWorld) -> list[ControlCommand]:
    return [e.payload for e in world.bus.messages(Topic.CONTROL)]


def _answering(world: ApiWorld, answer: Callable[[ControlCommand], StrategyStatus]) -> None:
    """Make the bus play the signals stage: each CONFIGURE_STRATEGY gets `answer(command)`
    applied to the api's book right after it is published."""
    publish = world.bus.publish

    async def publish_and_answer(topic: str, payload: Event, **kwargs: Any) -> Envelope[Any]:
        envelope = await publish(topic, payload, **kwargs)
        if isinstance(payload, ControlCommand):
            reply = answer(payload)
            asyncio.get_running_loop().call_soon(world.state.strategies.apply, reply)
        return envelope

    world.bus.publish = publish_and_answer  # type: ignore[method-assign]


@pytest.fixture
async def world(api_world_factory: WorldFactory) -> ApiWorld:
    built = await api_world_factory(strategy_config_wait_s=5.0)
    built.state.strategies.apply(_status())
    return built


async def test_list_when_a_strategy_is_announced_shows_its_params_and_state(
    world: ApiWorld,
) -> None:
    reader = await world.headers("reader", Role.READ_PORTFOLIO)
    await world.kv.set_add("halted", "old-one")

    response = await world.client.get("/api/v1/strategies", headers=reader)

    assert response.status_code == 200
    listed = {s["strategy_id"]: s for s in response.json()}
    assert set(listed) == {"old-one", "sma-btc"}
    sma = listed["sma-btc"]
    assert (sma["announced"], sma["name"], sma["account_id"], sma["state"]) == (
        True,
        "sma_cross",
        "paper-1",
        "RUNNING",
    )
    assert sma["params"] == {"fast": 2, "slow": 3, "quantity": "1", "allow_short": False}
    assert (sma["instance"], sma["halted"]) == ("pod-1", False)
    assert (listed["old-one"]["announced"], listed["old-one"]["halted"]) == (False, True)


async def test_get_when_halted_by_the_stage_shows_the_stage_state(world: ApiWorld) -> None:
    reader = await world.headers("reader", Role.READ_PORTFOLIO)
    world.state.strategies.apply(
        _status(state=StrategyState.HALTED, halted=True, ts_event=T0_NS + 1)
    )

    found = await world.client.get("/api/v1/strategies/sma-btc", headers=reader)
    missing = await world.client.get("/api/v1/strategies/nope", headers=reader)

    assert (found.json()["state"], found.json()["halted"]) == ("HALTED", True)
    assert missing.status_code == 404
    assert missing.json()["detail"] == "UNKNOWN_STRATEGY: strategy_id=nope"


async def test_patch_when_the_stage_applies_it_answers_200_with_the_new_params(
    world: ApiWorld,
) -> None:
    manager = await world.headers("mgr", Role.MANAGE_STRATEGIES)

    def applied(command: ControlCommand) -> StrategyStatus:
        params = {
            "fast": 2,
            "slow": 3,
            "allow_short": False,
            **json.loads(command.params["params"]),
        }
        return _status(
            params=params,
            last_command_id=command.command_id,
            config_version=1,
            ts_event=command.ts_event,
        )

    _answering(world, applied)

    response = await world.client.patch(
        "/api/v1/strategies/sma-btc", headers=manager, json={"params": {"quantity": "2.5"}}
    )

    assert response.status_code == 200, response.text
    body = response.json()
    (command,) = _commands(world)
    assert (command.action, command.target) == (ControlAction.CONFIGURE_STRATEGY, "sma-btc")
    assert command.params == {"params": '{"quantity":"2.5"}', "mode": "merge"}
    assert command.issued_by == "api:mgr"
    assert (body["command_id"], body["outcome"]) == (command.command_id, "APPLIED")
    assert body["strategy"]["params"]["quantity"] == "2.5"
    assert body["strategy"]["config_version"] == 1


async def test_put_when_sent_asks_the_stage_to_replace_the_params(world: ApiWorld) -> None:
    manager = await world.headers("mgr", Role.MANAGE_STRATEGIES)
    _answering(world, lambda c: _status(last_command_id=c.command_id, ts_event=c.ts_event))

    response = await world.client.put(
        "/api/v1/strategies/sma-btc", headers=manager, json={"params": {"fast": 5, "slow": 8}}
    )

    assert response.status_code == 200
    (command,) = _commands(world)
    assert command.params == {"params": '{"fast":5,"slow":8}', "mode": "replace"}


async def test_patch_when_the_stage_refuses_the_params_is_422_with_its_reason(
    world: ApiWorld,
) -> None:
    manager = await world.headers("mgr", Role.MANAGE_STRATEGIES)
    reason = "INVALID_PARAMS: Value error, fast (3) must be below slow (3)"
    _answering(
        world,
        lambda c: _status(last_command_id=c.command_id, last_error=reason, ts_event=c.ts_event),
    )

    response = await world.client.patch(
        "/api/v1/strategies/sma-btc", headers=manager, json={"params": {"fast": 3}}
    )

    assert response.status_code == 422
    assert response.json() == {"detail": reason}


async def test_patch_when_the_stage_does_not_answer_in_time_is_202_pending(
    api_world_factory: WorldFactory,
) -> None:
    world = await api_world_factory(strategy_config_wait_s=0.01)
    world.state.strategies.apply(_status())
    manager = await world.headers("mgr", Role.MANAGE_STRATEGIES)

    response = await world.client.patch(
        "/api/v1/strategies/sma-btc", headers=manager, json={"params": {"fast": 4, "slow": 9}}
    )

    assert response.status_code == 202
    assert response.json()["outcome"] == "PENDING"
    assert response.json()["strategy"]["params"]["fast"] == 2
    assert len(_commands(world)) == 1


@pytest.mark.parametrize(
    ("path", "body", "status", "detail"),
    [
        (
            "nope",
            {"params": {"fast": 4}},
            404,
            "UNKNOWN_STRATEGY: strategy_id=nope (no signals stage announced it)",
        ),
        (
            "sma-btc",
            {"params": {"fastt": 4}},
            422,
            "UNKNOWN_PARAMETER: fastt (known: allow_short, fast, quantity, slow)",
        ),
        (
            "sma-btc",
            {"params": {"fast": "4"}},
            422,
            "INVALID_PARAMETER_TYPE: fast must be integer, got '4'",
        ),
        ("sma-btc", {"params": {}}, 422, "NO_PARAMETERS: give at least one parameter to change"),
    ],
)
async def test_patch_when_the_api_can_tell_it_is_wrong_refuses_without_a_command(
    world: ApiWorld, path: str, body: dict[str, Any], status: int, detail: str
) -> None:
    manager = await world.headers("mgr", Role.MANAGE_STRATEGIES)

    response = await world.client.patch(f"/api/v1/strategies/{path}", headers=manager, json=body)

    assert (response.status_code, response.json()["detail"]) == (status, detail)
    assert _commands(world) == []


def test_book_when_an_older_status_arrives_keeps_the_newer() -> None:
    book = StrategyBook()
    book.apply(_status(config_version=2, ts_event=T0_NS + 10))

    kept = book.apply(_status(config_version=1, ts_event=T0_NS + 5))

    assert kept is False
    status = book.get("sma-btc")
    assert status is not None
    assert status.config_version == 2


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"fast": 3, "quantity": "0.5", "allow_short": True}, None),
        ({"fast": 3.0}, "INVALID_PARAMETER_TYPE: fast must be integer, got 3.0"),
        ({"fast": True}, "INVALID_PARAMETER_TYPE: fast must be integer, got True"),
        ({"allow_short": 1}, "INVALID_PARAMETER_TYPE: allow_short must be boolean, got 1"),
    ],
)
def test_check_params_when_given_values_judges_their_json_types(
    params: dict[str, Any], problem: str | None
) -> None:
    assert check_params(params, SCHEMA) == problem
