"""Benchmark of the api under concurrent HTTP load on loopback; prints one JSON line.

The api runs as its own process (`quantmesh-api`: one uvicorn worker inside the service, as
deployed) on the real stack: Kafka QM_KAFKA_BOOTSTRAP, a fresh migrated schema of
QM_DATABASE_URL's test database, Redis QM_REDIS_URL under a unique key prefix. The load comes
from other processes (`--processes`, spawned; uvloop; `--concurrency` keep-alive connections
in all, each sending its prepared request bytes again as soon as the answer is in), for
`--seconds` each:

- GET /api/v1/market/prices: the latest prices of `--instruments` instruments seeded in Redis
  (authenticated with a bearer token, rate limits raised out of the way).
- POST /api/v1/accounts/{id}/orders: a market order; 202 means Kafka acknowledged the intent.
  Each goes to the shared `orders.intents` topic (a risk stage running there will see them).

Per run: requests/s, latency p50/p90/p99/p99.9/max (ms) as the client saw it, the
concurrency achieved (Little's law: total latency / seconds), and non-2xx answers; the load
average before and after.

GET prices runs twice. Closed loop (`latest_prices`): every connection resends as soon as its
answer is in, so the server is saturated; that is the throughput figure, and its latencies are
mostly queueing. Open loop (`latest_prices_at_rate`): `--rate` requests/s in all on a fixed
schedule, each latency measured from the request's scheduled send time (a request held back
by a slow answer is charged for the wait: no coordinated omission); that is the latency
figure. Beside it, `server_stalls`: the api's own loop-lag probe and GC timings over that run.

Targets (issue 6): latest prices >= 2,000 req/s with p99 < 20 ms; order p99 < 50 ms.
Usage: `python bench/bench_api.py [--seconds 20] [--concurrency 16] [--rate 2000]
[--no-orders]` with the stack up; the default run takes about 70 s after the api caught up.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
import redis
import uvloop

from quantmesh_common.testing.postgres import fresh_schema, server_dsn_for_tests

ROOT = Path(__file__).resolve().parent.parent
ADMIN_PASSWORD = "bench-admin-password"
START_TIMEOUT_S = 60.0
CATCH_UP_TIMEOUT_S = 600.0
#: Messages per partition still to read for the api to count as caught up.
CAUGHT_UP_LAG = 50
#: The topics the api consumes (services/api/README.md).
CONSUMED = ("orders.updates", "exec.reports", "portfolio.updates", "portfolio.snapshots", "alerts")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))
    return sorted_values[index]


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split(" ")[:3])
    except OSError:
        return "unknown"


def _seed_prices(redis_url: str, md_prefix: str, count: int) -> None:
    client = redis.Redis.from_url(redis_url)
    now = time.time_ns()
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        instrument_id = f"B{i}-USDT.SIM"
        pipe.sadd(f"{md_prefix}instruments", instrument_id)
        pipe.hset(
            f"{md_prefix}latest:{instrument_id}",
            mapping={
                "price": "101.5",
                "ts": str(now),
                "open_24h": "100",
                "change_24h": "1.5",
                "change_pct_24h": "1.5",
                "high_24h": "102",
                "low_24h": "99",
                "volume_24h": "12345.678",
            },
        )
    pipe.execute()
    client.close()


def _clear_prefix(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


async def _wait_up(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the api exited with {proc.returncode}")
            try:
                async with session.get(base + "/api/v1/openapi.json") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("the api did not answer in time")


async def _wait_caught_up(metrics_url: str) -> float:
    """Wait until the api's consumer lag on its update topics is small; return the seconds.

    An instance seeded from PostgreSQL starts at the topics' stable end, so this is its start;
    an older one (before 8e25395) first folded every message since the topics began (on a
    shared broker, everything other runs wrote). The figures are of the steady state.
    """
    started = time.monotonic()
    deadline = started + CATCH_UP_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(metrics_url) as response:
                text = await response.text()
            lags = [
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("quantmesh_bus_consumer_lag{") and 'service="api"' in line
            ]
            if len(lags) >= len(CONSUMED) and all(0 <= lag <= CAUGHT_UP_LAG for lag in lags):
                return time.monotonic() - started
            await asyncio.sleep(1.0)
    raise RuntimeError("the api did not catch up with its update topics in time")


def _take_response(buffer: bytes) -> tuple[str, bytes] | None:
    """The status of the first whole response in `buffer` and what follows it; None until
    it is all in (framed by its Content-Length)."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buffer[:head_end].lower()
    at = head.find(b"content-length:")
    end = head.find(b"\r\n", at)
    length = int(head[at + 15 : end if end >= 0 else len(head)]) if at >= 0 else 0
    if len(buffer) < head_end + 4 + length:
        return None
    return head[9:12].decode(), buffer[head_end + 4 + length :]


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection sending the same request again and again.

    Bytes in, bytes out: the request is built once and a response is framed by its
    Content-Length, so the generator spends microseconds per request, not the server's share.
    """

    def __init__(self, request: bytes, deadline: float, done: asyncio.Future[None]) -> None:
        self.request = request
        self.deadline = deadline
        self.done = done
        self.buffer = b""
        self.started = 0.0
        self.latencies: list[float] = []
        self.statuses: dict[str, int] = {}
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.started = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        taken = _take_response(self.buffer)
        if taken is None:
            return
        status, self.buffer = taken
        now = time.perf_counter()
        self.latencies.append(now - self.started)
        if status[0] != "2":
            self.statuses[status] = self.statuses.get(status, 0) + 1
        if now < self.deadline:
            self._send()
        elif not self.done.done():
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


class _ScheduledConn(asyncio.Protocol):
    """One keep-alive connection sending on a fixed schedule (open loop).

    Request i is due at `first + i * interval`; its latency runs from that due time, not from
    when it could be written, so a stalled server is charged for every request it held back
    (no coordinated omission). At most one request is in flight per connection: one due while
    the previous answer is outstanding goes out as soon as that answer is in.
    """

    def __init__(
        self, request: bytes, first: float, interval: float, end: float, done: asyncio.Future[None]
    ) -> None:
        self.request = request
        self.due = first
        self.interval = interval
        self.end = end
        self.done = done
        self.buffer = b""
        self.latencies: list[float] = []
        self.statuses: dict[str, int] = {}
        self.late_sends = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._arm()

    def _arm(self) -> None:
        if self.due >= self.end:
            assert self.transport is not None
            self.transport.close()
            return
        delay = self.due - time.perf_counter()
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._send)
        else:
            if delay < -0.001:
                self.late_sends += 1
            self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        taken = _take_response(self.buffer)
        if taken is None:
            return
        status, self.buffer = taken
        self.latencies.append(time.perf_counter() - self.due)
        if status[0] != "2":
            self.statuses[status] = self.statuses.get(status, 0) + 1
        self.due += self.interval
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _scheduled_client(
    request: bytes, port: int, seconds: float, connections: int, rate: float, phase: float
) -> dict[str, Any]:
    """`connections` connections sharing `rate` requests/s, their schedules interleaved."""
    loop = asyncio.get_running_loop()
    interval = connections / rate
    # Every schedule starts from one origin a little ahead, so connecting is not measured.
    origin = time.perf_counter() + 0.5
    end = origin + seconds
    protocols: list[_ScheduledConn] = []
    waits: list[asyncio.Future[None]] = []
    for i in range(connections):
        done: asyncio.Future[None] = loop.create_future()
        first = origin + (i + phase) * interval / connections
        _, protocol = await loop.create_connection(
            functools.partial(_ScheduledConn, request, first, interval, end, done),
            "127.0.0.1",
            port,
        )
        protocols.append(protocol)
        waits.append(done)
    await asyncio.wait_for(asyncio.gather(*waits), seconds + 60)
    statuses: dict[str, int] = {}
    for protocol in protocols:
        for status, n in protocol.statuses.items():
            statuses[status] = statuses.get(status, 0) + n
    return {
        "latencies": [x for p in protocols for x in p.latencies],
        "non_2xx": statuses,
        "late_sends": sum(p.late_sends for p in protocols),
    }


def _scheduled_process(args: tuple[bytes, int, float, int, float, float]) -> dict[str, Any]:
    """One open-loop load process on uvloop."""
    uvloop.install()
    return asyncio.run(_scheduled_client(*args))


def _request_bytes(method: str, url: str, token: str, body: dict[str, Any] | None) -> bytes:
    parsed = urlsplit(url)
    lines = [
        f"{method} {parsed.path}{'?' + parsed.query if parsed.query else ''} HTTP/1.1",
        f"Host: {parsed.netloc}",
        f"Authorization: Bearer {token}",
        "Connection: keep-alive",
    ]
    payload = json.dumps(body).encode() if body is not None else b""
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


async def _client(request: bytes, port: int, seconds: float, connections: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = time.perf_counter() + seconds
    protocols: list[_Conn] = []
    waits: list[asyncio.Future[None]] = []
    for _ in range(connections):
        done: asyncio.Future[None] = loop.create_future()
        _, protocol = await loop.create_connection(
            functools.partial(_Conn, request, deadline, done), "127.0.0.1", port
        )
        protocols.append(protocol)
        waits.append(done)
    await asyncio.wait_for(asyncio.gather(*waits), seconds + 60)
    statuses: dict[str, int] = {}
    for protocol in protocols:
        for status, n in protocol.statuses.items():
            statuses[status] = statuses.get(status, 0) + n
    return {"latencies": [x for p in protocols for x in p.latencies], "non_2xx": statuses}


def _client_process(args: tuple[bytes, int, float, int]) -> dict[str, Any]:
    """One load-generator process: `connections` keep-alive connections on uvloop."""
    uvloop.install()
    return asyncio.run(_client(*args))


def _load(
    method: str,
    url: str,
    token: str,
    seconds: float,
    processes: int,
    connections: int,
    body: dict[str, Any] | None = None,
    rate: float | None = None,
) -> dict[str, Any]:
    """Load `url` from `processes` processes, `connections` connections in all.

    Closed loop by default (each connection resends as soon as its answer is in: the
    throughput); with `rate`, open loop at `rate` requests/s in all (the latency at that load).
    """
    request = _request_bytes(method, url, token, body)
    port = int(urlsplit(url).port or 80)
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    shares = [n for n in shares if n]
    ctx = multiprocessing.get_context("spawn")
    started = time.perf_counter()
    with ctx.Pool(len(shares)) as pool:
        if rate is None:
            parts = pool.map(_client_process, [(request, port, seconds, n) for n in shares])
        else:
            parts = pool.map(
                _scheduled_process,
                [
                    (request, port, seconds, n, rate * n / connections, i / len(shares))
                    for i, n in enumerate(shares)
                ],
            )
    elapsed = time.perf_counter() - started
    latencies = sorted(x for part in parts for x in part["latencies"])
    errors: dict[str, int] = {}
    for part in parts:
        for status, n in part["non_2xx"].items():
            errors[status] = errors.get(status, 0) + n
    ms = [v * 1000 for v in latencies]
    busy = sum(latencies)
    mode: dict[str, Any] = {"mode": "closed_loop"}
    if rate is not None:
        mode = {
            "mode": "open_loop",
            "offered_per_s": rate,
            # Sends more than 1 ms behind their schedule (an answer came late).
            "late_sends": sum(part["late_sends"] for part in parts),
        }
    return {
        **mode,
        "requests": len(latencies),
        "seconds": round(seconds, 2),
        "requests_per_s": round(len(latencies) / seconds),
        # Little's law: requests in flight on average, i.e. the concurrency achieved.
        "achieved_concurrency": round(busy / seconds, 1),
        "connections": connections,
        "client_processes": processes,
        "p50_ms": round(_percentile(ms, 0.50), 2),
        "p90_ms": round(_percentile(ms, 0.90), 2),
        "p99_ms": round(_percentile(ms, 0.99), 2),
        "p999_ms": round(_percentile(ms, 0.999), 2),
        "max_ms": round(ms[-1], 2) if ms else None,
        "non_2xx": errors,
        "wall_s_with_process_start": round(elapsed, 2),
    }


async def _setup(base: str) -> tuple[str, str]:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            base + "/api/v1/auth/token", data={"username": "admin", "password": ADMIN_PASSWORD}
        ) as response:
            token = (await response.json())["access_token"]
        async with session.post(
            base + "/api/v1/accounts",
            json={"capital": "1000000", "currency": "USDT"},
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            account_id = (await response.json())["account_id"]
    return token, account_id


#: The api's stall histograms (services/api/src/quantmesh_api/stalls.py) the bench reports.
STALL_FAMILIES = (
    "quantmesh_api_loop_lag_seconds",
    "quantmesh_api_loop_stall_on_cpu_ratio",
    "quantmesh_api_gc_pause_seconds",
)


Series = tuple[str, frozenset[tuple[str, str]]]


async def _stall_counts(metrics_url: str) -> dict[Series, float]:
    """The api's loop-lag and GC histograms' cumulative bucket counts and sums, by series."""
    async with aiohttp.ClientSession() as session, session.get(metrics_url) as response:
        text = await response.text()
    counts: dict[Series, float] = {}
    for line in text.splitlines():
        if line.startswith(STALL_FAMILIES):
            series, _, value = line.rpartition(" ")
            name, _, labels = series.partition("{")
            pairs = (pair.split("=", 1) for pair in labels.rstrip("}").split(",") if pair)
            counts[(name, frozenset((k, v.strip('"')) for k, v in pairs))] = float(value)
    return counts


def _stalls(before: dict[Series, float], after: dict[Series, float]) -> dict[str, Any]:
    """What happened between two scrapes: probes/collections above each bound, and their sums.

    Loop lag: how many 10 ms probes fired more than 5 / 10 / 20 / 50 ms late, and of those
    over 5 ms how many found the loop's thread mostly off a CPU. GC: how many
    collections of each generation, their total seconds, and how many took over 5 ms.
    """

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset({"service": "api", **labels}.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    lag = "quantmesh_api_loop_lag_seconds"
    probes = delta(lag + "_count")
    out: dict[str, Any] = {"loop_lag_probes": int(probes)}
    for bound in ("0.005", "0.01", "0.02", "0.05"):
        within = delta(lag + "_bucket", le=bound)
        out[f"loop_lag_over_{round(float(bound) * 1000)}ms"] = int(probes - within)
    out["loop_lag_total_s"] = round(delta(lag + "_sum"), 3)
    # Of the probes over 5 ms late: how many found the loop's thread on a CPU less than half
    # of the time (the process waited for a CPU or the GIL, not for its own work).
    ratio = "quantmesh_api_loop_stall_on_cpu_ratio"
    out["stalls_over_5ms_mostly_off_cpu"] = int(delta(ratio + "_bucket", le="0.5"))
    pause = "quantmesh_api_gc_pause_seconds"
    for generation in ("0", "1", "2"):
        n = delta(pause + "_count", generation=generation)
        within = delta(pause + "_bucket", generation=generation, le="0.005")
        out[f"gc{generation}_collections"] = int(n)
        out[f"gc{generation}_total_s"] = round(delta(pause + "_sum", generation=generation), 4)
        out[f"gc{generation}_over_5ms"] = int(n - within)
    return out


def _bench(base: str, metrics_url: str, args: argparse.Namespace) -> dict[str, Any]:
    catch_up_s = asyncio.run(_wait_caught_up(metrics_url))
    token, account_id = asyncio.run(_setup(base))
    prices_url = base + "/api/v1/market/prices"
    # Warm-up: connections, caches, the Kafka producer's metadata.
    _load("GET", prices_url, token, 1.0, args.processes, args.concurrency)
    prices = _load("GET", prices_url, token, args.seconds, args.processes, args.concurrency)
    before = asyncio.run(_stall_counts(metrics_url))
    at_rate = _load(
        "GET", prices_url, token, args.seconds, args.processes, args.concurrency, rate=args.rate
    )
    at_rate["server_stalls"] = _stalls(before, asyncio.run(_stall_counts(metrics_url)))
    figures: dict[str, Any] = {
        "startup_catch_up_s": round(catch_up_s, 1),
        "latest_prices": prices,
        "latest_prices_at_rate": at_rate,
        "account_id": account_id,
    }
    if not args.no_orders:
        order = {"instrument_id": "BTC-USDT.SIM", "side": "BUY", "quantity": "0.001"}
        orders_url = f"{base}/api/v1/accounts/{account_id}/orders"
        _load("POST", orders_url, token, 1.0, 1, args.order_concurrency, order)
        figures["post_order"] = _load(
            "POST", orders_url, token, args.seconds, 1, args.order_concurrency, order
        )
    return figures


def main() -> None:
    """Start the api, load it, print one JSON object."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per endpoint")
    parser.add_argument("--concurrency", type=int, default=16, help="GET connections in all")
    parser.add_argument("--processes", type=int, default=2, help="GET load processes")
    parser.add_argument("--order-concurrency", type=int, default=8, help="POST connections")
    parser.add_argument("--instruments", type=int, default=20)
    parser.add_argument(
        "--rate", type=float, default=2000.0, help="GET requests/s of the open-loop run"
    )
    parser.add_argument("--no-orders", action="store_true", help="skip the POST order runs")
    args = parser.parse_args()
    bootstrap = os.environ.get("QM_KAFKA_BOOTSTRAP")
    redis_url = os.environ.get("QM_REDIS_URL")
    server = server_dsn_for_tests()
    if not bootstrap or not redis_url or server is None:
        sys.stderr.write("needs QM_KAFKA_BOOTSTRAP, QM_REDIS_URL and QM_DATABASE_URL\n")
        raise SystemExit(2)
    loadavg_before = _loadavg()
    prefix = f"qmbench:api:{uuid.uuid4().hex[:8]}:"
    api_port, http_port = _free_port(), _free_port()
    base = f"http://127.0.0.1:{api_port}"
    with fresh_schema(server, "qm_bench_api", migrate=True) as dsn:
        _seed_prices(redis_url, prefix + "md:", args.instruments)
        env = {
            **os.environ,
            "QM_BUS": "kafka",
            "QM_DATABASE_URL": dsn,
            "QM_HTTP_HOST": "127.0.0.1",
            "QM_HTTP_PORT": str(http_port),
            "QM_API_PORT": str(api_port),
            "QM_JWT_SECRET": "bench-secret-" + uuid.uuid4().hex,
            "QM_BOOTSTRAP_ADMIN_USER": "admin",
            "QM_BOOTSTRAP_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "QM_REDIS_PREFIX": prefix,
            "QM_MD_REDIS_PREFIX": prefix + "md:",
            "QM_RATE_LIMIT_USER_PER_MIN": "1000000000",
            "QM_RATE_LIMIT_IP_PER_MIN": "1000000000",
            "QM_LOG_LEVEL": "WARNING",
            "QM_ENVIRONMENT": "development",
        }
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(
                [str(ROOT / ".venv" / "bin" / "quantmesh-api")],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                asyncio.run(_wait_up(base, proc))
                figures = _bench(base, f"http://127.0.0.1:{http_port}/metrics", args)
            except BaseException:
                log.seek(0)
                sys.stderr.write(log.read()[-3000:].decode(errors="replace"))
                raise
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                _clear_prefix(redis_url, prefix)
    out = {
        "benchmark": "api_http",
        "seconds_per_endpoint": args.seconds,
        "loadavg_before": loadavg_before,
        "loadavg_after": _loadavg(),
        "instruments": args.instruments,
        **{k: v for k, v in figures.items() if k != "account_id"},
        "targets": {
            "latest_prices_rps_min": 2000,
            "latest_prices_p99_ms_max": 20,
            "latest_prices_p99_at_rate_per_s": 2000,
            "post_order_p99_ms_max": 50,
        },
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
