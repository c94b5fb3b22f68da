"""The recorded-data order flow of the e2e tests: its set-up, its read-back and its checks.

A run replays recorded Binance BTCUSDT trades (tests/e2e/fixtures) on its own instrument id
through the marketdata replay, into signals (three strategies, one account each) -> risk ->
oms (PostgreSQL) -> execution (simulated venue) -> portfolio, every stage its own process.
What the venue did is read back from the committed `exec.reports` (its ledger: the venue's
state lives in the execution process; the reports are what it committed), and each check
compares another stage against that ledger with numbers recomputed here.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from quantmesh_common.messages import (
    CommandType,
    ExecType,
    ExecutionReport,
    Order,
    OrderCommand,
    OrderIntent,
    OrderStatus,
    Position,
    RiskDecision,
    Side,
)
from quantmesh_common.topics import Topic, dlq
from tests.e2e.conftest import Mesh, Record, TopicReader, stable_ends

HERE = Path(__file__).parent
#: 2,000 Binance spot BTCUSDT trades of 2024-08-08 23:54:15-23:55:51 UTC (hftbacktest, MIT).
RECORDED_TRADES = HERE / "fixtures" / "binance-spot_BTCUSDT_trades_2024-08-08.csv"
FEED_SCRIPT = HERE / "replay_feed.py"
#: Recorded seconds the trades span, rounded down.
RECORDED_SPAN_S = 95.0
QUANTITY = Decimal("0.01")
#: Reason codes of rejections that answer "no such order here", not the venue's decision.
NOT_AT_VENUE = ("UNKNOWN_ORDER", "ORDER_NOT_FOUND_AT_VENUE")

FLOW_TOPICS = (
    Topic.ORDERS_INTENTS,
    Topic.ORDERS_APPROVED,
    Topic.ORDERS_REJECTED,
    Topic.ORDERS_COMMANDS,
    Topic.ORDERS_UPDATES,
    Topic.EXEC_REPORTS,
    Topic.PORTFOLIO_UPDATES,
)
#: Every topic a stage of the flow consumes, with the services that consume it (READMEs).
CONSUMERS: dict[str, frozenset[str]] = {
    Topic.MD_TICKS: frozenset({"signals", "risk", "execution", "portfolio"}),
    Topic.MD_BARS: frozenset({"signals", "portfolio"}),
    Topic.MD_BOOKS: frozenset({"execution"}),
    Topic.ORDERS_INTENTS: frozenset({"risk"}),
    Topic.ORDERS_APPROVED: frozenset({"oms"}),
    Topic.ORDERS_UPDATES: frozenset({"risk"}),
    Topic.ORDERS_COMMANDS: frozenset({"execution"}),
    Topic.EXEC_REPORTS: frozenset({"signals", "risk", "oms", "portfolio"}),
    Topic.CONTROL: frozenset({"marketdata", "signals", "risk", "execution"}),
}
INPUT_TOPICS = tuple(CONSUMERS)
DEAD_LETTER_TOPICS = tuple(dlq(t) for t in INPUT_TOPICS)
STAGES = ("marketdata", "signals", "risk", "oms", "execution", "portfolio")
#: The stages' fixed consumer groups (each service.py): one run at a time per broker.
SHARED_GROUPS = (
    "marketdata.control",
    "signals",
    "signals.control",
    "risk",
    "oms",
    "execution-sim",
    "portfolio",
)


@dataclass(frozen=True)
class Run:
    """The ids that make one run's messages its own: three accounts on one fresh instrument."""

    tag: str
    instrument: str
    strategies: tuple[tuple[str, str, str, dict[str, Any]], ...]  # id, name, account, params

    @classmethod
    def new(cls) -> Run:
        tag = uuid.uuid4().hex[:10]
        common = {"quantity": str(QUANTITY), "allow_short": True}
        return cls(
            tag=tag,
            instrument=f"E2E{tag.upper()}-USDT.SIM",
            strategies=(
                (f"sma24-{tag}", "sma_cross", f"e2e-a-{tag}", {"fast": 2, "slow": 4, **common}),
                (f"sma36-{tag}", "sma_cross", f"e2e-b-{tag}", {"fast": 3, "slow": 6, **common}),
                (
                    f"boll-{tag}",
                    "bollinger_breakout",
                    f"e2e-c-{tag}",
                    {"period": 4, "k": 1, **common},
                ),
            ),
        )

    @property
    def accounts(self) -> frozenset[str]:
        return frozenset(s[2] for s in self.strategies)

    def owns(self, payload: Any) -> bool:
        """Return True if `payload` belongs to one of this run's accounts."""
        return getattr(payload, "account_id", None) in self.accounts

    def owns_any(self, payload: Any) -> bool:
        """Return True if `payload` is this run's: its accounts', or on its instrument."""
        return self.owns(payload) or getattr(payload, "instrument_id", None) == self.instrument


def stage_env(
    run: Run, *, bootstrap: str, database_url: str, redis_url: str | None = None
) -> dict[str, dict[str, str]]:
    """Each stage's settings for `run` on the broker `bootstrap` and the database
    `database_url` (a fresh migrated schema)."""
    strategies = [
        {"id": sid, "name": name, "account_id": account, "instruments": [run.instrument],
         "params": params}
        for sid, name, account, params in run.strategies
    ]  # fmt: skip
    # Every stage gets the run's schema: stages that keep state there find it migrated.
    common = {
        "QM_KAFKA_BOOTSTRAP": bootstrap,
        "QM_DATABASE_URL": database_url,
        "QM_LOG_LEVEL": "WARNING",
    }
    if redis_url is not None:
        common["QM_REDIS_URL"] = redis_url
    return {
        "marketdata": {**common, "QM_FEED": "none"},
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


async def start_feed(
    run: Run, *, bootstrap: str, compress: float, log_dir: Path
) -> asyncio.subprocess.Process:
    """Start the recorded-trades replay as its own process (stdout: its JSON summary)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(FEED_SCRIPT),
        "--csv",
        str(RECORDED_TRADES),
        "--instrument",
        run.instrument,
        "--bootstrap",
        bootstrap,
        "--compress",
        str(compress),
        stdout=asyncio.subprocess.PIPE,
        stderr=(log_dir / "replay-feed.log").open("wb"),
        env=os.environ.copy(),
    )


# --------------------------------------------------------------------------- read-back --


@dataclass
class RawRecord:
    """One message as stored: its place, headers and bytes (dead letters need no decoding)."""

    topic: str
    partition: int
    offset: int
    headers: dict[str, bytes]
    value: bytes | None


@dataclass
class RawReader:
    """Reads whole topics (read_committed) without decoding, keeping every message's headers."""

    bootstrap: str
    topics: tuple[str, ...]
    records: list[RawRecord] = field(default_factory=list)

    def read_all(self, idle_s: float = 3.0, timeout: float = 60.0) -> list[RawRecord]:
        """Read from the beginning until nothing new arrives for `idle_s`."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"qmtest.e2e.raw.{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
            }
        )
        try:
            meta = consumer.list_topics(timeout=10)
            consumer.assign(
                [
                    TopicPartition(t, p, OFFSET_BEGINNING)
                    for t in self.topics
                    for p in meta.topics[t].partitions
                ]
            )
            deadline = time.monotonic() + timeout
            quiet_since = time.monotonic()
            while time.monotonic() < deadline and time.monotonic() - quiet_since < idle_s:
                batch = consumer.consume(5000, 0.5)
                for msg in batch:
                    if msg.error():
                        continue
                    self.records.append(
                        RawRecord(
                            topic=str(msg.topic()),
                            partition=int(msg.partition() or 0),
                            offset=int(msg.offset() or 0),
                            headers=_headers(msg.headers()),
                            value=msg.value(),
                        )
                    )
                if batch:
                    quiet_since = time.monotonic()
        finally:
            consumer.close()
        return self.records


def _headers(raw: Any) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, value in raw or []:
        out[name] = value.encode() if isinstance(value, str) else bytes(value or b"")
    return out


def dead_letters_by_origin(records: Iterable[RawRecord]) -> dict[tuple[str, int, int], set[str]]:
    """For each original message (topic, partition, offset): the services that dead-lettered it."""
    found: dict[tuple[str, int, int], set[str]] = defaultdict(set)
    for record in records:
        h = record.headers
        if "qm-dlq-topic" not in h:
            continue
        origin = (h["qm-dlq-topic"].decode(), int(h["qm-dlq-partition"]), int(h["qm-dlq-offset"]))
        found[origin].add(h.get("qm-dlq-service", b"?").decode())
    return found


# -------------------------------------------------------------------------- the checks --


@dataclass(frozen=True)
class Lots:
    """The FIFO state of one account's instrument after a fill, recomputed from the ledger."""

    quantity: Decimal
    realized_net: Decimal  # realised P&L minus every fee paid
    fees: Decimal
    avg_entry: Decimal


def _same_state(got: Position, want: Lots) -> bool:
    """True if the portfolio's position is the recomputed one (average entry to 1e-12)."""
    if (got.quantity, got.realized_pnl, got.fees) != (want.quantity, want.realized_net, want.fees):
        return False
    return not want.quantity or abs(got.avg_entry_price - want.avg_entry) <= Decimal("1e-12")


def fifo(fills: list[ExecutionReport]) -> list[Lots]:
    """Recompute the position after each fill, FIFO, independently of the portfolio stage.

    Open lots are [signed quantity, price]. A fill against the open direction closes the
    oldest lots first at their own prices; any rest of it opens a lot the other way. Fees are
    in the quote currency and are subtracted from the realised P&L as paid.
    """
    lots: deque[list[Decimal]] = deque()
    position = realized = fees = Decimal(0)
    after: list[Lots] = []
    for fill in fills:
        assert fill.last_price is not None
        price = fill.last_price
        signed = fill.last_qty if fill.side is Side.BUY else -fill.last_qty
        left = signed
        while left and lots and (lots[0][0] > 0) != (left > 0):
            lot = lots[0]
            closed = min(abs(lot[0]), abs(left))
            sign = 1 if lot[0] > 0 else -1
            realized += (price - lot[1]) * closed * sign
            lot[0] -= closed * sign
            left += closed * sign
            if lot[0] == 0:
                lots.popleft()
        if left:
            lots.append([left, price])
        position += signed
        fees += fill.fee
        open_qty = sum((abs(q) for q, _ in lots), Decimal(0))
        cost = sum((abs(q) * p for q, p in lots), Decimal(0))
        after.append(
            Lots(position, realized - fees, fees, cost / open_qty if open_qty else Decimal(0))
        )
    return after


@dataclass
class FlowRecords:
    """What one run left on the flow topics, its accounts' messages only."""

    run: Run
    by_topic: dict[str, list[Record]]

    @classmethod
    def of(cls, reader: TopicReader, run: Run) -> FlowRecords:
        return cls(run, {t: reader.of(t, run.owns) for t in FLOW_TOPICS})

    def payloads(self, topic: str) -> list[Any]:
        return [r.payload for r in self.by_topic[topic]]

    @property
    def ledger(self) -> list[Record]:
        """exec.reports as the venue's ledger: each report once, where it was first committed.

        The execution stage answers a QUERY, and a SUBMIT its sent-log already holds, with the
        order's history as the venue made it: the same reports again, under their own report
        and trade ids (oms and portfolio apply each id once). So a report id counts once, at
        its first commit; `replays_that_differ` checks that every repeat is an exact copy.
        """
        seen: set[str] = set()
        ledger: list[Record] = []
        for record in self._reports_in_commit_order():
            if record.payload.report_id not in seen:
                seen.add(record.payload.report_id)
                ledger.append(record)
        return ledger

    def replays_that_differ(self) -> list[str]:
        """Report ids committed again with other content than their first commit."""
        first: dict[str, ExecutionReport] = {}
        problems: list[str] = []
        for record in self._reports_in_commit_order():
            report: ExecutionReport = record.payload
            original = first.setdefault(report.report_id, report)
            if report != original:
                problems.append(f"{report.report_id}: {original} then {report}")
        return problems

    def _reports_in_commit_order(self) -> list[Record]:
        return sorted(self.by_topic[Topic.EXEC_REPORTS], key=lambda r: (r.partition, r.offset))

    @property
    def fills(self) -> list[Record]:
        """The ledger's fills, in the order the venue committed them per account partition."""
        return [r for r in self.ledger if r.payload.is_fill]

    def submits(self) -> Counter[str]:
        return Counter(
            p.client_order_id
            for p in self.payloads(Topic.ORDERS_COMMANDS)
            if isinstance(p, OrderCommand) and p.command_type is CommandType.SUBMIT
        )

    def venue_acks(self) -> Counter[str]:
        """How often the venue acted on a submission: its ACCEPTED or REJECTED of the order.

        Rejections that say the venue does not have the order (the answer to a QUERY, or the
        sent-log's for a claimed order the venue lost) are not the venue acting on it.
        """
        acted: Counter[str] = Counter()
        for record in self.ledger:
            p = record.payload
            if p.exec_type is ExecType.ACCEPTED or (
                p.exec_type is ExecType.REJECTED
                and p.venue_order_id is None
                and not (p.reason or "").startswith(NOT_AT_VENUE)
            ):
                acted[p.client_order_id] += 1
        return acted

    def approved(self) -> set[str]:
        return {
            p.intent.client_order_id
            for p in self.payloads(Topic.ORDERS_APPROVED)
            if isinstance(p, RiskDecision)
        }

    def intents(self) -> set[str]:
        return {
            p.client_order_id
            for p in self.payloads(Topic.ORDERS_INTENTS)
            if isinstance(p, OrderIntent)
        }

    def rejected(self) -> set[str]:
        return {p.intent.client_order_id for p in self.payloads(Topic.ORDERS_REJECTED)}

    def settled(self) -> bool:
        """Every intent decided, every approval sent and finished, every fill applied.

        A flow with no intent yet has not settled: the recorded data always makes some, so its
        input is still on its way (a loaded machine, a stage restarting after an outage).
        """
        if not self.intents():
            return False
        approved = self.approved()
        last: dict[str, Order] = {p.client_order_id: p for p in self.payloads(Topic.ORDERS_UPDATES)}
        fills = {r.payload.report_id for r in self.fills}
        applied = set(self.position_updates())
        return (
            self.intents() <= approved | self.rejected()
            and approved <= set(self.submits())
            and all(c in last and last[c].status.is_terminal for c in approved)
            and fills <= applied
        )

    def position_updates(self) -> dict[str, list[Position]]:
        """portfolio.updates by the report id of the fill each answers, in commit order.

        A fill reaches the portfolio again when execution re-sends it (same report id, a new
        envelope) or when the portfolio's own input is redelivered; the portfolio applies it
        once and publishes the position as it is then, answering that delivery. An update
        whose cause is no execution report is kept under '<causation id> (no such fill)'.
        """
        report_of = {
            r.envelope.event_id: r.payload.report_id for r in self.by_topic[Topic.EXEC_REPORTS]
        }
        updates: dict[str, list[Position]] = defaultdict(list)
        records = sorted(
            self.by_topic[Topic.PORTFOLIO_UPDATES], key=lambda r: (r.partition, r.offset)
        )
        for record in records:
            cause = record.envelope.causation_id
            key = report_of.get(cause or "", f"{cause} (no such fill)")
            updates[key].append(record.payload)
        return updates

    def fills_applied_not_once(self) -> dict[str, int]:
        """Ledger fills (report ids) no position update answers, and updates that answer no
        ledger fill (under '<id> (no such fill)'), with how many updates each has.

        How often a fill was *applied* shows in the positions: applied twice, it moves the
        position twice, which `positions_vs_fifo` finds.
        """
        updates = self.position_updates()
        fill_ids = {r.payload.report_id for r in self.fills}
        wrong = {rid: 0 for rid in fill_ids if rid not in updates}
        wrong |= {rid: len(u) for rid, u in updates.items() if rid not in fill_ids}
        return wrong

    def positions_vs_fifo(self) -> list[str]:
        """Mismatches between the portfolio's updates and the FIFO recomputation of the ledger.

        The first update answering a fill must be the position right after it; one published
        again for the same fill (a redelivery) must be the position after it or after a later
        fill of the same book: the position as it was when published, never another.
        """
        updates = self.position_updates()
        books: dict[tuple[str, str], list[Record]] = defaultdict(list)
        for record in self.fills:
            books[(record.payload.account_id, record.payload.instrument_id)].append(record)
        problems: list[str] = []
        for key, records in books.items():
            states = fifo([r.payload for r in records])
            for n, record in enumerate(records):
                answers = updates.get(record.payload.report_id, [])
                if not answers:
                    continue  # reported by fills_applied_not_once
                first, *again = answers
                if not _same_state(first, states[n]):
                    problems.append(
                        f"{key} after {record.payload.trade_id}: {first} != {states[n]}"
                    )
                for got in again:
                    if not any(_same_state(got, later) for later in states[n:]):
                        problems.append(
                            f"{key} after {record.payload.trade_id}, published again: {got} is "
                            "no position the book had at or after that fill"
                        )
        return problems

    def venue_final(self) -> dict[str, ExecutionReport]:
        """The venue's last report of each order (exec.reports is ordered per account)."""
        return {r.payload.client_order_id: r.payload for r in self.ledger}


@dataclass(frozen=True)
class StoredOrder:
    """One row of the oms's `orders` table."""

    client_order_id: str
    status: OrderStatus
    quantity: Decimal
    filled_quantity: Decimal
    avg_fill_price: Decimal | None


def stored_orders(dsn: str, accounts: Iterable[str]) -> dict[str, StoredOrder]:
    """The oms's orders of `accounts`, as PostgreSQL holds them."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT client_order_id, status, quantity, filled_quantity, avg_fill_price "
            "FROM orders WHERE account_id = ANY(%s)",
            (list(accounts),),
        ).fetchall()
    return {
        r[0]: StoredOrder(r[0], OrderStatus(r[1]), Decimal(r[2]), Decimal(r[3]), r[4]) for r in rows
    }


def _lost_by_the_venue(venue: ExecutionReport, order: StoredOrder) -> bool:
    """The venue's last word on the order is a QUERY's UNKNOWN_ORDER, and the oms canceled it."""
    return (
        venue.order_status is OrderStatus.REJECTED
        and (venue.reason or "").startswith("UNKNOWN_ORDER")
        and order.status is OrderStatus.CANCELED
    )


def oms_vs_venue(flow: FlowRecords, stored: dict[str, StoredOrder]) -> list[str]:
    """Mismatches between the oms's stored orders and what the venue reported."""
    problems: list[str] = []
    filled: dict[str, Decimal] = defaultdict(Decimal)
    for record in flow.fills:
        filled[record.payload.client_order_id] += record.payload.last_qty
    for client_order_id, venue in flow.venue_final().items():
        order = stored.get(client_order_id)
        if order is None:
            problems.append(f"{client_order_id}: the venue knows it, the oms's database does not")
            continue
        if _lost_by_the_venue(venue, order):
            # The simulated venue's working orders die with execution's process; the oms's
            # QUERY at its next start gets UNKNOWN_ORDER and cancels what works nowhere
            # (services/oms, `_on_unknown_at_venue`). What was filled before must still agree.
            if order.filled_quantity != filled[client_order_id]:
                problems.append(
                    f"{client_order_id}: lost by the venue, filled oms {order.filled_quantity}, "
                    f"ledger {filled[client_order_id]}"
                )
            continue
        if order.status is not venue.order_status:
            problems.append(f"{client_order_id}: oms {order.status}, venue {venue.order_status}")
        if not order.filled_quantity == filled[client_order_id] == venue.cum_qty:
            problems.append(
                f"{client_order_id}: filled oms {order.filled_quantity}, ledger "
                f"{filled[client_order_id]}, venue cum {venue.cum_qty}"
            )
        if order.avg_fill_price != venue.avg_price:
            problems.append(
                f"{client_order_id}: avg oms {order.avg_fill_price}, venue {venue.avg_price}"
            )
    for client_order_id in flow.approved() - set(flow.venue_final()):
        order = stored.get(client_order_id)
        problems.append(f"{client_order_id}: approved, never reached the venue (oms {order})")
    return problems


def busy_groups(bootstrap: str) -> dict[str, int]:
    """Members of the stages' fixed consumer groups right now, by group."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    listed = {g.group_id for g in admin.list_consumer_groups().result().valid}
    wanted = [g for g in SHARED_GROUPS if g in listed]
    if not wanted:
        return {}
    described = admin.describe_consumer_groups(wanted).items()
    return {g: n for g, f in described if (n := len(f.result().members))}


async def wait_groups_free(bootstrap: str, timeout: float = 30.0) -> dict[str, int]:
    """Wait until no process is in the stages' groups (a killed one stays a session timeout)."""
    deadline = time.monotonic() + timeout
    busy = await asyncio.to_thread(busy_groups, bootstrap)
    while busy and time.monotonic() < deadline:
        await asyncio.sleep(2.0)
        busy = await asyncio.to_thread(busy_groups, bootstrap)
    return busy


def check_alive(mesh: Mesh, names: Iterable[str] | None = None) -> list[str]:
    """The stages (by process name) that are not running."""
    chosen = [mesh.stages[n] for n in names] if names is not None else mesh.stages.values()
    return [f"{s.name} exited {s.returncode}" for s in chosen if s.returncode is not None]


async def poll_until(
    reader: TopicReader,
    run: Run,
    timeout: float,
    *,
    done: Any = None,
    drained: Callable[[], bool] | None = None,
) -> FlowRecords:
    """Poll the flow topics until `done(flow)` (default: settled) or `timeout`.

    With `drained`, also until it returns True (checked once `done` holds): the flow read so
    far can look settled while a stage still holds output it has not published.
    """
    done = done or (lambda flow: flow.settled())
    deadline = time.monotonic() + timeout
    flow = FlowRecords.of(reader, run)
    while time.monotonic() < deadline:
        await asyncio.to_thread(reader.poll, 0.5)
        flow = FlowRecords.of(reader, run)
        if done(flow) and (drained is None or await asyncio.to_thread(drained)):
            break
    return flow


#: The stage whose output starts the order flow, and the inputs it turns into intents.
SOURCE_GROUP = "signals"
SOURCE_TOPICS = (Topic.MD_BARS, Topic.MD_TICKS)


def source_drained(bootstrap: str) -> bool:
    """True if signals has committed every bar and tick on the broker.

    signals commits an input only once its intents are acknowledged, so then no intent is
    still held in a producer buffer (after a broker restart, say), and a flow read that is
    settled stays settled. Market data here is published without transactions: no commit
    markers sit between the committed offset and the end.
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": SOURCE_GROUP})
    try:
        for topic in SOURCE_TOPICS:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            wanted = [TopicPartition(topic, p) for p in meta.partitions]
            for tp in consumer.committed(wanted, timeout=10):
                _, high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
                if high > 0 and tp.offset < high:
                    return False
        return True
    finally:
        consumer.close()


# ------------------------------------------------------------------------------ a run --

#: How long the replay process may take, beyond its own paced span (a broker restart stalls it).
FEED_TIMEOUT_S = 240.0


@dataclass
class Live:
    """The run in progress, as a fault injector sees it: the mesh and each stage's process."""

    run: Run
    mesh: Mesh
    env: dict[str, dict[str, str]]
    bootstrap: str
    #: The process name of each stage's current incarnation ("oms", then "oms-2", ...).
    current: dict[str, str] = field(default_factory=dict)

    async def restart(self, stage: str) -> str:
        """Start a new incarnation of `stage` (the old one must be gone); return its name."""
        n = sum(1 for name in self.mesh.stages if name.split("-")[0] == stage) + 1
        name = f"{stage}-{n}"
        await self.mesh.start(stage, self.env[stage], name=name)
        self.current[stage] = name
        return name

    def process(self, stage: str) -> Any:
        return self.mesh.stages[self.current[stage]]


@dataclass
class RunResult:
    """Everything a finished run left behind, read back after every stage stopped."""

    run: Run
    flow: FlowRecords
    settled: bool
    #: Stages not running just before the SIGTERM (process name and exit status).
    not_running: list[str]
    #: Exit status of each current incarnation on SIGTERM.
    codes: dict[str, int]
    #: Messages of this run found on a dead-letter topic, by topic.
    dead: dict[str, int]
    stored: dict[str, StoredOrder]
    feed: dict[str, Any]
    timeline: dict[str, float]
    logs: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)


async def run_flow(
    *,
    bootstrap: str,
    database_url: str,
    log_dir: Path,
    compress: float,
    faults: Any = None,
    settle_timeout: float = 90.0,
    redis_url: str | None = None,
) -> RunResult:
    """Run the six stages and the replay; `faults(live)` runs beside the replay if given."""
    began = time.monotonic()
    timeline: dict[str, float] = {}

    def reached(phase: str) -> None:
        timeline[phase] = round(time.monotonic() - began, 1)

    run = Run.new()
    env = stage_env(run, bootstrap=bootstrap, database_url=database_url, redis_url=redis_url)
    mesh = Mesh(log_dir)
    live = Live(run, mesh, env, bootstrap)
    # The topics are shared with every earlier run: read only what comes after this one began.
    began_at = await asyncio.to_thread(stable_ends, bootstrap, FLOW_TOPICS + DEAD_LETTER_TOPICS)
    reader = TopicReader(bootstrap, FLOW_TOPICS).open(since=began_at)
    extra: dict[str, Any] = {}
    try:
        for stage in STAGES:
            await mesh.start(stage, env[stage])
            live.current[stage] = stage
        await mesh.wait_ready()
        reached("ready")
        feed = await start_feed(run, bootstrap=bootstrap, compress=compress, log_dir=log_dir)
        injector = asyncio.create_task(faults(live)) if faults else None
        out, _ = await asyncio.wait_for(feed.communicate(), FEED_TIMEOUT_S)
        reached("replayed")
        if injector is not None:
            extra = await injector or {}
            reached("faults done")
        summary = json.loads(out.decode().strip().splitlines()[-1]) if out.strip() else {}
        summary["returncode"] = feed.returncode
        flow = await poll_until(
            reader, run, settle_timeout, drained=lambda: source_drained(bootstrap)
        )
        settled = flow.settled()
        reached("settled")
        names = list(live.current.values())
        not_running = check_alive(mesh, names)
        codes = await mesh.stop(*names)
        reached("stopped")
        final = TopicReader(bootstrap, FLOW_TOPICS + DEAD_LETTER_TOPICS).open(since=began_at)
        try:
            await asyncio.to_thread(final.read_to_end, 60.0)
            flow = FlowRecords.of(final, run)
            dead = {t: n for t in DEAD_LETTER_TOPICS if (n := len(final.of(t, run.owns_any)))}
        finally:
            final.close()
        stored = await asyncio.to_thread(stored_orders, database_url, run.accounts)
        reached("read back")
        logs = {name: s.tail(4000) for name, s in mesh.stages.items()}
        return RunResult(
            run, flow, settled, not_running, codes, dead, stored, summary, timeline, logs, extra
        )
    finally:
        reader.close()
        await mesh.close()
