"""Strategy statuses and configuration: CONFIGURE_STRATEGY validated by the strategy's model."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.messages import (
    Bar,
    ControlAction,
    ControlCommand,
    OrderIntent,
    StrategyState,
    StrategyStatus,
)
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic
from quantmesh_signals.config import SignalsSettings
from quantmesh_signals.engine import SignalsEngine, StrategySpec, configure_params
from quantmesh_signals.service import SignalsService

BTC = "BTC-USDT.SIM"
MINUTE = 60 * stubs.SECOND_NS
# fast=2, slow=3: bar 5 crosses up (target +quantity), bar 7 crosses down (target 0).
CLOSES = [10, 10, 10, 9, 8, 12, 14, 6]
SPEC: dict[str, Any] = {
    "id": "sma-btc",
    "name": "sma_cross",
    "account_id": "paper-1",
    "instruments": [BTC],
    "params": {"fast": 2, "slow": 3},
}


def _bar(close: int, i: int) -> Bar:
    price = Decimal(close)
    return stubs.bar(
        instrument_id=BTC,
        open=price,
        high=price,
        low=price,
        close=price,
        ts_open=stubs.TS + i * MINUTE,
        ts_close=stubs.TS + (i + 1) * MINUTE,
    )


def _configure(params: dict[str, Any], mode: str = "merge", cid: str = "C-1") -> ControlCommand:
    return stubs.control_command(
        command_id=cid,
        action=ControlAction.CONFIGURE_STRATEGY,
        target="sma-btc",
        params={"params": json.dumps(params), "mode": mode},
    )


def _engine() -> SignalsEngine:
    engine = SignalsEngine.from_specs([StrategySpec(**SPEC)])
    engine.start(stubs.TS)
    return engine


def _targets(engine: SignalsEngine) -> list[Decimal | None]:
    out: list[Decimal | None] = []
    for i, close in enumerate(CLOSES):
        out += [
            e.target_position for e in engine.on_bar(_bar(close, i)) if isinstance(e, OrderIntent)
        ]
    return out


def _status(events: list[Any]) -> StrategyStatus:
    statuses = [e for e in events if isinstance(e, StrategyStatus)]
    assert len(statuses) == 1
    return statuses[0]


def test_statuses_when_started_describe_each_strategy_with_its_effective_params() -> None:
    engine = _engine()

    (status,) = engine.statuses(stubs.TS)

    assert isinstance(status, StrategyStatus)
    assert (status.strategy_id, status.name, status.account_id) == (
        "sma-btc",
        "sma_cross",
        "paper-1",
    )
    assert status.instruments == [BTC]
    # Defaults filled in; Decimal as a string.
    assert status.params == {"fast": 2, "slow": 3, "quantity": "1", "allow_short": False}
    properties = status.param_schema["properties"]
    assert isinstance(properties, dict)
    assert set(properties) == {"fast", "slow", "quantity", "allow_short"}
    assert status.param_schema["additionalProperties"] is False
    assert (status.state, status.halted, status.config_version) == (StrategyState.RUNNING, False, 0)
    assert status.last_error is None


def test_configure_when_params_are_valid_merges_them_and_the_strategy_trades_with_them() -> None:
    engine = _engine()

    status = _status(engine.on_control(_configure({"quantity": "2.5"})))

    assert status.params == {"fast": 2, "slow": 3, "quantity": "2.5", "allow_short": False}
    assert (status.config_version, status.last_error, status.last_command_id) == (1, None, "C-1")
    assert _targets(engine) == [Decimal("2.5"), Decimal(0)]


def test_configure_when_mode_is_replace_resets_unnamed_params_to_their_defaults() -> None:
    engine = _engine()

    status = _status(engine.on_control(_configure({"fast": 5, "slow": 7}, mode="replace")))

    assert status.params == {"fast": 5, "slow": 7, "quantity": "1", "allow_short": False}
    assert engine.hosts["sma-btc"].spec.params == {"fast": 5, "slow": 7}


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"fast": 3}, "INVALID_PARAMS: Value error, fast (3) must be below slow (3)"),
        ({"bogus": 1}, "INVALID_PARAMS: bogus: Extra inputs are not permitted"),
        ({"fast": 0}, "INVALID_PARAMS: fast: Input should be greater than or equal to 1"),
    ],
)
def test_configure_when_params_are_invalid_refuses_them_and_keeps_the_running_ones(
    params: dict[str, Any], reason: str
) -> None:
    engine = _engine()

    status = _status(engine.on_control(_configure(params)))

    assert status.last_error == reason
    assert (status.config_version, status.last_command_id) == (0, "C-1")
    assert status.params == {"fast": 2, "slow": 3, "quantity": "1", "allow_short": False}
    assert _targets(engine) == [Decimal(1), Decimal(0)]


def test_configure_when_a_later_one_is_valid_clears_the_last_error() -> None:
    engine = _engine()
    engine.on_control(_configure({"fast": 9}, cid="C-1"))

    status = _status(engine.on_control(_configure({"quantity": 3}, cid="C-2")))

    assert (status.last_error, status.config_version, status.last_command_id) == (None, 1, "C-2")


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"params": "[1]"}, "INVALID_PARAMS: params must be a JSON object"),
        ({"params": "{"}, "INVALID_PARAMS: params is not JSON"),
        ({"params": "{}", "mode": "patch"}, "INVALID_MODE: mode must be merge or replace"),
    ],
)
def test_configure_params_when_malformed_raise_with_the_reason(
    params: dict[str, str], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(")):
        configure_params(params)


def test_configure_when_the_target_is_another_strategy_changes_nothing() -> None:
    engine = _engine()
    command = _configure({"quantity": 2}).model_copy(update={"target": "other"})

    assert engine.on_control(command) == []
    assert engine.hosts["sma-btc"].config_version == 0


def test_halt_and_resume_when_applied_publish_the_new_state_answering_the_command() -> None:
    engine = _engine()
    halt = stubs.control_command(command_id="H-1", action=ControlAction.HALT_STRATEGY, target="*")
    kill = stubs.control_command(
        command_id="K-1", action=ControlAction.KILL_SWITCH_ON, target="paper-1"
    )

    halted = _status(engine.on_control(halt))
    killed = _status(engine.on_control(kill))

    assert (halted.state, halted.halted, halted.last_command_id) == (
        StrategyState.HALTED,
        True,
        "H-1",
    )
    assert (killed.state, killed.killed) == (StrategyState.KILLED, True)


def test_fault_when_a_hook_raises_publishes_a_faulted_status() -> None:
    engine = _engine()
    host = engine.hosts["sma-btc"]

    def boom(bar: Bar, ctx: Any) -> None:
        raise RuntimeError("no data")

    host.strategy.on_bar = boom  # type: ignore[method-assign]

    status = _status(engine.on_bar(_bar(10, 0)))

    assert (status.state, status.fault) == (StrategyState.FAULTED, "RuntimeError: no data")


@pytest.fixture
async def stage() -> AsyncIterator[tuple[InMemoryBus, ServiceRunner[SignalsSettings]]]:
    settings = SignalsSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        strategies=json.dumps([SPEC]),
        signals_instance="pod-7",
    )
    clock = SimulatedClock(stubs.TS)
    bus = InMemoryBus("signals", clock=clock, retain=True)
    runner = ServiceRunner(SignalsService(settings), settings, bus=bus, clock=clock, pump=False)
    await runner.start()
    try:
        yield bus, runner
    finally:
        await runner.stop()


async def test_service_when_started_and_configured_publishes_statuses_keyed_by_strategy(
    stage: tuple[InMemoryBus, ServiceRunner[SignalsSettings]],
) -> None:
    bus, _ = stage

    await bus.publish(Topic.CONTROL, _configure({"fast": 4, "slow": 6}, cid="C-9"))
    await bus.run_until_idle()

    records = bus.records(Topic.STRATEGIES)
    statuses: list[StrategyStatus] = [e.payload for e in bus.messages(Topic.STRATEGIES)]
    assert [r.key for r in records] == ["sma-btc", "sma-btc"]
    assert [(s.last_command_id, s.config_version, s.instance) for s in statuses] == [
        (None, 0, "pod-7"),
        ("C-9", 1, "pod-7"),
    ]
    assert statuses[1].params["fast"] == 4
