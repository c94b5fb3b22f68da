"""The health and metrics HTTP server (/healthz, /readyz, /metrics) and the dependency wait."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, Gauge
from prometheus_client.exposition import choose_encoder
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

log = logging.getLogger(__name__)

#: A readiness check: passes unless it raises or returns False. May be sync or async.
ReadinessCheck = Callable[[], bool | Awaitable[bool | None] | None]

SERVICE_INFO = Gauge(
    "quantmesh_service_info",
    "Service name and version of this process (the value is always 1).",
    ["service", "version"],
)
SERVICE_UP = Gauge(
    "quantmesh_service_up",
    "1 while the service is running (RUNNING or DEGRADED), else 0.",
    ["service"],
)
READINESS_CHECK = Gauge(
    "quantmesh_readiness_check",
    "1 if the named readiness check passed when last run, else 0.",
    ["service", "check"],
)


class DependencyUnavailableError(RuntimeError):
    """A dependency (broker, database, cache) stayed unreachable for the whole wait."""

    def __init__(self, dependency: str, target: str, waited_s: float, cause: BaseException) -> None:
        self.dependency = dependency
        self.target = target
        self.cause = cause
        reason = f"{type(cause).__name__}: {cause}".strip().rstrip(":")
        super().__init__(f"{dependency} unreachable at {target} after {waited_s:.1f}s: {reason}")


async def wait_for_dependency(
    dependency: str,
    target: str,
    probe: Callable[[], Awaitable[Any]],
    *,
    timeout_s: float,
    attempt_timeout_s: float = 5.0,
) -> Any:
    """Call `probe` until it succeeds, retrying with backoff for at most `timeout_s` seconds.

    Returns what the probe returned. Raises DependencyUnavailableError naming `dependency` and
    `target` (which must not hold a password) with the last error once time is up.
    """
    started = time.monotonic()

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "waiting for %s at %s (attempt %d): %s",
            dependency,
            target,
            state.attempt_number,
            error,
            extra={"dependency": dependency, "attempt": state.attempt_number},
        )

    retrying = AsyncRetrying(
        stop=stop_after_delay(timeout_s),
        wait=wait_exponential(multiplier=0.2, max=2.0),
        retry=retry_if_exception_type(Exception),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                remaining = max(0.1, timeout_s - (time.monotonic() - started))
                return await asyncio.wait_for(probe(), min(attempt_timeout_s, remaining))
    except Exception as exc:
        raise DependencyUnavailableError(
            dependency, target, time.monotonic() - started, exc
        ) from exc
    raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover


class HealthServer:
    """Serves liveness, readiness and Prometheus metrics over HTTP.

    - `/healthz`: 200 `{"status": "ok"}` while the event loop serves requests and the `live`
      predicate holds (a FAULTED service answers 503 so an orchestrator restarts it).
    - `/readyz`: 200 only when every registered readiness check passes, else 503 naming the
      failing checks with their errors.
    - `/metrics`: the Prometheus registry in the format the scraper asks for.
    """

    def __init__(
        self,
        service: str,
        *,
        version: str,
        host: str = "0.0.0.0",
        port: int = 0,
        registry: CollectorRegistry = REGISTRY,
        check_timeout_s: float = 2.0,
    ) -> None:
        self.service = service
        self.version = version
        self.host = host
        self._requested_port = port
        self.registry = registry
        self.check_timeout_s = check_timeout_s
        self._checks: dict[str, ReadinessCheck] = {}
        self._live: Callable[[], bool] = lambda: True
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        SERVICE_INFO.labels(service, version).set(1)

    # -- registration ----------------------------------------------------------------------

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        """Register a readiness check under `name` (replacing one of the same name)."""
        self._checks[name] = check

    def remove_check(self, name: str) -> None:
        """Unregister a readiness check (no error if absent)."""
        self._checks.pop(name, None)

    def set_liveness(self, live: Callable[[], bool]) -> None:
        """Set the predicate /healthz consults besides the loop answering at all."""
        self._live = live

    @property
    def checks(self) -> list[str]:
        """Names of the registered readiness checks."""
        return list(self._checks)

    # -- evaluation ------------------------------------------------------------------------

    async def readiness(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        """Run every readiness check concurrently; return (all passed, per-check results)."""
        names = list(self._checks)
        results = await asyncio.gather(*(self._run_check(self._checks[n]) for n in names))
        report: dict[str, dict[str, Any]] = {}
        for name, (ok, error) in zip(names, results, strict=True):
            READINESS_CHECK.labels(self.service, name).set(1 if ok else 0)
            report[name] = {"ok": ok} if ok else {"ok": False, "error": error}
        return all(ok for ok, _ in results), report

    async def _run_check(self, check: ReadinessCheck) -> tuple[bool, str | None]:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, self.check_timeout_s)
        except TimeoutError:
            return False, f"timed out after {self.check_timeout_s}s"
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"
        if result is False:
            return False, "check returned false"
        return True, None

    # -- HTTP ------------------------------------------------------------------------------

    async def _healthz(self, _request: web.Request) -> web.Response:
        try:
            live = self._live()
        except Exception as exc:
            log.exception("liveness predicate raised")
            return web.json_response({"status": "error", "error": str(exc)}, status=503)
        if not live:
            return web.json_response({"status": "error"}, status=503)
        return web.json_response({"status": "ok", "service": self.service})

    async def _readyz(self, _request: web.Request) -> web.Response:
        ready, report = await self.readiness()
        failing = [name for name, result in report.items() if not result["ok"]]
        body = {
            "status": "ready" if ready else "not_ready",
            "service": self.service,
            "checks": report,
            "failing": failing,
        }
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.registry), headers={"Content-Type": content_type})

    def make_app(self) -> web.Application:
        """Return the aiohttp application (for embedding or tests)."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> int:
        """Bind and serve; returns the bound port (useful when the requested port is 0)."""
        if self._runner is not None:
            raise RuntimeError("health server already started")
        # A short shutdown timeout: probes and scrapes are quick, and stop() sits on the
        # service's shutdown budget.
        runner = web.AppRunner(
            self.make_app(), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        address = runner.addresses[0]
        self._port = int(address[1])
        log.info(
            "health server listening on %s:%d", self.host, self._port, extra={"port": self._port}
        )
        return self._port

    @property
    def port(self) -> int:
        """The bound port (after start)."""
        if self._port is None:
            raise RuntimeError("health server not started")
        return self._port

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
