"""Benchmark of the api under concurrent HTTP load on loopback; prints one JSON line.

The api runs as its own process (`quantmesh-api`: one uvicorn worker inside the service, as
deployed) on the real stack: Kafka QM_KAFKA_BOOTSTRAP, a fresh migrated schema of
QM_DATABASE_URL's test database, Redis QM_REDIS_URL under a unique key prefix. This process is
the load generator (aiohttp, `--concurrency` connections kept alive), for `--seconds` each:

- GET /api/v1/market/prices: the latest prices of `--instruments` instruments seeded in Redis
  (authenticated with a bearer token, rate limits raised out of the way).
- POST /api/v1/accounts/{id}/orders: a market order; 202 means Kafka acknowledged the intent.
  Each goes to the shared `orders.intents` topic (a risk stage running there will see them).

Per endpoint: requests/s, latency p50/p90/p99/max (ms) as the client saw it, and non-2xx
answers. Targets (issue 6): latest prices >= 2,000 req/s with p99 < 20 ms; order p99 < 50 ms.
Usage: `python bench/bench_api.py [--seconds 20] [--concurrency 32]` with the stack up; the
default run takes about 50 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import redis

from quantmesh_common.testing.postgres import fresh_schema, server_dsn_for_tests

ROOT = Path(__file__).resolve().parent.parent
ADMIN_PASSWORD = "bench-admin-password"
START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))
    return sorted_values[index]


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


async def _load(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    seconds: float,
    concurrency: int,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with session.request(method, url, json=body) as response:
                await response.read()
                status = response.status
            latencies.append(time.perf_counter() - started)
            if status >= 300:
                errors[str(status)] = errors.get(str(status), 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    ms = [v * 1000 for v in ordered]
    return {
        "requests": len(ordered),
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(ordered) / elapsed),
        "p50_ms": round(_percentile(ms, 0.50), 2),
        "p90_ms": round(_percentile(ms, 0.90), 2),
        "p99_ms": round(_percentile(ms, 0.99), 2),
        "max_ms": round(ms[-1], 2) if ms else None,
        "non_2xx": errors,
    }


async def _bench(base: str, args: argparse.Namespace) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(
            base + "/api/v1/auth/token", data={"username": "admin", "password": ADMIN_PASSWORD}
        ) as response:
            token = (await response.json())["access_token"]
        session.headers["Authorization"] = f"Bearer {token}"
        async with session.post(
            base + "/api/v1/accounts", json={"capital": "1000000", "currency": "USDT"}
        ) as response:
            account_id = (await response.json())["account_id"]
        # Warm-up: connections, caches, the Kafka producer's metadata.
        await _load(session, "GET", base + "/api/v1/market/prices", 1.0, args.concurrency)
        prices = await _load(
            session, "GET", base + "/api/v1/market/prices", args.seconds, args.concurrency
        )
        order = {"instrument_id": "BTC-USDT.SIM", "side": "BUY", "quantity": "0.001"}
        orders_url = f"{base}/api/v1/accounts/{account_id}/orders"
        await _load(session, "POST", orders_url, 1.0, args.order_concurrency, order)
        orders = await _load(
            session, "POST", orders_url, args.seconds, args.order_concurrency, order
        )
    return {"latest_prices": prices, "post_order": orders, "account_id": account_id}


def main() -> None:
    """Start the api, load it, print one JSON object."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per endpoint")
    parser.add_argument("--concurrency", type=int, default=32, help="GET connections")
    parser.add_argument("--order-concurrency", type=int, default=16, help="POST connections")
    parser.add_argument("--instruments", type=int, default=20)
    args = parser.parse_args()
    bootstrap = os.environ.get("QM_KAFKA_BOOTSTRAP")
    redis_url = os.environ.get("QM_REDIS_URL")
    server = server_dsn_for_tests()
    if not bootstrap or not redis_url or server is None:
        sys.stderr.write("needs QM_KAFKA_BOOTSTRAP, QM_REDIS_URL and QM_DATABASE_URL\n")
        raise SystemExit(2)
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
                figures = asyncio.run(_bench(base, args))
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
        "concurrency": {"latest_prices": args.concurrency, "post_order": args.order_concurrency},
        "instruments": args.instruments,
        **{k: v for k, v in figures.items() if k != "account_id"},
        "targets": {
            "latest_prices_rps_min": 2000,
            "latest_prices_p99_ms_max": 20,
            "post_order_p99_ms_max": 50,
        },
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
