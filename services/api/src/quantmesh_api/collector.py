"""The collector's config as the api takes it, and the latest status of each collection job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from quantmesh_common.messages import CollectorStatus

#: The marketdata scheduler reads a bare number as epoch s, ms or ns by its magnitude; from
#: 10**14 on it is ns, so the api takes only ns it cannot mistake (after 1970-01-02T03:46:40Z).
MIN_NS = 10**14
MAX_NS = 2**62
#: Jobs kept (the oldest by event time go first); a job is one (symbol, timeframe) per venue.
MAX_JOBS = 1000

Symbol = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9/:._-]*$")
]
#: "trades" or a bar interval: a positive count and a unit (s, m, h, d, w).
Timeframe = Annotated[
    str, StringConstraints(max_length=16, pattern=r"^(trades|[1-9][0-9]*[smhdw])$")
]
VenueName = Annotated[
    str, StringConstraints(min_length=1, max_length=32, pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
]


def time_ns(value: int | str, name: str) -> int:
    """`value` (epoch ns, or an ISO time with a zone) in epoch ns; ValueError with the reason."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        ns = value
    else:
        try:
            moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{name}: {value!r} is not epoch ns or an ISO time") from None
        if moment.tzinfo is None:
            raise ValueError(f"{name}: {value!r} needs a time zone (e.g. Z)")
        ns = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000
    if not MIN_NS <= ns <= MAX_NS:
        raise ValueError(f"{name}: {ns} ns is outside 1970-01-02T03:46:40Z to 2116")
    return ns


class CollectorConfig(BaseModel):
    """What to collect: the params of COLLECTOR_START (the scheduler's defaults fill the rest)."""

    model_config = ConfigDict(extra="forbid")

    symbols: list[Symbol] = Field(min_length=1, max_length=200, description="ccxt symbols.")
    timeframes: list[Timeframe] | None = Field(
        default=None, min_length=1, max_length=20, description='e.g. ["1m", "1h", "trades"].'
    )
    interval_s: float | None = Field(
        default=None, gt=0, le=7 * 86_400, allow_inf_nan=False, description="Between rounds."
    )
    since: int | str | None = Field(default=None, description="Epoch ns or an ISO time.")
    until: int | str | None = Field(default=None, description="Epoch ns or an ISO time.")
    lookback_s: float | None = Field(
        default=None, gt=0, le=3650 * 86_400, allow_inf_nan=False, description="Without since."
    )
    venue: VenueName | None = Field(default=None, description="ccxt exchange id.")
    page_limit: int | None = Field(default=None, ge=1, le=5000)

    @field_validator("since", "until")
    @classmethod
    def _to_ns(cls, value: int | str | None, info: ValidationInfo) -> int | None:
        return None if value is None else time_ns(value, info.field_name or "time")

    @model_validator(mode="after")
    def _range(self) -> CollectorConfig:
        if self.since is not None and self.until is not None and int(self.until) <= int(self.since):
            raise ValueError("until must be after since")
        return self

    def params(self) -> dict[str, str]:
        """The ControlCommand params, in the keys and forms CollectRequest.from_params reads."""
        params = {"symbols": ",".join(self.symbols)}
        if self.timeframes is not None:
            params["timeframes"] = ",".join(self.timeframes)
        if self.interval_s is not None:
            params["interval"] = repr(self.interval_s)
        if self.since is not None:
            params["since"] = str(self.since)
        if self.until is not None:
            params["until"] = str(self.until)
        if self.lookback_s is not None:
            params["lookback"] = repr(self.lookback_s)
        if self.venue is not None:
            params["venue"] = self.venue
        if self.page_limit is not None:
            params["page_limit"] = str(self.page_limit)
        return params


class CollectorJob(BaseModel):
    """The latest status one collection job reported on md.collector."""

    job_id: str
    kind: str
    state: str
    venue: str
    instrument_id: str | None
    timeframe: str | None
    start_ns: int | None
    end_ns: int | None
    cursor_ns: int | None
    fetched: int
    progress: float
    message: str
    ts_event: int


class CollectorJobs:
    """The newest status per job id by event time (a late, older one is ignored)."""

    def __init__(self, limit: int = MAX_JOBS) -> None:
        self.limit = limit
        self._jobs: dict[str, CollectorStatus] = {}

    def apply(self, status: CollectorStatus) -> bool:
        """Fold `status` in; False if the job already has a newer one."""
        current = self._jobs.get(status.job_id)
        if current is not None and status.ts_event < current.ts_event:
            return False
        self._jobs[status.job_id] = status
        if len(self._jobs) > self.limit:
            oldest = min(self._jobs.values(), key=lambda s: s.ts_event)
            del self._jobs[oldest.job_id]
        return True

    def jobs(self) -> list[CollectorJob]:
        """Every job's latest status, by job id."""
        return [job_public(s) for _, s in sorted(self._jobs.items())]


def job_public(s: CollectorStatus) -> CollectorJob:
    """A job's status as `GET /market/collector` and the WebSocket show it."""
    return CollectorJob(
        job_id=s.job_id,
        kind=s.kind,
        state=str(s.state),
        venue=s.venue,
        instrument_id=s.instrument_id,
        timeframe=s.timeframe,
        start_ns=s.start_ns,
        end_ns=s.end_ns,
        cursor_ns=s.cursor_ns,
        fetched=s.fetched,
        progress=s.progress,
        message=s.message,
        ts_event=s.ts_event,
    )
