"""Latency of a chain of bus relays on the local broker, transactional or not; prints JSON.

What the order path costs the bus alone: risk -> oms -> execution is three consume-transform-
produce hops, each its own process. Here each hop is a process whose handler only re-emits the
event to the next topic, so the figures are the bus's cycle (fetch, hand to the event loop,
handle, produce, send offsets, commit, the next reader's fetch) without any stage's work.
A source publishes Ticks at a fixed rate; the last topic's reader measures now - ts_event,
which every hop carries over. Run with the stack up:

    python bench/bench_txn_chain.py [--hops 3] [--rate 100] [--seconds 10] [--mode txn|plain|both]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from typing import Any

from quantmesh_common.bus.base import Emit
from quantmesh_common.bus.kafka import BATCH_PHASE_SECONDS_NAME, METRICS, KafkaBus, ensure_topics
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import Tick
from quantmesh_common.testing import stubs
from quantmesh_common.topics import TopicRegistry, TopicSpec

PARTITIONS = 6
WARMUP_S = 3.0


def _registry(prefix: str, hops: int) -> TopicRegistry:
    return TopicRegistry(
        [TopicSpec(f"{prefix}.{i}", Tick, "instrument_id", PARTITIONS) for i in range(hops + 1)]
    )


def _pairs(items: list[str]) -> dict[str, Any]:
    """librdkafka settings from `name=value` arguments (numbers as ints)."""
    out: dict[str, Any] = {}
    for item in items:
        name, _, value = item.partition("=")
        out[name] = int(value) if value.lstrip("-").isdigit() else value
    return out


async def _hop(
    bootstrap: str, prefix: str, hops: int, index: int, transactional: bool, conf: dict[str, Any]
) -> None:
    """Relay topic `index` to topic `index + 1` until SIGTERM."""
    registry = _registry(prefix, hops)
    bus = KafkaBus(f"bench-hop{index}", bootstrap, registry, **conf)
    await bus.start()
    out = f"{prefix}.{index + 1}"

    def relay(envelope: Envelope[Any]) -> list[Emit]:
        return [Emit(out, envelope.payload, ts_event=envelope.ts_event)]

    sub = bus.subscribe(
        f"{prefix}.hop{index}", [f"{prefix}.{index}"], relay, transactional=transactional
    )
    await sub.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await sub.stop()
    await bus.close()
    print(json.dumps(_phases()), flush=True)


def _phases() -> dict[str, Any]:
    """This process's batch cycles: how many, and the mean of each phase in ms."""
    out: dict[str, Any] = {}
    for family in METRICS.collect():
        if family.name != BATCH_PHASE_SECONDS_NAME:
            continue
        sums = {s.labels["phase"]: s.value for s in family.samples if s.name.endswith("_sum")}
        counts = {s.labels["phase"]: s.value for s in family.samples if s.name.endswith("_count")}
        for phase, count in counts.items():
            out[f"{phase}_mean_ms"] = round(sums[phase] / count * 1000, 2) if count else 0.0
        out["batches"] = int(counts.get("handle", 0))
    return out


def _summary(values_ns: list[int]) -> dict[str, float]:
    ms = sorted(v / 1e6 for v in values_ns)
    if not ms:
        return {"count": 0}

    def pct(q: float) -> float:
        return round(ms[min(len(ms) - 1, int(q * len(ms)))], 2)

    return {
        "count": len(ms),
        "p50_ms": pct(0.5),
        "p90_ms": pct(0.9),
        "p99_ms": pct(0.99),
        "max_ms": round(ms[-1], 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


async def _measure(
    bootstrap: str, prefix: str, hops: int, rate: float, seconds: float, conf: dict[str, Any]
) -> dict[str, Any]:
    registry = _registry(prefix, hops)
    bus = KafkaBus("bench-chain", bootstrap, registry, **conf)
    await bus.start()
    latencies: list[int] = []
    measuring = False
    expected = -1
    all_in = asyncio.Event()

    def sink(envelope: Envelope[Any]) -> None:
        if measuring:
            latencies.append(time.time_ns() - envelope.ts_event)
            if len(latencies) == expected:
                all_in.set()

    sub = bus.subscribe(f"{prefix}.sink", [f"{prefix}.{hops}"], sink)
    await sub.start()
    loop = asyncio.get_running_loop()
    ticks = [
        stubs.tick(instrument_id=f"I{i}-USDT.SIM", price=Decimal("64123.45")) for i in range(24)
    ]

    async def send(duration: float) -> int:
        start = loop.time()
        n = 0
        while loop.time() - start < duration:
            delay = start + n / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await bus.publish(f"{prefix}.0", ticks[n % len(ticks)], ts_event=time.time_ns())
            n += 1
        return n

    await send(WARMUP_S)
    await asyncio.sleep(2.0)
    measuring = True
    sent = expected = await send(seconds)
    if len(latencies) < sent:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), 30)
    await sub.stop()
    await bus.close()
    return {"sent": sent, **_summary(latencies)}


def _bus_options(producer: list[str], consumer: list[str]) -> dict[str, Any]:
    return {"producer_config": _pairs(producer), "consumer_config": _pairs(consumer)}


def _run_chain(
    bootstrap: str,
    hops: int,
    rate: float,
    seconds: float,
    txn: bool,
    producer: list[str],
    consumer: list[str],
) -> dict[str, Any]:
    prefix = f"bench.chain.{uuid.uuid4().hex[:8]}"
    settings = [a for p in producer for a in ("--producer", p)]
    settings += [a for c in consumer for a in ("--consumer", c)]
    ensure_topics(bootstrap, _registry(prefix, hops))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--hop", str(i), "--prefix", prefix, "--hops", str(hops)]
            + (["--plain"] if not txn else [])
            + ["--bootstrap", bootstrap]
            + settings,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(hops)
    ]
    result: dict[str, Any] = {}
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a hop did not start")
        started = time.process_time()
        conf = _bus_options(producer, consumer)
        result.update(asyncio.run(_measure(bootstrap, prefix, hops, rate, seconds, conf)))
        result["bench_process_cpu_s"] = round(time.process_time() - started, 2)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        phases = []
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=60)
                phases.append(json.loads(out.strip().splitlines()[-1]) if out.strip() else None)
            except subprocess.TimeoutExpired:
                proc.kill()
        result["hop_phases"] = phases
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hops", type=int, default=3)
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--mode", choices=("txn", "plain", "both"), default="both")
    parser.add_argument(
        "--bootstrap", default=os.environ.get("QM_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
    )
    parser.add_argument(
        "--producer", action="append", default=[], help="librdkafka producer name=value"
    )
    parser.add_argument(
        "--consumer", action="append", default=[], help="librdkafka consumer name=value"
    )
    parser.add_argument("--hop", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hop is not None:
        conf = _bus_options(args.producer, args.consumer)
        asyncio.run(_hop(args.bootstrap, args.prefix, args.hops, args.hop, not args.plain, conf))
        return
    load_before = os.getloadavg()[0]
    out: dict[str, Any] = {
        "bench": "txn_chain",
        "hops": args.hops,
        "rate_per_s": args.rate,
        "seconds": args.seconds,
        "python": platform.python_version(),
        "producer": args.producer,
        "consumer": args.consumer,
    }
    modes = ("txn", "plain") if args.mode == "both" else (args.mode,)
    for mode in modes:
        out[mode] = _run_chain(
            args.bootstrap,
            args.hops,
            args.rate,
            args.seconds,
            mode == "txn",
            args.producer,
            args.consumer,
        )
    out["load_avg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
