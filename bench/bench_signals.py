"""Benchmark of the signals stage; prints one JSON object.

One instance running three strategies (sma_cross, rsi_reversion, bollinger_breakout), each on
the same ten instruments:

- handler throughput in process (no bus): ticks/s and bars/s through `SignalsService.on_event`,
  envelopes decoded beforehand;
- throughput over the real Kafka bus: ticks published first, then one service instance started
  and timed from its first to its last handled tick (fetch, decode, handle, commit);
- tick-to-intent latency on the real broker at a fixed rate (default 1,000 ticks/s): the
  built-in strategies trade on bar closes, so a fourth strategy made here (`tick_flip`, buys
  then sells on alternate ticks) turns each tick into an intent; latency = intent received by a
  consumer - tick handed to the producer, p50/p99, with the signals instance in its own process
  and the run split at the handler; once with the bus's producer defaults (linger.ms 2) and once
  with linger.ms 0 in both producers.

Targets (issue 3): 50,000 ticks/s; p99 < 5 ms.
Usage: `python bench/bench_signals.py [--ticks 200000] [--kafka-ticks 100000] [--rate 1000]
[--seconds 10] [--profile]` with the stack up (the Kafka parts are skipped without it).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import multiprocessing
import os
import platform
import pstats
import random
import threading
import time
import uuid
from decimal import Decimal
from typing import Any

from confluent_kafka import Consumer

from quantmesh_common.bus.base import EnvelopeStamping
from quantmesh_common.bus.kafka import KafkaBus, ensure_topics
from quantmesh_common.clock import WallClock
from quantmesh_common.envelope import Envelope, decode, encode
from quantmesh_common.messages import Bar, OrderIntent, Tick
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.testing import stubs
from quantmesh_common.testing.kafka import delete_topics, plain_relay
from quantmesh_common.topics import Topic, registry
from quantmesh_signals.config import SignalsSettings
from quantmesh_signals.engine import StrategyHost, StrategySpec
from quantmesh_signals.service import SignalsService
from quantmesh_signals.strategy import Strategy, StrategyContext, StrategyParams

INSTRUMENTS = [f"I{i}-USDT.SIM" for i in range(10)]
MINUTE = 60 * stubs.SECOND_NS
STRATEGIES: list[dict[str, Any]] = [
    {
        "id": "sma",
        "name": "sma_cross",
        "account_id": "bench",
        "instruments": INSTRUMENTS,
        "params": {"fast": 10, "slow": 30},
    },
    {
        "id": "rsi",
        "name": "rsi_reversion",
        "account_id": "bench",
        "instruments": INSTRUMENTS,
        "params": {"period": 14},
    },
    {
        "id": "boll",
        "name": "bollinger_breakout",
        "account_id": "bench",
        "instruments": INSTRUMENTS,
        "params": {"period": 20, "k": 2.0},
    },
]
TOPICS = (
    Topic.MD_BARS,
    Topic.MD_TICKS,
    Topic.EXEC_REPORTS,
    Topic.CONTROL,
    Topic.SIGNALS,
    Topic.ORDERS_INTENTS,
    Topic.SIGNALS_JOINT_BARS,
    Topic.SIGNALS_JOINT_TICKS,
)


class TickFlip(Strategy[StrategyParams]):
    """Latency probe: on every tick, buy 1 then sell 1 ... (one intent per tick)."""

    def on_start(self, ctx: StrategyContext) -> None:
        self._long: set[str] = set()

    def on_tick(self, tick: Tick, ctx: StrategyContext) -> None:
        instrument = tick.instrument_id
        if instrument in self._long:
            self._long.discard(instrument)
            ctx.sell(instrument, 1, tag="tick_flip")
        else:
            self._long.add(instrument)
            ctx.buy(instrument, 1, tag="tick_flip")


def _ticks(count: int, seed: int = 1) -> list[Tick]:
    rng = random.Random(seed)
    prices = dict.fromkeys(INSTRUMENTS, 100.0)
    out = []
    for n in range(count):
        instrument = INSTRUMENTS[n % len(INSTRUMENTS)]
        prices[instrument] *= 1 + rng.gauss(0, 0.001)
        out.append(
            stubs.tick(
                instrument_id=instrument,
                price=Decimal(f"{prices[instrument]:.2f}"),
                trade_id=f"T{n}",
                ts_event=stubs.TS + n * 1_000_000,
            )
        )
    return out


def _bars(count: int) -> list[Bar]:
    rng = random.Random(2)
    prices = dict.fromkeys(INSTRUMENTS, 100.0)
    out = []
    for n in range(count):
        instrument = INSTRUMENTS[n % len(INSTRUMENTS)]
        step = n // len(INSTRUMENTS)
        prices[instrument] *= 1 + rng.gauss(0, 0.01)
        close = Decimal(f"{prices[instrument]:.2f}")
        out.append(
            stubs.bar(
                instrument_id=instrument,
                open=close,
                high=close,
                low=close,
                close=close,
                ts_open=stubs.TS + step * MINUTE,
                ts_close=stubs.TS + (step + 1) * MINUTE,
            )
        )
    return out


def _service(**extra: Any) -> SignalsService:
    settings = SignalsSettings(
        bus="memory", http_host="127.0.0.1", http_port=0, strategies=json.dumps(STRATEGIES), **extra
    )
    service = SignalsService(settings)
    service.engine.start(stubs.TS)
    return service


def handler_rate(events: list[Tick] | list[Bar], profile: bool) -> dict[str, Any]:
    """Messages/s through on_event, envelopes decoded beforehand (as the bus hands them)."""
    stamp = EnvelopeStamping()
    stamp.source, stamp.clock = "bench", WallClock()
    envelopes = [decode(encode(stamp.wrap(e))) for e in events]
    service = _service()
    emitted = 0
    profiler = cProfile.Profile() if profile else None
    gc.collect()
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    for envelope in envelopes:
        emitted += len(service.on_event(envelope))
    if profiler:
        profiler.disable()
    elapsed = time.perf_counter() - start
    result: dict[str, Any] = {
        "messages": len(envelopes),
        "emitted": emitted,
        "elapsed_s": round(elapsed, 3),
        "per_s": round(len(envelopes) / elapsed),
    }
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
        result["profile_top"] = text.getvalue().splitlines()[:40]
    return result


class _Namespace:
    """Topics of one run under a fresh prefix, deleted afterwards."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.prefix = f"bench.sig.{uuid.uuid4().hex[:8]}."
        self.topics = registry().prefixed(self.prefix, TOPICS)
        ensure_topics(bootstrap, self.topics)

    def settings(self, instance: str) -> SignalsSettings:
        return self.settings_for(self.bootstrap, self.prefix, instance)

    @staticmethod
    def settings_for(bootstrap: str, prefix: str, instance: str) -> SignalsSettings:
        return SignalsSettings(
            bus="kafka",
            kafka_bootstrap=bootstrap,
            http_host="127.0.0.1",
            http_port=0,
            strategies=json.dumps(STRATEGIES),
            signals_group=prefix + "signals",
            signals_instance=instance,
            signals_topic_prefix=prefix,
        )

    def delete(self) -> None:
        delete_topics(self.bootstrap, self.topics.all_topic_names())


class _CountingService(SignalsService):
    """The service, noting when it handled its first and its n-th tick."""

    def __init__(self, settings: SignalsSettings, expected: int) -> None:
        super().__init__(settings)
        self.expected = expected
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.done = threading.Event()

    cpu_first = 0.0
    cpu_last = 0.0

    def on_event(self, envelope: Envelope[Any]) -> list[Any]:
        if self.count == 0:
            self.first = time.perf_counter()
            self.cpu_first = time.process_time()
        out = super().on_event(envelope)
        self.count += 1
        if self.count >= self.expected:
            self.last = time.perf_counter()
            self.cpu_last = time.process_time()
            self.done.set()
        return out


def _handler_split(path: str) -> dict[str, Any]:
    """The profiled event loop's time, the stage's handler (on_event) share of it, and the
    ten functions with the most time of their own."""
    stats = pstats.Stats(path)
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    handler = sum(
        row[3]
        for (filename, _, function), row in table.items()
        if function == "on_event" and filename.endswith("quantmesh_signals/service.py")
    )
    total = stats.total_tt  # type: ignore[attr-defined]
    text = io.StringIO()
    pstats.Stats(path, stream=text).sort_stats("tottime").print_stats(10)
    return {
        "file": path,
        "profiled_s": round(total, 3),
        "handler_s": round(handler, 3),
        "handler_share": round(handler / total, 3) if total else None,
        "top": [line for line in text.getvalue().splitlines() if line.strip()][-11:],
    }


async def kafka_rate(bootstrap: str, count: int, profile: str | None = None) -> dict[str, Any]:
    """Ticks/s through one service instance on the real broker (ticks published beforehand).

    Also the process's CPU per tick over the same span (event loop and the client's threads;
    on the shared machine the steadier figure) and, with `profile`, a cProfile of the event
    loop's thread into that file with the handler's share (`on_event`) of it.
    """
    ns = _Namespace(bootstrap)
    try:
        bus = KafkaBus("bench", bootstrap, registry=ns.topics)
        await bus.start()
        for tick in _ticks(count):
            await bus.publish(ns.prefix + Topic.MD_TICKS, tick)
        await bus.flush()
        await bus.close()
        settings = ns.settings("rate")
        service = _CountingService(settings, count)
        runner = ServiceRunner(service, settings)
        profiler = cProfile.Profile() if profile else None
        load_before = _loadavg()
        await runner.start()
        try:
            if profiler is not None:
                profiler.enable()
            ok = await asyncio.get_running_loop().run_in_executor(None, service.done.wait, 120)
        finally:
            if profiler is not None:
                profiler.disable()
            await runner.stop()
        elapsed = service.last - service.first
        cpu = service.cpu_last - service.cpu_first
        result: dict[str, Any] = {
            "ticks": count,
            "handled": service.count,
            "completed": ok,
            "elapsed_s": round(elapsed, 3),
            "ticks_per_s": round(service.count / elapsed) if elapsed > 0 else None,
            "cpu_s": round(cpu, 3),
            "cpu_us_per_tick": round(cpu / service.count * 1e6, 2) if service.count else None,
            "loadavg_before": load_before,
            "loadavg_after": _loadavg(),
        }
        if profiler is not None and profile:
            profiler.dump_stats(profile)
            result["profile"] = _handler_split(profile)
        return result
    finally:
        ns.delete()


class _StampingService(SignalsService):
    """The service with the latency probe added, noting when each tick reached its handler."""

    def __init__(self, settings: SignalsSettings) -> None:
        super().__init__(settings)
        probe = StrategySpec(
            id="flip", name="tick_flip", account_id="bench", instruments=INSTRUMENTS
        )
        hosts = [*self.engine.hosts.values(), StrategyHost(probe, TickFlip())]
        self.engine = type(self.engine)(hosts, route_joint=True)
        self.handled: dict[int, float] = {}

    def on_event(self, envelope: Envelope[Any]) -> list[Any]:
        self.handled[envelope.payload.ts_event] = time.perf_counter()
        return super().on_event(envelope)


def _serve_latency(
    bootstrap: str,
    prefix: str,
    producer_config: dict[str, Any] | None,
    ready: Any,
    stop: Any,
    stamps: Any,
) -> None:
    """The signals instance of the latency run, in its own process (as it is deployed)."""

    async def serve() -> None:
        settings = _Namespace.settings_for(bootstrap, prefix, "latency")
        service = _StampingService(settings)
        bus = None
        if producer_config is not None:
            bus = KafkaBus(
                "signals",
                bootstrap,
                producer_config=producer_config,
                batch_size=settings.consumer_batch_size,
            )
        runner = ServiceRunner(service, settings, bus=bus)
        await runner.start()
        pauses = _GcPauses()
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait, 300)
        pauses.close()
        await runner.stop()
        if bus is not None:
            await bus.close()
        stamps.put((service.handled, pauses.pauses))

    asyncio.run(serve())


def _serve_raw_relay(
    bootstrap: str,
    prefix: str,
    producer_config: dict[str, Any] | None,
    ready: Any,
    stop: Any,
    stamps: Any,
) -> None:
    """The yardstick for `_serve_latency`: plain confluent-kafka, each tick's bytes passed on
    to the intents topic unread, in the same process layout. What the broker, the client and
    this host allow two hops to cost, with no stage, envelope or bus in between."""
    pauses = _GcPauses()
    plain_relay(
        bootstrap,
        prefix + Topic.MD_TICKS,
        prefix + Topic.ORDERS_INTENTS,
        ready,
        stop,
        producer_config,
    )
    pauses.close()
    stamps.put(({}, pauses.pauses))


class _GcPauses:
    """Notes the garbage collector's pauses of 1 ms or more: (perf_counter at start, gen, ms)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int, float]] = []
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started = now
        elif now - self._started >= 0.001:
            self.pauses.append((self._started, info["generation"], (now - self._started) * 1000))

    def close(self) -> None:
        gc.callbacks.remove(self._on_gc)


def _slow_bursts(
    sent: dict[int, float], latency_ms: dict[int, float], start: float, over_ms: float = 20.0
) -> list[dict[str, float]]:
    """Runs of ticks slower than `over_ms`, by send time: when (s into the run), how many, worst."""
    bursts: list[dict[str, float]] = []
    for key, sent_at in sorted(sent.items(), key=lambda item: item[1]):
        ms = latency_ms.get(key)
        if ms is None or ms < over_ms:
            continue
        at = sent_at - start
        if bursts and at - bursts[-1]["last_s"] < 0.05:
            burst = bursts[-1]
            burst["ticks"] += 1
            burst["last_s"] = round(at, 3)
            burst["worst_ms"] = max(burst["worst_ms"], round(ms, 1))
        else:
            bursts.append(
                {"at_s": round(at, 3), "last_s": round(at, 3), "ticks": 1, "worst_ms": round(ms, 1)}
            )
    return bursts


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {
        "p50_ms": round(ordered[len(ordered) // 2], 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
        "max_ms": round(ordered[-1], 3),
    }


async def kafka_latency(
    bootstrap: str,
    rate: int,
    seconds: float,
    producer_config: dict[str, Any] | None = None,
    *,
    raw_relay: bool = False,
) -> dict[str, Any]:
    """p50/p99 of tick published -> intent consumed, at `rate` ticks/s for `seconds`.

    Three processes' worth of work, as deployed: the signals instance runs in a child process;
    this process publishes the ticks (a KafkaBus, as marketdata does) and reads the intents on
    a thread that polls (returning as soon as one message is there: a `consume(n, timeout)`
    would wait for n messages or the whole timeout and add that wait to every figure).
    CLOCK_MONOTONIC (perf_counter) is one clock for both processes, so the run is also split
    into tick -> handler (publisher, broker, the service's consumer) and handler -> reader
    (the intent's producer, broker, the reader). `producer_config` overrides the bus's
    producer defaults in both the publisher and the service (e.g. linger.ms). `raw_relay`
    puts `_serve_raw_relay` where the signals instance was: the same hops with no stage.
    """
    wanted: type[Tick] | type[OrderIntent] = Tick if raw_relay else OrderIntent
    ns = _Namespace(bootstrap)
    received: dict[int, float] = {}
    stop = threading.Event()
    intents_topic = ns.prefix + Topic.ORDERS_INTENTS

    def consume() -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"{ns.prefix}latency",
                "auto.offset.reset": "latest",
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 1,
            }
        )
        consumer.subscribe([intents_topic])
        try:
            while not stop.is_set():
                first = consumer.poll(0.05)
                if first is None:
                    continue
                messages = [first, *consumer.consume(1000, 0)]
                now = time.perf_counter()
                for msg in messages:
                    if msg.error() is None:
                        payload = decode(msg.value() or b"").payload
                        if isinstance(payload, wanted):
                            received.setdefault(payload.ts_event, now)
        finally:
            consumer.close()

    ctx = multiprocessing.get_context("spawn")
    ready, child_stop, stamps = ctx.Event(), ctx.Event(), ctx.Queue()
    child = ctx.Process(
        target=_serve_raw_relay if raw_relay else _serve_latency,
        args=(bootstrap, ns.prefix, producer_config, ready, child_stop, stamps),
        daemon=True,
    )
    try:
        child.start()
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, ready.wait, 120):
            return {"error": "the signals process did not start"}
        reader = threading.Thread(target=consume, daemon=True)
        reader.start()
        bus = KafkaBus("bench", bootstrap, registry=ns.topics, producer_config=producer_config)
        await bus.start()
        sent: dict[int, float] = {}
        total = int(rate * seconds)
        ticks = _ticks(total + 1000, seed=3)
        warmup = 1000  # connections, group joins, first fetches
        await asyncio.sleep(3.0)  # the reader joins its group (latest offsets) before sending
        load_before = _loadavg()
        # As the stages do after their setup (marketdata, which this process stands in for).
        gc.collect()
        gc.freeze()
        own_pauses = _GcPauses()
        start = time.perf_counter()
        started_at = time.time()  # to line the bursts up with the broker's log
        for n, tick in enumerate(ticks):
            due = start + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if n >= warmup:
                sent[tick.ts_event] = time.perf_counter()
            await bus.publish(ns.prefix + Topic.MD_TICKS, tick)
        await bus.flush()
        # The reader runs on its own thread: give it up to 30 s to see the last intents.
        await loop.run_in_executor(
            None, _wait_for, lambda: len(received.keys() & sent.keys()) >= len(sent), 30.0
        )
        load_after = _loadavg()
        stop.set()
        reader.join(10)
        await bus.close()
        child_stop.set()
        own_pauses.close()
        handled, child_pauses = await loop.run_in_executor(None, stamps.get, True, 120)
        child.join(30)
        latency_ms = {k: (received[k] - t) * 1000 for k, t in sent.items() if k in received}
        total_ms = list(latency_ms.values())
        if not total_ms:
            return {"error": "no intent received"}

        def gc_summary(pauses: list[tuple[float, int, float]]) -> list[list[float]]:
            # [s into the run, generation, ms] of the pauses while ticks were sent.
            return [
                [round(at - start, 3), gen, round(ms, 1)] for at, gen, ms in pauses if at >= start
            ]

        return {
            "rate_ticks_per_s": rate,
            "relay": "raw confluent-kafka" if raw_relay else "signals instance",
            "producer_config": producer_config or "bus defaults",
            "ticks": len(sent),
            "intents_matched": len(total_ms),
            **_percentiles(total_ms),
            "tick_to_handler": _percentiles(
                [(handled[k] - t) * 1000 for k, t in sent.items() if k in handled]
            ),
            "handler_to_reader": _percentiles(
                [(received[k] - handled[k]) * 1000 for k in sent if k in received and k in handled]
            ),
            "started_at_unix_s": round(started_at, 3),
            "slow_bursts_over_20ms": _slow_bursts(sent, latency_ms, start),
            "gc_pauses_over_1ms": {
                "publisher_and_reader": gc_summary(own_pauses.pauses),
                "signals": gc_summary(child_pauses),
            },
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        }
    finally:
        if child.is_alive():
            child.kill()
        ns.delete()


def _loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def _wait_for(condition: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "benchmark": "signals",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "strategies": [s["name"] for s in STRATEGIES],
        "instruments": len(INSTRUMENTS),
        "handler": {
            "ticks": handler_rate(_ticks(args.ticks), args.profile),
            "bars": handler_rate(_bars(args.bars), args.profile),
        },
        "target_ticks_per_s": 50_000,
        "target_p99_ms": 5.0,
    }
    bootstrap = os.environ.get("QM_KAFKA_BOOTSTRAP")
    if not bootstrap:
        result["kafka"] = {"skipped": "QM_KAFKA_BOOTSTRAP is not set (make up)"}
        return result
    if args.only_latency:
        result["kafka"] = {
            "latency": await kafka_latency(bootstrap, args.rate, args.seconds),
            "latency_linger_0": await kafka_latency(
                bootstrap, args.rate, args.seconds, {"linger.ms": 0}
            ),
            "raw_relay": await kafka_latency(
                bootstrap, args.rate, args.seconds, {"linger.ms": 0}, raw_relay=True
            ),
        }
        return result
    result["kafka"] = {
        "throughput": await kafka_rate(bootstrap, args.kafka_ticks, args.profile_kafka),
    }
    if args.only_throughput:
        return result
    result["kafka"]["latency"] = await kafka_latency(bootstrap, args.rate, args.seconds)
    # The same run with the producers' batching delay off: what linger.ms costs per hop.
    result["kafka"]["latency_linger_0"] = await kafka_latency(
        bootstrap, args.rate, args.seconds, {"linger.ms": 0}
    )
    # The same hops through plain confluent-kafka: what this host and broker allow at best.
    result["kafka"]["raw_relay"] = await kafka_latency(
        bootstrap, args.rate, args.seconds, {"linger.ms": 0}, raw_relay=True
    )
    tp = result["kafka"]["throughput"].get("ticks_per_s") or 0
    p99 = result["kafka"]["latency"].get("p99_ms", float("inf"))
    result["targets_met"] = {
        "handler_ticks_per_s": result["handler"]["ticks"]["per_s"] >= 50_000,
        "kafka_ticks_per_s": tp >= 50_000,
        "p99_ms": p99 < 5.0,
    }
    return result


def main() -> None:
    """Parse the arguments, run, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ticks", type=int, default=200_000, help="ticks through the handler")
    parser.add_argument("--bars", type=int, default=50_000, help="bars through the handler")
    parser.add_argument("--kafka-ticks", type=int, default=100_000, help="ticks over Kafka")
    parser.add_argument("--rate", type=int, default=1_000, help="ticks/s of the latency run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the latency run")
    parser.add_argument("--profile", action="store_true", help="cProfile the handler runs")
    parser.add_argument(
        "--profile-kafka", metavar="FILE", help="cProfile the Kafka throughput run into FILE"
    )
    parser.add_argument(
        "--only-throughput", action="store_true", help="skip the Kafka latency runs"
    )
    parser.add_argument(
        "--only-latency", action="store_true", help="only the two Kafka latency runs"
    )
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
