"""Fixtures of the e2e tests: each stage as its own process on the real stack, and topic readers."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._listoffsets import OffsetSpec  # admin re-exports it, untyped

# Imported for its side effect: it registers every schema that `decode` reads.
from quantmesh_common import messages  # noqa: F401
from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.envelope import DecodeError, Envelope, Event, decode
from quantmesh_common.testing.postgres import fresh_schema, server_dsn_for_tests

#: "The partition's end": with READ_COMMITTED, its last stable offset.
_LATEST = OffsetSpec.latest()  # type: ignore[no-untyped-call]

#: Where the console scripts of the workspace (quantmesh-<stage>) are installed.
BIN = Path(sys.executable).parent
#: How long a stage may take to answer /readyz 200 (it waits for its dependencies first).
START_TIMEOUT_S = 90.0
#: How long a stage may take to drain and exit after SIGTERM.
STOP_TIMEOUT_S = 60.0


def free_port() -> int:
    """Return a TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kafka_bootstrap() -> str:
    """Return the broker of the stack the session uses (the root conftest sets or checks it)."""
    return os.environ["QM_KAFKA_BOOTSTRAP"]


@pytest.fixture(scope="session", autouse=True)
def _one_e2e_session_per_broker() -> Iterator[None]:
    """Hold the broker's e2e lock for the session: one e2e run at a time per broker.

    The stages run in their fixed consumer groups (`portfolio`, `oms`, ...). Two e2e sessions
    on one broker (engineers sharing a stack) would put their stages in the same groups, and
    a member of the other run taking over a partition mid-test is crosstalk, not a result (a
    stop-loss's SELL applied by the other run's portfolio, to a book without the BUY, read
    -2). The tests check the groups are free when they start; this keeps them free.
    """
    bootstrap = os.environ.get("QM_KAFKA_BOOTSTRAP")
    if not bootstrap:
        yield
        return
    name = "".join(c if c.isalnum() else "-" for c in bootstrap)
    path = Path(tempfile.gettempdir()) / f"quantmesh-e2e-{name}.lock"
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.stderr.write(f"waiting for another e2e run on {bootstrap} ({path})\n")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class StageProcess:
    """One stage running as its own process, its output going to a file."""

    name: str
    proc: asyncio.subprocess.Process
    port: int
    log_path: Path

    @property
    def returncode(self) -> int | None:
        """The exit status, None while it runs."""
        return self.proc.returncode

    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines of the output (other lines are skipped)."""
        records: list[dict[str, Any]] = []
        for line in self.output().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records

    def tail(self, chars: int = 3000) -> str:
        """The end of the output, for assertion messages."""
        return self.output()[-chars:]


class Mesh:
    """Starts stages as separate processes via their console scripts, and stops them all.

    Every stage gets its own free HTTP port and `QM_BUS=kafka` on the session's stack; the
    caller adds the stage's own settings. Output goes to `<log_dir>/<name>.log`.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.stages: dict[str, StageProcess] = {}
        self._session: aiohttp.ClientSession | None = None

    async def start(
        self, stage: str, env: Mapping[str, str] | None = None, *, name: str | None = None
    ) -> StageProcess:
        """Start `quantmesh-<stage>` as process `name` (default: the stage) with extra `env`."""
        name = name or stage
        if name in self.stages:
            raise ValueError(f"{name} is already started in this mesh")
        exe = shutil.which(f"quantmesh-{stage}", path=str(BIN))
        assert exe is not None, f"quantmesh-{stage} is not installed"
        port = free_port()
        full_env = {
            **os.environ,
            "QM_HTTP_PORT": str(port),
            "QM_HTTP_HOST": "127.0.0.1",
            "QM_BUS": "kafka",
            **(env or {}),
        }
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                exe, env=full_env, stdout=log_file, stderr=asyncio.subprocess.STDOUT
            )
        stage_process = StageProcess(name, proc, port, log_path)
        self.stages[name] = stage_process
        return stage_process

    async def get(self, name: str, path: str) -> tuple[int, str]:
        """GET `path` on the stage's health server; return the status and the body."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url = f"http://127.0.0.1:{self.stages[name].port}{path}"
        async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=3)) as response:
            return response.status, await response.text()

    async def wait_ready(self, *names: str, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until every named stage (default: all) answers /readyz with 200."""
        await asyncio.gather(*(self._wait_one(n, timeout) for n in names or list(self.stages)))

    async def _wait_one(self, name: str, timeout: float) -> None:
        stage = self.stages[name]
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if stage.returncode is not None:
                raise AssertionError(
                    f"{name} exited with {stage.returncode} before it was ready:\n{stage.tail()}"
                )
            try:
                status, body = await self.get(name, "/readyz")
                if status == 200:
                    return
                last = (status, body)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = exc
            await asyncio.sleep(0.2)
        raise AssertionError(f"{name}: /readyz never answered 200: last {last!r}\n{stage.tail()}")

    async def stop(self, *names: str, timeout: float = STOP_TIMEOUT_S) -> dict[str, int]:
        """SIGTERM the named stages (default: all) at once; return each one's exit status.

        A stage still running after `timeout` is killed and reported as -9.
        """
        chosen = [self.stages[n] for n in names or list(self.stages)]
        for stage in chosen:
            if stage.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    stage.proc.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(self._reap(s, timeout) for s in chosen))
        return {s.name: code for s, code in zip(chosen, codes, strict=True)}

    async def _reap(self, stage: StageProcess, timeout: float) -> int:
        try:
            return await asyncio.wait_for(stage.proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                stage.proc.kill()
            await stage.proc.wait()
            return -signal.SIGKILL

    async def close(self) -> None:
        """Stop whatever still runs (a failed test must not leave processes behind)."""
        if any(s.returncode is None for s in self.stages.values()):
            await self.stop(timeout=20)
        if self._session is not None:
            await self._session.close()
            self._session = None


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    """A Mesh whose processes are all stopped when the test ends, passed or not."""
    started = Mesh(tmp_path)
    try:
        yield started
    finally:
        await started.close()


@dataclass(frozen=True)
class Record:
    """One message read back from a topic, decoded."""

    topic: str
    partition: int
    offset: int
    envelope: Envelope[Any]

    @property
    def payload(self) -> Any:
        """The event inside the envelope."""
        return self.envelope.payload


@dataclass
class TopicReader:
    """Reads whole topics from the beginning as a read_committed consumer without a group.

    Only committed transactions are seen, as every downstream stage sees them. `poll` takes
    what has arrived so far; `read_to_end` reads up to each partition's last stable offset as
    of the call (after the producers stopped, that is everything they committed).
    """

    bootstrap: str
    topics: tuple[str, ...]
    records: dict[str, list[Record]] = field(default_factory=dict)
    #: Messages that are not a valid envelope (malformed input others injected), by topic.
    undecodable: dict[str, int] = field(default_factory=dict)
    _consumer: Consumer | None = None
    _partitions: list[TopicPartition] = field(default_factory=list)
    #: Where `open` placed partitions past their beginning (`since`), by (topic, partition).
    _start: dict[tuple[str, int], int] = field(default_factory=dict)

    def open(self, since: Mapping[tuple[str, int], int] | None = None) -> TopicReader:
        """Assign every partition of the topics at its first offset, or at its offset in
        `since` (e.g. `stable_ends` when a run began: what came before is not the run's, and
        on a long-lived broker reading it all would cost minutes and gigabytes)."""
        start = since or {}
        self._start = {key: offset for key, offset in start.items() if offset > 0}
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                # Never subscribed or committed: the id only satisfies the client.
                "group.id": f"qmtest.e2e.reader.{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
            }
        )
        metadata = consumer.list_topics(timeout=10)
        for topic in self.topics:
            assert topic in metadata.topics, f"{topic} does not exist: run quantmesh-topics create"
            self.records[topic] = []
            self._partitions += [
                TopicPartition(topic, p, start.get((topic, p), OFFSET_BEGINNING))
                for p in metadata.topics[topic].partitions
            ]
        consumer.assign(self._partitions)
        self._consumer = consumer
        return self

    def close(self) -> None:
        """Close the consumer."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def _take(self, wait_s: float) -> int:
        assert self._consumer is not None, "call open() first"
        taken = 0
        for msg in self._consumer.consume(1000, wait_s):
            if msg.error():
                continue
            topic = msg.topic()
            value = msg.value()
            assert topic is not None
            try:
                assert value is not None
                envelope = decode(value)
            except (AssertionError, DecodeError):
                self.undecodable[topic] = self.undecodable.get(topic, 0) + 1
                continue
            partition, offset = msg.partition(), msg.offset()
            assert partition is not None
            assert offset is not None
            self.records[topic].append(Record(topic, partition, offset, envelope))
            taken += 1
        return taken

    def poll(self, wait_s: float = 0.2) -> int:
        """Read what is available now (waiting up to `wait_s` for a first message)."""
        total = self._take(wait_s)
        while taken := self._take(0):
            total += taken
        return total

    def end_offsets(self) -> dict[tuple[str, int], int]:
        """Each partition's last stable offset now: where a read_committed reader ends."""
        return _stable_ends(self.bootstrap, [(tp.topic, tp.partition) for tp in self._partitions])

    def read_to_end(self, timeout: float = 30.0) -> None:
        """Read until every partition's position reaches its end as of this call."""
        assert self._consumer is not None, "call open() first"
        # A partition with nothing past where the reader started is at its end already (its
        # position stays unset, -1001, until a message is fetched from it).
        ends = {tp: end for tp, end in self.end_offsets().items() if end > self._start.get(tp, 0)}
        deadline = time.monotonic() + timeout
        while True:
            self.poll(0.2)
            positions = self._consumer.position([TopicPartition(t, p) for t, p in ends])
            # The last offset may be a transaction marker: never delivered, but passed.
            behind = [
                (tp.topic, tp.partition, tp.offset, ends[(tp.topic, tp.partition)])
                for tp in positions
                if tp.offset < ends[(tp.topic, tp.partition)]
            ]
            if not behind:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"topics not read to their end in {timeout} s: {behind}")

    def payloads(self, topic: str, model: type[Event] | None = None) -> list[Any]:
        """The payloads read from `topic` so far (only those of `model`, if given)."""
        found = [r.payload for r in self.records[topic]]
        return found if model is None else [p for p in found if isinstance(p, model)]

    def of(self, topic: str, predicate: Any) -> list[Record]:
        """The records of `topic` whose payload satisfies `predicate`."""
        return [r for r in self.records[topic] if predicate(r.payload)]


def stable_ends(bootstrap: str, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """Each partition of `topics` at its last stable offset now (read_committed's end)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    metadata = admin.list_topics(timeout=10)
    return _stable_ends(bootstrap, [(t, p) for t in topics for p in metadata.topics[t].partitions])


#: What a broker answers for a partition whose leader is not elected yet, or a topic just made
#: (a broker just restarted answers UNKNOWN_LEADER_EPOCH until its metadata catches up).
_NO_LEADER_YET = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._TRANSPORT,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._TIMED_OUT,
    }
)


def _stable_ends(
    bootstrap: str, partitions: list[tuple[str, int]], timeout: float = 60.0
) -> dict[tuple[str, int], int]:
    """The partitions' last stable offsets, asked again while the broker cannot answer yet
    (topics just created, or a broker just started: no leader for a partition for a moment)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    while True:
        futures = admin.list_offsets(
            {TopicPartition(topic, partition): _LATEST for topic, partition in partitions},
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=10,
        )
        try:
            return {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            retriable = isinstance(error, KafkaError) and (
                error.retriable() or error.code() in _NO_LEADER_YET
            )
            if not retriable or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture
def topic_reader() -> Iterator[Callable[..., TopicReader]]:
    """Open TopicReaders over some topics; every reader is closed when the test ends."""
    readers: list[TopicReader] = []

    def open_reader(*topics: str) -> TopicReader:
        reader = TopicReader(kafka_bootstrap(), tuple(topics)).open()
        readers.append(reader)
        return reader

    yield open_reader
    for reader in readers:
        reader.close()


async def publish(topic: str, payload: Event, *, source: str = "e2e-test") -> Envelope[Any]:
    """Publish one event on the real broker, as an operator tool would, and wait for its ack."""
    bus = KafkaBus(source, kafka_bootstrap())
    await bus.start()
    try:
        envelope = await bus.publish(topic, payload)
        await bus.flush()
        return envelope
    finally:
        await bus.close()


@pytest.fixture
def database_url() -> Iterator[str]:
    """A fresh schema with every migration applied, dropped afterwards: the test's database.

    The stages find exactly the tables the code in this checkout expects, whatever state the
    stack's own database is in, and no run sees another's rows.
    """
    server = server_dsn_for_tests()
    if server is None:
        pytest.skip("no PostgreSQL: QM_DATABASE_URL is not set")
    with fresh_schema(server, "qm_e2e", migrate=True) as dsn:
        yield dsn
