"""The mesh end to end on the real stack: every stage starts, is ready, and stops cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from confluent_kafka.admin import AdminClient

from quantmesh_common.launcher import SERVICES
from quantmesh_common.topics import registry

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=3)) as response:
        return response.status, await response.text()


async def _wait_ready(
    session: aiohttp.ClientSession, port: int, proc: asyncio.subprocess.Process
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last: object = None
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise AssertionError(f"exited with {proc.returncode} before it was ready")
        try:
            status, body = await _get(session, f"http://127.0.0.1:{port}/readyz")
            if status == 200:
                return
            last = (status, body)
        except (aiohttp.ClientError, OSError) as exc:
            last = exc
        await asyncio.sleep(0.2)
    raise AssertionError(f"/readyz on {port} never answered 200: last {last!r}")


def test_every_registered_topic_and_its_dead_letter_twin_exist_on_the_broker() -> None:
    admin = AdminClient({"bootstrap.servers": os.environ["QM_KAFKA_BOOTSTRAP"]})

    metadata = admin.list_topics(timeout=10)

    for spec in registry():
        for name in (spec.name, spec.name + ".dlq"):
            assert name in metadata.topics, f"{name} missing: run quantmesh-topics create"
            assert len(metadata.topics[name].partitions) == spec.partitions, name


async def test_every_stage_starts_on_the_stack_is_ready_and_stops_on_sigterm() -> None:
    # Arrange: every service as its own process, on the real Kafka, PostgreSQL and Redis.
    procs: dict[str, tuple[asyncio.subprocess.Process, int]] = {}
    for name in SERVICES:
        exe = shutil.which(f"quantmesh-{name}", path=str(BIN))
        assert exe is not None, f"quantmesh-{name} is not installed"
        port = _free_port()
        env = {**os.environ, "QM_HTTP_PORT": str(port), "QM_HTTP_HOST": "127.0.0.1"}
        env["QM_BUS"] = "kafka"
        proc = await asyncio.create_subprocess_exec(
            exe, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        procs[name] = (proc, port)
    try:
        async with aiohttp.ClientSession() as session:
            # Act: wait until every stage says it is ready, then read its metrics.
            await asyncio.gather(*(_wait_ready(session, port, p) for p, port in procs.values()))
            metrics = {
                name: (await _get(session, f"http://127.0.0.1:{port}/metrics"))[1]
                for name, (_, port) in procs.items()
            }
    finally:
        for proc, _ in procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        outputs = {
            name: (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
            for name, (proc, _) in procs.items()
        }

    # Assert: each stage identified itself in its metrics, logged JSON, and exited 0.
    for name, (proc, _) in procs.items():
        assert f'quantmesh_service_info{{service="{name}"' in metrics[name], name
        assert proc.returncode == 0, f"{name} exited {proc.returncode}: {outputs[name][-2000:]}"
        lines = [json.loads(line) for line in outputs[name].splitlines() if line.strip()]
        assert any(line.get("service") == name for line in lines), name
