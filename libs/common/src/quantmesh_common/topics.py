"""The topic registry: every topic's model, key and partition count, defined in this one place."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

from quantmesh_common.envelope import Event

DLQ_SUFFIX = ".dlq"


def dlq(topic: str) -> str:
    """Return the dead-letter twin of `topic`."""
    return topic if topic.endswith(DLQ_SUFFIX) else topic + DLQ_SUFFIX


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One topic: the model it carries, the payload field that keys it, and its partitions.

    The key keeps order where order matters: all messages with one key land on one partition
    and are consumed in order. `key_field=None` means the topic is unkeyed (round-robin).
    """

    name: str
    model: type[Event]
    key_field: str | None
    partitions: int = 6
    config: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def key_of(self, payload: Event) -> str | None:
        """Return the partitioning key of `payload` on this topic."""
        if self.key_field is None:
            return None
        return str(getattr(payload, self.key_field))


class TopicRegistry:
    """A set of TopicSpecs; every topic also implies its `.dlq` twin with the same partitions."""

    def __init__(self, specs: list[TopicSpec] | None = None) -> None:
        self._specs: dict[str, TopicSpec] = {}
        for spec in specs or []:
            self.register(spec)

    def register(self, spec: TopicSpec) -> TopicSpec:
        """Add a topic; refuses a second, different definition of one name."""
        if spec.name.endswith(DLQ_SUFFIX):
            raise ValueError(f"{spec.name}: dead-letter topics are implied, not registered")
        existing = self._specs.get(spec.name)
        if existing is not None and existing != spec:
            raise ValueError(f"topic {spec.name!r} is already registered differently")
        self._specs[spec.name] = spec
        return spec

    def get(self, name: str) -> TopicSpec | None:
        """Return the spec of `name` (a `.dlq` twin resolves to its source topic's spec)."""
        base = name.removesuffix(DLQ_SUFFIX)
        return self._specs.get(base)

    def __getitem__(self, name: str) -> TopicSpec:
        spec = self.get(name)
        if spec is None:
            raise KeyError(f"unknown topic {name!r}: declare it in quantmesh_common.topics")
        return spec

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[TopicSpec]:
        return iter(sorted(self._specs.values(), key=lambda s: s.name))

    def prefixed(self, prefix: str, names: Iterable[str]) -> TopicRegistry:
        """A registry of `names` renamed `prefix + name`, their specs otherwise kept: how a
        test or a bench gets topics of its own that partition and compact like the real ones."""
        return TopicRegistry([replace(self[name], name=prefix + name) for name in names])

    def partitions(self, name: str) -> int:
        """Return the partition count of `name` (1 for a topic this registry does not know)."""
        spec = self.get(name)
        return spec.partitions if spec else 1

    def all_topic_names(self) -> list[str]:
        """Return every topic name with its dead-letter twin, sorted."""
        names: list[str] = []
        for spec in self:
            names += [spec.name, dlq(spec.name)]
        return names


class Topic:
    """Topic names as constants, so no stage spells a topic as a string literal."""

    MD_TICKS = "md.ticks"
    MD_BARS = "md.bars"
    MD_BOOKS = "md.books"
    SIGNALS = "signals"
    ORDERS_INTENTS = "orders.intents"
    ORDERS_APPROVED = "orders.approved"
    ORDERS_REJECTED = "orders.rejected"
    ORDERS_COMMANDS = "orders.commands"
    ORDERS_UPDATES = "orders.updates"
    #: Cancel and replace requests for one order (api, operators) to the oms.
    ORDERS_REQUESTS = "orders.requests"
    EXEC_REPORTS = "exec.reports"
    PORTFOLIO_UPDATES = "portfolio.updates"
    PORTFOLIO_SNAPSHOTS = "portfolio.snapshots"
    #: Performance figures per account and strategy, on an interval and on request.
    PORTFOLIO_PERFORMANCE = "portfolio.performance"
    ALERTS = "alerts"
    CONTROL = "control"
    #: Repartition topics of the signals stage: market data of strategies that need several
    #: instruments together, re-keyed by strategy group so that one instance gets all of it.
    SIGNALS_JOINT_BARS = "signals.joint.bars"
    SIGNALS_JOINT_TICKS = "signals.joint.ticks"
    #: Instruments and their trading rules (tick, lot, minimums) as marketdata loaded them.
    REF_INSTRUMENTS = "ref.instruments"
    #: Status and progress of marketdata's backfills and scheduled collection.
    MD_COLLECTOR = "md.collector"
    #: Accounts opened (api paper accounts) with their starting cash; compacted.
    ACCOUNTS = "accounts"
    #: What each strategy of the signals stage runs with, and its switches; compacted.
    STRATEGIES = "strategies"
    #: The limits, kill switch and breaker risk applies per account (`*`: default); compacted.
    RISK_LIMITS = "risk.limits"


def _build_default() -> TopicRegistry:
    from quantmesh_common import messages as m

    return TopicRegistry(
        [
            TopicSpec(Topic.MD_TICKS, m.Tick, "instrument_id", 12, description="trades and quotes"),
            TopicSpec(Topic.MD_BARS, m.Bar, "instrument_id", 12, description="OHLCV bars"),
            TopicSpec(Topic.MD_BOOKS, m.BookSnapshot, "instrument_id", 12, description="L2 books"),
            TopicSpec(Topic.SIGNALS, m.Signal, "instrument_id", 6, description="strategy output"),
            TopicSpec(Topic.ORDERS_INTENTS, m.OrderIntent, "account_id", 6),
            TopicSpec(Topic.ORDERS_APPROVED, m.RiskDecision, "account_id", 6),
            TopicSpec(Topic.ORDERS_REJECTED, m.RiskDecision, "account_id", 6),
            TopicSpec(Topic.ORDERS_COMMANDS, m.OrderCommand, "account_id", 6),
            TopicSpec(Topic.ORDERS_UPDATES, m.Order, "account_id", 6, description="order states"),
            TopicSpec(
                Topic.ORDERS_REQUESTS, m.OrderRequest, "account_id", 6, description="cancel/replace"
            ),
            TopicSpec(Topic.EXEC_REPORTS, m.ExecutionReport, "account_id", 6),
            TopicSpec(Topic.PORTFOLIO_UPDATES, m.Position, "account_id", 6),
            TopicSpec(Topic.PORTFOLIO_SNAPSHOTS, m.PortfolioSnapshot, "account_id", 6),
            TopicSpec(Topic.PORTFOLIO_PERFORMANCE, m.PerformanceReport, "account_id", 6),
            TopicSpec(Topic.ALERTS, m.Alert, "source_service", 3),
            # One partition: operator commands are totally ordered for every stage.
            TopicSpec(Topic.CONTROL, m.ControlCommand, None, 1),
            # Keyed explicitly by the signals stage (strategy group), not by a payload field.
            TopicSpec(Topic.SIGNALS_JOINT_BARS, m.Bar, None, 6, description="signals repartition"),
            TopicSpec(
                Topic.SIGNALS_JOINT_TICKS, m.Tick, None, 6, description="signals repartition"
            ),
            # Compacted: the latest rules of each instrument stay readable from the start.
            TopicSpec(
                Topic.REF_INSTRUMENTS,
                m.Instrument,
                "instrument_id",
                3,
                config={"cleanup.policy": "compact"},
                description="instrument rules",
            ),
            TopicSpec(Topic.MD_COLLECTOR, m.CollectorStatus, "job_id", 1, description="jobs"),
            # Compacted: every account's opening stays readable from the start.
            TopicSpec(
                Topic.ACCOUNTS,
                m.AccountOpened,
                "account_id",
                6,
                config={"cleanup.policy": "compact"},
                description="accounts opened",
            ),
            # Compacted: every strategy's latest status stays readable from the start.
            TopicSpec(
                Topic.STRATEGIES,
                m.StrategyStatus,
                "strategy_id",
                3,
                config={"cleanup.policy": "compact"},
                description="strategies run",
            ),
            # Compacted: every account's latest limits stay readable from the start.
            TopicSpec(
                Topic.RISK_LIMITS,
                m.RiskLimitsStatus,
                "account_id",
                3,
                config={"cleanup.policy": "compact"},
                description="risk limits",
            ),
        ]
    )


_default: TopicRegistry | None = None


def registry() -> TopicRegistry:
    """Return the platform's topic registry."""
    global _default
    if _default is None:
        _default = _build_default()
    return _default


def main(argv: list[str] | None = None) -> int:
    """`quantmesh-topics create|list`: create every registered topic (and its .dlq) on Kafka."""
    parser = argparse.ArgumentParser(prog="quantmesh-topics", description=main.__doc__)
    parser.add_argument("command", choices=["create", "list"])
    parser.add_argument("--bootstrap", default=None, help="default: $QM_KAFKA_BOOTSTRAP")
    args = parser.parse_args(argv)
    if args.command == "list":
        for spec in registry():
            line = f"{spec.name}\t{spec.partitions}\t{spec.model.SCHEMA_NAME}\tkey={spec.key_field}"
            sys.stdout.write(line + "\n")
        return 0
    import os

    from quantmesh_common.bus.kafka import ensure_topics

    bootstrap = args.bootstrap or os.environ.get("QM_KAFKA_BOOTSTRAP")
    if not bootstrap:
        sys.stderr.write("QM_KAFKA_BOOTSTRAP is not set and --bootstrap was not given\n")
        return 2
    created = ensure_topics(bootstrap, registry())
    existed = len(registry().all_topic_names()) - len(created)
    sys.stdout.write(f"topics: {len(created)} created, {existed} existed\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
