"""Benchmark of marketdata: rows/s recorded to PostgreSQL with COPY, ticks/s published.

Ticks/s published by one instance on the real broker (the issue's figure, needs
QM_KAFKA_BOOTSTRAP): the service with QM_FEED=replay of a generated trade file (CSV parse,
Tick normalisation and validation, 1 s bars, envelope, encode, produce), timed from its first
event to the broker's acknowledgement of the last. In process, on the in-memory bus: the
synthetic feed, the file normaliser alone, and venue trades: ccxt's Binance parser on
recorded aggTrades (tests/fixtures), then the streamer's path (dedup, gap check, Tick
normalisation, publish to the in-memory bus). Prints one JSON object with the load average.

The PostgreSQL figure needs QM_DATABASE_URL (`make up`); it writes into
a throw-away schema of the quantmesh_test database (or of QM_DATABASE_URL's database) and drops
it afterwards. It is the sink's COPY of the text lines the Recorder builds as ticks arrive,
with the client's and (local server) the backends' CPU per row; then duplicates, row tuples
encoded inside the timing, and the whole recorder path. `--only copy|publish` runs one half;
`--profile FILE` cProfiles the Kafka publish run and reports the bus's share of the replay
loop. Targets (issue 3): 100,000 rows/s recorded, 50,000 ticks/s published.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import gc
import json
import logging
import os
import platform
import pstats
import statistics
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

from quantmesh_common.bus.kafka import ensure_topics
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import WallClock
from quantmesh_common.messages import Bar
from quantmesh_common.runtime import ServiceContext, ServiceRunner
from quantmesh_common.storage.migrate import apply_migrations
from quantmesh_common.storage.postgres import create_pool
from quantmesh_common.testing.kafka import delete_topics
from quantmesh_common.topics import TopicRegistry, registry
from quantmesh_marketdata.config import MarketDataSettings
from quantmesh_marketdata.feed import SyntheticFeed
from quantmesh_marketdata.recorder import PostgresSink, Recorder, group_lines
from quantmesh_marketdata.replay import file_events
from quantmesh_marketdata.service import MarketDataService
from quantmesh_marketdata.stream import StreamTuning, VenueStreamer
from quantmesh_marketdata.synthetic import GbmParams, gbm_ticks
from quantmesh_marketdata.venue import SymbolMap, VenueConfig, ccxt_module

T0 = 1_700_000_040 * 1_000_000_000


def _scratch_dsn(base: str) -> tuple[str, str, str]:
    """(server dsn, dsn of a new schema, schema name), preferring the quantmesh_test database."""
    parts = urlsplit(base)
    test = urlunsplit(parts._replace(path="/quantmesh_test"))
    try:
        with psycopg.connect(test, connect_timeout=5):
            server = test
    except psycopg.OperationalError:
        server = base
    schema = f"qm_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"'.encode())
    sp = urlsplit(server)
    query = [(k, v) for k, v in parse_qsl(sp.query) if k != "options"]
    query.append(("options", f"-csearch_path={schema},public"))
    return server, urlunsplit(sp._replace(query=urlencode(query))), schema


def _tick_rows(n: int, instruments: int) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for i in range(n):
        inst = f"I{i % instruments}-USDT.SIM"
        ts = T0 + i * 1_000
        price = Decimal(50_000 + i % 997) / 100
        rows.append(
            (
                "SIM",
                inst,
                ts,
                ts + 500,
                "TRADE",
                price,
                Decimal("0.125"),
                "BUYER",
                f"T{i}",
                None,
                None,
                None,
                None,
            )
        )
    return rows


def _backend_cpu_s(pids: list[int]) -> float | None:
    """CPU seconds the PostgreSQL backends `pids` have used (None: not on this host)."""
    total = 0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    except (FileNotFoundError, PermissionError, IndexError, ValueError):
        return None
    return total / os.sysconf("SC_CLK_TCK")


async def copy_rate(
    dsn: str, rows: int, batch: int, repeat: int, parallel: int = 2
) -> dict[str, Any]:
    """Rows/s through PostgresSink's COPY (pre-encoded lines, as the Recorder hands them over),
    duplicates (staging table + ON CONFLICT), row tuples, and the whole Recorder path.

    Client CPU is this process's; server CPU is read from /proc for the pool's backends when
    PostgreSQL runs on this host (the local stack), else null.
    """
    apply_migrations(dsn)
    pool = await create_pool(dsn, parallel, parallel)
    try:
        sink = PostgresSink(pool, parallel=parallel)
        data = _tick_rows(rows, 16)
        # Encoding happens in Recorder.add, once per tick as it arrives: not part of the COPY.
        lines = [group_lines(data[lo : lo + batch], 1) for lo in range(0, rows, batch)]
        pids = [
            r[0]
            for r in await asyncio.gather(
                *(pool.fetchrow("SELECT pg_backend_pid(), pg_sleep(0.2)") for _ in range(parallel))
            )
        ]
        await sink.write_ticks(data[:1000])  # warm the connections and the staging table
        # The host is shared: run the fast path `repeat` times and report the median and best.
        rates: list[float] = []
        client_us: list[float] = []
        server_us: list[float] = []
        for _ in range(repeat):
            await pool.execute("TRUNCATE ticks")
            gc.collect()
            server0 = _backend_cpu_s(pids)
            cpu0 = time.process_time()
            start = time.perf_counter()
            inserted = 0
            for group in lines:
                inserted += await sink.write_tick_lines(group)
            rates.append(rows / (time.perf_counter() - start))
            client_us.append((time.process_time() - cpu0) / rows * 1e6)
            server1 = _backend_cpu_s(pids)
            if server0 is not None and server1 is not None:
                server_us.append((server1 - server0) / rows * 1e6)
            assert inserted == rows, (inserted, rows)
        start = time.perf_counter()
        for group in lines:
            assert await sink.write_tick_lines(group) == 0
        dup_elapsed = time.perf_counter() - start

        # Row tuples: the same rows, encoded to COPY text in Python inside the timing.
        await pool.execute("TRUNCATE ticks")
        start = time.perf_counter()
        for lo in range(0, rows, batch):
            await sink.write_ticks(data[lo : lo + batch])
        tuples_elapsed = time.perf_counter() - start

        # The whole recorder path: Tick models -> lines + 24 h stats -> COPY, no Redis.
        await pool.execute("TRUNCATE ticks")
        feed = gbm_ticks("BTC-USDT.SIM", GbmParams(interval_ns=1_000_000), T0, 3)
        ticks = [next(feed) for _ in range(rows // 2)]
        recorder = Recorder(sink, None, WallClock(), batch_rows=batch)
        gc.collect()
        cpu0 = time.process_time()
        start = time.perf_counter()
        for tick in ticks:
            recorder.add(tick)
            if recorder.pending >= batch:
                await recorder.flush()
        await recorder.flush()
        rec_elapsed = time.perf_counter() - start
        rec_cpu = time.process_time() - cpu0
        stored = await pool.fetchval("SELECT count(*) FROM ticks")
        assert stored == len(ticks), (stored, len(ticks))
    finally:
        await pool.close()
    return {
        "rows": rows,
        "batch": batch,
        "parallel": parallel,
        "copy_rows_per_s": round(statistics.median(rates)),
        "copy_rows_per_s_best": round(max(rates)),
        "repeat": repeat,
        "copy_client_cpu_us_per_row": round(statistics.median(client_us), 2),
        "copy_server_cpu_us_per_row": (
            round(statistics.median(server_us), 2) if server_us else None
        ),
        "duplicate_rows_per_s": round(rows / dup_elapsed),
        "row_tuples_rows_per_s": round(rows / tuples_elapsed),
        "recorder_ticks": len(ticks),
        "recorder_ticks_per_s": round(len(ticks) / rec_elapsed),
        "recorder_client_cpu_us_per_tick": round(rec_cpu / len(ticks) * 1e6, 2),
        "target_rows_per_s": 100_000,
    }


async def feed_publish_rate(steps: int, instruments: int) -> dict[str, Any]:
    """Ticks/s the synthetic feed generates and publishes to the in-memory bus (one consumer)."""
    bus = InMemoryBus("bench", registry())
    seen = 0

    def handler(_: Any) -> None:
        nonlocal seen
        seen += 1

    await bus.subscribe("bench", ["md.ticks", "md.bars"], handler).start()
    ids = [f"I{i}-USDT.SIM" for i in range(instruments)]
    feed = SyntheticFeed(ids, GbmParams(interval_ns=1_000_000), T0, 1, "1s")
    publish = bus.publish
    ticks = 0
    gc.collect()
    start = time.perf_counter()
    for step in range(steps):
        for topic, event in feed.step():
            ts = event.ts_close if isinstance(event, Bar) else event.ts_event  # type: ignore[attr-defined]
            await publish(topic, event, ts_event=ts)
            ticks += topic == "md.ticks"
        if step % 64 == 63:
            await bus.run_until_idle()
    await bus.run_until_idle()
    elapsed = time.perf_counter() - start
    return {
        "ticks": ticks,
        "messages_delivered": seen,
        "elapsed_s": round(elapsed, 3),
        "ticks_per_s": round(ticks / elapsed),
        "target_ticks_per_s": 50_000,
    }


FIXTURES = Path(__file__).resolve().parents[1] / "services/marketdata/tests/fixtures"


class _TradeBatches:
    """A stand-in ccxt.pro exchange: watch_trades returns the next batch, then waits forever."""

    def __init__(self, batches: list[list[dict[str, Any]]]) -> None:
        self.batches = iter(batches)
        self.exhausted = asyncio.Event()

    async def watch_trades(self, symbol: str) -> list[dict[str, Any]]:
        batch = next(self.batches, None)
        if batch is None:
            self.exhausted.set()
            await asyncio.Event().wait()
        return batch or []

    async def close(self) -> None:
        return None


async def venue_normalise_rate(trades: int, batch: int) -> dict[str, Any]:
    """ccxt trade parsing, then unified trades -> Tick -> in-memory bus through VenueStreamer."""
    ccxt_async = ccxt_module("ccxt.async_support")
    recorded = json.loads((FIXTURES / "binance_xrpeth_aggtrades_2019-10-11_head.json").read_text())
    exchange = ccxt_async.binance()
    market = {
        "id": "XRPETH",
        "symbol": "XRP/ETH",
        "base": "XRP",
        "quote": "ETH",
        "type": "spot",
        "spot": True,
        "margin": False,
        "swap": False,
        "future": False,
        "option": False,
        "contract": False,
        "linear": None,
        "inverse": None,
    }
    raw = [dict(recorded[i % len(recorded)], a=i + 1) for i in range(trades)]
    gc.collect()
    start = time.perf_counter()
    unified = [exchange.parse_trade(info, market) for info in raw]
    parse_elapsed = time.perf_counter() - start
    await exchange.close()

    bus = InMemoryBus("bench", registry())
    seen = 0

    def handler(_: Any) -> None:
        nonlocal seen
        seen += 1

    await bus.subscribe("bench", ["md.ticks"], handler).start()
    source = _TradeBatches([unified[i : i + batch] for i in range(0, trades, batch)])
    config = VenueConfig("binance", symbols=("XRP/ETH",), channels=("trades",))
    symbols = SymbolMap({"XRP/ETH": market}, "BINANCE")
    published = 0

    async def publish(topic: str, event: Any, ts_event: int) -> None:
        nonlocal published
        await bus.publish(topic, event, ts_event=ts_event)
        published += 1
        if published % 4096 == 0:
            await bus.run_until_idle()

    streamer = VenueStreamer(source, config, symbols, publish, WallClock(), StreamTuning())
    gc.collect()
    start = time.perf_counter()
    task = asyncio.create_task(streamer._watch_loop("trades", "XRP/ETH"))
    await source.exhausted.wait()
    await bus.run_until_idle()
    elapsed = time.perf_counter() - start
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return {
        "trades": trades,
        "ccxt_parse_trades_per_s": round(trades / parse_elapsed),
        "ticks_published": published,
        "messages_delivered": seen,
        "elapsed_s": round(elapsed, 3),
        "ticks_per_s": round(published / elapsed),
        "target_ticks_per_s": 50_000,
    }


def _trade_file(path: Path, trades: int) -> Path:
    """A trade CSV of one instrument: GBM prices, one trade per ms, Binance-like columns."""
    feed = gbm_ticks("BTC-USDT.SIM", GbmParams(interval_ns=1_000_000), T0, 5)
    with path.open("w") as handle:
        handle.write("time_ms,trade_id,price,quantity,buyer_is_maker\n")
        for n in range(trades):
            tick = next(feed)
            maker = "true" if n % 3 else "false"
            handle.write(f"{tick.ts_event // 1_000_000},{n + 1},{tick.price},{tick.size},{maker}\n")
    return path


def replay_normalise_rate(path: Path) -> dict[str, Any]:
    """Events/s of the file normaliser alone: CSV rows -> validated Ticks + 1 s bars."""
    gc.collect()
    start = time.perf_counter()
    events = sum(1 for _ in file_events(path, "BTC-USDT.SIM", "1s"))
    elapsed = time.perf_counter() - start
    return {
        "events": events,
        "elapsed_s": round(elapsed, 3),
        "events_per_s": round(events / elapsed),
    }


class _NullBus:
    """A bus whose publish does nothing: what is left of the replay loop is the stage's own."""

    published = 0

    async def publish(self, topic: str, payload: Any, **_: Any) -> None:
        self.published += 1


async def replay_stage_cpu(path: Path, prefix: str, rounds: int = 3) -> dict[str, Any]:
    """The stage's CPU per event of the replay loop (QM_FEED=replay: CSV -> Tick + 1 s bars ->
    topic, key -> publish), with a bus that does nothing; least of `rounds` runs.

    On the shared machine CPU per event is the steady figure; the bus's own cost per message
    is measured by bench_bus_cpu.py.
    """
    settings = MarketDataSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        feed="replay",
        replay_file=str(path),
        instruments="BTC-USDT.SIM",
        bar_interval="1s",
        marketdata_topic_prefix=prefix,
    )
    best = float("inf")
    events = 0
    for _ in range(rounds):
        service = MarketDataService(settings)
        bus = _NullBus()
        ctx: Any = type("Ctx", (), {})()
        ctx.bus, ctx.clock, ctx.logger = bus, WallClock(), logging.getLogger("bench")
        gc.collect()
        cpu0 = time.process_time()
        await service._run_replay(ctx)
        best = min(best, time.process_time() - cpu0)
        events = bus.published
    return {
        "prefix": prefix or None,
        "events": events,
        "cpu_s": round(best, 3),
        "cpu_us_per_event": round(best / events * 1e6, 3),
        "events_per_cpu_s": round(events / best),
    }


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads by name (librdkafka's `rdk:broker17` counted as
    `rdk:broker`): which of them the publishing costs."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        try:
            head, rest = (task / "stat").read_text().rsplit(")", 1)
        except (FileNotFoundError, ValueError):
            continue  # the thread ended
        name = head.split("(", 1)[1].rstrip("0123456789") or "?"
        fields = rest.split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


class _TimedReplay(MarketDataService):
    """The service, noting when its replay published its first event."""

    started = 0.0
    cpu_started = 0.0
    threads_started: dict[str, float]
    finished: asyncio.Event

    async def _run_replay(self, ctx: ServiceContext[MarketDataSettings]) -> None:
        self.started = time.perf_counter()
        self.cpu_started = time.process_time()
        self.threads_started = _thread_cpu()
        await super()._run_replay(ctx)
        self.finished.set()


async def instance_publish_rate(bootstrap: str, path: Path, trades: int) -> dict[str, Any]:
    """Ticks/s one marketdata instance publishes on the real broker (QM_FEED=replay)."""
    prefix = f"bench.md.{uuid.uuid4().hex[:8]}."
    names = ("md.ticks", "md.bars", "control")
    topics = TopicRegistry([dataclasses.replace(registry()[t], name=prefix + t) for t in names])
    ensure_topics(bootstrap, topics)
    try:
        settings = MarketDataSettings(
            bus="kafka",
            kafka_bootstrap=bootstrap,
            http_host="127.0.0.1",
            http_port=0,
            feed="replay",
            replay_file=str(path),
            instruments="BTC-USDT.SIM",
            bar_interval="1s",
            marketdata_topic_prefix=prefix,
        )
        service = _TimedReplay(settings)
        service.finished = asyncio.Event()
        runner = ServiceRunner(service, settings)
        load_before = _loadavg()
        await runner.start()
        try:
            await asyncio.wait_for(service.finished.wait(), 600)
            await runner.bus.flush()  # every message acknowledged by the broker
            elapsed = time.perf_counter() - service.started
            cpu = time.process_time() - service.cpu_started
            threads = _thread_cpu()
        finally:
            await runner.stop()
        return {
            "trades": trades,
            "events_published": service.replayed,
            "completed": service.replay_done,
            "elapsed_s": round(elapsed, 3),
            "ticks_per_s": round(trades / elapsed),
            "events_per_s": round(service.replayed / elapsed),
            # CPU of the whole process (event loop and librdkafka's threads) over the same
            # span: on a loaded host, events per CPU second is the steadier figure.
            "cpu_s": round(cpu, 3),
            "events_per_cpu_s": round(service.replayed / cpu) if cpu > 0 else None,
            # The same CPU by thread (the event loop is the process's first, named after the
            # program): the stage and the bus's Python against librdkafka's threads.
            "cpu_us_per_event_by_thread": {
                name: round((spent - service.threads_started.get(name, 0.0)) / n * 1e6, 2)
                for name, spent in sorted(threads.items())
                if (n := service.replayed) and spent - service.threads_started.get(name, 0.0) > 0
            },
            "loadavg_before": load_before,
            "loadavg_after": _loadavg(),
            "target_ticks_per_s": 50_000,
        }
    finally:
        delete_topics(bootstrap, topics.all_topic_names())


def _loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both figures (PostgreSQL's skipped, with the reason, when QM_DATABASE_URL is unset)."""
    result: dict[str, Any] = {
        "benchmark": "marketdata",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_start": _loadavg(),
    }
    if args.only != "copy":
        await _publish_figures(args, result)
    if args.only == "publish":
        result["loadavg_end"] = _loadavg()
        return result
    base = os.environ.get("QM_DATABASE_URL")
    if not base:
        result["postgres_copy"] = {"skipped": "QM_DATABASE_URL is not set (make up)"}
        return result
    server, dsn, schema = _scratch_dsn(base)
    try:
        result["postgres_copy"] = await copy_rate(
            dsn, args.rows, args.batch, args.repeat, args.parallel
        )
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())
    result["loadavg_end"] = _loadavg()
    return result


async def _publish_figures(args: argparse.Namespace, result: dict[str, Any]) -> None:
    result["feed_publish"] = await feed_publish_rate(args.steps, args.instruments)
    result["venue_normalise_publish"] = await venue_normalise_rate(args.venue_trades, 100)
    with tempfile.TemporaryDirectory() as scratch:
        path = _trade_file(Path(scratch) / "trades.csv", args.replay_trades)
        result["replay_normalise"] = replay_normalise_rate(path)
        result["replay_stage_cpu"] = await replay_stage_cpu(path, "")
        result["replay_stage_cpu_prefixed"] = await replay_stage_cpu(path, "bench.")
        bootstrap = os.environ.get("QM_KAFKA_BOOTSTRAP")
        if not bootstrap:
            result["instance_publish_kafka"] = {"skipped": "QM_KAFKA_BOOTSTRAP is not set"}
            return
        profiler = cProfile.Profile() if args.profile else None
        if profiler is not None:
            profiler.enable()
        try:
            result["instance_publish_kafka"] = await instance_publish_rate(
                bootstrap, path, args.replay_trades
            )
        finally:
            if profiler is not None:
                profiler.disable()
        if profiler is not None:
            profiler.dump_stats(args.profile)
            result["instance_publish_kafka"]["profile"] = _publish_split(args.profile)


def _publish_split(path: str) -> dict[str, Any]:
    """The replay loop's profiled time split between the bus's publish and the stage's side."""
    stats: dict[Any, Any] = pstats.Stats(path).stats  # type: ignore[attr-defined]
    loop = bus = 0.0
    for (filename, _, function), (_, _, _, cumulative, _) in stats.items():
        if function == "_run_replay" and filename.endswith("quantmesh_marketdata/service.py"):
            loop += cumulative
        elif function in ("publish", "publish_nowait") and filename.endswith(
            "quantmesh_common/bus/kafka.py"
        ):
            bus += cumulative
    return {
        "file": path,
        "replay_loop_s": round(loop, 3),
        "bus_publish_s": round(bus, 3),
        "bus_share": round(bus / loop, 3) if loop else None,
    }


def main() -> None:
    """Parse the arguments, run, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=400_000, help="tick rows to COPY")
    parser.add_argument("--batch", type=int, default=20_000, help="rows per COPY batch")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the COPY fast path")
    parser.add_argument("--parallel", type=int, default=2, help="COPY connections per batch")
    parser.add_argument(
        "--only", choices=("copy", "publish"), help="run only the PostgreSQL or the publish part"
    )
    parser.add_argument(
        "--profile", metavar="FILE", help="cProfile the Kafka publish run into FILE (and split it)"
    )
    parser.add_argument("--steps", type=int, default=20_000, help="synthetic feed steps")
    parser.add_argument("--instruments", type=int, default=10, help="instruments in the feed")
    parser.add_argument("--venue-trades", type=int, default=100_000, help="venue trades")
    parser.add_argument(
        "--replay-trades", type=int, default=200_000, help="trades one instance replays to Kafka"
    )
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
