"""Benchmark of the order flow on the real broker, stages as processes; prints one JSON line.

risk, oms (PostgreSQL), execution (simulated venue) and portfolio run as separate processes
on QM_KAFKA_BOOTSTRAP, with a fresh migrated schema of QM_DATABASE_URL's test database.
Measured, all from the envelopes' creation stamps (one machine, one clock):

- tick -> venue: ticks at `--rate` per second on md.ticks; with every `--every`-th tick the
  bench publishes the market order a strategy reacting to that tick would (an OrderIntent on
  orders.intents). Latency = the venue's ACCEPTED report's creation minus the tick's.
  The strategy's own step (signals) is not in the path: the built-in strategies act on bars.
  The first `--warmup` seconds (2) run the same way but are not measured (the stages' start).
- fill -> position: a portfolio.updates message's creation minus its fill's creation.
- orders/s through risk -> oms -> execution: `--burst` limit orders far from the market
  published at once; rate = orders / (last ACCEPTED's creation - first intent's creation).
  Per hop (`burst_hops`): intent -> decision (risk), decision -> SUBMIT command (oms) and
  command -> ACCEPTED (execution) per order, and each stage's own rate (orders / its last
  output's creation - the first intent's), which shows the stage that holds the flow back.
- the tick phase's batch cycles (`tick_phase_batch_cycle`): each stage's
  `quantmesh_bus_batch_phase_seconds` read from its /metrics when the tick phase's orders are
  all at the venue: per consumer group and phase (handle, hook, send_offsets, commit), the
  batches, the mean and the histogram bucket holding the p50 and the p99.

Targets (issue 4): tick -> venue p99 < 20 ms, fill -> position p99 < 10 ms, >= 5,000 orders/s.
Usage: `python bench/bench_orderflow.py [--seconds 10] [--warmup 2] [--rate 1000] [--burst 2000]
[--delivery transactional|idempotent] [--profile DIR]` with the stack up and no other mesh
in the stages' consumer groups. Runs about a minute. The topics are the stack's own: the
stages' groups are first moved to the topics' ends, so the run measures its own messages, not
what earlier runs and tests left unconsumed.
`--profile DIR` runs each stage's main under cProfile (its event-loop thread) and writes
DIR/<stage>.prof at its stop, with DIR/<stage>.prof.gc.json (the cyclic GC's collections and
seconds per generation); the profiler slows the stages, so such a run's figures are not
comparable with a plain one's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from quantmesh_common.bus.base import H_SCHEMA, H_SCHEMA_VERSION
from quantmesh_common.bus.kafka import DEFAULT_PRODUCER_CONFIG
from quantmesh_common.envelope import DecodeError, Envelope, Event, decode, encode
from quantmesh_common.messages import (
    CommandType,
    ExecType,
    ExecutionReport,
    OrderCommand,
    OrderIntent,
    OrderType,
    Position,
    RiskDecision,
    Side,
    Tick,
    TickKind,
)
from quantmesh_common.testing.postgres import fresh_schema, server_dsn_for_tests
from quantmesh_common.topics import Topic

STAGES = ("risk", "oms", "execution", "portfolio")
BIN = Path(sys.executable).parent
PRICE = Decimal("60000")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _summary(ms: list[float]) -> dict[str, Any]:
    return {
        "n": len(ms),
        "p50_ms": round(_pct(ms, 0.50), 2),
        "p99_ms": round(_pct(ms, 0.99), 2),
        "max_ms": round(max(ms), 2) if ms else None,
    }


def _hop(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """The latency from each order's `before` stamp to its `after` stamp (ns, by order id)."""
    return _summary([(after[c] - t) / 1e6 for c, t in before.items() if c in after])


def _by_second(ticks: dict[str, int], done: dict[str, int], start_ns: int) -> list[float]:
    """The p99 latency (ms) of the orders of each second of the tick phase, in order."""
    seconds: dict[int, list[float]] = {}
    for c, t in ticks.items():
        if c in done:
            seconds.setdefault((t - start_ns) // 1_000_000_000, []).append((done[c] - t) / 1e6)
    return [_summary(seconds[s])["p99_ms"] for s in sorted(seconds)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: Runs a stage's main under cProfile and dumps the stats when it returns or exits (SIGTERM:
#: the service's os._exit), with the cyclic GC's collections and their time per generation
#: beside them (<out>.gc.json): cProfile charges a collection to whatever function allocated
#: when it started.
_PROFILED_MAIN = """
import cProfile, gc, importlib, json, os, sys, time
stage, out = sys.argv[1], sys.argv[2]
main = importlib.import_module(f"quantmesh_{stage}.__main__").main
spent = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
started = [0.0]
def on_gc(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        spent[info["generation"]][0] += 1
        spent[info["generation"]][1] += time.perf_counter() - started[0]
gc.callbacks.append(on_gc)
profiler = cProfile.Profile()
def dump():
    profiler.disable()
    profiler.dump_stats(out)
    with open(out + ".gc.json", "w") as f:
        json.dump({g: {"collections": n, "seconds": round(s, 3)} for g, (n, s) in spent.items()}, f)
# The service leaves with os._exit (runtime.run), past any finally: dump first.
real_exit = os._exit
def exit_after_dump(code):
    dump()
    real_exit(code)
os._exit = exit_after_dump
try:
    profiler.runcall(main)
finally:
    dump()
"""


def _start(
    stage: str, env: dict[str, str], log_dir: Path, profile_dir: Path | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which(f"quantmesh-{stage}", path=str(BIN))
    assert exe is not None, f"quantmesh-{stage} is not installed"
    command = [exe]
    if profile_dir is not None:
        command = [sys.executable, "-c", _PROFILED_MAIN, stage, str(profile_dir / f"{stage}.prof")]
    port = _free_port()
    full = {**os.environ, **env, "QM_HTTP_PORT": str(port), "QM_HTTP_HOST": "127.0.0.1"}
    log = (log_dir / f"{stage}.log").open("wb")
    return subprocess.Popen(command, env=full, stdout=log, stderr=subprocess.STDOUT), port


#: The stages' consumer groups and what each reads (their control groups are fresh per start;
#: risk's and portfolio's market data are broadcast members, which join no group).
GROUPS: dict[str, tuple[str, ...]] = {
    "risk": (
        Topic.ORDERS_INTENTS,
        Topic.EXEC_REPORTS,
        Topic.ORDERS_UPDATES,
        Topic.PORTFOLIO_UPDATES,
        Topic.PORTFOLIO_SNAPSHOTS,
    ),
    "oms": (Topic.ORDERS_APPROVED, Topic.EXEC_REPORTS, Topic.ORDERS_REQUESTS),
    "execution-sim": (Topic.ORDERS_COMMANDS, Topic.MD_TICKS, Topic.MD_BOOKS, Topic.CONTROL),
    "portfolio": (Topic.EXEC_REPORTS, Topic.ACCOUNTS),
}


def _members(bootstrap: str) -> dict[str, int]:
    """Return the stages' groups that have members, with how many."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    described = admin.describe_consumer_groups(list(GROUPS)).items()
    return {group: n for group, future in described if (n := len(future.result().members))}


def _skip_backlog(bootstrap: str) -> int:
    """Commit the stage groups' offsets at the topics' ends; return the messages skipped.

    The topics are the shared stack's: what earlier runs and other tests left there would
    otherwise be worked off first, and every latency would measure that backlog.
    """
    skipped = 0
    for group, topics in GROUPS.items():
        consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
        )
        try:
            meta = consumer.list_topics(timeout=10)
            ends: list[TopicPartition] = []
            for topic in topics:
                if topic not in meta.topics:
                    continue
                for partition in meta.topics[topic].partitions:
                    _low, high = consumer.get_watermark_offsets(
                        TopicPartition(topic, partition), timeout=10
                    )
                    ends.append(TopicPartition(topic, partition, high))
            committed = consumer.committed(ends, timeout=10)
            pairs = zip(ends, committed, strict=True)
            skipped += sum(end.offset - max(done.offset, 0) for end, done in pairs)
            if ends:
                try:
                    consumer.commit(offsets=ends, asynchronous=False)
                except KafkaException as exc:
                    raise SystemExit(
                        f"consumer group {group!r} has live members (another mesh or test is "
                        f"running its stages on this broker); run the bench alone: {exc}"
                    ) from exc
        finally:
            consumer.close()
    return skipped


def _rss_mb(pid: int) -> dict[str, float] | None:
    """Return a process's resident and peak resident memory in MB (None: not on Linux)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {
        key: round(int(fields[name].split()[0]) / 1024, 1)
        for key, name in (("rss", "VmRSS"), ("peak", "VmHWM"))
        if name in fields
    }


def _cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) a process has used so far (None: not on Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces), from its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_per_order(
    before: dict[str, float | None], after: dict[str, float | None], orders: int
) -> dict[str, float | None]:
    """Each stage's CPU milliseconds per order between two readings, and their sum."""
    per: dict[str, float | None] = {}
    for stage, start in before.items():
        end = after.get(stage)
        if start is None or end is None:
            per[stage] = None
        else:
            per[stage] = round((end - start) * 1000 / orders, 3)
    known = [v for v in per.values() if v is not None]
    per["total"] = round(sum(known), 3) if len(known) == len(per) else None
    return per


def _bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The upper bound of the bucket holding quantile `q` (cumulative Prometheus buckets)."""
    total = buckets[-1][1] if buckets else 0.0
    for bound, count in buckets:
        if count >= q * total:
            return bound
    return None


def _batch_phases(port: int) -> dict[str, dict[str, Any]]:
    """A stage's batch-cycle phases so far (`quantmesh_bus_batch_phase_seconds`), by group.

    Per phase: batches, mean ms, and p50 / p99 as the upper bound of their histogram bucket.
    """
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    buckets: dict[tuple[str, str], list[tuple[float, float]]] = {}
    sums: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "quantmesh_bus_batch_phase_seconds":
            continue
        for sample in family.samples:
            key = (sample.labels["group"], sample.labels["phase"])
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                buckets.setdefault(key, []).append((bound, sample.value))
            elif sample.name.endswith("_sum"):
                sums[key] = sample.value
    phases: dict[str, dict[str, Any]] = {}
    for (group, phase), cumulative in sorted(buckets.items()):
        cumulative.sort()
        count = cumulative[-1][1]
        if not count:
            continue
        p50, p99 = _bucket_quantile(cumulative, 0.5), _bucket_quantile(cumulative, 0.99)
        phases.setdefault(group, {})[phase] = {
            "batches": int(count),
            "mean_ms": round(sums.get((group, phase), 0.0) / count * 1e3, 2),
            "p50_le_ms": None if p50 is None else p50 * 1e3,
            "p99_le_ms": None if p99 is None else p99 * 1e3,
        }
    return phases


def _wait_ready(procs: dict[str, tuple[subprocess.Popen[bytes], int]], log_dir: Path) -> None:
    deadline = time.monotonic() + 120
    pending = dict(procs)
    while pending:
        for stage, (proc, port) in list(pending.items()):
            if proc.poll() is not None:
                tail = (log_dir / f"{stage}.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"{stage} exited {proc.returncode}: {tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        del pending[stage]
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise SystemExit(f"not ready in 120 s: {sorted(pending)}")
        time.sleep(0.2)


class Publisher:
    """Publishes envelopes as the bus would (same headers and producer settings), unacked."""

    def __init__(self, bootstrap: str) -> None:
        self.producer = Producer({"bootstrap.servers": bootstrap, **DEFAULT_PRODUCER_CONFIG})

    def publish(self, topic: str, payload: Event, key: str) -> Envelope[Any]:
        now = time.time_ns()
        envelope = Envelope.wrap(payload, source="bench", ts_event=now, ts_init=now)
        headers: list[tuple[str, str | bytes | None]] = [
            (H_SCHEMA, envelope.schema_name.encode()),
            (H_SCHEMA_VERSION, str(envelope.schema_version).encode()),
        ]
        self.producer.produce(topic, encode(envelope), key=key.encode(), headers=headers)
        self.producer.poll(0)
        return envelope

    def flush(self) -> None:
        self.producer.flush(30)


def _tick(instrument: str, n: int, size: Decimal) -> Tick:
    now = time.time_ns()
    return Tick(
        instrument_id=instrument,
        venue="SIM",
        kind=TickKind.TRADE,
        price=PRICE,
        size=size,
        trade_id=f"b{n}",
        ts_event=now,
        ts_init=now,
    )


def _intent(account: str, instrument: str, n: int, *, limit: bool) -> OrderIntent:
    return OrderIntent(
        intent_id=f"bi-{account}-{n}",
        account_id=account,
        strategy_id=f"bench-{account}",
        instrument_id=instrument,
        client_order_id=f"bo-{account}-{n}",
        side=Side.BUY,
        quantity=Decimal("0.001"),
        order_type=OrderType.LIMIT if limit else OrderType.MARKET,
        limit_price=Decimal(1) if limit else None,
        ts_event=time.time_ns(),
    )


def _read(bootstrap: str, topics: tuple[str, ...], want: Any, idle_s: float = 5.0) -> list[Any]:
    """Read `topics` from the start until idle; keep the envelopes `want` accepts."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench.orderflow.{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    meta = consumer.list_topics(timeout=10)
    consumer.assign(
        [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in meta.topics[t].partitions]
    )
    kept: list[Any] = []
    quiet = time.monotonic()
    while time.monotonic() - quiet < idle_s:
        batch = consumer.consume(10000, 0.5)
        if batch:
            quiet = time.monotonic()
        for msg in batch:
            value = msg.value()
            if msg.error() or value is None:
                continue
            try:
                envelope = decode(value)
            except DecodeError:
                continue
            if want(envelope):
                kept.append(envelope)
    consumer.close()
    return kept


def _wait_acks(bootstrap: str, accounts: set[str], count: int, timeout: float) -> None:
    """Wait until `count` ACCEPTED reports of `accounts` are committed (or `timeout`)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench.orderflow.{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    meta = consumer.list_topics(timeout=10)
    consumer.assign(
        [
            TopicPartition(Topic.EXEC_REPORTS, p, OFFSET_BEGINNING)
            for p in meta.topics[Topic.EXEC_REPORTS].partitions
        ]
    )
    seen = 0
    deadline = time.monotonic() + timeout
    while seen < count and time.monotonic() < deadline:
        for msg in consumer.consume(10000, 0.5):
            value = msg.value()
            if msg.error() or value is None:
                continue
            if b'"ACCEPTED"' not in value:
                continue
            payload = decode(value).payload
            if payload.account_id in accounts and payload.exec_type is ExecType.ACCEPTED:
                seen += 1
    consumer.close()


def main() -> None:
    """Run the stages, drive them, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="tick phase length")
    parser.add_argument("--rate", type=int, default=1000, help="ticks per second")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of ticks and orders not measured"
    )
    parser.add_argument("--every", type=int, default=10, help="an order every N ticks")
    parser.add_argument("--burst", type=int, default=2000, help="orders in the burst phase")
    parser.add_argument("--accounts", type=int, default=12, help="accounts of the burst")
    parser.add_argument("--profile", type=Path, default=None, help="write DIR/<stage>.prof")
    parser.add_argument(
        "--delivery",
        choices=("transactional", "idempotent"),
        default=os.environ.get("QM_ORDER_FLOW_DELIVERY", "idempotent"),
        help="the stages' QM_ORDER_FLOW_DELIVERY",
    )
    args = parser.parse_args()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    bootstrap = os.environ.get("QM_KAFKA_BOOTSTRAP")
    server = server_dsn_for_tests()
    if not bootstrap or server is None:
        raise SystemExit("set QM_KAFKA_BOOTSTRAP and QM_DATABASE_URL (deploy/local/stack.sh up)")
    tag = uuid.uuid4().hex[:8]
    instrument = f"BENCH{tag.upper()}-USDT.SIM"
    lat_account = f"bench-lat-{tag}"
    burst_accounts = [f"bench-b{i}-{tag}" for i in range(args.accounts)]
    log_dir = Path(tempfile.mkdtemp(prefix="bench-orderflow-"))
    procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    skipped = 0
    started_ns = 0
    measured_s = 0.0
    tick_cpu_before: dict[str, float | None] = {}
    tick_cpu_after: dict[str, float | None] = {}
    tick_phases: dict[str, dict[str, dict[str, Any]]] = {}
    rss: dict[str, dict[str, float] | None] = {}
    shared: dict[str, int] = {}
    with fresh_schema(server, "qm_bench_flow", migrate=True) as dsn:
        env = {
            "QM_BUS": "kafka",
            "QM_KAFKA_BOOTSTRAP": bootstrap,
            "QM_DATABASE_URL": dsn,
            "QM_LOG_LEVEL": "WARNING",
            "QM_RISK_LIMITS": "{}",
            "QM_VENUE": "SIM",
            "QM_ORDER_FLOW_DELIVERY": args.delivery,
        }
        try:
            busy = _members(bootstrap)
            if busy:
                raise SystemExit(f"another mesh is in the stages' consumer groups: {busy}")
            skipped = _skip_backlog(bootstrap)
            for stage in STAGES:
                procs[stage] = _start(stage, env, log_dir, args.profile)
            _wait_ready(procs, log_dir)
            publisher = Publisher(bootstrap)

            # Phase 1: ticks at the rate, a market order with every N-th; each tick's size
            # covers the order, so every order fills (and the portfolio updates).
            # The warm-up's orders are not measured: a stage's first messages pay its start
            # (connections, first partitions' fetches, caches), hundreds of ms at p99.
            tick_at: dict[str, int] = {}
            warm_at: dict[str, int] = {}
            intent_at: dict[str, int] = {}
            period = 1.0 / args.rate
            warm = int(args.warmup * args.rate)
            total = warm + int(args.seconds * args.rate)
            started = time.perf_counter()
            for n in range(total):
                due = started + n * period
                while (delay := due - time.perf_counter()) > 0:
                    time.sleep(min(delay, 0.001))
                if n == warm:
                    started_ns = time.time_ns()
                    tick_cpu_before = {st: _cpu_s(proc.pid) for st, (proc, _) in procs.items()}
                tick = publisher.publish(
                    Topic.MD_TICKS, _tick(instrument, n, Decimal(1)), instrument
                )
                if n % args.every == 0:
                    intent = _intent(lat_account, instrument, n, limit=False)
                    publisher.publish(Topic.ORDERS_INTENTS, intent, lat_account)
                    (tick_at if n >= warm else warm_at)[intent.client_order_id] = tick.ts_init
            tick_phase_s = time.perf_counter() - started
            tick_cpu_after = {st: _cpu_s(proc.pid) for st, (proc, _) in procs.items()}
            measured_s = (time.time_ns() - started_ns) / 1e9
            publisher.flush()
            _wait_acks(bootstrap, {lat_account}, len(tick_at) + len(warm_at), timeout=60)
            # The tick phase's batch cycles, before the burst adds its own.
            tick_phases = {stage: _batch_phases(port) for stage, (_, port) in procs.items()}

            # Phase 2: a burst of resting limit orders across accounts, as fast as possible.
            cpu_before = {stage: _cpu_s(proc.pid) for stage, (proc, _) in procs.items()}
            first_intent = time.time_ns()
            for n in range(args.burst):
                account = burst_accounts[n % len(burst_accounts)]
                burst_intent = _intent(account, instrument, n, limit=True)
                sent = publisher.publish(Topic.ORDERS_INTENTS, burst_intent, account)
                intent_at[burst_intent.client_order_id] = sent.ts_init
            publisher.flush()
            publish_s = (time.time_ns() - first_intent) / 1e9
            _wait_acks(bootstrap, set(burst_accounts), args.burst, timeout=180)
            cpu_after = {stage: _cpu_s(proc.pid) for stage, (proc, _) in procs.items()}
            # One member per group is this run's own stage: more means another mesh joined
            # during the run and took some of its partitions (the figures are not valid).
            shared = {g: n for g, n in _members(bootstrap).items() if n > 1}
        finally:
            rss = {stage: _rss_mb(proc.pid) for stage, (proc, _) in procs.items()}
            for proc, _ in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc, _ in procs.values():
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()

    accounts = {lat_account, *burst_accounts}
    envelopes = _read(
        bootstrap,
        (Topic.EXEC_REPORTS, Topic.PORTFOLIO_UPDATES, Topic.ORDERS_APPROVED, Topic.ORDERS_COMMANDS),
        lambda e: getattr(e.payload, "account_id", None) in accounts,
    )
    reports = [e for e in envelopes if isinstance(e.payload, ExecutionReport)]
    acks = {
        e.payload.client_order_id: e.ts_init
        for e in reports
        if e.payload.exec_type is ExecType.ACCEPTED
    }
    # The measured orders' fills (not the warm-up's).
    fill_at = {
        e.event_id: e.ts_init
        for e in reports
        if e.payload.is_fill and e.payload.client_order_id in tick_at
    }
    updates = [e for e in envelopes if isinstance(e.payload, Position)]
    tick_to_venue = [(acks[c] - t) / 1e6 for c, t in tick_at.items() if c in acks]
    fill_to_position = [
        (e.ts_init - fill_at[e.causation_id]) / 1e6 for e in updates if e.causation_id in fill_at
    ]
    burst_acks = [t for c, t in acks.items() if c.startswith("bo-bench-b")]
    burst_s = (max(burst_acks) - first_intent) / 1e9 if burst_acks else float("nan")
    decided_all = {
        e.payload.intent.client_order_id: e.ts_init
        for e in envelopes
        if isinstance(e.payload, RiskDecision)
    }
    commanded_all = {
        e.payload.client_order_id: e.ts_init
        for e in envelopes
        if isinstance(e.payload, OrderCommand) and e.payload.command_type is CommandType.SUBMIT
    }
    decided = {c: t for c, t in decided_all.items() if c in intent_at}
    commanded = {c: t for c, t in commanded_all.items() if c in intent_at}
    # The tick phase's orders hop by hop: where its tick -> venue time is spent.
    tick_hops = {
        "tick_to_decision": _hop(tick_at, decided_all),
        "decision_to_command": _hop(
            {c: decided_all[c] for c in tick_at if c in decided_all}, commanded_all
        ),
        "command_to_accepted": _hop(
            {c: commanded_all[c] for c in tick_at if c in commanded_all}, acks
        ),
    }
    hops = {
        "intent_to_decision": _hop(intent_at, decided),
        "decision_to_command": _hop(decided, commanded),
        "command_to_accepted": _hop(commanded, acks),
        "orders_per_s_out_of": {
            stage: round(len(done) / ((max(done.values()) - first_intent) / 1e9))
            for stage, done in (("risk", decided), ("oms", commanded))
            if done
        },
    }
    out = {
        "benchmark": "orderflow_processes_kafka",
        "stages": list(STAGES),
        "backlog_skipped": skipped,
        "run_tag": tag,
        "delivery": args.delivery,
        "tick_rate_per_s": args.rate,
        "tick_rate_achieved_per_s": round(total / tick_phase_s),
        "orders_in_tick_phase": len(tick_at),
        "warmup_orders_not_measured": len(warm_at),
        "tick_to_venue": _summary(tick_to_venue),
        # Whether the tail is a start-up cost or spread over the run.
        "tick_to_venue_p99_by_second": _by_second(tick_at, acks, started_ns),
        "tick_hops": tick_hops,
        # Each stage's batch cycle in the tick phase (quantmesh_bus_batch_phase_seconds): what
        # a message arriving mid-cycle waits for, phase by phase, per consumer group.
        "tick_phase_batch_cycle": tick_phases,
        "fill_to_position": _summary(fill_to_position),
        "burst_orders": args.burst,
        "burst_acked": len(burst_acks),
        "burst_publish_s": round(publish_s, 3),
        "orders_per_s_risk_oms_execution": round(len(burst_acks) / burst_s) if burst_acks else 0,
        "burst_hops": hops,
        # CPU the stages spent per burst order (their processes, all threads; the broker and
        # PostgreSQL not included): what orders/s would cost in cores where the stages had
        # their own, as opposed to the shared machine's wall-clock rate above.
        "burst_cpu_ms_per_order": _cpu_per_order(cpu_before, cpu_after, args.burst),
        # Each stage's share of one CPU while the measured ticks were published (per cent).
        "tick_phase_cpu_percent": _cpu_per_order(
            tick_cpu_before, tick_cpu_after, max(1, round(measured_s * 10))
        ),
        "targets": {
            "tick_to_venue_p99_ms": 20,
            "fill_to_position_p99_ms": 10,
            "orders_per_s": 5000,
        },
        "rss_mb_at_end": rss,
        "groups_shared_with_another_mesh": shared,
        "logs": str(log_dir),
        "profiled": args.profile is not None,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
