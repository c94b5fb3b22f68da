"""The real ccxt.pro Binance client against a loopback server replaying a recorded stream.

The WebSocket server replays `fixtures/binance_spot_btcusdt_ws_2024-08-08_head.jsonl` (trade
and depth frames of 2024-08-08, data of Binance's combined stream) frame by frame; an aiohttp
server answers exchangeInfo and depth snapshots. Tests stop and restart the WebSocket server,
hold frames back, and drop a depth update, and watch what the streamer publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from websockets.asyncio.server import Server, ServerConnection, serve

from quantmesh_common.clock import WallClock
from quantmesh_common.envelope import Envelope, Event
from quantmesh_common.messages import Alert, Bar, BookSnapshot, Instrument, Tick, TickKind
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.topics import Topic
from quantmesh_marketdata.config import MarketDataSettings
from quantmesh_marketdata.service import MarketDataService
from quantmesh_marketdata.stream import StreamTuning, VenueStreamer
from quantmesh_marketdata.venue import SymbolMap, VenueConfig, make_stream_exchange

FIXTURES = Path(__file__).parent / "fixtures"
SNAPSHOT = "binance_spot_btcusdt_depth_snapshot_2024-08-08.json"
WAIT_S = 30.0  # generous: a loaded 2-core machine


def _frames() -> dict[str, list[dict[str, Any]]]:
    frames: dict[str, list[dict[str, Any]]] = {"trade": [], "depth": [], "bookTicker": []}
    for line in (
        (FIXTURES / "binance_spot_btcusdt_ws_2024-08-08_head.jsonl").read_text().splitlines()
    ):
        data = json.loads(line)["msg"]["data"]
        kinds = {"trade": "trade", "depthUpdate": "depth"}
        frames[kinds.get(data.get("e", ""), "bookTicker")].append(data)
    return frames


class ReplayServer:
    """A Binance-like WebSocket endpoint replaying recorded frames from shared cursors.

    Each kind (trade, depth) has one cursor shared by every connection, so a client that
    reconnects resumes where the last connection stopped. `limit[kind]` holds frames back;
    `drop[kind]` lists frame indices never sent (a sequence gap).
    """

    def __init__(self) -> None:
        self.frames = _frames()
        self.cursor = {kind: 0 for kind in self.frames}
        self.limit: dict[str, int | None] = {kind: None for kind in self.frames}
        self.drop: dict[str, set[int]] = {kind: set() for kind in self.frames}
        self.subscribes = 0
        self.port = 0
        self._server: Server | None = None
        self._advance = asyncio.Event()
        recorded = json.loads((FIXTURES / SNAPSHOT).read_text())
        self.book_id: int = recorded["lastUpdateId"]
        self.book = {"b": dict(recorded["bids"]), "a": dict(recorded["asks"])}

    async def start(self) -> None:
        self._server = await serve(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Kill the server: connections are cut (no close handshake), the port is released."""
        assert self._server is not None
        for connection in list(self._server.connections):
            connection.transport.abort()
        self._server.close()
        await self._server.wait_closed()
        self._server = None

    def release(self, kind: str, limit: int | None = None) -> None:
        self.limit[kind] = limit
        self._advance.set()

    def snapshot(self) -> dict[str, Any]:
        """The venue's book now: the recorded snapshot plus every depth update sent or dropped."""
        return {
            "lastUpdateId": self.book_id,
            "bids": sorted(self.book["b"].items(), key=lambda lv: -float(lv[0])),
            "asks": sorted(self.book["a"].items(), key=lambda lv: float(lv[0])),
        }

    def _apply(self, update: dict[str, Any]) -> None:
        if update["u"] <= self.book_id:
            return
        for side in ("b", "a"):
            for price, size in update[side]:
                if float(size) == 0:
                    self.book[side].pop(price, None)
                else:
                    self.book[side][price] = size
        self.book_id = update["u"]

    async def _handle(self, ws: ServerConnection) -> None:
        senders: dict[str, asyncio.Task[None]] = {}
        try:
            async for raw in ws:
                request = json.loads(raw)
                if request.get("method") != "SUBSCRIBE":
                    continue
                self.subscribes += 1
                await ws.send(json.dumps({"result": None, "id": request["id"]}))
                for stream in request["params"]:
                    name = stream.split("@")[1]  # btcusdt@trade, @bookTicker, @depth@100ms
                    kind = name if name in ("trade", "bookTicker") else "depth"
                    if kind not in senders:
                        senders[kind] = asyncio.create_task(self._send(ws, kind))
        finally:
            for task in senders.values():
                task.cancel()

    async def _send(self, ws: ServerConnection, kind: str) -> None:
        frames = self.frames[kind]
        while True:
            index = self.cursor[kind]
            limit = self.limit[kind]
            if index >= len(frames) or (limit is not None and index >= limit):
                self._advance.clear()
                await self._advance.wait()
                continue
            self.cursor[kind] = index + 1
            if kind == "depth":
                self._apply(frames[index])
            if index not in self.drop[kind]:
                await ws.send(json.dumps(frames[index]))
            await asyncio.sleep(0.01)


class Collected:
    """What the streamer published, with a way to await a condition on it."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Event]] = []
        self._changed = asyncio.Condition()

    async def publish(self, topic: str, event: Event, ts_event: int) -> None:
        async with self._changed:
            self.events.append((topic, event))
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), WAIT_S)
            except TimeoutError:
                raise AssertionError(
                    f"timed out waiting for {what}; got {self.summary()}"
                ) from None

    def ticks(self) -> list[Tick]:
        return [e for t, e in self.events if t == Topic.MD_TICKS and isinstance(e, Tick)]

    def books(self) -> list[BookSnapshot]:
        return [e for t, e in self.events if isinstance(e, BookSnapshot)]

    def alerts(self, code: str) -> list[Alert]:
        return [e for t, e in self.events if isinstance(e, Alert) and e.code == code]

    def summary(self) -> str:
        codes = [e.code for _, e in self.events if isinstance(e, Alert)]
        return f"{len(self.ticks())} ticks, {len(self.books())} books, alerts {codes}"


@pytest.fixture
async def ws_server() -> AsyncIterator[ReplayServer]:
    server = ReplayServer()
    await server.start()
    yield server
    with contextlib.suppress(AssertionError):
        await server.stop()


@pytest.fixture
async def rest_server(
    ws_server: ReplayServer, binance_exchange_info: dict[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    state: dict[str, Any] = {"depth_requests": 0}

    async def exchange_info(request: web.Request) -> web.Response:
        return web.json_response(binance_exchange_info)

    async def depth(request: web.Request) -> web.Response:
        state["depth_requests"] += 1
        return web.json_response(ws_server.snapshot())

    app = web.Application()
    app.router.add_get("/api/v3/exchangeInfo", exchange_info)
    app.router.add_get("/api/v3/depth", depth)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state["port"] = runner.addresses[0][1]
    yield state
    await runner.cleanup()


async def _streamer(
    ws_server: ReplayServer, rest_server: dict[str, Any], channels: tuple[str, ...]
) -> tuple[VenueStreamer, Collected]:
    config = VenueConfig(
        "binance",
        symbols=("BTC/USDT",),
        channels=channels,
        book_depth=5,
        options={"fetchMarkets": {"types": ["spot"]}},
        url_overrides={
            # ccxt.pro appends "/<stream index>"; "/stream" in the path marks a spot socket.
            "api.ws.spot": f"ws://127.0.0.1:{ws_server.port}/stream/ws",
            "api.public": f"http://127.0.0.1:{rest_server['port']}/api/v3",
        },
        rate_limit=False,
    )
    exchange = make_stream_exchange(config)
    markets = await exchange.load_markets()
    collected = Collected()
    tuning = StreamTuning(
        backoff_base_s=0.05, backoff_cap_s=0.5, stale_after_s=1.0, stale_check_s=0.1
    )
    streamer = VenueStreamer(
        exchange, config, SymbolMap(markets, "BINANCE"), collected.publish, WallClock(), tuning
    )
    return streamer, collected


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_streamer_when_server_killed_and_restarted_reconnects_and_resumes_without_gaps(
    ws_server: ReplayServer, rest_server: dict[str, Any]
) -> None:
    ws_server.release("trade", 20)
    streamer, out = await _streamer(ws_server, rest_server, ("trades",))
    expected_ids = [str(frame["t"]) for frame in ws_server.frames["trade"]]
    task = asyncio.create_task(streamer.run())
    try:
        await out.wait_for(lambda: len(out.ticks()) >= 20, "the first 20 trades")

        await ws_server.stop()
        await out.wait_for(lambda: bool(out.alerts("FEED_DISCONNECTED")), "FEED_DISCONNECTED")
        await ws_server.start()
        ws_server.release("trade", None)
        await out.wait_for(lambda: len(out.ticks()) >= len(expected_ids), "every trade")
    finally:
        await _cancel(task)

    ticks = out.ticks()
    assert [t.trade_id for t in ticks] == expected_ids  # resumed: no trade lost or repeated
    first = ws_server.frames["trade"][0]
    assert (str(ticks[0].price), ticks[0].ts_event) == ("61837.63", first["T"] * 1_000_000)
    assert ticks[0].ts_init != ticks[0].ts_event  # our receive time kept beside the venue's
    assert len(out.alerts("FEED_DISCONNECTED")) == 1  # one alert per outage
    assert out.alerts("FEED_RECOVERED")
    assert streamer.reconnects >= 1
    assert ws_server.subscribes >= 2
    assert not out.alerts("FEED_GAP")


async def test_streamer_when_feed_goes_silent_raises_stale_then_recovered(
    ws_server: ReplayServer, rest_server: dict[str, Any]
) -> None:
    ws_server.release("trade", 5)
    streamer, out = await _streamer(ws_server, rest_server, ("trades",))
    task = asyncio.create_task(streamer.run())
    try:
        await out.wait_for(lambda: len(out.ticks()) >= 5, "5 trades")
        await out.wait_for(lambda: bool(out.alerts("FEED_STALE")), "FEED_STALE")
        stale_at = len(out.events)
        ws_server.release("trade", 10)
        await out.wait_for(lambda: bool(out.alerts("FEED_RECOVERED")), "FEED_RECOVERED")
    finally:
        await _cancel(task)

    stale = out.alerts("FEED_STALE")
    assert len(stale) == 1
    assert stale[0].instrument_id == "BTC-USDT.BINANCE"
    assert float(stale[0].details["silent_s"]) >= 1.0
    assert any(isinstance(e, Tick) for _, e in out.events[stale_at:])


async def test_streamer_when_a_trade_id_is_skipped_raises_feed_gap(
    ws_server: ReplayServer, rest_server: dict[str, Any]
) -> None:
    ws_server.drop["trade"] = {3}
    ws_server.release("trade", 6)
    streamer, out = await _streamer(ws_server, rest_server, ("trades",))
    task = asyncio.create_task(streamer.run())
    try:
        await out.wait_for(lambda: bool(out.alerts("FEED_GAP")), "FEED_GAP")
    finally:
        await _cancel(task)

    gap = out.alerts("FEED_GAP")[0]
    dropped = ws_server.frames["trade"][3]["t"]
    assert (gap.details["after_id"], gap.details["missing"]) == (str(dropped - 1), "1")


async def test_streamer_when_depth_sequence_breaks_resyncs_book_from_a_new_snapshot(
    ws_server: ReplayServer, rest_server: dict[str, Any]
) -> None:
    depth = ws_server.frames["depth"]
    ws_server.drop["depth"] = {5}
    streamer, out = await _streamer(ws_server, rest_server, ("book",))
    task = asyncio.create_task(streamer.run())
    try:
        await out.wait_for(lambda: bool(out.alerts("BOOK_RESYNC")), "BOOK_RESYNC")
        await out.wait_for(
            lambda: bool(out.books()) and out.books()[-1].sequence == depth[-1]["u"],
            "the book up to the last depth update",
        )
    finally:
        await _cancel(task)

    sequences = [b.sequence for b in out.books()]
    assert sequences == sorted(set(sequences))  # never backwards, never repeated
    assert depth[5]["u"] not in sequences  # the dropped update was never applied
    assert rest_server["depth_requests"] == 2  # the first snapshot and the resync
    assert streamer.resyncs == 1
    venue_book = ws_server.snapshot()
    top = out.books()[-1]
    assert [(lv.price, lv.size) for lv in top.bids] == [
        (Decimal(p), Decimal(q)) for p, q in venue_book["bids"][:5]
    ]
    assert [(lv.price, lv.size) for lv in top.asks] == [
        (Decimal(p), Decimal(q)) for p, q in venue_book["asks"][:5]
    ]


async def test_streamer_when_bidask_channel_publishes_top_of_book_quotes(
    ws_server: ReplayServer, rest_server: dict[str, Any]
) -> None:
    quotes = ws_server.frames["bookTicker"]
    streamer, out = await _streamer(ws_server, rest_server, ("bidask",))
    task = asyncio.create_task(streamer.run())
    try:
        await out.wait_for(lambda: len(out.ticks()) >= 5, "5 quotes")
    finally:
        await _cancel(task)

    first = out.ticks()[0]
    assert first.kind is TickKind.QUOTE
    assert (first.bid, first.ask) == (Decimal(quotes[0]["b"]), Decimal(quotes[0]["a"]))
    assert (first.bid_size, first.ask_size) == (Decimal(quotes[0]["B"]), Decimal(quotes[0]["A"]))
    assert first.price == (Decimal(quotes[0]["b"]) + Decimal(quotes[0]["a"])) / 2
    # Binance's bookTicker carries no time: the venue time is our receive time.
    assert first.ts_event == first.ts_init


async def test_service_when_feed_is_venue_publishes_instruments_ticks_bars_and_books(
    ws_server: ReplayServer, rest_server: dict[str, Any], tmp_path: Path
) -> None:
    settings = MarketDataSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        feed="venue",
        venue="binance",
        venue_symbols="BTC/USDT",
        venue_channels="trades,book",
        venue_book_depth=3,
        bar_interval="1s",
        venue_options=json.dumps({"fetchMarkets": {"types": ["spot"]}}),
        venue_urls=json.dumps(
            {
                "api.ws.spot": f"ws://127.0.0.1:{ws_server.port}/stream/ws",
                "api.public": f"http://127.0.0.1:{rest_server['port']}/api/v3",
            }
        ),
        markets_cache_dir=str(tmp_path / "markets"),
        collector_state_dir=str(tmp_path / "collector"),
    )
    runner = ServiceRunner(MarketDataService(settings), settings)
    out = Collected()
    topics = [Topic.MD_TICKS, Topic.MD_BARS, Topic.MD_BOOKS, Topic.REF_INSTRUMENTS]

    async def collect(envelope: Envelope[Any]) -> None:
        topic = Topic.MD_TICKS if isinstance(envelope.payload, Tick) else ""
        await out.publish(topic, envelope.payload, envelope.ts_event)

    trades = ws_server.frames["trade"]
    await runner.start()
    try:
        await runner.bus.subscribe("test.md", topics, collect).start()
        await out.wait_for(
            lambda: len(out.ticks()) == len(trades) and bool(out.books()), "every trade and a book"
        )
    finally:
        await runner.stop()

    instruments = [e for _, e in out.events if isinstance(e, Instrument)]
    assert [(i.instrument_id, i.tick_size) for i in instruments] == [
        ("BTC-USDT.BINANCE", Decimal("0.01"))
    ]
    ticks = out.ticks()
    assert [t.trade_id for t in ticks] == [str(f["t"]) for f in trades]
    bars = [e for _, e in out.events if isinstance(e, Bar)]
    assert bars  # the trades span several seconds: 1 s bars closed
    for bar in bars:
        inside = [t for t in ticks if bar.ts_open <= t.ts_event < bar.ts_close]
        assert bar.volume == sum((t.size for t in inside), Decimal(0))
    assert all(len(b.bids) <= 3 for b in out.books())
