"""Benchmark of each stage's memory over a long replay at full speed; prints one JSON object.

The six stages (marketdata, signals, risk, oms, execution, portfolio) run as separate processes
on Kafka, as `make up` would run them: marketdata's seeded synthetic feed publishes trades and
1 s bars for ten instruments at `--rate` ticks/s each (default 200: 2,000 ticks/s asked), or
as fast as its one process can when that is less (`event_time_speed` < 1 in the output: the
feed's event time, and so its bars, then run slower than the wall clock), and its recorder
writes them to PostgreSQL and Redis; signals runs sma_cross, rsi_reversion and
bollinger_breakout (short windows, so they trade within seconds) over the ten instruments, one
account each; their intents go through risk, oms, execution (simulated venue) and portfolio.
Every `--interval` s the resident set (VmRSS, and RssAnon: the heap, where a leak shows) of
each stage's process tree is read from /proc. After `--warmup` s, a least-squares line through
the remaining samples gives the growth in MB/min.

Pass/fail, per stage (issue 3: "under 200 MB and not growing"):
- peak VmRSS < 200 MB;
- fitted growth of RssAnon over the fit window < 2 MB (slope < 2 MB / window minutes). Why
  2 MB, 1 % of the budget: a stage that keeps no per-message state stays flat to 0.1 MB over
  9 minutes here (marketdata did, 0.004 MB/min), so 2 MB is far above the noise and is real
  growth: a high-water mark that may still level off, or state kept per order or per message.
  Over the issue's 10 minutes (9 min fitted) that is 0.22 MB/min, ~320 MB a day; a slower leak
  needs a longer run. The default 90 s run (60 s fitted, 2 MB/min) is a smoke test that
  catches only fast leaks and start-up growth; `--duration 600` is the issue's measurement.

Where it runs: by default on a private stack (deploy/local/stack.sh with its own directory and
ports, deleted afterwards). The stages' topics and consumer groups are fixed names, so a run on
the shared broker would put millions of ticks into its md.ticks (every later signals start
replays that history; the fixed groups would be left behind the end) and must not overlap an
e2e run. `--shared` uses QM_KAFKA_BOOTSTRAP / QM_DATABASE_URL / QM_REDIS_URL instead (a fresh
schema, its own Redis prefix), after waiting for the stages' consumer groups to be empty.

Not covered yet: a stage draining a backlog. On the private stack every consumer keeps up with
the feed, so nothing measures a recorder catching up or signals replaying a long history at
start; with `--shared` (history on the broker) signals was at 314 MB right after its start-up
replay and marketdata at 346 MB while its recorder drained ~80,000 old ticks (2026-11-25).

Usage: `python bench/bench_rss.py [--duration 90] [--warmup 30] [--rate 200] [--shared]
[--series] [--keep-logs]`; `--duration 600` for the issue's 10 minutes. The stack takes about
half a minute to start and stop around the run.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from confluent_kafka.admin import AdminClient

from quantmesh_common.bus.kafka import ensure_topics
from quantmesh_common.testing.postgres import TEST_DATABASE, fresh_schema, with_database
from quantmesh_common.topics import Topic, registry

REPO = Path(__file__).resolve().parents[1]
STACK_SH = REPO / "deploy" / "local" / "stack.sh"
BIN = Path(sys.executable).parent
#: marketdata last: the consumers are in their groups before the first tick.
STAGES = ("signals", "risk", "oms", "execution", "portfolio", "marketdata")
#: The stages' fixed consumer groups (each service.py; signals' is QM_SIGNALS_GROUP's default).
SHARED_GROUPS = (
    "marketdata.control",
    "marketdata.recorder",
    "signals",
    "signals.control",
    "risk",
    "oms",
    "execution-sim",
    "portfolio",
)
MAX_RSS_MB = 200.0
#: Fitted growth over the fit window that counts as growing (see the module docstring).
NOISE_MB = 2.0
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
MB = 1024 * 1024


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwind through the same clean-up as Ctrl-C: stages stopped, private stack deleted.
    raise KeyboardInterrupt(f"signal {signum}")


def _free_port(pair: bool = False) -> int:
    """A free loopback port (with `pair`, one whose successor is free too: Kafka's controller)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if not pair or port >= 65535:
            return port
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port + 1))
            return port
    raise SystemExit("no free pair of ports")


# ----------------------------------------------------------------------- the stack --


@dataclass
class Stack:
    """Where the stages find Kafka, PostgreSQL and Redis; a private one is stopped and deleted."""

    bootstrap: str
    database_url: str
    redis_url: str
    private_dir: Path | None = None
    private_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def private(cls, log_dir: Path) -> Stack:
        """Start a stack of our own with stack.sh (a few tens of seconds: initdb, KRaft format)."""
        stack_dir = Path(tempfile.mkdtemp(prefix="qm-bench-rss-stack-"))
        kafka, pg, redis = _free_port(pair=True), _free_port(), _free_port()
        env = {
            "QM_STACK_DIR": str(stack_dir),
            "QM_KAFKA_PORT": str(kafka),
            "QM_PG_PORT": str(pg),
            "QM_REDIS_PORT": str(redis),
            # Smaller than the shared broker's 1 GiB: this one holds one run's data.
            "QM_KAFKA_HEAP_OPTS": "-Xms256m -Xmx768m",
        }
        stack = cls(
            bootstrap=f"127.0.0.1:{kafka}",
            database_url=f"postgresql://quantmesh:quantmesh@127.0.0.1:{pg}/quantmesh",
            redis_url=f"redis://127.0.0.1:{redis}/0",
            private_dir=stack_dir,
            private_env=env,
        )
        try:
            stack._stack_sh("up", log_dir / "stack-up.log", timeout=600)
        except BaseException:
            stack.close(log_dir)
            raise
        return stack

    @classmethod
    def shared(cls) -> Stack:
        """The stack QM_KAFKA_BOOTSTRAP, QM_DATABASE_URL and QM_REDIS_URL name."""
        try:
            return cls(
                os.environ["QM_KAFKA_BOOTSTRAP"],
                os.environ["QM_DATABASE_URL"],
                os.environ["QM_REDIS_URL"],
            )
        except KeyError as exc:
            raise SystemExit(f"--shared needs {exc.args[0]} (deploy/local/.stack/env)") from None

    def _stack_sh(self, command: str, log: Path, timeout: float) -> None:
        with log.open("ab") as out:
            done = subprocess.run(
                [str(STACK_SH), command],
                env={**os.environ, **self.private_env},
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
                # Its daemons must not get the terminal's Ctrl-C: this script stops them.
                start_new_session=True,
            )
        if done.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"stack.sh {command} failed ({done.returncode}):\n{tail}")

    def close(self, log_dir: Path) -> None:
        """Stop and delete a private stack (nothing to do for the shared one)."""
        if self.private_dir is None:
            return
        try:
            self._stack_sh("reset", log_dir / "stack-down.log", timeout=180)
        finally:
            shutil.rmtree(self.private_dir, ignore_errors=True)


def busy_groups(bootstrap: str) -> dict[str, int]:
    """Members of the stages' fixed consumer groups right now, by group."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    listed = {g.group_id for g in admin.list_consumer_groups().result().valid}
    wanted = [g for g in SHARED_GROUPS if g in listed]
    if not wanted:
        return {}
    described = admin.describe_consumer_groups(wanted).items()
    return {g: n for g, f in described if (n := len(f.result().members))}


def wait_groups_free(bootstrap: str, timeout: float) -> None:
    """Wait until no process is in the stages' groups, or exit naming the busy ones."""
    deadline = time.monotonic() + timeout
    while busy := busy_groups(bootstrap):
        if time.monotonic() > deadline:
            raise SystemExit(
                f"another mesh (an e2e test or bench) is in the stages' consumer groups "
                f"{busy} on {bootstrap}; run again when it is done, or without --shared"
            )
        time.sleep(2.0)


# ---------------------------------------------------------------------- the stages --


def stage_env(
    stack: Stack, dsn: str, redis_prefix: str, instruments: list[str], rate: float, tag: str
) -> dict[str, dict[str, str]]:
    """Each stage's settings (the working ones of tests/e2e/test_order_flow.py, scaled up)."""
    common = {
        "QM_BUS": "kafka",
        "QM_KAFKA_BOOTSTRAP": stack.bootstrap,
        "QM_DATABASE_URL": dsn,
        "QM_REDIS_URL": stack.redis_url,
        "QM_LOG_LEVEL": "WARNING",
    }
    # Short windows: the strategies trade within seconds, so the order path carries load too.
    specs = (
        ("sma_cross", {"fast": 2, "slow": 5}),
        ("rsi_reversion", {"period": 5, "oversold": 40, "overbought": 60}),
        ("bollinger_breakout", {"period": 5, "k": 1}),
    )
    strategies = [
        {
            "id": f"rss-{name}-{tag}",
            "name": name,
            "account_id": f"bench-rss-{n}-{tag}",
            "instruments": instruments,
            "params": {**params, "quantity": "0.01", "allow_short": True},
        }
        for n, (name, params) in enumerate(specs)
    ]
    return {
        "marketdata": {
            **common,
            "QM_FEED": "synthetic",
            "QM_INSTRUMENTS": ",".join(instruments),
            "QM_FEED_RATE": str(rate),
            "QM_BAR_INTERVAL": "1s",
            "QM_VOLATILITY": "2",
            "QM_SEED": str(int(tag[:6], 16)),
            "QM_RECORDER": "on",
            "QM_REDIS_PREFIX": redis_prefix,
        },
        "signals": {**common, "QM_STRATEGIES": json.dumps(strategies)},
        "risk": {**common, "QM_RISK_LIMITS": "{}"},
        "oms": common,
        "execution": {**common, "QM_VENUE": "SIM"},
        "portfolio": {
            **common,
            "QM_STARTING_CASH": '{"USDT": "100000"}',
            "QM_SNAPSHOT_INTERVAL_S": "1",
        },
    }


@dataclass
class Stage:
    """One stage's process, its health port and its log."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode()


def start_stage(name: str, env: dict[str, str], log_dir: Path) -> Stage:
    exe = shutil.which(f"quantmesh-{name}", path=str(BIN))
    if exe is None:
        raise SystemExit(f"quantmesh-{name} is not installed in {BIN}")
    port = _free_port()
    full = {**os.environ, **env, "QM_HTTP_PORT": str(port), "QM_HTTP_HOST": "127.0.0.1"}
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        # Own session: a Ctrl-C reaches only this script, which then stops the stages in order.
        proc = subprocess.Popen(
            [exe], env=full, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Stage(name, proc, port, log)


def wait_ready(stages: list[Stage], timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    pending = list(stages)
    while pending:
        for stage in list(pending):
            if not stage.alive():
                raise SystemExit(f"{stage.name} exited {stage.proc.returncode}:\n{stage.tail()}")
            with contextlib.suppress(OSError):
                if stage.get("/readyz", timeout=2)[0] == 200:
                    pending.remove(stage)
        if time.monotonic() > deadline:
            raise SystemExit(f"not ready in {timeout:.0f} s: {[s.name for s in pending]}")
        time.sleep(0.3)


def stop_stages(stages: list[Stage], timeout: float = STOP_TIMEOUT_S) -> dict[str, int]:
    """SIGTERM marketdata first (no new input), then the rest; kill what outlives `timeout`."""
    codes: dict[str, int] = {}
    feed = [s for s in stages if s.name == "marketdata"]
    for group in (feed, [s for s in stages if s.name != "marketdata"]):
        for stage in group:
            if stage.alive():
                with contextlib.suppress(ProcessLookupError):
                    stage.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for stage in group:
            try:
                codes[stage.name] = stage.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stage.proc.kill()
                stage.proc.wait()
                codes[stage.name] = -signal.SIGKILL
    return codes


# ------------------------------------------------------------------------ measuring --


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (/proc/<pid>/task/<tid>/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
    return found


def memory_mb(pid: int) -> tuple[float, float] | None:
    """(VmRSS, RssAnon) in MB of the process tree of `pid`; None once it is gone."""
    rss = anon = 0
    seen = False
    for member in _tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
                seen = True
            elif line.startswith("RssAnon:"):
                anon += int(line.split()[1])
    return (rss / 1024, anon / 1024) if seen else None


def scrape(stage: Stage) -> dict[str, float]:
    """Bus counters of the stage's /metrics: consumed and produced totals, lag, per topic."""
    out: dict[str, float] = {}
    try:
        _, text = stage.get("/metrics", timeout=10)
    except OSError:
        return out
    families = {
        "quantmesh_bus_messages_consumed_total": "consumed",
        "quantmesh_bus_messages_produced_total": "produced",
        "quantmesh_bus_consumer_lag": "lag",
    }
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        kind = families.get(name)
        if kind is None or "topic=" not in rest:
            continue
        topic = rest.split('topic="', 1)[1].split('"', 1)[0]
        value = float(line.rsplit(" ", 1)[1])
        out[kind] = out.get(kind, 0.0) + value
        out[f"{kind}:{topic}"] = out.get(f"{kind}:{topic}", 0.0) + value
    return out


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope of (t, y) and its standard error (nan below three points)."""
    n = len(points)
    if n < 3:
        return float("nan"), float("nan")
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    stt = sum((t - mean_t) ** 2 for t, _ in points)
    if stt == 0:
        return float("nan"), float("nan")
    slope = sum((t - mean_t) * (y - mean_y) for t, y in points) / stt
    intercept = mean_y - slope * mean_t
    residual = sum((y - intercept - slope * t) ** 2 for t, y in points)
    return slope, (residual / (n - 2) / stt) ** 0.5


@dataclass
class Series:
    """One stage's samples: (seconds since the feed started, VmRSS MB, RssAnon MB)."""

    samples: list[tuple[float, float, float]] = field(default_factory=list)

    def downsampled(self, points: int = 40) -> list[list[float]]:
        """At most about `points` samples as [s, VmRSS MB, RssAnon MB], the last one included."""
        step = max(1, len(self.samples) // points)
        kept = self.samples[::step]
        if kept[-1] is not self.samples[-1]:
            kept.append(self.samples[-1])
        return [[round(t), round(rss, 1), round(anon, 1)] for t, rss, anon in kept]

    def summary(self, warmup: float, limit_mb: float) -> dict[str, Any]:
        if not self.samples:
            return {"samples": 0}
        window = [s for s in self.samples if s[0] >= warmup]
        minutes = (window[-1][0] - window[0][0]) / 60 if len(window) > 1 else 0.0
        rss_slope, rss_err = fit([(t / 60, rss) for t, rss, _ in window])
        anon_slope, anon_err = fit([(t / 60, anon) for t, _, anon in window])
        threshold = NOISE_MB / minutes if minutes else float("nan")
        peak = max(rss for _, rss, _ in self.samples)
        growing = not anon_slope < threshold  # nan (too few samples) is not a pass
        return {
            "rss_mb": {
                "start": round(self.samples[0][1], 1),
                "after_warmup": round(window[0][1], 1) if window else None,
                "peak": round(peak, 1),
                "end": round(self.samples[-1][1], 1),
            },
            "anon_mb": {
                "start": round(self.samples[0][2], 1),
                "after_warmup": round(window[0][2], 1) if window else None,
                "end": round(self.samples[-1][2], 1),
            },
            "slope_mb_per_min": round(rss_slope, 3),
            "slope_stderr": round(rss_err, 3),
            "anon_slope_mb_per_min": round(anon_slope, 3),
            "anon_slope_stderr": round(anon_err, 3),
            "fit_minutes": round(minutes, 2),
            "fitted_growth_mb": round(anon_slope * minutes, 2),
            "fit_samples": len(window),
            "slope_threshold_mb_per_min": round(threshold, 3),
            "under_limit": peak < limit_mb,
            "not_growing": not growing,
            "pass": peak < limit_mb and not growing,
        }


@contextlib.contextmanager
def redis_keys_removed(url: str, prefix: str) -> Iterator[None]:
    """Delete the recorder's keys under `prefix` afterwards (the shared Redis keeps no junk)."""
    try:
        yield
    finally:
        import redis  # the recorder's client library; only needed for this clean-up

        with contextlib.suppress(redis.RedisError), redis.Redis.from_url(url) as client:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start : start + 500])


def measure(
    stages: list[Stage], duration: float, interval: float, started: float
) -> dict[str, Series]:
    """Sample every stage's memory until `duration` s after `started`; stop if one dies."""
    series = {s.name: Series() for s in stages}
    next_at = started
    while True:
        now = time.monotonic()
        for stage in stages:
            if not stage.alive():
                raise SystemExit(
                    f"{stage.name} exited {stage.proc.returncode} during the run:\n{stage.tail()}"
                )
            mem = memory_mb(stage.proc.pid)
            if mem is not None:
                series[stage.name].samples.append((now - started, *mem))
        if now - started >= duration:
            return series
        next_at += interval
        time.sleep(max(0.0, min(next_at, started + duration) - time.monotonic()))


def main() -> None:
    """Run the mesh, sample its memory, stop it, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of feed")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds left out of the fit (default: min(60, duration/3))",
    )
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--instruments", type=int, default=10)
    parser.add_argument("--rate", type=float, default=200.0, help="ticks/s per instrument asked")
    parser.add_argument("--limit-mb", type=float, default=MAX_RSS_MB)
    parser.add_argument(
        "--shared", action="store_true", help="use the stack of QM_* (see the docstring)"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the stages' logs")
    parser.add_argument(
        "--series", action="store_true", help="add each stage's samples (about 40) to the output"
    )
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else min(60.0, args.duration / 3)
    if not 0 <= warmup < args.duration:
        raise SystemExit("--warmup must be at least 0 and below --duration")

    signal.signal(signal.SIGTERM, _on_sigterm)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-rss-"))
    try:
        out = run(args, warmup, log_dir)
    except BaseException:
        sys.stderr.write(f"bench_rss: failed; the stages' and stack's logs are in {log_dir}\n")
        raise
    if not args.keep_logs:
        shutil.rmtree(log_dir, ignore_errors=True)
    sys.stdout.write(json.dumps(out) + "\n")


def run(args: argparse.Namespace, warmup: float, log_dir: Path) -> dict[str, Any]:
    """Start the stack and the stages, sample, stop everything; return the JSON object."""
    tag = uuid.uuid4().hex[:10]
    instruments = [f"RSS{i}{tag[:6].upper()}-USDT.SIM" for i in range(args.instruments)]
    redis_prefix = f"qm:bench-rss-{tag}:"
    stages: list[Stage] = []
    codes: dict[str, int] = {}
    began = time.monotonic()
    stack = Stack.shared() if args.shared else Stack.private(log_dir)
    try:
        stack_s = time.monotonic() - began
        if args.shared:
            wait_groups_free(stack.bootstrap, timeout=60)
        ensure_topics(stack.bootstrap, registry())
        # Both stacks come from stack.sh, which creates the test database beside the main one.
        server = with_database(stack.database_url, TEST_DATABASE)
        with (
            fresh_schema(server, "qm_bench_rss", migrate=True) as dsn,
            redis_keys_removed(stack.redis_url, redis_prefix),
        ):
            env = stage_env(stack, dsn, redis_prefix, instruments, args.rate, tag)
            try:
                for name in STAGES[:-1]:
                    stages.append(start_stage(name, env[name], log_dir))
                wait_ready(stages)
                stages.append(start_stage("marketdata", env["marketdata"], log_dir))
                wait_ready(stages[-1:])
                started = time.monotonic()
                first = {s.name: scrape(s) for s in stages}
                series = measure(stages, args.duration, args.interval, started)
                last = {s.name: scrape(s) for s in stages}
                elapsed = time.monotonic() - started
            finally:
                codes = stop_stages(stages)
    finally:
        stack.close(log_dir)

    per_stage: dict[str, Any] = {}
    for stage in stages:
        before, after = first[stage.name], last[stage.name]
        consumed = after.get("consumed", 0.0)
        per_stage[stage.name] = {
            **series[stage.name].summary(warmup, args.limit_mb),
            "messages_consumed": int(consumed),
            "consumed_per_s": round((consumed - before.get("consumed", 0.0)) / elapsed),
            "messages_produced": int(after.get("produced", 0.0)),
            "consumer_lag_at_end": int(after.get("lag", 0.0)),
            "exit_code": codes.get(stage.name),
        }
        if args.series:
            per_stage[stage.name]["series_s_rss_anon"] = series[stage.name].downsampled()
    ticks = last["marketdata"].get(f"produced:{Topic.MD_TICKS}", 0.0)
    flow = {
        "bars": last["marketdata"].get(f"produced:{Topic.MD_BARS}", 0.0),
        "intents": last["signals"].get(f"produced:{Topic.ORDERS_INTENTS}", 0.0),
        "orders_approved": last["risk"].get(f"produced:{Topic.ORDERS_APPROVED}", 0.0),
        "exec_reports": last["execution"].get(f"produced:{Topic.EXEC_REPORTS}", 0.0),
        "portfolio_updates": last["portfolio"].get(f"produced:{Topic.PORTFOLIO_UPDATES}", 0.0),
    }
    return {
        "benchmark": "rss_processes_kafka",
        "duration_s": args.duration,
        "warmup_s": warmup,
        "interval_s": args.interval,
        "stack": "shared" if args.shared else "private",
        "stack_start_s": round(stack_s, 1),
        "instruments": args.instruments,
        "feed_rate_asked_per_s": args.rate * args.instruments,
        "ticks_published": int(ticks),
        "ticks_published_per_s": round(ticks / elapsed),
        # Below 1 when the feed cannot keep the asked rate: event time (and bars) run slower.
        "event_time_speed": round(ticks / elapsed / (args.rate * args.instruments), 2),
        "messages_published": {k: int(v) for k, v in flow.items()},
        "stages": per_stage,
        "targets": {
            "rss_mb_below": args.limit_mb,
            "growth_mb_over_fit_window_below": NOISE_MB,
        },
        "pass": all(s.get("pass", False) for s in per_stage.values()),
        "logs": str(log_dir) if args.keep_logs else None,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


if __name__ == "__main__":
    main()
