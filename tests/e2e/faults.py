"""Fault injection for the e2e tests: a private stack whose broker can be stopped, and junk.

The private stack is `deploy/local/stack.sh` with its own QM_STACK_DIR and ports, so stopping
its broker never disturbs anyone else's tests on the shared one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from confluent_kafka import KafkaError, Message, Producer

from quantmesh_common.envelope import Envelope, Event, encode
from quantmesh_common.messages import Position, PositionSide
from quantmesh_common.topics import registry

REPO = Path(__file__).resolve().parents[2]
STACK_SH = REPO / "deploy" / "local" / "stack.sh"


@dataclass(frozen=True)
class PrivateStack:
    """A Kafka + PostgreSQL + Redis of our own, started by stack.sh."""

    stack_dir: Path
    kafka_port: int
    pg_port: int
    redis_port: int

    @classmethod
    def from_env(cls) -> PrivateStack:
        """The stack QM_FAULTS_STACK_DIR / QM_FAULTS_*_PORT name (defaults: /tmp/faults-stack)."""
        return cls(
            Path(os.environ.get("QM_FAULTS_STACK_DIR", "/tmp/faults-stack")),
            int(os.environ.get("QM_FAULTS_KAFKA_PORT", "29092")),
            int(os.environ.get("QM_FAULTS_PG_PORT", "25432")),
            int(os.environ.get("QM_FAULTS_REDIS_PORT", "26379")),
        )

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def database_url(self) -> str:
        return f"postgresql://quantmesh:quantmesh@127.0.0.1:{self.pg_port}/quantmesh_test"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def _stack(self, command: str, timeout: float = 240.0) -> None:
        env = {
            **os.environ,
            "QM_STACK_DIR": str(self.stack_dir),
            "QM_KAFKA_PORT": str(self.kafka_port),
            "QM_PG_PORT": str(self.pg_port),
            "QM_REDIS_PORT": str(self.redis_port),
        }
        done = subprocess.run(
            [str(STACK_SH), command], env=env, capture_output=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"stack.sh {command} failed: {done.stderr.decode()[-3000:]}")

    def up(self) -> None:
        """Start whatever of the stack is not running (idempotent)."""
        self._stack("up")

    def down(self) -> None:
        """Stop the whole private stack."""
        self._stack("down")

    def kafka_pid(self) -> int:
        return int((self.stack_dir / "kafka" / "kafka.pid").read_text().strip())

    def stop_broker(self, timeout: float = 60.0) -> None:
        """SIGTERM the private broker and wait until its process is gone."""
        pid = self.kafka_pid()
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)

    def start_broker(self) -> None:
        """Start the broker again (`up` finds PostgreSQL and Redis running)."""
        self.up()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of a process we did not start still answers kill 0: look at its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# ----------------------------------------------------------------- malformed messages --

KINDS = ("garbage", "wrong-schema", "bad-fields")


def _wrong_schema(tag: str, n: int) -> bytes:
    """A valid envelope of a schema no stage of the flow consumes (a portfolio position)."""
    payload: Event = Position(
        account_id=f"junk-{tag}",
        instrument_id="JUNK-USDT.SIM",
        side=PositionSide.LONG,
        quantity=Decimal(1),
        avg_entry_price=Decimal(1),
        ts_event=n + 1,
    )
    return encode(Envelope.wrap(payload, source="e2e-junk", ts_event=n + 1, ts_init=n + 1))


def _bad_fields(topic: str, n: int) -> bytes:
    """Valid JSON naming the topic's own schema, whose payload fields are all wrong."""
    spec = registry()[topic]
    return json.dumps(
        {
            "schema_name": spec.model.SCHEMA_NAME,
            "schema_version": spec.model.SCHEMA_VERSION,
            "event_id": f"junk-{n}",
            "ts_event": n + 1,
            "ts_init": n + 1,
            "correlation_id": f"junk-{n}",
            "source": "e2e-junk",
            "payload": {"instrument_id": 42, "account_id": [], "ts_event": "yesterday"},
        }
    ).encode()


def malformed(topic: str, n: int, rng: random.Random, tag: str) -> tuple[str, bytes]:
    """The n-th malformed message for `topic`: its kind and bytes."""
    kind = KINDS[n % len(KINDS)]
    if kind == "garbage":
        return kind, rng.randbytes(rng.randint(1, 64))
    if kind == "wrong-schema":
        return kind, _wrong_schema(tag, n)
    return kind, _bad_fields(topic, n)


@dataclass(frozen=True)
class Injected:
    """Where one malformed message landed."""

    topic: str
    partition: int
    offset: int
    kind: str


def inject(
    bootstrap: str, topics: tuple[str, ...], per_topic: int, seed: int, tag: str
) -> list[Injected]:
    """Produce `per_topic` malformed messages on each topic; return where each landed."""
    rng = random.Random(seed)
    landed: list[Injected] = []
    failures: list[str] = []
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})

    def delivered(kind: str) -> Callable[[KafkaError | None, Message], None]:
        def report(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                failures.append(str(err))
                return
            landed.append(
                Injected(str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0), kind)
            )

        return report

    for topic in topics:
        for n in range(per_topic):
            kind, value = malformed(topic, n, rng, tag)
            key = f"junk-{rng.randrange(1 << 30)}".encode()
            producer.produce(topic, value, key=key, on_delivery=delivered(kind))
            producer.poll(0)
    remaining = producer.flush(60)
    assert remaining == 0, f"{remaining} malformed messages not delivered"
    assert not failures, failures[:3]
    return landed
