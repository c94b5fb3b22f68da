"""OpenTelemetry tracing: the tracer provider, OTLP export, and trace context in Kafka headers."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from quantmesh_common import __version__

log = logging.getLogger(__name__)

#: Header names the W3C trace-context propagator writes.
TRACE_HEADERS = ("traceparent", "tracestate")
_OTLP_TRACES_PATH = "/v1/traces"

_provider: TracerProvider | None = None

#: Kafka-style headers: (name, value) pairs; values are bytes (str and None are tolerated).
HeaderPairs = Sequence[tuple[str, bytes | str | None]]


def records_spans(provider: object) -> bool:
    """Whether spans made with `provider` go anywhere.

    An SDK provider without a span processor (tracing configured without an OTLP endpoint)
    drops every span after paying for it: tens of microseconds per consumed message, which
    the Kafka bus then skips. Any other provider is assumed to want its spans.
    """
    active = getattr(provider, "_active_span_processor", None)
    processors = getattr(active, "_span_processors", None)
    return processors is None or len(processors) > 0


def configure_tracing(
    service: str,
    otlp_endpoint: str | None = None,
    *,
    version: str = __version__,
    environment: str | None = None,
    exporter: SpanExporter | None = None,
    set_global: bool = True,
) -> TracerProvider:
    """Set up tracing for this process and return the tracer provider.

    Spans carry the resource `service.name=<service>`. With `otlp_endpoint` (a collector's base
    URL such as http://otel-collector:4318, or its full /v1/traces URL) spans are exported over
    OTLP/HTTP in batches; without it the Kafka bus makes no consumer spans (see
    `records_spans`), so log lines carry correlation and event ids but no trace id.
    `exporter` adds a synchronous exporter (tests use an InMemorySpanExporter).
    The W3C trace-context (and baggage) propagators are installed globally.

    With `set_global` the provider also becomes OpenTelemetry's global one (used by libraries
    such as the Kafka bus) unless a global provider is already set: OpenTelemetry allows that
    only once per process. `get_tracer` always uses the latest provider.
    """
    global _provider
    attributes: dict[str, str] = {"service.name": service, "service.version": version}
    if environment:
        attributes["deployment.environment"] = environment
    provider = TracerProvider(resource=Resource.create(attributes))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # A short export timeout (retries included) bounds how long a dead collector can
        # hold up shutdown; spans are telemetry, not data worth delaying a stop for.
        exporter_otlp = OTLPSpanExporter(endpoint=traces_url(otlp_endpoint), timeout=2.0)
        provider.add_span_processor(BatchSpanProcessor(exporter_otlp))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    propagate.set_global_textmap(
        CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
    )
    if set_global and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)
    previous, _provider = _provider, provider
    if previous is not None and previous is not trace.get_tracer_provider():
        previous.shutdown()
    return provider


def traces_url(endpoint: str) -> str:
    """Return the OTLP/HTTP traces URL for a collector base URL (or the URL itself if complete)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(_OTLP_TRACES_PATH) else endpoint + _OTLP_TRACES_PATH


def get_tracer(name: str) -> trace.Tracer:
    """Return a tracer from the configured provider (OpenTelemetry's global one before that)."""
    if _provider is not None:
        return _provider.get_tracer(name, __version__)
    return trace.get_tracer(name, __version__)


def shutdown_tracing() -> None:
    """Export pending spans and stop the provider (at service stop).

    Bounded by the exporter's timeout: SDK force_flush ignores its own timeout, so it is not used.
    """
    global _provider
    provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()


class _HeaderSetter(Setter[dict[str, str]]):
    def set(self, carrier: dict[str, str], key: str, value: str) -> None:
        carrier[key] = value


class _HeaderGetter(Getter[Mapping[str, list[str]]]):
    def get(self, carrier: Mapping[str, list[str]], key: str) -> list[str] | None:
        return carrier.get(key.lower())

    def keys(self, carrier: Mapping[str, list[str]]) -> list[str]:
        return list(carrier)


_SETTER = _HeaderSetter()
_GETTER = _HeaderGetter()


def inject_headers(
    headers: list[tuple[str, bytes]] | None = None, context: otel_context.Context | None = None
) -> list[tuple[str, bytes]]:
    """Write the current (or given) trace context into Kafka-style headers and return them.

    Existing trace-context headers are replaced; other headers are kept in order. With no
    active span nothing is added.
    """
    out = [] if headers is None else headers
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context, setter=_SETTER)
    if carrier:
        names = {name.lower() for name in carrier}
        out[:] = [(k, v) for k, v in out if k.lower() not in names]
        out.extend((name, value.encode()) for name, value in carrier.items())
    return out


def extract_context(headers: HeaderPairs | None) -> otel_context.Context:
    """Read the trace context from Kafka-style headers (an empty context if there is none)."""
    carrier: dict[str, list[str]] = {}
    for name, value in headers or ():
        if value is None:
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        carrier.setdefault(name.lower(), []).append(text)
    return propagate.extract(carrier, getter=_GETTER)


@contextmanager
def consumer_span(
    name: str,
    headers: HeaderPairs | None,
    attributes: Mapping[str, str | int] | None = None,
) -> Iterator[trace.Span]:
    """Run the block in a CONSUMER span whose parent is the trace context in `headers`."""
    tracer = get_tracer("quantmesh.bus")
    with tracer.start_as_current_span(
        name,
        context=extract_context(headers),
        kind=trace.SpanKind.CONSUMER,
        attributes=dict(attributes or {}),
    ) as span:
        yield span
