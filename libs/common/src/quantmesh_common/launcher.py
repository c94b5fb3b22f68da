"""`make run`: start every service of the mesh as its own process on the local stack."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path

#: The stages in start order (upstream first), with the port of their health server.
SERVICES: dict[str, int] = {
    "marketdata": 8101,
    "signals": 8102,
    "risk": 8103,
    "oms": 8104,
    "execution": 8105,
    "portfolio": 8106,
    "alerts": 8107,
    "api": 8000,
}


#: What `make run` sets for a stage unless the caller's environment already does.
DEMO_DEFAULTS: dict[str, dict[str, str]] = {
    "marketdata": {"QM_FEED": "synthetic", "QM_INSTRUMENTS": "BTC-USDT.SIM,ETH-USDT.SIM"},
}


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _pump(name: str, stream: asyncio.StreamReader) -> None:
    width = max(len(n) for n in SERVICES)
    while line := await stream.readline():
        _say(f"{name:<{width}} | {line.decode(errors='replace').rstrip()}")


async def _start(name: str, port: int) -> asyncio.subprocess.Process | None:
    exe = shutil.which(f"quantmesh-{name}", path=str(Path(sys.executable).parent))
    if exe is None:
        _say(f"launcher: quantmesh-{name} is not installed; run `make venv`")
        return None
    env = {**DEMO_DEFAULTS.get(name, {}), **os.environ}
    env.update(QM_SERVICE_NAME=name, QM_HTTP_PORT=str(port))
    proc = await asyncio.create_subprocess_exec(
        exe, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    assert proc.stdout is not None
    asyncio.get_running_loop().create_task(_pump(name, proc.stdout))
    return proc


async def run_mesh() -> int:
    """Start the services, print where they answer, stop them all on Ctrl-C or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    procs: dict[str, asyncio.subprocess.Process] = {}
    for name, port in SERVICES.items():
        proc = await _start(name, port)
        if proc is not None:
            procs[name] = proc
            _say(f"launcher: {name} started (pid {proc.pid}), http://127.0.0.1:{port}/readyz")
    _say(
        "launcher: the mesh runs on the local stack. Stages without handlers yet only serve "
        "/healthz, /readyz and /metrics (see README: status). Ctrl-C stops everything."
    )
    waiters = {asyncio.ensure_future(p.wait()): n for n, p in procs.items()}
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([*waiters, stopper], return_when=asyncio.FIRST_COMPLETED)
    failed = [waiters[t] for t in done if t in waiters]
    for name in failed:
        _say(f"launcher: {name} exited with {procs[name].returncode}; stopping the mesh")
    for proc in procs.values():
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    for name, proc in procs.items():
        try:
            await asyncio.wait_for(proc.wait(), timeout=20)
        except TimeoutError:
            _say(f"launcher: {name} did not stop within 20 s; killing it")
            proc.kill()
    return 1 if failed else 0


def main() -> None:
    """Entry point of `python -m quantmesh_common.launcher`."""
    raise SystemExit(asyncio.run(run_mesh()))


if __name__ == "__main__":
    main()
