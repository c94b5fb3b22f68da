"""The signals stage on the in-memory bus: bars in, intents out; control; fills; settings."""

from __future__ import annotations

import gc
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
    ExecType,
    OrderIntent,
    OrderStatus,
    Side,
    Signal,
)
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.settings import CONFIG_ERROR_EXIT_CODE, load_settings
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic
from quantmesh_signals.config import SignalsSettings
from quantmesh_signals.service import HANDLERS_ISSUE, SignalsService

BTC = "BTC-USDT.SIM"
ETH = "ETH-USDT.SIM"
MINUTE = 60 * stubs.SECOND_NS
# fast=2, slow=3: bar 5 crosses up (target +1), bar 7 crosses down (target 0); see
# test_builtin_strategies for the arithmetic.
CLOSES = [10, 10, 10, 9, 8, 12, 14, 6]
SMA_BTC = {
    "id": "sma-btc",
    "name": "sma_cross",
    "account_id": "paper-1",
    "instruments": [BTC],
    "params": {"fast": 2, "slow": 3},
}


def _bar(instrument: str, close: int, i: int) -> Bar:
    price = Decimal(close)
    return stubs.bar(
        instrument_id=instrument,
        open=price,
        high=price,
        low=price,
        close=price,
        ts_open=stubs.TS + i * MINUTE,
        ts_close=stubs.TS + (i + 1) * MINUTE,
    )


def _coid(strategy_id: str, i: int) -> str:
    return f"{strategy_id}-{stubs.TS + (i + 1) * MINUTE}-0.1"


class Stage:
    """The service running on an injected in-memory bus that the test drives."""

    def __init__(self, bus: InMemoryBus, runner: ServiceRunner[SignalsSettings]) -> None:
        self.bus = bus
        self.runner = runner

    async def bars(self, instrument: str, closes: list[int], start: int = 0) -> None:
        for i, close in enumerate(closes, start):
            await self.bus.publish(Topic.MD_BARS, _bar(instrument, close, i))
        await self.bus.run_until_idle()

    async def control(self, action: ControlAction, target: str) -> None:
        command = stubs.control_command(action=action, target=target)
        await self.bus.publish(Topic.CONTROL, command)
        await self.bus.run_until_idle()

    def intents(self) -> list[OrderIntent]:
        return [e.payload for e in self.bus.messages(Topic.ORDERS_INTENTS)]


async def _stage(strategies: list[dict[str, Any]]) -> AsyncIterator[Stage]:
    settings = SignalsSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        strategies=json.dumps(strategies),
    )
    clock = SimulatedClock(stubs.TS)
    bus = InMemoryBus("signals", clock=clock, retain=True)
    runner = ServiceRunner(SignalsService(settings), settings, bus=bus, clock=clock, pump=False)
    await runner.start()
    try:
        yield Stage(bus, runner)
    finally:
        await runner.stop()


@pytest.fixture
async def stage() -> AsyncIterator[Stage]:
    async for s in _stage([SMA_BTC]):
        yield s


def test_declared_topics_match_what_the_stage_subscribes_and_publishes() -> None:
    assert SignalsService.consumes == (
        Topic.MD_TICKS,
        Topic.MD_BARS,
        Topic.EXEC_REPORTS,
        Topic.CONTROL,
    )
    assert SignalsService.produces == (Topic.SIGNALS, Topic.ORDERS_INTENTS, Topic.STRATEGIES)


def test_handlers_exist() -> None:
    assert HANDLERS_ISSUE is None


async def test_bars_when_fast_sma_crosses_emit_exact_target_intents(stage: Stage) -> None:
    await stage.bars(BTC, CLOSES)

    intents = stage.intents()
    assert [(i.client_order_id, i.target_position, i.side) for i in intents] == [
        (_coid("sma-btc", 5), Decimal(1), None),
        (_coid("sma-btc", 7), Decimal(0), None),
    ]
    assert {(i.account_id, i.strategy_id, i.instrument_id) for i in intents} == {
        ("paper-1", "sma-btc", BTC)
    }
    envelopes = stage.bus.messages(Topic.ORDERS_INTENTS)
    assert [e.ts_event for e in envelopes] == [stubs.TS + 6 * MINUTE, stubs.TS + 8 * MINUTE]
    assert [r.key for r in stage.bus.records(Topic.ORDERS_INTENTS)] == ["paper-1", "paper-1"]


async def test_bars_when_target_changes_publish_a_signal_in_the_bar_flow(stage: Stage) -> None:
    await stage.bars(BTC, CLOSES)

    signals: list[Signal] = [e.payload for e in stage.bus.messages(Topic.SIGNALS)]
    intents = stage.bus.messages(Topic.ORDERS_INTENTS)
    bars = stage.bus.messages(Topic.MD_BARS)
    assert [s.target_position for s in signals] == [Decimal(1), Decimal(0)]
    assert intents[0].correlation_id == bars[5].correlation_id
    assert intents[0].causation_id == bars[5].event_id


async def test_halt_when_commanded_stops_emission_and_resume_restarts_it(stage: Stage) -> None:
    await stage.control(ControlAction.HALT_STRATEGY, "sma-btc")
    await stage.bars(BTC, CLOSES[:6])  # the up-cross at bar 5 happens while halted
    halted = stage.intents()

    await stage.control(ControlAction.RESUME_STRATEGY, "sma-btc")
    await stage.bars(BTC, CLOSES[6:], start=6)

    assert halted == []
    assert [(i.client_order_id, i.target_position) for i in stage.intents()] == [
        (_coid("sma-btc", 7), Decimal(0))
    ]


async def test_halt_when_aimed_at_another_strategy_changes_nothing(stage: Stage) -> None:
    await stage.control(ControlAction.HALT_STRATEGY, "someone-else")

    await stage.bars(BTC, CLOSES)

    assert len(stage.intents()) == 2


async def test_kill_switch_when_on_for_the_account_mutes_it_until_off(stage: Stage) -> None:
    await stage.control(ControlAction.KILL_SWITCH_ON, "paper-1")
    await stage.bars(BTC, CLOSES[:6])
    killed = stage.intents()

    await stage.control(ControlAction.KILL_SWITCH_OFF, "*")
    await stage.bars(BTC, CLOSES[6:], start=6)

    assert killed == []
    assert len(stage.intents()) == 1


async def test_fill_when_reported_updates_the_owning_strategy_position_once(stage: Stage) -> None:
    await stage.bars(BTC, CLOSES[:6])
    (intent,) = stage.intents()
    fill = stubs.execution_report(
        account_id="paper-1",
        client_order_id=intent.client_order_id,
        strategy_id=None,
        instrument_id=BTC,
        exec_type=ExecType.FILL,
        order_status=OrderStatus.FILLED,
        side=Side.BUY,
        last_qty=Decimal("0.4"),
        last_price=Decimal("12"),
        cum_qty=Decimal("0.4"),
        trade_id="T-77",
    )

    await stage.bus.publish(Topic.EXEC_REPORTS, fill)
    await stage.bus.publish(Topic.EXEC_REPORTS, fill)  # redelivered
    await stage.bus.run_until_idle()

    service = stage.runner.service
    assert isinstance(service, SignalsService)
    assert service.engine.hosts["sma-btc"].ctx.position(BTC) == Decimal("0.4")


async def test_two_strategies_on_different_instruments_each_see_only_their_bars() -> None:
    eth = {**SMA_BTC, "id": "sma-eth", "instruments": [ETH], "account_id": "paper-2"}
    async for stage in _stage([SMA_BTC, eth]):
        await stage.bars(BTC, CLOSES)
        await stage.bars(ETH, CLOSES[:6])

        got = [(i.strategy_id, i.instrument_id, i.target_position) for i in stage.intents()]

    assert got == [
        ("sma-btc", BTC, Decimal(1)),
        ("sma-btc", BTC, Decimal(0)),
        ("sma-eth", ETH, Decimal(1)),
    ]


def test_settings_when_strategies_env_is_valid_parse_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QM_BUS", "memory")
    monkeypatch.setenv("QM_STRATEGIES", json.dumps([SMA_BTC]))

    settings = load_settings(SignalsSettings)

    (spec,) = settings.strategies
    assert (spec.id, spec.name, spec.instruments, spec.params) == (
        "sma-btc",
        "sma_cross",
        [BTC],
        {"fast": 2, "slow": 3},
    )


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ("[{", "is not valid JSON"),
        (json.dumps([{**SMA_BTC, "name": "nope"}]), "unknown strategy 'nope'"),
        (json.dumps([{**SMA_BTC, "params": {"fast": 9, "slow": 3}}]), "fast (9) must be below"),
        (json.dumps([SMA_BTC, SMA_BTC]), "'sma-btc' appears twice"),
        (json.dumps([{**SMA_BTC, "name": "pairs_spread", "params": {}}]), "exactly 2 instruments"),
    ],
)
def test_settings_when_strategies_env_is_bad_exit_2_naming_qm_strategies(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str, phrase: str
) -> None:
    monkeypatch.setenv("QM_BUS", "memory")
    monkeypatch.setenv("QM_STRATEGIES", value)

    with pytest.raises(SystemExit) as exited:
        load_settings(SignalsSettings)

    err = capsys.readouterr().err
    assert exited.value.code == CONFIG_ERROR_EXIT_CODE
    assert "QM_STRATEGIES" in err
    assert phrase in err


def test_groups_when_two_instances_run_share_the_data_group_and_own_a_control_group() -> None:
    def service(instance: str) -> SignalsService:
        return SignalsService(
            SignalsSettings(
                bus="memory", strategies=json.dumps([SMA_BTC]), signals_instance=instance
            )
        )

    one, two = service("pod-0"), service("pod-1")

    assert (one.group, two.group) == ("signals", "signals")
    assert (one.control_group, two.control_group) == (
        "signals.control.pod-0",
        "signals.control.pod-1",
    )


def test_settings_when_topic_prefix_is_set_prefix_every_topic_read_and_written() -> None:
    settings = SignalsSettings(
        bus="kafka",
        kafka_bootstrap="127.0.0.1:1",
        strategies=json.dumps([SMA_BTC]),
        signals_topic_prefix="t1.",
    )

    service = SignalsService(settings)

    assert service.data_topics == ["t1.md.bars", "t1.md.ticks", "t1.exec.reports"]
    assert service.control_topics == ["t1.control"]
    assert service.joint_topics == ["t1.signals.joint.bars", "t1.signals.joint.ticks"]


async def test_setup_when_done_freezes_what_exists_out_of_the_collectors_sight() -> None:
    # Arrange: nothing frozen (an earlier test's stage may have frozen the heap)
    gc.unfreeze()
    marker: list[list[str]] = [["built before the stage"]]  # lists are always tracked
    assert any(o is marker for o in gc.get_objects())

    try:
        # Act
        async for _ in _stage([SMA_BTC]):
            frozen = gc.get_freeze_count()
            tracked = any(o is marker for o in gc.get_objects())  # frozen ones are not listed

        # Assert: the heap so far is in the permanent generation, the marker with it
        assert frozen > 1_000
        assert not tracked
    finally:
        gc.unfreeze()
