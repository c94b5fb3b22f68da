"""A live Prometheus scrapes the whole mesh while it trades: dashboards and rules read real data.

All eight stages run as processes on the local stack; Prometheus from Debian's package (the
binary tools/get-promtool.sh caches) scrapes each one's /metrics every second with the alert
rules of deploy/prometheus loaded. One account trades freely; a second has a daily-loss limit
of one cent, so its first fee trips its circuit breaker. A client logs in to the api and
reads from it. Then every metric each dashboard panel and each rule uses must have series in
Prometheus, every panel's expression must evaluate, the rules must evaluate without errors and
QuantmeshCircuitBreakerTripped must be firing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from confluent_kafka import Producer

from quantmesh_common.messages import ControlAction, ControlCommand
from quantmesh_common.topics import Topic
from tests.e2e.conftest import Mesh, free_port, kafka_bootstrap, publish
from tests.e2e.orderflow import wait_groups_free

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
PROMETHEUS_CACHE = Path.home() / ".cache" / "quantmesh" / "bin" / "prometheus"
#: Grafana's variables, replaced by what "All" and the default range mean.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$service": ".*",
    "$account": ".*",
    "$instrument": ".*",
}
#: PromQL words that look like metric names in an expression but are not.
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "le", "inf", "nan",
}  # fmt: skip
TRADING_TIMEOUT_S = 240.0
ADMIN_PASSWORD = "e2e-observability-admin-pw"


def _prometheus_binary() -> str | None:
    explicit = os.environ.get("QM_PROMETHEUS")
    if explicit:
        return explicit
    on_path = shutil.which("prometheus")
    if on_path:
        return on_path
    return str(PROMETHEUS_CACHE) if PROMETHEUS_CACHE.is_file() else None


def _panel_expressions() -> list[tuple[str, str]]:
    found = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
        for panel in panels:
            for target in panel.get("targets", []):
                if "expr" in target:
                    expr = target["expr"]
                    for variable, value in GRAFANA_VARIABLES.items():
                        expr = expr.replace(variable, value)
                    found.append((f"{path.stem}: {panel['title']}", expr))
    return found


def _rule_expressions() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            found.extend((rule["alert"], rule["expr"]) for rule in group["rules"])
    return found


def _metric_names(expr: str) -> set[str]:
    # Drop strings, label matchers and durations, then take identifiers not followed by "(".
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    stripped = re.sub(r"\{[^}]*\}", "", stripped)
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)
    stripped = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", stripped
    )
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", stripped))
    return {n for n in names if n.lower() not in PROMQL_WORDS and not n.isdigit()}


class Prometheus:
    """A Prometheus server scraping the mesh's stages, with the repository's rules loaded."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self.session = aiohttp.ClientSession()

    async def start(self, targets: dict[str, int]) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES_DIR / "*.yml")],
            "scrape_configs": [
                {
                    "job_name": "quantmesh",
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{port}"], "labels": {"stage": stage}}
                        for stage, port in targets.items()
                    ],
                }
            ],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        log = (self.workdir / "prometheus.log").open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            self.binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with self.session.get(self._url("/-/ready")) as response:
                    if response.status == 200:
                        return
            assert self.proc.returncode is None, (self.workdir / "prometheus.log").read_text()
            await asyncio.sleep(0.5)
        raise AssertionError("prometheus never became ready")

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def api(self, path: str, **params: str) -> Any:
        async with self.session.get(self._url(f"/api/v1/{path}"), params=params) as response:
            body = await response.json()
        if body["status"] != "success":
            raise AssertionError(f"{path} {params}: {body.get('error')}")
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 30)
        await self.session.close()


@pytest.fixture
async def prometheus(tmp_path: Path) -> AsyncIterator[Prometheus]:
    binary = _prometheus_binary()
    if binary is None:
        pytest.skip("no prometheus binary: run tools/get-promtool.sh (Debian's prometheus)")
    server = Prometheus(binary, tmp_path)
    try:
        yield server
    finally:
        await server.stop()


def _stage_env(
    tag: str, instrument: str, free: str, halted: str, database_url: str
) -> dict[str, dict[str, str]]:
    # The halted account trades a hundred times the size, so its fees and marks move its
    # equity by more than a cent within a few bars.
    strategies = [
        {"id": f"sma-{account}", "name": "sma_cross", "account_id": account,
         "instruments": [instrument], "params": {"fast": 2, "slow": 4, "quantity": quantity}}
        for account, quantity in ((free, "0.01"), (halted, "1"))
    ]  # fmt: skip
    # One cent of daily loss: the halted account's first losses trip its breaker.
    limits = {"default": {}, "accounts": {halted: {"max_daily_loss": "0.01"}}}
    # Every stage on the test's own migrated schema, so it finds exactly the tables it expects.
    common = {"QM_DATABASE_URL": database_url}
    stages = {
        "marketdata": {
            "QM_FEED": "synthetic",
            "QM_INSTRUMENTS": instrument,
            "QM_FEED_RATE": "200",
            "QM_BAR_INTERVAL": "1s",
            "QM_VOLATILITY": "2",
            "QM_SEED": str(int(tag[:6], 16)),
            "QM_RECORDER": "on",
        },
        "signals": {"QM_STRATEGIES": json.dumps(strategies)},
        "risk": {"QM_RISK_LIMITS": json.dumps(limits)},
        "oms": {},
        "execution": {"QM_VENUE": "SIM"},
        "portfolio": {"QM_STARTING_CASH": '{"USDT": "100000"}', "QM_SNAPSHOT_INTERVAL_S": "1"},
        "alerts": {},
        "api": {
            "QM_API_PORT": str(free_port()),
            "QM_JWT_SECRET": uuid.uuid4().hex * 2,
            "QM_BOOTSTRAP_ADMIN_USER": "admin",
            "QM_BOOTSTRAP_ADMIN_PASSWORD": ADMIN_PASSWORD,
        },
    }
    return {stage: {**common, **values} for stage, values in stages.items()}


async def _use_the_api(port: int) -> None:
    """Log in and read a few routes, one of them wrong: the api dashboard's traffic."""
    base = f"http://127.0.0.1:{port}/api/v1"
    async with aiohttp.ClientSession() as session:
        form = {"username": "admin", "password": ADMIN_PASSWORD}
        async with session.post(f"{base}/auth/token", data=form) as response:
            assert response.status == 200, await response.text()
            token = (await response.json())["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        for path in ("/me", "/market/prices", "/accounts", "/accounts/not-mine"):
            async with session.get(f"{base}{path}", headers=headers) as response:
                assert response.status in (200, 404), (path, response.status)
        async with session.ws_connect(f"{base}/ws?token={token}") as socket:
            hello = await socket.receive_json(timeout=30)
            assert hello


def _produce_raw(topic: str, value: bytes) -> None:
    producer = Producer({"bootstrap.servers": kafka_bootstrap(), "acks": "all"})
    producer.produce(topic, value, key=b"e2e-observability")
    assert producer.flush(30) == 0


async def _wait_for(prometheus: Prometheus, expr: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await prometheus.query(expr):
            return True
        await asyncio.sleep(2)
    return False


async def test_dashboards_and_rules_when_mesh_trades_read_series_a_live_prometheus_scrapes(
    mesh: Mesh, prometheus: Prometheus, database_url: str
) -> None:
    # Arrange: the whole mesh, scraped.
    busy = await wait_groups_free(kafka_bootstrap(), timeout=180)
    assert not busy, f"another mesh uses this broker's consumer groups: {busy}"
    tag = uuid.uuid4().hex[:10]
    instrument = f"OBS{tag.upper()}-USDT.SIM"
    free, halted = f"obs-free-{tag}", f"obs-halted-{tag}"
    env = _stage_env(tag, instrument, free, halted, database_url)
    for stage in ("signals", "risk", "oms", "execution", "portfolio", "alerts", "api"):
        await mesh.start(stage, env[stage])
    await mesh.wait_ready()
    await publish(
        Topic.CONTROL,
        ControlCommand(
            command_id=f"e2e-observability-start-{tag}",
            action=ControlAction.COLLECTOR_START,
            target="marketdata",
            issued_by="e2e-test",
            reason="observability test starts",
            ts_event=time.time_ns(),
        ),
    )
    await mesh.start("marketdata", env["marketdata"])
    await mesh.wait_ready("marketdata")
    await prometheus.start({name: stage.port for name, stage in mesh.stages.items()})

    # Act: trade until the free account has fills and the halted one tripped its breaker.
    await _use_the_api(int(env["api"]["QM_API_PORT"]))
    traded = await _wait_for(
        prometheus,
        f'quantmesh_account_equity{{account="{free}"}} and on() sum(quantmesh_fills_total) > 0',
        TRADING_TIMEOUT_S,
    )
    tripped = await _wait_for(
        prometheus,
        'ALERTS{alertname="QuantmeshCircuitBreakerTripped", alertstate="firing"}',
        TRADING_TIMEOUT_S,
    )
    # The halted account's next intent is denied for the breaker.
    denied = await _wait_for(
        prometheus,
        'quantmesh_risk_decisions_total{outcome="denied", reason="CIRCUIT_BREAKER_TRIPPED"}',
        TRADING_TIMEOUT_S,
    )
    # A malformed intent: risk must dead-letter it and the dead-letter alert must fire.
    await asyncio.to_thread(_produce_raw, Topic.ORDERS_INTENTS, b"not an envelope")
    dead_lettered = await _wait_for(
        prometheus, 'ALERTS{alertname="QuantmeshDeadLetters", alertstate="firing"}', 60
    )
    # Two more scrapes, so every counter has a rate.
    await asyncio.sleep(3)

    # Assert: every stage is scraped and up.
    ups = {
        r["metric"]["stage"]: r["value"][1] for r in await prometheus.query('up{job="quantmesh"}')
    }
    assert ups == {stage: "1" for stage in mesh.stages}
    assert traded, "no fills and equity within the time limit; see the stages' logs"
    assert tripped, "the one-cent daily-loss limit never tripped a circuit breaker"
    assert denied, "the halted account's intents were never denied for its breaker"
    assert dead_lettered, "a malformed intent never raised QuantmeshDeadLetters"
    # Every metric a panel or a rule reads has series.
    wanted = {
        name: where
        for where, expr in [*_panel_expressions(), *_rule_expressions()]
        for name in _metric_names(expr)
        if name not in {"time", "vector"}
    }
    missing = {
        name: where
        for name, where in sorted(wanted.items())
        if not await prometheus.query(f'count({{__name__="{name}"}})')
    }
    assert missing == {}
    # Every panel's expression evaluates (an error raises) and returns data.
    empty = [where for where, expr in _panel_expressions() if not await prometheus.query(expr)]
    assert empty == [], empty
    # The rules evaluate without errors against the live data.
    groups = (await prometheus.api("rules"))["groups"]
    broken = [
        (rule["name"], rule.get("lastError"))
        for group in groups
        for rule in group["rules"]
        if rule["health"] != "ok"
    ]
    assert {rule["name"] for g in groups for rule in g["rules"]} >= {
        "QuantmeshStageDown",
        "QuantmeshCircuitBreakerTripped",
        "QuantmeshDrawdownBeyondLimit",
    }
    assert broken == []
