"""Configuration of the signals stage: the shared QM_* settings, its port and its strategies."""

from __future__ import annotations

import json
import socket
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import NoDecode

from quantmesh_common.messages import Identifier
from quantmesh_common.settings import ServiceSettings
from quantmesh_signals.engine import StrategyHost, StrategySpec
from quantmesh_signals.strategy import UnknownStrategyError

#: Port of the stage's health and metrics server; QM_HTTP_PORT overrides it.
DEFAULT_HTTP_PORT = 8102


class SignalsSettings(ServiceSettings):
    """Settings of the signals stage."""

    http_port: int = Field(
        default=DEFAULT_HTTP_PORT, ge=0, le=65535, description="health + metrics server"
    )
    #: QM_STRATEGIES: a JSON list of strategy specs. NoDecode: the JSON is parsed by the
    #: validator below, so bad JSON is reported as a QM_STRATEGIES error like any other.
    strategies: Annotated[list[StrategySpec], NoDecode] = Field(
        default_factory=list,
        description='JSON list: [{"id", "name", "account_id", "instruments", "params"}]',
    )

    signals_group: Identifier = Field(
        default="signals",
        description="consumer group of the instances that share the strategies' work",
    )
    signals_instance: Identifier = Field(
        default_factory=socket.gethostname,
        description="stable id of this instance: its control group is <group>.control.<id>",
    )
    signals_topic_prefix: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9._-]*$",
        description="prefix of every topic the stage reads and writes (isolated runs)",
    )
    signals_replay: bool = Field(
        default=True,
        description="on Kafka, rebuild strategy state at start by replaying consumed input",
    )
    signals_snapshot_dir: str = Field(
        default="",
        description="where this instance keeps its engine snapshot (empty: none, full replay)",
    )
    signals_snapshot_interval_s: float = Field(
        default=300.0, gt=0, le=86_400, description="seconds between periodic snapshots"
    )

    @field_validator("strategies", mode="before")
    @classmethod
    def _parse_json(cls, value: Any) -> Any:
        if isinstance(value, str | bytes):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"is not valid JSON ({exc})") from None
        return value

    @field_validator("strategies")
    @classmethod
    def _buildable(cls, specs: list[StrategySpec]) -> list[StrategySpec]:
        # Build each strategy once now, so an unknown name or a bad parameter stops the
        # service at start with exit 2, not at its first bar.
        seen: set[str] = set()
        for spec in specs:
            if spec.id in seen:
                raise ValueError(f"strategy id {spec.id!r} appears twice")
            seen.add(spec.id)
            try:
                StrategyHost.from_spec(spec)
            except UnknownStrategyError as exc:
                raise ValueError(f"strategy {spec.id!r}: {exc}") from None
            except ValidationError as exc:
                problems = "; ".join(
                    _problem(e["loc"], e["msg"]) for e in exc.errors(include_url=False)
                )
                raise ValueError(f"strategy {spec.id!r} ({spec.name}) params: {problems}") from None
        return specs


def _problem(loc: tuple[int | str, ...], msg: str) -> str:
    text = msg.removeprefix("Value error, ")
    return f"{'.'.join(str(p) for p in loc)}: {text}" if loc else text
