"""Benchmark of the in-memory bus and the envelope codec; prints one JSON object."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import time
from decimal import Decimal
from typing import Any

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.envelope import Envelope, decode, encode
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic, registry


async def memory_bus_rate(n: int, batch: int) -> dict[str, float]:
    """Messages per second from publish through a trivial handler, in batches like a replay."""
    bus = InMemoryBus("bench", registry())
    seen = 0

    def handler(envelope: Envelope[Any]) -> None:
        nonlocal seen
        seen += 1

    await bus.subscribe("bench", [Topic.MD_TICKS], handler).start()
    envelopes = [bus.wrap(stubs.tick(instrument_id=f"I{i % 64}-USDT.SIM")) for i in range(batch)]
    keys = [e.payload.instrument_id for e in envelopes]
    pairs = list(zip(envelopes, keys, strict=True))
    append, drain, topic = bus.append, bus.run_until_idle, Topic.MD_TICKS
    gc.collect()
    start = time.perf_counter()
    for _ in range(n // batch):
        for envelope, key in pairs:
            append(topic, envelope, key)
        await drain()
    elapsed = time.perf_counter() - start
    assert seen == (n // batch) * batch
    return {"messages": seen, "elapsed_s": round(elapsed, 4), "msg_per_s": round(seen / elapsed)}


def codec_rate(envelope: Envelope[Any], n: int) -> dict[str, float]:
    """Encode and decode rates of one envelope."""
    raw = encode(envelope)
    start = time.perf_counter()
    for _ in range(n):
        encode(envelope)
    enc = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        decode(raw, envelope.schema_name)
    dec = time.perf_counter() - start
    assert decode(raw) == envelope
    return {"bytes": len(raw), "encode_per_s": round(n / enc), "decode_per_s": round(n / dec)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2_000_000, help="messages through the bus")
    parser.add_argument("--batch", type=int, default=1_000, help="messages appended per drain")
    parser.add_argument("--codec-n", type=int, default=100_000)
    args = parser.parse_args()
    bus = InMemoryBus("bench", registry())
    tick = bus.wrap(stubs.tick(price=Decimal("64123.45")))
    report = bus.wrap(stubs.execution_report())
    result = {
        "benchmark": "memory_bus_and_codec",
        "python": platform.python_version(),
        "memory_bus": asyncio.run(memory_bus_rate(args.n, args.batch)),
        "memory_bus_target_msg_per_s": 1_000_000,
        "codec_tick": codec_rate(tick, args.codec_n),
        "codec_execution_report": codec_rate(report, args.codec_n),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
