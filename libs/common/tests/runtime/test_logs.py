"""JSON log lines: one object per line with service, correlation id, trace ids and extras."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from quantmesh_common.envelope import Envelope
from quantmesh_common.logs import JsonFormatter, bind_envelope, configure_logging, format_timestamp
from quantmesh_common.testing import stubs

_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose records go through the JSON formatter into a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter("risk"))
    logger = logging.getLogger("test.logs.captured")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, buffer
    logger.removeHandler(handler)


def _lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_json_formatter_when_plain_message_writes_core_fields(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, buffer = captured

    logger.info("hello %s", "world")

    [line] = _lines(buffer)
    assert line["message"] == "hello world"
    assert line["level"] == "INFO"
    assert line["logger"] == "test.logs.captured"
    assert line["service"] == "risk"
    assert line["correlation_id"] is None
    assert line["event_id"] is None
    assert _TS.match(line["ts"])
    assert "trace_id" not in line


def test_json_formatter_when_envelope_bound_carries_its_ids(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, buffer = captured
    envelope = Envelope.wrap(stubs.tick(), source="test", ts_event=1, ts_init=2)

    with bind_envelope(envelope):
        logger.info("inside")
    logger.info("outside")

    inside, outside = _lines(buffer)
    assert inside["correlation_id"] == envelope.correlation_id
    assert inside["event_id"] == envelope.event_id
    assert outside["correlation_id"] is None


def test_json_formatter_when_span_active_adds_trace_and_span_ids(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, buffer = captured
    tracer = TracerProvider().get_tracer("test")

    with tracer.start_as_current_span("work") as span:
        logger.info("traced")
        context = span.get_span_context()

    [line] = _lines(buffer)
    assert line["trace_id"] == f"{context.trace_id:032x}"
    assert line["span_id"] == f"{context.span_id:016x}"


def test_json_formatter_when_extra_given_adds_fields_and_keeps_core_keys(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, buffer = captured

    logger.info("order", extra={"price": Decimal("1.10"), "service": "spoofed", "qty": 3})

    [line] = _lines(buffer)
    assert line["price"] == "1.10"  # Decimals stay exact, as strings
    assert line["qty"] == 3
    assert line["service"] == "risk"
    assert line["x_service"] == "spoofed"


def test_json_formatter_when_exception_logged_includes_type_and_traceback(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, buffer = captured

    try:
        raise ValueError("bad tick")
    except ValueError:
        logger.exception("failed")

    [line] = _lines(buffer)
    assert line["level"] == "ERROR"
    assert line["exc_type"] == "ValueError"
    assert "ValueError: bad tick" in line["exc"]


def test_configure_logging_when_called_twice_keeps_one_handler() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    stream = io.StringIO()
    try:
        configure_logging("alerts", "warning", stream=stream)
        configure_logging("alerts", "INFO", stream=stream)
        logging.getLogger("test.logs.root").info("once")

        lines = [json.loads(x) for x in stream.getvalue().splitlines()]
        assert [x["message"] for x in lines] == ["once"]
        assert lines[0]["service"] == "alerts"
        assert len(root.handlers) == len(before) + 1
    finally:
        for handler in list(root.handlers):
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)


def test_format_timestamp_when_given_epoch_float_is_iso_utc_microseconds() -> None:
    assert format_timestamp(1_700_000_000.123456) == "2023-11-14T22:13:20.123456Z"
    assert format_timestamp(1_700_000_000.9999996) == "2023-11-14T22:13:21.000000Z"
