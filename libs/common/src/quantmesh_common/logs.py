"""JSON logs on stdout, one object per line, carrying the correlation id of the envelope in hand."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any, Protocol

from opentelemetry import trace

#: Correlation id of the flow being handled (set by the runner around each envelope).
correlation_id_var: ContextVar[str | None] = ContextVar("qm_correlation_id", default=None)
#: Event id of the envelope being handled.
event_id_var: ContextVar[str | None] = ContextVar("qm_event_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
_CORE_KEYS = (
    "ts",
    "level",
    "logger",
    "message",
    "service",
    "correlation_id",
    "event_id",
    "trace_id",
    "span_id",
    "exc_type",
    "exc",
    "stack",
)
# Marks handlers installed by configure_logging so a second call replaces them.
_HANDLER_MARK = "_quantmesh_json_handler"


class HasIds(Protocol):
    """Anything with an event id and a correlation id: an Envelope."""

    @property
    def event_id(self) -> str:
        """The id of this event."""
        ...

    @property
    def correlation_id(self) -> str:
        """The id of the flow this event belongs to."""
        ...


@contextmanager
def bind_correlation(correlation_id: str | None, event_id: str | None = None) -> Iterator[None]:
    """Tag every log line written inside the block with these ids."""
    corr_token = correlation_id_var.set(correlation_id)
    event_token = event_id_var.set(event_id)
    try:
        yield
    finally:
        event_id_var.reset(event_token)
        correlation_id_var.reset(corr_token)


def bind_envelope(envelope: HasIds) -> AbstractContextManager[None]:
    """Tag every log line written while `envelope` is handled with its correlation and event ids.

    Returns a context manager: `with bind_envelope(env): ...`.
    """
    return bind_correlation(envelope.correlation_id, envelope.event_id)


def format_timestamp(created: float) -> str:
    """ISO-8601 UTC with microseconds and a Z suffix, from a LogRecord's `created`."""
    seconds = int(created)
    micros = round((created - seconds) * 1_000_000)
    if micros == 1_000_000:
        seconds, micros = seconds + 1, 0
    stamp = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{micros:06d}Z"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: core keys first, then the record's `extra` fields.

    An extra field whose name clashes with a core key is kept under `x_<name>`.
    """

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as one line of JSON."""
        obj: dict[str, Any] = {
            "ts": format_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self.service,
            "correlation_id": correlation_id_var.get(),
            "event_id": event_id_var.get(),
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            obj["trace_id"] = f"{span_context.trace_id:032x}"
            obj["span_id"] = f"{span_context.span_id:016x}"
        if record.exc_info and record.exc_info[0] is not None:
            obj["exc_type"] = record.exc_info[0].__name__
            obj["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exc"] = record.exc_text
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRS or key.startswith("_"):
                continue
            obj[f"x_{key}" if key in _CORE_KEYS else key] = value
        return json.dumps(obj, default=str, ensure_ascii=False, separators=(",", ":"))


def configure_logging(
    service: str, level: str | int = "INFO", stream: IO[str] | None = None
) -> None:
    """Send every log record of the process as JSON lines to stdout (or `stream`).

    Idempotent: a second call replaces the handler the first one installed. Python warnings are
    routed into the logs too, and aiohttp's per-request access log is quieted (probes would
    flood it).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    """Return the stdlib logger `name` (records go through the JSON handler once configured)."""
    return logging.getLogger(name)
