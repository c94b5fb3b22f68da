"""`quantmesh run --venue`: the real ccxt.pro Binance client streams a loopback server's trades
into the one-process mesh, which paper trades them on the simulated venue.

The WebSocket server sends the first 800 recorded BTCUSDT trades of 2024-08-08 (43.8 s of the
venue's time, sent in about a second); an aiohttp server answers exchangeInfo. Nothing
outside loopback is contacted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from websockets.asyncio.server import ServerConnection, serve

from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import Bar, ExecutionReport, Instrument, Tick
from quantmesh_common.topics import Topic
from quantmesh_embedded.cli import main
from quantmesh_embedded.mesh import EmbeddedMesh
from quantmesh_embedded.run import RunConfig, VenueFeed, run_live

FIXTURES = Path(__file__).parent / "fixtures"
TRADES = [
    json.loads(line)
    for line in (FIXTURES / "binance_spot_btcusdt_trades_2024-08-08_head.jsonl")
    .read_text()
    .splitlines()
]
SYMBOL = "BTC-USDT.BINANCE"
WAIT_S = 60.0  # generous: a loaded 2-core machine


@pytest.fixture
async def venue() -> AsyncIterator[dict[str, str]]:
    """Binance's spot WebSocket (trades) and REST (exchangeInfo) on loopback ports."""

    async def stream(ws: ServerConnection) -> None:
        async for raw in ws:
            request = json.loads(raw)
            if request.get("method") != "SUBSCRIBE":
                continue
            await ws.send(json.dumps({"result": None, "id": request["id"]}))
            for trade in TRADES:
                await ws.send(json.dumps(trade))
                await asyncio.sleep(0.001)

    async def exchange_info(request: web.Request) -> web.Response:
        info = json.loads((FIXTURES / "binance_exchangeinfo_2021-10-12_subset.json").read_text())
        return web.json_response(info)

    app = web.Application()
    app.router.add_get("/api/v3/exchangeInfo", exchange_info)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    rest_port = runner.addresses[0][1]
    async with serve(stream, "127.0.0.1", 0) as server:
        ws_port = server.sockets[0].getsockname()[1]
        yield {
            # ccxt.pro appends "/<stream index>"; "/stream" in the path marks a spot socket.
            "api.ws.spot": f"ws://127.0.0.1:{ws_port}/stream/ws",
            "api.public": f"http://127.0.0.1:{rest_port}/api/v3",
        }
    await runner.cleanup()


def _feed(urls: dict[str, str], tmp_path: Path) -> VenueFeed:
    return VenueFeed(
        "binance",
        url_overrides=urls,
        options={"fetchMarkets": {"types": ["spot"]}},
        markets_cache_dir=tmp_path / "markets",
    )


class Seen:
    """Everything the mesh published on the topics a test looks at, in delivery order."""

    def __init__(self) -> None:
        #: Set once every recorded trade has come through as a tick.
        self.every_trade = asyncio.Event()
        self.ticks: list[Tick] = []
        self.bars: list[Bar] = []
        self.fills: list[ExecutionReport] = []
        self.instruments: list[Instrument] = []

    async def attach(self, mesh: EmbeddedMesh) -> None:
        topics = [Topic.MD_TICKS, Topic.MD_BARS, Topic.EXEC_REPORTS, Topic.REF_INSTRUMENTS]
        await mesh.bus.subscribe("test.seen", topics, self.on_event).start()

    def on_event(self, envelope: Envelope[Any]) -> None:
        event = envelope.payload
        if isinstance(event, Tick):
            self.ticks.append(event)
            if len(self.ticks) == len(TRADES):
                self.every_trade.set()
        elif isinstance(event, Bar):
            self.bars.append(event)
        elif isinstance(event, ExecutionReport) and event.exec_type.is_fill:
            self.fills.append(event)
        elif isinstance(event, Instrument):
            self.instruments.append(event)


async def _run_until_every_trade(config: RunConfig, seen: Seen) -> str:
    out = StringIO()
    await asyncio.wait_for(
        run_live(config, out, stop=seen.every_trade, on_mesh=seen.attach), WAIT_S
    )
    return out.getvalue()


def _expected_bars() -> list[tuple[int, Decimal, Decimal, Decimal, Decimal]]:
    """(open time, o, h, l, c) of the 1 s bars of the recorded trades, every one but the last
    (still open when the trades end), computed here from the raw frames."""
    by_second: dict[int, list[Decimal]] = {}
    for trade in TRADES:
        by_second.setdefault(trade["T"] // 1000, []).append(Decimal(trade["p"]))
    return [
        (second * 1_000_000_000, p[0], max(p), min(p), p[-1])
        for second, p in sorted(by_second.items())
    ][:-1]


async def test_run_live_when_fed_by_a_venue_trades_its_recorded_trades_on_the_paper_venue(
    venue: dict[str, str], tmp_path: Path
) -> None:
    # Arrange: 1 s bars, sma_cross 2/4 (the run's default), 0.001 BTC an order
    config = RunConfig(
        instruments=(SYMBOL,),
        bar_interval="1s",
        params={"quantity": "0.001"},
        venue=_feed(venue, tmp_path),
    )
    seen = Seen()

    # Act
    printed = await _run_until_every_trade(config, seen)

    # Assert: every trade once, in the venue's order, with its own time and price
    assert [t.trade_id for t in seen.ticks] == [str(t["t"]) for t in TRADES]
    assert seen.ticks[0].price == Decimal("61837.63")
    assert seen.ticks[0].ts_event == TRADES[0]["T"] * 1_000_000
    # bars of the venue's time, aggregated by the marketdata stage
    assert [(b.ts_open, b.open, b.high, b.low, b.close) for b in seen.bars] == _expected_bars()
    # the instrument's rules came from the venue's exchangeInfo
    assert [i.instrument_id for i in seen.instruments] == [SYMBOL]
    assert seen.instruments[0].lot_size == Decimal("0.00001")
    # the strategy traded, and every fill is at a price the venue printed
    assert seen.fills
    printed_prices = {Decimal(t["p"]) for t in TRADES}
    assert all(f.last_price in printed_prices for f in seen.fills)
    # sma_cross holds +-0.001 BTC: a reversal trades 0.002, and the net is never beyond 0.001
    assert all(f.last_qty <= Decimal("0.002") for f in seen.fills)
    net = sum((f.last_qty if f.side == "BUY" else -f.last_qty for f in seen.fills), Decimal(0))
    assert abs(net) <= Decimal("0.001")
    assert f"{len(TRADES)} ticks" in printed


def test_run_config_when_an_instrument_is_not_the_venues_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"BTC-USDT\.SIM is not on binance"):
        RunConfig(instruments=("BTC-USDT.SIM",), venue=_feed({}, tmp_path))


def test_venue_feed_when_ccxt_has_no_such_exchange_raises() -> None:
    with pytest.raises(ValueError, match=r"not a ccxt\.pro exchange"):
        VenueFeed("nosuchexchange")


def test_cli_run_when_venue_urls_are_not_a_json_object_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--venue", "binance", "--venue-urls", "[1]", "--no-tui"])

    assert exited.value.code == 2
    assert "not a JSON object" in capsys.readouterr().err


def test_cli_run_when_the_symbol_is_another_venues_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["run", "--venue", "binance", "--symbol", "BTC-USDT.SIM", "--no-history"])

    assert code == 2
    assert "BTC-USDT.SIM is not on binance" in capsys.readouterr().err
