"""The execution stage's own expectations; what every stage must do is in tests/stages/."""

from __future__ import annotations

import itertools
import subprocess
import sys
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.messages import (
    BookLevel,
    CommandType,
    ControlAction,
    ExecType,
    ExecutionReport,
    LiquiditySide,
    OrderStatus,
    OrderType,
    Side,
)
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.settings import CONFIG_ERROR_EXIT_CODE, load_settings
from quantmesh_common.testing import stubs
from quantmesh_common.testing.stubs import TS
from quantmesh_common.topics import Topic
from quantmesh_execution.config import ExecutionSettings
from quantmesh_execution.service import (
    HANDLERS_ISSUE,
    ExecutionHandler,
    ExecutionService,
    build_slippage,
    build_venue,
)
from quantmesh_execution.simulated import FixedBpsSlippage, NoSlippage, SquareRootImpact

D = Decimal
GROUP = "execution-sim"
INPUTS = [Topic.ORDERS_COMMANDS, Topic.MD_TICKS, Topic.MD_BOOKS, Topic.CONTROL]
_ids = itertools.count(1)


def settings(**overrides: Any) -> ExecutionSettings:
    fields: dict[str, Any] = {
        "bus": "memory",
        "http_host": "127.0.0.1",
        "http_port": 0,
        "database_url": None,
        "redis_url": None,
    }
    return ExecutionSettings(**{**fields, **overrides})


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("QM_VENUE", "QM_HTTP_PORT", "QM_DATABASE_URL", "QM_REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QM_BUS", "memory")
    return monkeypatch


async def wired(**overrides: Any) -> InMemoryBus:
    """An in-memory bus with the stage's handler (fixed id prefix "SIM") subscribed."""
    bus = InMemoryBus("execution", clock=SimulatedClock(TS), retain=True)
    handler = ExecutionHandler(build_venue(settings(**overrides), id_prefix="SIM"))
    await bus.subscribe(GROUP, INPUTS, handler, transactional=True).start()
    return bus


def reports(bus: InMemoryBus) -> list[ExecutionReport]:
    return [env.payload for env in bus.messages(Topic.EXEC_REPORTS)]


def book(asks: list[tuple[str, str]], bids: list[tuple[str, str]] | None = None) -> Any:
    return stubs.book_snapshot(
        asks=[BookLevel(price=D(p), size=D(s)) for p, s in asks],
        bids=[BookLevel(price=D(p), size=D(s)) for p, s in bids or []],
    )


def limit_buy(quantity: str, price: str, **overrides: Any) -> Any:
    n = next(_ids)
    fields: dict[str, Any] = {
        "command_id": f"C-{n}",
        "client_order_id": f"O-{n}",
        "quantity": D(quantity),
        "limit_price": D(price),
        "ts_event": TS,
    }
    return stubs.order_command(**{**fields, **overrides})


def expected(**overrides: Any) -> ExecutionReport:
    """A report of the venue with id prefix SIM and the stub order's account and strategy."""
    fields: dict[str, Any] = {
        "venue_order_id": "SIM-O1",
        "last_qty": D(0),
        "last_price": None,
        "avg_price": None,
        "fee": D(0),
        "fee_currency": None,
        "liquidity_side": LiquiditySide.NONE,
        "trade_id": None,
        "ts_event": TS,
    }
    return stubs.execution_report(**{**fields, **overrides})


# -- declaration and settings ------------------------------------------------------------------


def test_declared_topics_match_the_design() -> None:
    assert ExecutionService.consumes == (
        Topic.ORDERS_COMMANDS,
        Topic.MD_TICKS,
        Topic.MD_BOOKS,
        Topic.CONTROL,
    )
    assert ExecutionService.produces == (Topic.EXEC_REPORTS,)


def test_handlers_issue_when_handlers_exist_is_none() -> None:
    assert HANDLERS_ISSUE is None


def test_settings_when_env_is_empty_default_to_sim_with_tenth_percent_fees(
    clean_env: pytest.MonkeyPatch,
) -> None:
    loaded = load_settings(ExecutionSettings)

    assert (loaded.venue, loaded.sim_maker_fee, loaded.sim_taker_fee) == (
        "SIM",
        D("0.001"),
        D("0.001"),
    )
    assert isinstance(build_slippage(loaded), NoSlippage)
    assert loaded.sim_latency_ns == 0


def test_settings_when_env_sets_venue_fees_slippage_and_latency_build_that_venue(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("QM_VENUE", "binance")
    clean_env.setenv("QM_SIM_MAKER_FEE", "-0.0001")
    clean_env.setenv("QM_SIM_SLIPPAGE", "FIXED_BPS")
    clean_env.setenv("QM_SIM_SLIPPAGE_BPS", "2.5")
    clean_env.setenv("QM_SIM_LATENCY_MS", "1.5")

    venue = build_venue(load_settings(ExecutionSettings))

    assert venue.venue == "BINANCE"
    assert venue.config.maker_fee == D("-0.0001")
    assert venue.config.slippage == FixedBpsSlippage(D("2.5"))
    assert venue.config.latency_ns == 1_500_000


def test_settings_when_sqrt_impact_has_adv_build_the_impact_model(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("QM_SIM_SLIPPAGE", "sqrt_impact")
    clean_env.setenv("QM_SIM_IMPACT_ADV", "1000")
    clean_env.setenv("QM_SIM_IMPACT_SIGMA", "0.03")

    model = build_slippage(load_settings(ExecutionSettings))

    assert model == SquareRootImpact(k=D("1"), sigma=D("0.03"), adv=D("1000"))


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"QM_SIM_TAKER_FEE": "lots"}, "QM_SIM_TAKER_FEE='lots' is not a valid decimal number"),
        ({"QM_SIM_TAKER_FEE": "0.5"}, "QM_SIM_TAKER_FEE='0.5' must be less than or equal to 0.1"),
        ({"QM_SIM_MAKER_FEE": "NaN"}, "QM_SIM_MAKER_FEE='NaN'"),
        ({"QM_SIM_SLIPPAGE": "random"}, "QM_SIM_SLIPPAGE='random' is not one of"),
        ({"QM_SIM_SLIPPAGE_BPS": "-1"}, "QM_SIM_SLIPPAGE_BPS='-1' must be greater than or equal"),
        (
            {"QM_SIM_SLIPPAGE": "sqrt_impact"},
            "QM_SIM_IMPACT_ADV is required when QM_SIM_SLIPPAGE=sqrt_impact",
        ),
        ({"QM_SIM_LATENCY_MS": "-3"}, "QM_SIM_LATENCY_MS='-3' must be greater than or equal"),
        ({"QM_VENUE": "sim-1"}, "QM_VENUE='SIM-1' String should match pattern"),
        ({"QM_EXEC_VENUE": "paper"}, "QM_EXEC_VENUE='paper' is not one of"),
        ({"QM_EXEC_VENUE": "ccxt"}, "QM_EXEC_CCXT_EXCHANGE is required when QM_EXEC_VENUE=ccxt"),
        (
            {"QM_EXEC_VENUE": "ccxt", "QM_EXEC_CCXT_EXCHANGE": "nasdaq"},
            "QM_EXEC_CCXT_EXCHANGE='nasdaq' is not a ccxt exchange id",
        ),
        (
            {
                "QM_EXEC_VENUE": "ccxt",
                "QM_EXEC_CCXT_EXCHANGE": "binance",
                "QM_EXEC_CCXT_SANDBOX": "?",
            },
            "QM_EXEC_CCXT_SANDBOX='?'",
        ),
        (
            {
                "QM_EXEC_VENUE": "ccxt",
                "QM_EXEC_CCXT_EXCHANGE": "binance",
                "QM_EXEC_CCXT_BASE_URL": "ftp://x",
            },
            "QM_EXEC_CCXT_BASE_URL='ftp://x'",
        ),
        (
            {
                "QM_EXEC_VENUE": "ccxt",
                "QM_EXEC_CCXT_EXCHANGE": "binance",
                "QM_BINANCE_API_SECRET_FILE": "/nonexistent/qm-secret",
            },
            "QM_BINANCE_API_SECRET_FILE: cannot read the secret file /nonexistent/qm-secret",
        ),
    ],
)
def test_settings_when_a_venue_setting_is_bad_exit_2_naming_the_variable(
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    line: str,
) -> None:
    for var, value in env.items():
        clean_env.setenv(var, value)

    with pytest.raises(SystemExit) as exited:
        load_settings(ExecutionSettings)

    assert exited.value.code == CONFIG_ERROR_EXIT_CODE
    assert line in capsys.readouterr().err


# -- handlers on the in-memory bus -------------------------------------------------------------


async def test_submit_when_book_is_thin_emits_ack_taker_fill_and_rests_remainder() -> None:
    bus = await wired()
    await bus.publish(Topic.MD_BOOKS, book(asks=[("49000.00", "0.04"), ("49100.00", "1")]))
    command = limit_buy("0.1", "49000.00")

    envelope = await bus.publish(Topic.ORDERS_COMMANDS, command)
    await bus.run_until_idle()

    assert reports(bus) == [
        expected(
            report_id="SIM-R1",
            client_order_id=command.client_order_id,
            exec_type=ExecType.ACCEPTED,
            order_status=OrderStatus.ACCEPTED,
            cum_qty=D(0),
            leaves_qty=D("0.1"),
        ),
        expected(
            report_id="SIM-R2",
            client_order_id=command.client_order_id,
            exec_type=ExecType.PARTIAL_FILL,
            order_status=OrderStatus.PARTIALLY_FILLED,
            last_qty=D("0.04"),
            last_price=D("49000.00"),
            cum_qty=D("0.04"),
            leaves_qty=D("0.06"),
            avg_price=D("49000.00"),
            fee=D("1.96"),  # 0.04 x 49000 x 0.001
            fee_currency="USDT",
            liquidity_side=LiquiditySide.TAKER,
            trade_id="SIM-T1",
        ),
    ]
    records = bus.records(Topic.EXEC_REPORTS)
    assert {r.key for r in records} == {stubs.ACCOUNT_ID}
    assert {r.envelope.causation_id for r in records if r.envelope} == {envelope.event_id}


async def test_trade_tick_when_it_crosses_a_resting_limit_emits_a_maker_fill() -> None:
    bus = await wired(sim_maker_fee=D("0.0005"))
    command = limit_buy("0.1", "49000.00")
    await bus.publish(Topic.ORDERS_COMMANDS, command)
    await bus.run_until_idle()

    tick = stubs.tick(price=D("48990.00"), size=D("2"), ts_event=TS + 7, ts_init=TS + 7)
    envelope = await bus.publish(Topic.MD_TICKS, tick)
    await bus.run_until_idle()

    fill = reports(bus)[-1]
    assert fill == expected(
        report_id="SIM-R2",
        client_order_id=command.client_order_id,
        exec_type=ExecType.FILL,
        order_status=OrderStatus.FILLED,
        last_qty=D("0.1"),
        last_price=D("49000.00"),
        cum_qty=D("0.1"),
        leaves_qty=D(0),
        avg_price=D("49000.00"),
        fee=D("2.45"),  # 0.1 x 49000 x 0.0005
        fee_currency="USDT",
        liquidity_side=LiquiditySide.MAKER,
        trade_id="SIM-T1",
        ts_event=TS + 7,
    )
    assert bus.messages(Topic.EXEC_REPORTS)[-1].causation_id == envelope.event_id


async def test_cancel_command_when_order_rests_emits_canceled() -> None:
    bus = await wired()
    command = limit_buy("0.1", "49000.00")
    await bus.publish(Topic.ORDERS_COMMANDS, command)
    cancel = stubs.order_command(
        command_id="C-cancel",
        command_type=CommandType.CANCEL,
        client_order_id=command.client_order_id,
        side=None,
        order_type=None,
        quantity=None,
        limit_price=None,
        time_in_force=None,
        ts_event=TS + 1,
    )

    await bus.publish(Topic.ORDERS_COMMANDS, cancel)
    await bus.run_until_idle()

    assert [(r.exec_type, r.order_status) for r in reports(bus)] == [
        (ExecType.ACCEPTED, OrderStatus.ACCEPTED),
        (ExecType.CANCELED, OrderStatus.CANCELED),
    ]
    assert reports(bus)[-1].ts_event == TS + 1


async def test_submit_when_redelivered_with_same_client_order_id_emits_nothing_more() -> None:
    bus = await wired()
    await bus.publish(Topic.MD_BOOKS, book(asks=[("50000.20", "5")]))
    command = stubs.order_command(
        command_id="C-dup",
        client_order_id="O-dup",
        order_type=OrderType.MARKET,
        limit_price=None,
        quantity=D("1"),
    )

    await bus.publish(Topic.ORDERS_COMMANDS, command)
    await bus.publish(Topic.ORDERS_COMMANDS, command)
    await bus.publish(Topic.ORDERS_COMMANDS, command.model_copy(update={"command_id": "C-dup2"}))
    await bus.run_until_idle()

    assert [r.exec_type for r in reports(bus)] == [ExecType.ACCEPTED, ExecType.FILL]


async def test_command_when_for_another_venue_is_ignored() -> None:
    bus = await wired(venue="BINANCE")

    await bus.publish(Topic.ORDERS_COMMANDS, limit_buy("0.1", "49000.00"))
    await bus.run_until_idle()

    assert reports(bus) == []
    assert bus.committed(GROUP)  # consumed, not stuck or dead-lettered


async def test_control_cancel_all_orders_when_targeting_an_account_cancels_only_its_orders() -> (
    None
):
    bus = await wired()
    mine = limit_buy("0.1", "49000.00")
    other = limit_buy("0.1", "49000.00", account_id="acc-2")
    await bus.publish(Topic.ORDERS_COMMANDS, mine)
    await bus.publish(Topic.ORDERS_COMMANDS, other)

    control = stubs.control_command(
        action=ControlAction.CANCEL_ALL_ORDERS, target=stubs.ACCOUNT_ID, ts_event=TS + 5
    )
    await bus.publish(Topic.CONTROL, control)
    await bus.run_until_idle()

    canceled = [r for r in reports(bus) if r.exec_type is ExecType.CANCELED]
    assert [r.client_order_id for r in canceled] == [mine.client_order_id]
    assert canceled[0].reason == "CANCEL_ALL_ORDERS: command_id=K-1, issued_by=ops@example.com"


async def test_service_when_started_on_memory_bus_turns_a_command_into_reports() -> None:
    bus = InMemoryBus("execution", clock=SimulatedClock(TS), retain=True)
    service_settings = settings()
    runner = ServiceRunner(ExecutionService(service_settings), service_settings, bus=bus)
    await runner.start()
    try:
        await bus.publish(Topic.MD_BOOKS, book(asks=[("50000.20", "1")]))
        await bus.publish(
            Topic.ORDERS_COMMANDS,
            stubs.order_command(order_type=OrderType.MARKET, limit_price=None, side=Side.BUY),
        )
        await bus.run_until_idle()
        groups = [s.group for s in runner.ctx.subscriptions] if runner.ctx else []
    finally:
        await runner.stop()

    out = reports(bus)
    assert groups == [GROUP]
    assert [r.exec_type for r in out] == [ExecType.ACCEPTED, ExecType.FILL]
    assert (out[-1].last_qty, out[-1].last_price, out[-1].fee) == (
        D("0.1"),
        D("50000.20"),
        D("5.00002000"),
    )
    assert out[-1].trade_id is not None
    assert out[-1].venue_order_id == out[0].venue_order_id


def test_settings_when_ccxt_venue_configured_read_names_case_insensitively_without_ccxt(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("QM_EXEC_VENUE", "CCXT")
    clean_env.setenv("QM_EXEC_CCXT_EXCHANGE", " Binance ")
    clean_env.setenv("QM_EXEC_CCXT_SANDBOX", "true")
    clean_env.setenv("QM_VENUE", "binance")

    settings = load_settings(ExecutionSettings)

    assert (settings.exec_venue, settings.exec_ccxt_exchange) == ("ccxt", "binance")
    assert settings.exec_ccxt_sandbox is True
    assert settings.venue == "BINANCE"


def test_service_module_when_imported_does_not_import_ccxt() -> None:
    # Importing ccxt takes seconds: only QM_EXEC_VENUE=ccxt may pay for it, at setup.
    code = (
        "import sys, quantmesh_execution.service, quantmesh_execution.config\n"
        "from quantmesh_execution.config import ccxt_exchange_ids\n"
        "assert 'binance' in ccxt_exchange_ids()\n"
        "print(sorted(m for m in sys.modules if m == 'ccxt' or m.startswith('ccxt.')))"
    )

    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )

    assert done.stdout.strip() == "[]"
