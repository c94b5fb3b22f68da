"""The marketdata stage: its topics, the synthetic feed's steps, and the running service."""

from __future__ import annotations

import asyncio
import gc
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import Bar, ControlAction, Tick
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.settings import load_settings
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic
from quantmesh_marketdata.config import MarketDataSettings
from quantmesh_marketdata.feed import SyntheticFeed
from quantmesh_marketdata.service import HANDLERS_ISSUE, MarketDataService
from quantmesh_marketdata.synthetic import GbmParams


def test_declared_topics_match_the_design() -> None:
    assert MarketDataService.consumes == (Topic.CONTROL,)
    assert MarketDataService.produces == (
        Topic.MD_TICKS,
        Topic.MD_BARS,
        Topic.MD_BOOKS,
        Topic.REF_INSTRUMENTS,
        Topic.MD_COLLECTOR,
        Topic.ALERTS,
    )
    assert HANDLERS_ISSUE is None


def test_feed_step_gives_one_tick_per_instrument_and_bars_when_minutes_close() -> None:
    feed = SyntheticFeed(
        ["BTC-USDT.SIM", "ETH-USDT.SIM"],
        GbmParams(interval_ns=20_000_000_000),  # one tick every 20 s
        start_ns=1_700_000_040 * 1_000_000_000,  # on a minute boundary
        seed=5,
        bar_interval="1m",
    )

    steps = [feed.step() for _ in range(4)]  # t = 0, 20, 40, 60 s

    assert [[topic for topic, _ in step] for step in steps[:3]] == [[Topic.MD_TICKS] * 2] * 3
    # At 60 s each instrument's first minute closes right after its tick.
    assert [topic for topic, _ in steps[3]] == [
        Topic.MD_TICKS,
        Topic.MD_BARS,
        Topic.MD_TICKS,
        Topic.MD_BARS,
    ]
    btc_ticks = [e for step in steps[:3] for _, e in step if isinstance(e, Tick)][::2]
    bar = steps[3][1][1]
    assert isinstance(bar, Bar)
    assert bar.open == btc_ticks[0].price
    assert bar.close == btc_ticks[2].price
    assert bar.volume == sum((t.size for t in btc_ticks), Decimal(0))


def test_settings_when_an_instrument_id_is_malformed_exit_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QM_BUS", "memory")
    monkeypatch.setenv("QM_INSTRUMENTS", "BTC-USDT.SIM,btcusdt")

    with pytest.raises(SystemExit):
        load_settings(MarketDataSettings)

    assert "QM_INSTRUMENTS" in capsys.readouterr().err


async def _wait(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_service_publishes_ticks_and_pauses_on_collector_stop() -> None:
    settings = MarketDataSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        feed="synthetic",
        feed_rate=200,
        instruments="BTC-USDT.SIM",
    )
    service = MarketDataService(settings)
    runner = ServiceRunner(service, settings)
    ticks: list[Tick] = []

    def collect(envelope: Envelope[Any]) -> None:
        ticks.append(envelope.payload)

    await runner.start()
    try:
        await runner.bus.subscribe("test.collector", [Topic.MD_TICKS], collect).start()
        await _wait(lambda: len(ticks) >= 20)
        await runner.bus.publish(
            Topic.CONTROL,
            stubs.control_command(action=ControlAction.COLLECTOR_STOP, target="marketdata"),
        )
        await _wait(lambda: not service.feeding)
        await asyncio.sleep(0.1)  # a step in flight may still land
        paused_at = len(ticks)
        await asyncio.sleep(0.3)
        after_pause = len(ticks)
    finally:
        await runner.stop()

    assert after_pause == paused_at
    assert all(t.instrument_id == "BTC-USDT.SIM" for t in ticks)
    assert [t.ts_event for t in ticks] == sorted(t.ts_event for t in ticks)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"QM_FEED": "venue", "QM_VENUE_SYMBOLS": "BTC/USDT"}, "QM_VENUE"),
        (
            {"QM_FEED": "venue", "QM_VENUE": "nosuchexchange", "QM_VENUE_SYMBOLS": "BTC/USDT"},
            "QM_VENUE",
        ),
        ({"QM_FEED": "venue", "QM_VENUE": "binance"}, "QM_VENUE_SYMBOLS"),
        ({"QM_VENUE_CHANNELS": "trades,candles"}, "QM_VENUE_CHANNELS"),
        ({"QM_VENUE_URLS": "{not json"}, "QM_VENUE_URLS"),
    ],
)
def test_settings_when_venue_config_is_bad_exit_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    variable: str,
) -> None:
    monkeypatch.setenv("QM_BUS", "memory")
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    with pytest.raises(SystemExit):
        load_settings(MarketDataSettings)

    assert f"configuration error: {variable}=" in capsys.readouterr().err


def test_settings_when_venue_config_is_complete_builds_the_venue() -> None:
    settings = MarketDataSettings(
        bus="memory",
        feed="venue",
        venue="Binance",
        venue_symbols="BTC/USDT, ETH/USDT",
        venue_channels="trades,book,trades",
        venue_sandbox=True,
        venue_urls='{"api.ws.spot": "ws://127.0.0.1:1/ws"}',
    )

    config = settings.venue_config()

    assert (config.exchange_id, config.venue) == ("binance", "BINANCE")
    assert config.symbols == ("BTC/USDT", "ETH/USDT")
    assert config.channels == ("trades", "book")
    assert config.sandbox is True
    assert config.url_overrides == {"api.ws.spot": "ws://127.0.0.1:1/ws"}


async def test_replay_feed_when_prefixed_publishes_the_file_once_on_the_prefixed_topics(
    tmp_path: Path,
) -> None:
    path = tmp_path / "trades.csv"
    path.write_text(
        "timestamp,id,price,amount\n"
        "1700000040000,1,100,1\n"
        "1700000041000,2,101,1\n"
        "1700000100000,3,99,2\n"
    )
    settings = MarketDataSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        feed="replay",
        replay_file=str(path),
        instruments="ETH-USDT.SIM",
        bar_interval="1m",
        marketdata_topic_prefix="run1.",
    )
    service = MarketDataService(settings)
    runner = ServiceRunner(service, settings)
    got: list[tuple[str, Any]] = []

    def collect(envelope: Envelope[Any]) -> None:
        got.append((type(envelope.payload).__name__, envelope.ts_event))

    await runner.start()
    try:
        await runner.bus.subscribe(
            "test.replay", ["run1." + Topic.MD_TICKS, "run1." + Topic.MD_BARS], collect
        ).start()
        await _wait(lambda: service.replay_done and len(got) == 5)
    finally:
        await runner.stop()

    sec = 1_000_000_000
    assert service.replayed == 5
    assert sorted(got) == [
        ("Bar", 1_700_000_100 * sec),
        ("Bar", 1_700_000_160 * sec),
        ("Tick", 1_700_000_040 * sec),
        ("Tick", 1_700_000_041 * sec),
        ("Tick", 1_700_000_100 * sec),
    ]


def test_settings_when_replay_file_is_missing_exit_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("QM_BUS", "memory")
    monkeypatch.setenv("QM_FEED", "replay")
    monkeypatch.setenv("QM_REPLAY_FILE", str(tmp_path / "absent.csv"))

    with pytest.raises(SystemExit):
        load_settings(MarketDataSettings)

    assert "QM_REPLAY_FILE" in capsys.readouterr().err


async def test_setup_when_done_freezes_what_exists_out_of_the_collectors_sight() -> None:
    # Arrange: nothing frozen (an earlier test's stage may have frozen the heap)
    gc.unfreeze()
    marker: list[list[str]] = [["built before the stage"]]  # lists are always tracked
    assert any(o is marker for o in gc.get_objects())
    settings = MarketDataSettings(bus="memory", http_host="127.0.0.1", http_port=0, feed="none")
    runner = ServiceRunner(MarketDataService(settings), settings)

    try:
        # Act
        await runner.start()
        frozen = gc.get_freeze_count()
        tracked = any(o is marker for o in gc.get_objects())  # frozen ones are not listed
        await runner.stop()

        # Assert: the heap so far is in the permanent generation, the marker with it
        assert frozen > 1_000
        assert not tracked
    finally:
        gc.unfreeze()
