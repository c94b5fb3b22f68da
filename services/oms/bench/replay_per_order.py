"""The oms's CPU per order replayed alone: its handler and batch hook, PostgreSQL store.

A burst like bench/bench_orderflow.py's: `--orders` approved limit orders over 12 accounts,
then their venue's ACCEPTED reports, and a partial fill of every fourth, fed to a fresh
`OmsService` (the batched PostgreSQL store, as the service runs with QM_DATABASE_URL) in
batches of `--batch` messages, each followed by the batch hook (`flush`). Measured per order
(best and median of `--rounds`): the handler's CPU (`process_time` around `handle`), the batch
hook's client CPU, and the CPU of the PostgreSQL backend that ran the hook's statements
(/proc/<pid>/stat; the server runs on this machine). Also printed: a sha256 of every emitted
message and every stored row, so two versions of the code can be checked for the same output.

    set -a; . deploy/local/.stack/env; set +a
    flock /tmp/qm-bench.lock .venv/bin/python services/oms/bench/replay_per_order.py \
        [--orders 4000] [--batch 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import time
from collections import OrderedDict
from decimal import Decimal
from typing import Any

from quantmesh_common.clock import SimulatedClock
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import ExecType, OrderStatus, OrderType
from quantmesh_common.storage.postgres import create_pool
from quantmesh_common.testing import stubs
from quantmesh_common.testing.postgres import fresh_schema, server_dsn_for_tests
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.service import OmsService
from quantmesh_oms.store import PostgresOrderStore

T0 = stubs.TS
TICKS = os.sysconf("SC_CLK_TCK")


def _messages(orders: int) -> list[Envelope[Any]]:
    """Every decision first, then the ACCEPTED reports, then the partial fills."""
    decisions: list[Envelope[Any]] = []
    reports: list[Envelope[Any]] = []
    fills: list[Envelope[Any]] = []
    for i in range(orders):
        coid = f"C-{i:06d}"
        account = f"ACC-{i % 12}"
        intent = stubs.limit_order_intent(
            intent_id=f"I-{i}",
            client_order_id=coid,
            account_id=account,
            quantity=Decimal("0.01"),
            limit_price=Decimal("30000.00"),
            order_type=OrderType.LIMIT,
        )
        decision = stubs.risk_decision(decision_id=f"D-{i}", intent=intent)
        ts = T0 + i
        decisions.append(
            Envelope.wrap(decision, source="bench", ts_event=ts, ts_init=ts, event_id=f"E-D-{i}")
        )
        common = {
            "account_id": account,
            "client_order_id": coid,
            "venue_order_id": f"V-{i}",
            "last_price": Decimal("30000.00"),
            "avg_price": Decimal("30000.00"),
            "fee": Decimal("0"),
        }
        accepted = stubs.execution_report(
            report_id=f"R-A-{i}",
            exec_type=ExecType.ACCEPTED,
            order_status=OrderStatus.ACCEPTED,
            last_qty=Decimal("0"),
            cum_qty=Decimal("0"),
            leaves_qty=Decimal("0.01"),
            trade_id=None,
            **common,
        )
        reports.append(
            Envelope.wrap(accepted, source="bench", ts_event=ts, ts_init=ts, event_id=f"E-A-{i}")
        )
        if i % 4 == 0:
            fill = stubs.execution_report(
                report_id=f"R-F-{i}",
                exec_type=ExecType.PARTIAL_FILL,
                order_status=OrderStatus.PARTIALLY_FILLED,
                last_qty=Decimal("0.004"),
                cum_qty=Decimal("0.004"),
                leaves_qty=Decimal("0.006"),
                trade_id=f"T-{i}",
                **common,
            )
            fills.append(
                Envelope.wrap(fill, source="bench", ts_event=ts, ts_init=ts, event_id=f"E-F-{i}")
            )
    return decisions + reports + fills


def _backend_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def _round(dsn: str, messages: list[Envelope[Any]], batch: int) -> dict[str, Any]:
    pool = await create_pool(dsn, min_size=1, max_size=1)
    try:
        await pool.execute("TRUNCATE orders, order_events, oms_outbox")
        pid = await pool.fetchval("SELECT pg_backend_pid()")
        service = OmsService(OmsSettings(bus="memory", http_port=0))
        service.store = PostgresOrderStore(pool)
        service.batched = True
        service._terminal = OrderedDict()
        service.clock = SimulatedClock(T0 + 10**9)
        handle_s = flush_s = server_s = 0.0
        digest = hashlib.sha256()
        for start in range(0, len(messages), batch):
            began = time.process_time()
            outputs = [await service.handle(m) for m in messages[start : start + batch]]
            handled = time.process_time()
            server_before = _backend_cpu_s(pid)
            await service.flush()
            flush_s += time.process_time() - handled
            server_s += _backend_cpu_s(pid) - server_before
            handle_s += handled - began
            for emits in outputs:
                for e in emits:
                    digest.update(f"{e.topic}|{e.key}|{e.ts_event}|".encode())
                    digest.update(e.payload.model_dump_json().encode())
        for query in (
            "SELECT to_jsonb(t)::text FROM orders t ORDER BY client_order_id",
            "SELECT to_jsonb(t)::text FROM order_events t ORDER BY event_id",
            # ts_stored is the store's wall clock (retention), not the replay's.
            "SELECT (to_jsonb(t) - 'ts_stored')::text FROM oms_outbox t ORDER BY input_id",
        ):
            for row in await pool.fetch(query):
                digest.update(row[0].encode())
        return {
            "handle": handle_s,
            "flush": flush_s,
            "server": server_s,
            "sha256": digest.hexdigest(),
        }
    finally:
        await pool.close()


async def _main(orders: int, batch: int, rounds: int) -> dict[str, Any]:
    messages = _messages(orders)
    server = server_dsn_for_tests()
    if server is None:
        raise SystemExit("QM_DATABASE_URL is not set: load deploy/local/.stack/env")
    runs: list[dict[str, Any]] = []
    with fresh_schema(server, "qm_oms_bench", migrate=True) as dsn:
        for _ in range(rounds):
            runs.append(await _round(dsn, messages, batch))
    digests = {r["sha256"] for r in runs}
    result: dict[str, Any] = {
        "orders": orders,
        "messages": len(messages),
        "batch": batch,
        "rounds": rounds,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "sha256": digests.pop() if len(digests) == 1 else sorted(digests),
    }
    for part in ("handle", "flush", "server"):
        per_order = [r[part] / orders * 1e6 for r in runs]
        result[f"{part}_us_per_order"] = {
            "best": round(min(per_order), 1),
            "median": round(statistics.median(per_order), 1),
        }
    return result


def main() -> None:
    """Run the replay and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--orders", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(_main(args.orders, args.batch, args.rounds))))  # noqa: T201


if __name__ == "__main__":
    main()
