"""The api stage in a one-process run: its settings, its login and the state no OMS stores."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from quantmesh_api.config import ApiSettings
from quantmesh_api.kv import MemoryKv
from quantmesh_api.service import ApiService
from quantmesh_api.store import MemoryApiStore
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import ExecutionReport, Order, Tick
from quantmesh_common.topics import Topic
from quantmesh_embedded.mesh import EmbeddedMesh
from quantmesh_marketdata.stats import RollingStats24h

DEFAULT_API_HOST = "127.0.0.1"
DEFAULT_API_PORT = 8000
DEFAULT_ADMIN_USER = "admin"


@dataclass(frozen=True)
class ApiOptions:
    """Where a run serves the api (REST + WebSocket under /api/v1)."""

    host: str = DEFAULT_API_HOST
    port: int = DEFAULT_API_PORT

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"api port must be in [0, 65535], got {self.port}")


@dataclass(frozen=True)
class ApiLogin:
    """How to log in to a run's api: its bootstrap admin."""

    username: str
    #: None when the password came from QM_BOOTSTRAP_ADMIN_PASSWORD (it is not echoed).
    generated_password: str | None


def api_settings(options: ApiOptions) -> tuple[ApiSettings, ApiLogin]:
    """The api's settings from QM_* as the service reads them, and what one run adds.

    A run needs a signing key and someone to log in: without QM_JWT_SECRET the tokens are
    signed with a random key of this run; without QM_BOOTSTRAP_ADMIN_USER / _PASSWORD the
    admin is `admin` with a random password of this run (printed at start).
    """
    env = os.environ
    given: dict[str, Any] = {"bus": "memory", "http_host": options.host, "api_port": options.port}
    if not env.get("QM_JWT_SECRET"):
        given["jwt_secret"] = SecretStr(secrets.token_urlsafe(48))
    username = env.get("QM_BOOTSTRAP_ADMIN_USER") or DEFAULT_ADMIN_USER
    given["bootstrap_admin_user"] = username
    generated = None
    if not env.get("QM_BOOTSTRAP_ADMIN_PASSWORD"):
        generated = secrets.token_urlsafe(12)
        given["bootstrap_admin_password"] = SecretStr(generated)
    return ApiSettings(**given), ApiLogin(username, generated)


class EmbeddedApi:
    """The api stage added to a mesh, fed what the services' storage would give it.

    In the services the api reads orders and fills from the OMS's PostgreSQL tables and the
    latest prices from the marketdata recorder's Redis hashes; one process has neither, so
    this folds `orders.updates`, `exec.reports` and the feed's ticks into the api's in-memory
    store and key-value state, as those writers would.
    """

    def __init__(self, mesh: EmbeddedMesh, options: ApiOptions) -> None:
        settings, self.login = api_settings(options)
        self.options = options
        service = mesh.add(ApiService, settings)
        assert isinstance(service, ApiService)
        self.service = service
        self._stats: dict[str, RollingStats24h] = {}

    async def attach(self, mesh: EmbeddedMesh) -> None:
        """Subscribe the feeding to the mesh's bus (before `mesh.start()`)."""
        topics = [Topic.ORDERS_UPDATES, Topic.EXEC_REPORTS, Topic.MD_TICKS]
        await mesh.bus.subscribe("run.api", topics, self.on_event).start()

    @property
    def port(self) -> int:
        """The port the api listens on (known once the mesh started)."""
        return self.service.port if self.service.port is not None else self.options.port

    @property
    def url(self) -> str:
        """The api's base URL."""
        return f"http://{self.options.host}:{self.port}/api/v1"

    def on_event(self, envelope: Envelope[Any]) -> None:
        """Fold an order state, a fill or a trade print into the api's state."""
        state = self.service.state
        if state is None:  # not set up yet: nothing can have asked for it
            return
        event = envelope.payload
        store, kv = state.store, state.kv
        if isinstance(event, Tick):
            if isinstance(kv, MemoryKv):
                stats = self._stats.get(event.instrument_id)
                if stats is None:
                    stats = self._stats[event.instrument_id] = RollingStats24h(event.instrument_id)
                if stats.update(event) and (snapshot := stats.snapshot()) is not None:
                    kv.prices[event.instrument_id] = snapshot.as_fields()
        elif isinstance(store, MemoryApiStore):
            if isinstance(event, Order):
                store.record_order(event)
            elif isinstance(event, ExecutionReport):
                store.record_fill(event)

    def banner(self) -> str:
        """What the run prints at start: the api's URL and how to get a token."""
        password = self.login.generated_password or "$QM_BOOTSTRAP_ADMIN_PASSWORD"
        return (
            f"api: {self.url} (docs {self.url}/docs, WebSocket "
            f"ws://{self.options.host}:{self.port}/api/v1/ws?token=TOKEN)\n"
            f"  admin {self.login.username}, password {password}; a token:\n"
            f"  curl -s {self.url}/auth/token -d username={self.login.username}"
            f" -d password={password}\n"
        )
