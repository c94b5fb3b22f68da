"""`quantmesh run` with the api: REST and WebSocket over loopback, every stage in one process."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from quantmesh_api.service import ApiService
from quantmesh_embedded.api import ApiOptions, api_settings
from quantmesh_embedded.cli import build_parser
from quantmesh_embedded.mesh import EmbeddedMesh
from quantmesh_embedded.run import RunConfig, run_config, run_live

#: Generous: the run shares two loaded cores with other test runs.
WAIT_S = 60.0
ADMIN = "runner"
PASSWORD = "run-password-1"
TERMINAL = frozenset({"FILLED", "CANCELED", "REJECTED", "DENIED", "EXPIRED"})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Out(io.StringIO):
    """The run's output, with an event set once the api's banner was written."""

    def __init__(self) -> None:
        super().__init__()
        self.api_up = asyncio.Event()

    def write(self, text: str) -> int:
        if text.startswith("api: "):
            self.api_up.set()
        return super().write(text)


def _listening_inodes() -> set[str]:
    """Socket inodes in LISTEN state (TCP, v4 and v6) on this machine."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    inodes.add(fields[9])
    return inodes


def _own_socket_inodes() -> set[str]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


async def _wait_for(ws: Any, channel: str, account_id: str, predicate: Any) -> dict[str, Any]:
    while True:
        message = json.loads(await ws.recv())
        mine = message.get("channel") == channel and message.get("account_id") == account_id
        if mine and predicate(message["data"]):
            return dict(message["data"])


async def _poll(client: httpx.AsyncClient, path: str, predicate: Any) -> Any:
    """GET `path` until its JSON satisfies `predicate` (the REST side has no push to await)."""
    while True:
        body = (await client.get(path)).json()
        if predicate(body):
            return body
        await asyncio.sleep(0.1)


async def test_run_with_api_when_an_order_is_posted_fills_and_shows_over_rest_and_websocket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange: the admin from the environment, as the service reads it; the strategy's own
    # account trades too, the test's account only what it orders
    monkeypatch.setenv("QM_BOOTSTRAP_ADMIN_USER", ADMIN)
    monkeypatch.setenv("QM_BOOTSTRAP_ADMIN_PASSWORD", PASSWORD)
    port = _free_port()
    config = RunConfig(instruments=("BTC-USDT.SIM",), rate=20, api=ApiOptions(port=port))
    out, stop = _Out(), asyncio.Event()
    run = asyncio.create_task(run_live(config, out, stop=stop))
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        await asyncio.wait_for(out.api_up.wait(), WAIT_S)
        async with httpx.AsyncClient(base_url=base, timeout=WAIT_S) as client:
            login = await client.post("/auth/token", data={"username": ADMIN, "password": PASSWORD})
            token = login.json()["access_token"]
            client.headers["Authorization"] = f"Bearer {token}"
            opened = await client.post("/accounts", json={"capital": "50000", "currency": "USDT"})
            account_id = opened.json()["account_id"]
            ws_url = f"ws://127.0.0.1:{port}/api/v1/ws?token={token}"
            async with websockets.connect(ws_url) as ws:
                hello = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))

                # Act: the feed's smallest print size, so one print fills it whole (the paper
                # venue fills a market order up to the last print's size, cancels the rest)
                posted = await client.post(
                    f"/accounts/{account_id}/orders",
                    json={"instrument_id": "BTC-USDT.SIM", "side": "BUY", "quantity": "0.001"},
                )
                client_order_id = posted.json()["client_order_id"]
                pushed_order = await asyncio.wait_for(
                    _wait_for(ws, "orders", account_id, lambda d: d["status"] in TERMINAL), WAIT_S
                )
                pushed_position = await asyncio.wait_for(
                    _wait_for(ws, "positions", account_id, lambda d: Decimal(d["quantity"]) != 0),
                    WAIT_S,
                )
            orders = await asyncio.wait_for(
                _poll(
                    client,
                    f"/accounts/{account_id}/orders",
                    lambda rows: bool(rows) and rows[0]["status"] == "FILLED",
                ),
                WAIT_S,
            )
            positions = await asyncio.wait_for(
                _poll(client, f"/accounts/{account_id}/positions", bool), WAIT_S
            )
            trades = (await client.get(f"/accounts/{account_id}/trades")).json()
            prices = (await client.get("/market/prices")).json()
    finally:
        stop.set()
        view = await asyncio.wait_for(run, WAIT_S)

    # Assert
    assert login.status_code == 200
    assert opened.status_code == 201
    assert hello["channel"] == "hello"
    assert posted.status_code == 202
    assert (pushed_order["client_order_id"], pushed_order["status"]) == (client_order_id, "FILLED")
    assert [(o["client_order_id"], o["status"]) for o in orders] == [(client_order_id, "FILLED")]
    fill_price = Decimal(orders[0]["avg_fill_price"])
    assert Decimal(orders[0]["filled_quantity"]) == Decimal("0.001")
    assert [(p["instrument_id"], Decimal(p["quantity"])) for p in positions] == [
        ("BTC-USDT.SIM", Decimal("0.001"))
    ]
    assert Decimal(pushed_position["quantity"]) == Decimal("0.001")
    assert Decimal(pushed_position["avg_entry_price"]) == fill_price
    assert [(t["client_order_id"], t["side"], Decimal(t["quantity"])) for t in trades] == [
        (client_order_id, "BUY", Decimal("0.001"))
    ]
    assert Decimal(trades[0]["price"]) == fill_price
    assert [p["instrument_id"] for p in prices] == ["BTC-USDT.SIM"]
    # The paper venue fills a market order at the last print: a price near the 60000 start
    assert Decimal(50000) < fill_price < Decimal(70000)
    assert view.ticks > 0
    assert f"api: {base} " in out.getvalue()


async def test_run_with_no_api_when_running_listens_nowhere() -> None:
    # Arrange: the command line's --no-api, made into the run's configuration
    config = run_config(build_parser().parse_args(["run", "--no-api", "--symbol", "BTC-USDT.SIM"]))
    meshes: list[EmbeddedMesh] = []
    ticking = asyncio.Event()

    async def keep(mesh: EmbeddedMesh) -> None:
        meshes.append(mesh)
        await mesh.bus.subscribe("test.ticks", ["md.ticks"], lambda _: ticking.set()).start()

    out, stop = _Out(), asyncio.Event()
    run = asyncio.create_task(run_live(config, out, stop=stop, on_mesh=keep))

    # Act: once the stages are up and trading prices
    try:
        await asyncio.wait_for(ticking.wait(), WAIT_S)
        listening = _listening_inodes() & _own_socket_inodes()
    finally:
        stop.set()
        await asyncio.wait_for(run, WAIT_S)

    # Assert
    assert config.api is None
    assert not any(isinstance(s, ApiService) for s in meshes[0].services)
    assert listening == set()
    assert "api:" not in out.getvalue()


def test_cli_run_when_given_no_api_options_serves_the_api_on_loopback_8000() -> None:
    # Arrange
    parse = build_parser().parse_args

    # Act
    default = run_config(parse(["run"]))
    chosen = run_config(parse(["run", "--api-port", "9123", "--api-host", "0.0.0.0"]))
    replay = run_config(parse(["run", "--replay", "x.csv"]))

    # Assert
    assert default.api == ApiOptions("127.0.0.1", 8000)
    assert chosen.api == ApiOptions("0.0.0.0", 9123)
    assert replay.api is None


def test_cli_run_when_a_replay_asks_for_the_api_refuses() -> None:
    args = build_parser().parse_args(["run", "--replay", "x.csv", "--api-port", "9123"])

    with pytest.raises(ValueError, match="--no-api"):
        run_config(args)


def test_api_settings_when_no_secret_is_configured_makes_one_per_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange
    for name in ("QM_JWT_SECRET", "QM_BOOTSTRAP_ADMIN_USER", "QM_BOOTSTRAP_ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)

    # Act
    first, login = api_settings(ApiOptions(port=0))
    second, other = api_settings(ApiOptions(port=0))

    # Assert
    assert first.jwt_secret is not None
    assert second.jwt_secret is not None
    assert first.jwt_secret.get_secret_value() != second.jwt_secret.get_secret_value()
    assert len(first.jwt_secret.get_secret_value()) >= 32
    assert login.username == "admin"
    assert login.generated_password is not None
    assert login.generated_password != other.generated_password
    assert first.bootstrap_admin_password is not None
    assert first.bootstrap_admin_password.get_secret_value() == login.generated_password
    assert (first.http_host, first.api_port, first.bus) == ("127.0.0.1", 0, "memory")


def test_api_settings_when_the_environment_gives_them_keeps_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange
    monkeypatch.setenv("QM_JWT_SECRET", "s" * 40)
    monkeypatch.setenv("QM_BOOTSTRAP_ADMIN_USER", ADMIN)
    monkeypatch.setenv("QM_BOOTSTRAP_ADMIN_PASSWORD", PASSWORD)

    # Act
    settings, login = api_settings(ApiOptions(port=0))

    # Assert
    assert settings.jwt_secret is not None
    assert settings.jwt_secret.get_secret_value() == "s" * 40
    assert (login.username, login.generated_password) == (ADMIN, None)
    assert settings.bootstrap_admin_password is not None
    assert settings.bootstrap_admin_password.get_secret_value() == PASSWORD


def test_run_config_when_the_api_is_asked_for_with_a_replay_raises() -> None:
    with pytest.raises(ValueError, match="--no-api"):
        RunConfig(instruments=("BTC-USDT.SIM",), replay=Path("x.csv"), api=ApiOptions(port=0))


async def test_run_with_api_when_the_port_is_taken_raises_naming_it() -> None:
    # Arrange: a socket already listening on the port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = int(taken.getsockname()[1])
        config = RunConfig(instruments=("BTC-USDT.SIM",), api=ApiOptions(port=port))

        # Act / Assert
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
            await asyncio.wait_for(run_live(config, io.StringIO()), WAIT_S)
