"""Portfolio's CPU per order: its handlers replayed alone on the inputs a backtest gave them.

`record` runs bench/bench_backtest.py's seeded SMA 10/20 crossover bar by bar through the
real stages (in memory) and saves every envelope delivered to portfolio's handlers, with the
settings it ran with. `replay` feeds those envelopes to fresh handlers several times and
prints one JSON object: the best `process_time` per order (an order: one client order id
among the execution reports) of `PortfolioHandlers` and of the batched `PersistentHandlers`
path the service runs with PostgreSQL (its batch held, never stored), the Python calls and
pydantic validations per order (cProfile of one replay), and the sha256 of every output's
JSON (report ids left out), so two versions of the code can be compared on the same inputs:

    .venv/bin/python services/portfolio/bench/replay_per_order.py record --bars 30000 \
        --out /tmp/portfolio-inputs.pickle
    flock /tmp/qm-bench.lock .venv/bin/python services/portfolio/bench/replay_per_order.py \
        replay --inputs /tmp/portfolio-inputs.pickle --rounds 7 [--performance --limit 20000]

Run `replay` with another version of quantmesh_portfolio first on PYTHONPATH to measure it.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import importlib.util
import json
import logging
import pickle
import pstats
import sys
import time
from pathlib import Path
from typing import Any

from quantmesh_common.envelope import Envelope, decode, encode
from quantmesh_common.messages import ExecutionReport
from quantmesh_portfolio import service as portfolio_service
from quantmesh_portfolio.performance import NoPerformanceTracker, PerformanceTracker
from quantmesh_portfolio.positions import Portfolio
from quantmesh_portfolio.service import PersistentHandlers, PortfolioHandlers
from quantmesh_portfolio.store import PortfolioBatch

ROOT = Path(__file__).resolve().parents[3]
#: Messages per batch on the persistent path (the bus's batches are up to a few hundred).
BATCH = 200


def _bench_backtest() -> Any:
    spec = importlib.util.spec_from_file_location(
        "bench_backtest", ROOT / "bench/bench_backtest.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(bars: int, seed: int, out: Path) -> dict[str, Any]:
    """Run the backtest bar by bar; save what portfolio's handlers got and their settings."""
    from quantmesh_embedded.backtest import run_backtest

    bench = _bench_backtest()
    seen: list[Envelope[Any]] = []
    settings: dict[str, Any] = {}
    call = PortfolioHandlers.__call__
    setup = portfolio_service.PortfolioService.setup

    def recording(self: PortfolioHandlers, envelope: Envelope[Any]) -> Any:
        seen.append(envelope)
        return call(self, envelope)

    async def setup_recorded(self: Any, ctx: Any) -> None:
        s = ctx.settings
        settings.update(
            base_currency=s.base_currency,
            starting_cash=dict(s.starting_cash),
            snapshot_interval_ns=s.snapshot_interval_ns,
            performance_interval_ns=s.performance_interval_ns,
            performance=s.portfolio_performance,
            confidence=s.performance_confidence,
            risk_free=s.performance_risk_free,
            trips=s.performance_trips,
        )
        await setup(self, ctx)

    PortfolioHandlers.__call__ = recording  # type: ignore[method-assign]
    portfolio_service.PortfolioService.setup = setup_recorded  # type: ignore[method-assign]
    try:
        columns = bench.synthetic_columns(bars, seed)
        result = asyncio.run(run_backtest(bench._config(), columns, mode="per_bar"))
    finally:
        PortfolioHandlers.__call__ = call  # type: ignore[method-assign]
        portfolio_service.PortfolioService.setup = setup  # type: ignore[method-assign]
    encoded = [encode(e) for e in seen]  # a generic Envelope[...] does not pickle
    out.write_bytes(pickle.dumps({"settings": settings, "envelopes": encoded}))
    return {"bars": bars, "fills": len(result.fills), "envelopes": len(seen), "file": str(out)}


def _handlers(settings: dict[str, Any]) -> PortfolioHandlers:
    """What PortfolioService.setup builds from these settings."""
    tracker_cls = PerformanceTracker if settings["performance"] else NoPerformanceTracker
    tracker = tracker_cls(
        settings["snapshot_interval_ns"],
        confidence=settings["confidence"],
        risk_free=settings["risk_free"],
        report_trips=settings["trips"],
    )
    return PortfolioHandlers(
        Portfolio(settings["base_currency"], settings["starting_cash"]),
        settings["snapshot_interval_ns"],
        tracker=tracker,
        report_interval_ns=settings["performance_interval_ns"],
    )


def _run_handlers(settings: dict[str, Any], envelopes: list[Envelope[Any]]) -> float:
    handlers = _handlers(settings)
    started = time.process_time()
    for envelope in envelopes:
        handlers(envelope)
    return time.process_time() - started


def _run_persistent(settings: dict[str, Any], envelopes: list[Envelope[Any]]) -> float:
    persistent = PersistentHandlers(_handlers(settings), None, batched=True)  # type: ignore[arg-type]

    async def run() -> float:
        started = time.process_time()
        for n, envelope in enumerate(envelopes):
            await persistent(envelope)
            if n % BATCH == 0:
                persistent.batch = PortfolioBatch()  # what `flush` would have stored
        return time.process_time() - started

    return asyncio.run(run())


def _digest(settings: dict[str, Any], envelopes: list[Envelope[Any]]) -> tuple[int, str]:
    handlers = _handlers(settings)
    sha = hashlib.sha256()
    lines = 0
    for envelope in envelopes:
        for emit in handlers(envelope) or []:
            exclude = {"report_id"} if emit.topic == "portfolio.performance" else None
            line = f"{emit.topic} {emit.key} {emit.ts_event} "
            sha.update((line + emit.payload.model_dump_json(exclude=exclude) + "\n").encode())
            lines += 1
    return lines, sha.hexdigest()


def _profile(settings: dict[str, Any], envelopes: list[Envelope[Any]]) -> tuple[int, int]:
    """Python calls and pydantic validations (model constructions and validate calls)."""
    handlers = _handlers(settings)
    profile = cProfile.Profile()
    profile.enable()
    for envelope in envelopes:
        handlers(envelope)
    profile.disable()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    calls = validations = 0
    for (path, _, name), (_, total, *_) in stats.items():
        calls += total
        if (
            "pydantic" in path
            and path.endswith("main.py")
            and name in ("__init__", "model_validate")
        ):
            validations += total
    return calls, validations


def replay(inputs: Path, rounds: int, performance: bool, limit: int | None) -> dict[str, Any]:
    """Replay the recorded envelopes `rounds` times on each path; the best per order.

    `performance`: track round trips and curves and report hourly, as the service does by
    default (the backtest runs without). `limit`: only the first that many envelopes (each
    hourly report summarises the whole curve so far, so a long replay with reports is slow).
    """
    data = pickle.loads(inputs.read_bytes())
    settings = data["settings"]
    if performance:
        settings = {**settings, "performance": True, "performance_interval_ns": 3600 * 10**9}
    envelopes: list[Envelope[Any]] = [decode(raw) for raw in data["envelopes"][:limit]]
    orders = len(
        {
            (e.payload.account_id, e.payload.client_order_id)
            for e in envelopes
            if isinstance(e.payload, ExecutionReport)
        }
    )
    handlers_s = [_run_handlers(settings, envelopes) for _ in range(rounds)]
    persistent_s = [_run_persistent(settings, envelopes) for _ in range(rounds)]
    calls, validations = _profile(settings, envelopes)
    lines, digest = _digest(settings, envelopes)
    return {
        "portfolio_module": portfolio_service.__file__,
        "envelopes": len(envelopes),
        "limit": limit,
        "performance": settings["performance"],
        "orders": orders,
        "rounds": rounds,
        "handlers_us_per_order_best": round(min(handlers_s) / orders * 1e6, 1),
        "handlers_us_per_order_all": [round(s / orders * 1e6, 1) for s in handlers_s],
        "persistent_us_per_order_best": round(min(persistent_s) / orders * 1e6, 1),
        "persistent_us_per_order_all": [round(s / orders * 1e6, 1) for s in persistent_s],
        "calls_per_order": round(calls / orders, 1),
        "validations_per_order": round(validations / orders, 2),
        "output_lines": lines,
        "output_sha256": digest,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--bars", type=int, default=30_000)
    rec.add_argument("--seed", type=int, default=7)
    rec.add_argument("--out", type=Path, required=True)
    rep = sub.add_parser("replay")
    rep.add_argument("--inputs", type=Path, required=True)
    rep.add_argument("--rounds", type=int, default=7)
    rep.add_argument(
        "--performance", action="store_true", help="with performance tracking and hourly reports"
    )
    rep.add_argument("--limit", type=int, default=None, help="replay the first N envelopes only")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    if args.command == "record":
        out = record(args.bars, args.seed, args.out)
    else:
        out = replay(args.inputs, args.rounds, args.performance, args.limit)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
