"""`quantmesh run`: the live embedded mode on the synthetic feed, its view and its command line."""

from __future__ import annotations

import asyncio
import io
from decimal import Decimal

import pytest

from quantmesh_embedded.cli import main
from quantmesh_embedded.run import CLEAR, DEFAULT_SMA_PARAMS, RunConfig, run_live

SECOND = 1_000_000_000
T0 = 1_700_000_000 * SECOND  # a whole second, hence a 1 s bar boundary


class FastClock:
    """A clock whose sleep moves time on at once: seconds of feed in milliseconds of test."""

    def __init__(self, start_ns: int, stop_at_ns: int | None = None) -> None:
        self.now = start_ns
        self.stop_at_ns = stop_at_ns
        self.stop = asyncio.Event()

    def now_ns(self) -> int:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += round(seconds * SECOND)
        if self.stop_at_ns is not None and self.now >= self.stop_at_ns:
            self.stop.set()
        await asyncio.sleep(0)


def _config(**changes: object) -> RunConfig:
    base: dict[str, object] = {
        "rate": 20.0,
        "bar_interval": "1s",
        "duration_s": 12.0,
        "params": {"fast": 1, "slow": 2},
    }
    base.update(changes)
    return RunConfig(**base)  # type: ignore[arg-type]


async def test_run_live_when_fed_for_12_seconds_publishes_every_tick_and_closed_bar() -> None:
    # Arrange: 20 ticks/s from T0 on, stopping at T0 + 12 s
    out = io.StringIO()

    # Act
    view = await run_live(_config(), out, clock=FastClock(T0))

    # Assert: ticks at 0, 0.05, ..., 11.95 s = 240 per instrument; bars 0..10 closed per
    # instrument (bar 11 would close on a tick at 12 s, which is not published).
    assert view.ticks == 2 * 240
    assert view.bars == 2 * 11


async def test_run_live_when_fed_trades_fills_and_prints_prices_every_second() -> None:
    # Arrange
    out = io.StringIO()

    # Act
    view = await run_live(_config(), out, clock=FastClock(T0))

    # Assert
    text = out.getvalue()
    assert view.fills, "sma_cross 1/2 on 1 s bars trades within 12 s"
    assert view.orders >= 1
    assert "FILL   " in text
    summaries = [line for line in text.splitlines() if line.startswith("[")]
    # One line per elapsed second (1..11) plus the final one.
    assert len(summaries) == 12
    assert all("BTC-USDT.SIM" in line and "ETH-USDT.SIM" in line for line in summaries)
    assert "stopped after 12.0 s: 480 ticks, 22 bars" in text
    assert view.equity != Decimal("100000")


async def test_run_live_when_run_twice_with_same_seed_gives_the_same_fills() -> None:
    # Arrange: the second run starts 0.3 s into the first second: the bar grid is the same
    first_clock, second_clock = FastClock(T0), FastClock(T0 + 3 * SECOND // 10)

    # Act
    first = await run_live(_config(), io.StringIO(), clock=first_clock)
    second = await run_live(_config(), io.StringIO(), clock=second_clock)

    # Assert: compare the fills up to the first run's end, the horizon both runs saw
    horizon = T0 + 12 * SECOND
    key = [(f.instrument_id, f.side, f.last_qty, f.last_price) for f in first.fills]
    later = [f for f in second.fills if f.ts_event < horizon]
    assert key == [(f.instrument_id, f.side, f.last_qty, f.last_price) for f in later]
    assert key


async def test_run_live_when_seed_differs_gives_other_prices() -> None:
    # Arrange / Act
    one = await run_live(_config(seed=1), io.StringIO(), clock=FastClock(T0))
    two = await run_live(_config(seed=2), io.StringIO(), clock=FastClock(T0))

    # Assert
    assert one.prices != two.prices


async def test_run_live_when_stop_is_set_stops_without_a_duration() -> None:
    # Arrange: no duration; the clock sets `stop` once 3 s have passed
    clock = FastClock(T0, stop_at_ns=T0 + 3 * SECOND)
    out = io.StringIO()

    # Act
    view = await run_live(_config(duration_s=None), out, clock=clock, stop=clock.stop)

    # Assert: stopped at the first check after 3 s: ticks 0 .. 2.95 s, or one step beyond
    assert 2 * 60 <= view.ticks <= 2 * 61
    assert "stopped after 3.0 s" in out.getvalue()


async def test_run_live_when_tty_redraws_the_screen_with_positions() -> None:
    # Arrange
    out = io.StringIO()

    # Act
    view = await run_live(_config(), out, tty=True, clock=FastClock(T0))

    # Assert: the last screen shows what the portfolio held at its last snapshot
    screens = out.getvalue().split(CLEAR)
    last = screens[-1]
    assert len(screens) == 1 + 12
    for heading in ("PRICES", "POSITIONS", "EQUITY", "RECENT ORDERS / FILLS"):
        assert heading in last
    assert view.snapshot is not None
    assert view.snapshot.positions, "sma_cross with shorting is always in the market once in"
    held = last.split("POSITIONS")[1].split("EQUITY")[0]
    for position in view.snapshot.positions:
        assert f"{position.instrument_id:<16} {position.quantity:>+10}" in held
    last_fill = view.fills[-1]
    assert f"FILL   {last_fill.side} {last_fill.last_qty} {last_fill.instrument_id}" in last


def test_run_config_when_sma_cross_fills_unset_params_from_defaults() -> None:
    # Arrange
    config = RunConfig(params={"fast": 5, "slow": 9})

    # Act
    params = config.strategy_params()

    # Assert
    assert params == {"fast": 5, "slow": 9, "quantity": "0.01", "allow_short": True}
    assert DEFAULT_SMA_PARAMS["fast"] == 2


def test_run_config_when_another_strategy_passes_only_given_params() -> None:
    # Arrange / Act
    params = RunConfig(strategy="rsi_reversion", params={"period": 7}).strategy_params()

    # Assert
    assert params == {"period": 7}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"instruments": ("BTC-USDT.SIM", "ETH-USDT.BINANCE")}, "one venue"),
        ({"instruments": ("BTC-USDT.SIM", "ETH-USD.SIM")}, "one quote"),
        ({"rate": 0.0}, "rate"),
        ({"duration_s": -1.0}, "duration"),
        ({"bar_interval": "5x"}, "bar interval"),
    ],
)
def test_run_config_when_invalid_raises(changes: dict[str, object], message: str) -> None:
    # Arrange / Act / Assert
    with pytest.raises(ValueError, match=message):
        RunConfig(**changes)  # type: ignore[arg-type]


def test_cli_run_when_given_a_duration_exits_0_after_trading(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Arrange: the real wall clock; fast=1 slow=2 on 1 s bars trades within 4 s
    argv = ["run", "--duration", "4", "--rate", "50", "--bar-interval", "1s"]
    argv += ["--param", "fast=1", "--param", "slow=2", "--symbol", "BTC-USDT.SIM"]

    # Act
    code = main(argv)

    # Assert
    text = capsys.readouterr().out
    assert code == 0
    assert "BTC-USDT.SIM 6" in text  # a price near the 60000 start
    assert "ETH-USDT.SIM" not in text
    assert "stopped after 4.0 s" in text
    assert "FILL   " in text
