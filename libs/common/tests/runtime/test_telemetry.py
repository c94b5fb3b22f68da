"""Tracing: spans with the service resource, and W3C trace context through Kafka-style headers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from quantmesh_common import telemetry
from quantmesh_common.telemetry import (
    configure_tracing,
    consumer_span,
    extract_context,
    get_tracer,
    inject_headers,
    traces_url,
)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Tracing configured for service 'risk' with spans captured in memory (not global)."""
    memory = InMemorySpanExporter()
    configure_tracing("risk", None, exporter=memory, set_global=False, environment="test")
    yield memory
    telemetry.shutdown_tracing()


def test_configure_tracing_when_span_ends_exports_it_with_service_resource(
    exporter: InMemorySpanExporter,
) -> None:
    tracer = get_tracer("test")

    with tracer.start_as_current_span("check-intent"):
        pass

    [span] = exporter.get_finished_spans()
    assert span.name == "check-intent"
    assert span.resource.attributes["service.name"] == "risk"
    assert span.resource.attributes["deployment.environment"] == "test"


def test_inject_then_extract_when_span_active_continues_the_trace(
    exporter: InMemorySpanExporter,
) -> None:
    tracer = get_tracer("test")
    headers: list[tuple[str, bytes]] = [("qm-schema", b"md.tick")]

    with tracer.start_as_current_span("produce") as producer:
        inject_headers(headers)
    with tracer.start_as_current_span("consume", context=extract_context(headers)) as consumer:
        pass

    names = [name for name, _ in headers]
    assert names[0] == "qm-schema"
    assert "traceparent" in names
    assert all(isinstance(value, bytes) for _, value in headers)
    produced = producer.get_span_context()
    consumed = consumer.get_span_context()
    assert consumed.trace_id == produced.trace_id
    [_, consume_span] = exporter.get_finished_spans()
    assert consume_span.parent is not None
    assert consume_span.parent.span_id == produced.span_id


def test_inject_headers_when_trace_headers_present_replaces_them(
    exporter: InMemorySpanExporter,
) -> None:
    stale = b"00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"
    headers: list[tuple[str, bytes]] = [("traceparent", stale)]

    with get_tracer("test").start_as_current_span("produce"):
        inject_headers(headers)

    values = [value for name, value in headers if name == "traceparent"]
    assert len(values) == 1
    assert values[0] != stale
    assert len(exporter.get_finished_spans()) == 1


def test_inject_headers_when_no_span_active_adds_nothing() -> None:
    headers = inject_headers([("k", b"v")])

    assert headers == [("k", b"v")]


def test_extract_context_when_no_headers_gives_no_parent() -> None:
    context = extract_context(None)

    assert not trace.get_current_span(context).get_span_context().is_valid


def test_consumer_span_when_headers_carry_context_is_child_of_producer(
    exporter: InMemorySpanExporter,
) -> None:
    with get_tracer("test").start_as_current_span("produce") as producer:
        headers = inject_headers()

    with consumer_span("md.ticks process", headers, {"messaging.destination": "md.ticks"}):
        pass

    consume = exporter.get_finished_spans()[-1]
    assert consume.kind is trace.SpanKind.CONSUMER
    assert consume.context.trace_id == producer.get_span_context().trace_id
    assert consume.attributes is not None
    assert consume.attributes["messaging.destination"] == "md.ticks"


def test_traces_url_when_base_url_given_appends_v1_traces() -> None:
    assert traces_url("http://otel:4318") == "http://otel:4318/v1/traces"
    assert traces_url("http://otel:4318/v1/traces/") == "http://otel:4318/v1/traces"


def test_records_spans_when_configured_without_an_exporter_is_false() -> None:
    # Arrange
    provider = configure_tracing("risk", None, set_global=False)

    # Act
    recorded = telemetry.records_spans(provider)

    # Assert
    assert recorded is False


def test_records_spans_when_an_exporter_is_attached_is_true(
    exporter: InMemorySpanExporter,
) -> None:
    # Arrange
    provider = telemetry._provider

    # Act
    recorded = telemetry.records_spans(provider)

    # Assert
    assert recorded is True


def test_records_spans_when_provider_is_not_the_sdks_is_true() -> None:
    assert telemetry.records_spans(trace.NoOpTracerProvider()) is True
