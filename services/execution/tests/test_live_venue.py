"""The ccxt live adapter against a local stand-in of Binance spot's REST API (recorded replies)."""

from __future__ import annotations

import asyncio
import decimal
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from quantmesh_common.messages import (
    CommandType,
    ExecType,
    ExecutionReport,
    OrderCommand,
    OrderStatus,
    OrderType,
    Side,
)
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.testing.stubs import TS
from quantmesh_common.topics import Topic
from quantmesh_execution.config import ExecutionSettings
from quantmesh_execution.guarded import GuardedExecutionHandler
from quantmesh_execution.live import (
    BreakerState,
    CcxtRoute,
    CcxtVenue,
    CircuitBreaker,
    Credentials,
    RetryPolicy,
    VenueUnreachable,
    build_exchange,
)
from quantmesh_execution.sentlog import MemorySentLog
from quantmesh_execution.service import ExecutionService

D = Decimal
DATA = Path("/work/shared/data")
API_KEY = "test-api-key-9f2c81d7"
SECRET = "test-secret-4b7e10aa55"


def _data_dir() -> Path:
    for candidate in (DATA, Path(__file__).resolve().parents[4] / "shared" / "data"):
        if (candidate / "ccxt-static").is_dir():
            return candidate
    pytest.skip("recorded venue data (/work/shared/data) not found")


def _recorded() -> dict[str, Any]:
    data = _data_dir()
    responses = json.loads((data / "ccxt-static/response/binance.json").read_text())["methods"]
    info_path = data / "market/binance-spot_exchangeinfo-rest_2021-10-12.jsonl"
    with info_path.open() as f:
        info = json.loads(f.readline())["msg"]
    info["symbols"] = [s for s in info["symbols"] if s["symbol"] in {"BTCUSDT", "LTCUSDT"}]
    return {
        "exchangeInfo": info,
        "createOrder": responses["createOrder"][0]["httpResponse"],  # a resting limit order
        "fetchOrder": responses["fetchOrder"][0]["httpResponse"],  # a filled market order
        "myTrades": responses["fetchMyTrades"][0]["httpResponse"],
    }


@dataclass
class FakeBinance:
    """Binance spot's order endpoints, answering from recorded replies; scripted failures."""

    recorded: dict[str, Any]
    #: Replies to give to the next POST /api/v3/order calls before answering normally.
    post_script: list[tuple[int, Any]] = field(default_factory=list)
    #: Replies to give to the next GET /api/v3/order calls before answering normally.
    get_script: list[tuple[int, Any]] = field(default_factory=list)
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str], dict[str, str]]] = field(default_factory=list)
    next_id: int = 9780331417

    def posts(self) -> list[dict[str, str]]:
        return [p for m, path, p, _ in self.requests if m == "POST" and path == "/api/v3/order"]

    async def handle(self, request: web.Request) -> web.Response:
        params = dict(request.query)
        if request.method in ("POST", "DELETE") and request.can_read_body:
            params.update({k: str(v) for k, v in (await request.post()).items()})
        self.requests.append((request.method, request.path, params, dict(request.headers)))
        path = request.path
        if path == "/api/v3/exchangeInfo":
            return web.json_response(self.recorded["exchangeInfo"])
        if path == "/api/v3/time":
            return web.json_response({"serverTime": 1737635557417})
        if path == "/api/v3/myTrades":
            return web.json_response(self.recorded["myTrades"])
        if path != "/api/v3/order":
            return web.json_response({"code": -1, "msg": f"no {path}"}, status=404)
        if request.method == "POST":
            return self._post(params)
        if request.method == "GET":
            if self.get_script:
                status, body = self.get_script.pop(0)
                return _reply(status, body)
            return self._known(params.get("origClientOrderId"))
        order = self.orders.get(params.get("origClientOrderId", ""))
        if order is None:
            return web.json_response({"code": -2011, "msg": "Unknown order sent."}, status=400)
        order["status"] = "CANCELED"
        return web.json_response(order)

    def _post(self, params: dict[str, str]) -> web.Response:
        if self.post_script:
            status, body = self.post_script.pop(0)
            if status == 200 and body == "ACCEPT-BUT-FAIL":  # the venue takes it, the reply is lost
                self._accept(params)
                return _reply(504, "Gateway Time-out")
            return _reply(status, body)
        return web.json_response(self._accept(params))

    def _accept(self, params: dict[str, str]) -> dict[str, Any]:
        client_id = params["newClientOrderId"]
        self.next_id += 1
        order = dict(self.recorded["createOrder"])
        order.update(
            {
                "symbol": params["symbol"],
                "orderId": str(self.next_id),
                "clientOrderId": client_id,
                "price": params.get("price", "0"),
                "origQty": params["quantity"],
                "side": params["side"],
                "type": params["type"],
            }
        )
        order.pop("icebergQty", None)
        self.orders[client_id] = order
        return order

    def _known(self, client_id: str | None) -> web.Response:
        order = self.orders.get(client_id or "")
        if order is None:
            return web.json_response({"code": -2013, "msg": "Order does not exist."}, status=400)
        return web.json_response(order)


def _reply(status: int, body: Any) -> web.Response:
    if isinstance(body, str):
        return web.Response(status=status, text=body)
    return web.json_response(body, status=status)


@pytest.fixture
async def binance() -> AsyncIterator[tuple[FakeBinance, str]]:
    fake = FakeBinance(_recorded())
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _no_sleep(seconds: float) -> None:
    return None


def _route(url: str, name: str = "binance", **kwargs: Any) -> CcxtRoute:
    credentials = Credentials(api_key=API_KEY, secret=SECRET)
    exchange = build_exchange("binance", credentials, base_url=url)
    return CcxtRoute(name, exchange, credentials, sleep=_no_sleep, **kwargs)


def limit_buy(n: int = 1, **overrides: Any) -> OrderCommand:
    fields: dict[str, Any] = {
        "command_id": f"CMD-{n}",
        "client_order_id": f"qm-{n}-7c1e",
        "venue": "BINANCE",
        "instrument_id": "LTC-USDT.BINANCE",
        "order_type": OrderType.LIMIT,
        "side": Side.BUY,
        "quantity": D("0.2"),
        "limit_price": D("50"),
        "ts_event": TS,
    }
    return stubs.order_command(**{**fields, **overrides})


# -- happy path: the client order id reaches the venue -------------------------------------------


async def test_submit_when_venue_accepts_sends_client_order_id_and_reports_accepted(
    binance: tuple[FakeBinance, str],
) -> None:
    fake, url = binance
    venue = CcxtVenue("BINANCE", [_route(url)])
    try:
        reports = await venue.submit(limit_buy(), TS)
    finally:
        await venue.close()

    (posted,) = fake.posts()
    assert (posted["newClientOrderId"], posted["symbol"], posted["side"]) == (
        "qm-1-7c1e",
        "LTCUSDT",
        "BUY",
    )
    assert (posted["quantity"], posted["price"], posted["type"]) == ("0.2", "50", "LIMIT")
    (accepted,) = reports
    assert (accepted.exec_type, accepted.order_status) == (ExecType.ACCEPTED, OrderStatus.ACCEPTED)
    assert accepted.venue_order_id == "9780331418"
    assert accepted.report_id == "binance:9780331418:ACCEPTED"
    assert accepted.leaves_qty == D("0.2")
    assert venue.routes[0].exchange.enableRateLimit is True


# -- retries -------------------------------------------------------------------------------------


async def test_submit_when_first_post_is_503_asks_venue_then_resends_once_and_succeeds(
    binance: tuple[FakeBinance, str],
) -> None:
    fake, url = binance
    fake.post_script.append((503, "Service Unavailable"))
    venue = CcxtVenue("BINANCE", [_route(url)])
    try:
        reports = await venue.submit(limit_buy(2), TS)
    finally:
        await venue.close()

    assert len(fake.posts()) == 2
    lookups = [p for m, path, p, _ in fake.requests if m == "GET" and path == "/api/v3/order"]
    assert [p["origClientOrderId"] for p in lookups] == ["qm-2-7c1e"]
    assert [r.exec_type for r in reports] == [ExecType.ACCEPTED]
    assert len(fake.orders) == 1


async def test_submit_when_reply_is_lost_but_order_arrived_adopts_it_without_resending(
    binance: tuple[FakeBinance, str],
) -> None:
    fake, url = binance
    fake.post_script.append((200, "ACCEPT-BUT-FAIL"))
    venue = CcxtVenue("BINANCE", [_route(url)])
    try:
        reports = await venue.submit(limit_buy(3), TS)
    finally:
        await venue.close()

    assert len(fake.posts()) == 1
    assert [(r.exec_type, r.venue_order_id) for r in reports] == [(ExecType.ACCEPTED, "9780331418")]


async def test_submit_when_venue_says_invalid_order_is_not_retried_and_is_rejected(
    binance: tuple[FakeBinance, str],
) -> None:
    fake, url = binance
    fake.post_script.append(
        (400, {"code": -2010, "msg": "Order would immediately match and take."})
    )
    venue = CcxtVenue("BINANCE", [_route(url)])
    try:
        reports = await venue.submit(limit_buy(4), TS)
    finally:
        await venue.close()

    assert len(fake.posts()) == 1
    (rejected,) = reports
    assert (rejected.exec_type, rejected.order_status) == (ExecType.REJECTED, OrderStatus.REJECTED)
    assert rejected.reason is not None
    assert rejected.reason == (
        "VENUE_REJECTED: route=binance, error=OrderImmediatelyFillable: binance "
        "Order would immediately match and take."
    )
    assert venue.routes[0].breaker.state is BreakerState.CLOSED


# -- circuit breaker and failover ----------------------------------------------------------------


async def test_breaker_when_failures_reach_threshold_opens_and_fails_fast_without_sending(
    binance: tuple[FakeBinance, str],
) -> None:
    fake, url = binance
    fake.post_script.extend([(503, "down")] * 2)
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, reset_after_s=30.0, clock=lambda: now[0])
    venue = CcxtVenue("BINANCE", [_route(url, retry=RetryPolicy(attempts=2), breaker=breaker)])
    try:
        first = await venue.submit(limit_buy(5), TS)  # 2 failed POSTs, each followed by a lookup
        posts_when_opened = len(fake.posts())
        second = await venue.submit(limit_buy(6), TS)
        now[0] = 31.0  # half-open: one probe goes through and closes it
        third = await venue.submit(limit_buy(7), TS)
    finally:
        await venue.close()

    assert posts_when_opened == 2
    assert first[0].reason == "NO_ROUTE_AVAILABLE: routes=binance=2 attempts failed"
    assert second[0].exec_type is ExecType.REJECTED
    assert second[0].reason is not None
    assert "circuit open" in second[0].reason
    assert len(fake.posts()) == 3  # the open breaker sent nothing; the probe sent one
    assert [r.exec_type for r in third] == [ExecType.ACCEPTED]
    assert breaker.state is BreakerState.CLOSED


async def test_submit_when_primary_breaker_open_fails_over_to_next_route(
    binance: tuple[FakeBinance, str],
) -> None:
    fake, url = binance
    primary_breaker = CircuitBreaker(failure_threshold=1, reset_after_s=300.0)
    primary_breaker.failure()
    venue = CcxtVenue(
        "BINANCE",
        [
            _route(url, name="binance", breaker=primary_breaker),
            _route(url, name="binance_backup"),
        ],
    )
    try:
        route = venue.route_for(limit_buy(8))
        reports = await venue.submit(limit_buy(8), TS)
    finally:
        await venue.close()

    assert route == "binance_backup"
    assert len(fake.posts()) == 1
    assert reports[0].report_id.startswith("binance_backup:")


# -- history (recovery after a crash) and the guarded handler ------------------------------------


async def test_history_when_order_filled_reports_accept_and_fills_with_venue_trade_ids(
    binance: tuple[FakeBinance, str],
) -> None:
    fake, url = binance
    recorded = dict(fake.recorded["fetchOrder"])  # FILLED market sell 0.1 LTC
    recorded["clientOrderId"] = "qm-9-7c1e"
    fake.orders["qm-9-7c1e"] = recorded
    fake.recorded["myTrades"] = [
        {**fake.recorded["myTrades"][0], "qty": "0.10000000", "price": "90.80000000"}
    ]
    venue = CcxtVenue("BINANCE", [_route(url)])
    command = limit_buy(9, side=Side.SELL, quantity=D("0.1"))
    try:
        reports = await venue.history(command, "binance", TS)
    finally:
        await venue.close()

    assert [r.exec_type for r in reports] == [ExecType.ACCEPTED, ExecType.FILL]
    fill = reports[1]
    assert (fill.last_qty, fill.last_price, fill.trade_id) == (D("0.1"), D("90.8"), "309520010")
    assert (fill.fee, fill.fee_currency) == (D("0.013926"), "USDT")
    assert fill.venue_order_id == "3397148653"


async def test_guarded_handler_when_submit_redelivered_asks_venue_instead_of_posting(
    binance: tuple[FakeBinance, str],
) -> None:
    fake, url = binance
    venue = CcxtVenue("BINANCE", [_route(url)])
    handler = GuardedExecutionHandler(venue, MemorySentLog())
    order = limit_buy(10)
    try:
        first = await handler.reports_for(order)
        again = await handler.reports_for(order.model_copy(update={"command_id": "CMD-10b"}))
    finally:
        await venue.close()

    assert len(fake.posts()) == 1
    assert [r.report_id for r in again] == [r.report_id for r in first]


async def test_query_when_order_sent_republishes_its_reports_and_unknown_id_is_unknown_order(
    binance: tuple[FakeBinance, str],
) -> None:
    fake, url = binance
    venue = CcxtVenue("BINANCE", [_route(url)])
    handler = GuardedExecutionHandler(venue, MemorySentLog())
    order = limit_buy(14)
    query = order.model_copy(
        update={
            "command_id": "CMD-14:QUERY",
            "command_type": CommandType.QUERY,
            "side": None,
            "order_type": None,
            "quantity": None,
            "limit_price": None,
            "time_in_force": None,
        }
    )
    try:
        first = await handler.reports_for(order)
        answer = await handler.reports_for(query)
        [unknown] = await handler.reports_for(
            query.model_copy(update={"client_order_id": "qm-never-sent", "command_id": "Q-2"})
        )
    finally:
        await venue.close()

    assert len(fake.posts()) == 1
    assert [r.report_id for r in answer] == [r.report_id for r in first]
    assert [r.exec_type for r in answer] == [ExecType.ACCEPTED]
    assert (unknown.exec_type, unknown.report_id) == (ExecType.REJECTED, "Q-2-R")
    assert unknown.reason == "UNKNOWN_ORDER: client_order_id=qm-never-sent, venue=BINANCE"


async def test_history_when_venue_unreachable_raises_venue_unreachable(
    binance: tuple[FakeBinance, str],
) -> None:
    fake, url = binance
    fake.get_script.extend([(503, "down")] * 4)
    venue = CcxtVenue("BINANCE", [_route(url)])
    try:
        with pytest.raises(VenueUnreachable):
            await venue.history(limit_buy(11), "binance", TS)
    finally:
        await venue.close()


# -- credentials ---------------------------------------------------------------------------------


async def test_secrets_when_orders_succeed_fail_and_retry_never_reach_logs_or_reprs(
    binance: tuple[FakeBinance, str], caplog: pytest.LogCaptureFixture
) -> None:
    fake, url = binance
    fake.post_script.extend(
        [(503, f"echo {SECRET}"), (400, {"code": -2010, "msg": f"bad key {API_KEY}"})]
    )
    caplog.set_level(logging.DEBUG)
    venue = CcxtVenue("BINANCE", [_route(url)])
    try:
        reports = await venue.submit(limit_buy(12), TS)
        reports += await venue.submit(limit_buy(13), TS)
    finally:
        await venue.close()

    shown = caplog.text + repr(venue) + str(venue.routes[0].credentials)
    shown += " ".join(r.reason or "" for r in reports)
    assert SECRET not in shown
    assert API_KEY not in shown
    assert "***" in shown
    assert fake.requests[-1][3]["X-MBX-APIKEY"] == API_KEY  # the venue did get the key


def test_credentials_when_read_from_env_and_secret_file_are_redacted_in_repr(
    tmp_path: Path,
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    env = {"QM_BINANCE_API_KEY": API_KEY, "QM_BINANCE_API_SECRET_FILE": str(secret_file)}

    credentials = Credentials.from_env("binance", env)

    assert (credentials.api_key, credentials.secret) == (API_KEY, SECRET)
    assert repr(credentials) == "Credentials(api_key=***, secret=***)"


def test_build_exchange_when_sandbox_uses_the_venue_testnet_urls() -> None:
    exchange = build_exchange("binance", Credentials(), sandbox=True)

    assert exchange.urls["api"]["public"].startswith("https://testnet.binance.vision/")


# -- the service on the live adapter (QM_EXEC_VENUE=ccxt) ----------------------------------------


async def test_service_when_exec_venue_is_ccxt_sends_orders_to_the_venue_and_answers_queries(
    binance: tuple[FakeBinance, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Arrange: the stage configured as it is from QM_* variables, pointed at the stand-in.
    fake, url = binance
    monkeypatch.setenv("QM_BINANCE_API_KEY", API_KEY)
    monkeypatch.setenv("QM_BINANCE_API_SECRET", SECRET)
    caplog.set_level(logging.DEBUG)
    settings = ExecutionSettings(
        bus="memory",
        http_port=0,
        venue="BINANCE",
        exec_venue="ccxt",
        exec_ccxt_exchange="binance",
        exec_ccxt_base_url=url,
        exec_sent_log="none",
    )
    stage = await StageHarness(ExecutionService(settings), now_ns=TS).start()
    order = limit_buy(20)
    query = order.model_copy(
        update={
            "command_id": "CMD-20:QUERY",
            "command_type": CommandType.QUERY,
            "order_type": None,
            "quantity": None,
            "limit_price": None,
            "time_in_force": None,
        }
    )
    try:
        # Act: a SUBMIT, the same SUBMIT redelivered, then a QUERY.
        await stage.send(Topic.ORDERS_COMMANDS, order, order, query)
    finally:
        await stage.service.teardown(None)  # type: ignore[arg-type]  # closes the HTTP session

    # Assert: one POST with the client order id; every answer carries the venue's ids.
    [post] = fake.posts()
    assert post["newClientOrderId"] == "qm-20-7c1e"
    reports: list[ExecutionReport] = stage.payloads(Topic.EXEC_REPORTS)
    assert [r.exec_type for r in reports] == [ExecType.ACCEPTED] * 3
    assert {r.report_id for r in reports} == {"binance:9780331418:ACCEPTED"}
    assert isinstance(stage.service.handler, GuardedExecutionHandler)
    assert API_KEY not in caplog.text
    assert SECRET not in caplog.text


# -- the decimal context: ccxt's ROUND_HALF_UP stays inside the adapter --------------------------

#: 2.000000000000000000000000001 / 2 = 1.0000000000000000000000000005: a tie at 28 digits, as an
#: average price or cost basis of ours can be.
_TIE = D("2.000000000000000000000000001")
#: What our two rounding-dependent computations give under Python's default context.
_HALF_EVEN = (D(2), D("1.000000000000000000000000000"))


def _ours() -> tuple[Decimal, Decimal]:
    """2.5 to a whole number (3 half-up) and a 28-digit average on a tie (...001 half-up)."""
    return D("2.5").quantize(D("1")), _TIE / 2


def _settings(context: decimal.Context) -> tuple[Any, ...]:
    traps = tuple(sorted((t.__name__, on) for t, on in context.traps.items()))
    return (context.prec, context.rounding, context.Emin, context.Emax, context.clamp, traps)


async def test_submit_when_ccxt_rounds_the_order_leaves_our_decimal_context_unchanged(
    binance: tuple[FakeBinance, str],
) -> None:
    fake, url = binance
    before = decimal.getcontext()
    expected = _settings(before)
    assert _ours() == _HALF_EVEN
    venue = CcxtVenue("BINANCE", [_route(url)])
    try:
        reports = await venue.submit(limit_buy(30, limit_price=D("50.25")), TS)
    finally:
        await venue.close()

    (posted,) = fake.posts()
    assert posted["price"] == "50.3"  # ccxt's price_to_precision: half-up to the 0.1 tick
    assert [r.exec_type for r in reports] == [ExecType.ACCEPTED]
    assert decimal.getcontext() is before
    assert _settings(before) == expected
    assert _ours() == _HALF_EVEN


async def test_submit_when_run_in_a_task_of_its_own_leaves_the_creating_tasks_context_unchanged(
    binance: tuple[FakeBinance, str],
) -> None:
    fake, url = binance
    expected = _settings(decimal.getcontext())
    venue = CcxtVenue("BINANCE", [_route(url)])
    try:
        # A task copies the reference to its creator's Context object: a change ccxt made to it
        # in place would reach this task too.
        reports = await asyncio.create_task(venue.submit(limit_buy(31), TS))
        reports += await asyncio.create_task(venue.history(limit_buy(31), "binance", TS))
    finally:
        await venue.close()

    assert len(fake.posts()) == 1
    assert [r.exec_type for r in reports] == [ExecType.ACCEPTED, ExecType.ACCEPTED]
    assert _settings(decimal.getcontext()) == expected
    assert _ours() == _HALF_EVEN


async def test_service_when_an_order_goes_to_a_ccxt_venue_keeps_python_default_rounding(
    binance: tuple[FakeBinance, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = binance
    monkeypatch.setenv("QM_BINANCE_API_KEY", API_KEY)
    monkeypatch.setenv("QM_BINANCE_API_SECRET", SECRET)
    expected = _settings(decimal.getcontext())
    settings = ExecutionSettings(
        bus="memory",
        http_port=0,
        venue="BINANCE",
        exec_venue="ccxt",
        exec_ccxt_exchange="binance",
        exec_ccxt_base_url=url,
        exec_sent_log="none",
    )
    stage = await StageHarness(ExecutionService(settings), now_ns=TS).start()
    order = limit_buy(32, limit_price=D("50.25"))
    try:
        await stage.send(Topic.ORDERS_COMMANDS, order)
    finally:
        await stage.service.teardown(None)  # type: ignore[arg-type]  # closes the HTTP session

    reports: list[ExecutionReport] = stage.payloads(Topic.EXEC_REPORTS)
    assert [r.exec_type for r in reports] == [ExecType.ACCEPTED]
    assert _settings(decimal.getcontext()) == expected
    assert _ours() == _HALF_EVEN
