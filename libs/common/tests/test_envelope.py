"""Tests of the envelope: lineage of wrap/child, encode/decode and its errors."""

from __future__ import annotations

import json

import pytest

from quantmesh_common.envelope import (
    DecodeError,
    Envelope,
    Event,
    decode,
    encode,
    peek_ts_init,
    schemas,
)
from quantmesh_common.messages import Bar, Tick
from quantmesh_common.testing import stubs


def test_wrap_when_no_flow_given_starts_a_new_one() -> None:
    # Act
    env = Envelope.wrap(stubs.tick(), source="marketdata", ts_event=1, ts_init=2)

    # Assert
    assert env.schema_name == "md.tick"
    assert env.schema_version == 1
    assert env.correlation_id == env.event_id
    assert env.causation_id is None
    assert (env.source, env.ts_event, env.ts_init) == ("marketdata", 1, 2)


def test_wrap_when_flow_given_keeps_it() -> None:
    # Act
    env = Envelope.wrap(
        stubs.tick(), source="s", ts_event=1, ts_init=1, correlation_id="flow-1", event_id="e-1"
    )

    # Assert
    assert env.correlation_id == "flow-1"
    assert env.event_id == "e-1"


def test_wrap_when_payload_registered_builds_typed_envelope() -> None:
    # Act
    env = stubs.envelope(stubs.bar())

    # Assert
    assert type(env) is schemas.envelope_type("md.bar")
    assert isinstance(env.payload, Bar)


def test_wrap_when_built_without_validation_equals_the_validated_envelope() -> None:
    # Arrange
    tick = stubs.tick()

    # Act
    env = Envelope.wrap(tick, source="md", ts_event=1, ts_init=2, causation_id="c-1")
    validated = schemas.envelope_type("md.tick").model_validate({**env.__dict__, "payload": tick})

    # Assert: the same object pydantic would make: equal, same fields set, same bytes
    assert env == validated
    assert env.model_fields_set == validated.model_fields_set
    assert (
        env.model_fields_set
        is not Envelope.wrap(tick, source="md", ts_event=1, ts_init=2).model_fields_set
    )
    assert encode(env) == encode(validated)


def test_wrap_when_its_name_is_registered_after_a_first_wrap_uses_the_registered_class() -> None:
    # Arrange: a model wrapped while its schema name is unknown (its typed envelope is
    # remembered), then another model registered under that name
    class Early(Event):
        SCHEMA_NAME = "qmtest.envelope.late"
        SCHEMA_VERSION = 3
        n: int

    class Late(Event):
        SCHEMA_NAME = "qmtest.envelope.late"
        n: int

    before = Envelope.wrap(Early(n=1), source="s", ts_event=1, ts_init=1)

    # Act
    schemas.register(Late)
    after = Envelope.wrap(Early(n=2), source="s", ts_event=1, ts_init=1)

    # Assert: as wrap has always chosen, by the registered name; the model's own version
    assert type(before) is Envelope[Early]
    assert type(after) is schemas.envelope_type("qmtest.envelope.late") is Envelope[Late]
    assert (after.schema_name, after.schema_version) == ("qmtest.envelope.late", 3)


def test_child_when_derived_keeps_correlation_and_points_at_parent() -> None:
    # Arrange
    parent = stubs.envelope(stubs.signal(), source="signals")

    # Act
    child = parent.child(stubs.order_intent(), source="signals", ts_event=5, ts_init=6)
    grandchild = child.child(stubs.risk_decision(), source="risk", ts_event=7, ts_init=8)

    # Assert
    assert child.correlation_id == parent.correlation_id == grandchild.correlation_id
    assert child.causation_id == parent.event_id
    assert grandchild.causation_id == child.event_id
    assert parent.event_id < child.event_id < grandchild.event_id  # UUIDv7 sorts by creation
    assert child.schema_name == "orders.intent"


def test_encode_when_decoded_with_or_without_header_name_is_equal() -> None:
    # Arrange
    env = stubs.envelope(stubs.execution_report())
    raw = encode(env)

    # Act
    from_body = decode(raw)
    from_header = decode(raw, "exec.report")

    # Assert
    assert from_body == env
    assert from_header == env


def test_decode_when_envelope_has_extra_fields_ignores_them() -> None:
    # Arrange: a newer producer added fields to the envelope and the payload
    data = json.loads(encode(stubs.envelope(stubs.tick())))
    data["partition_hint"] = 3
    data["payload"]["exchange_seq"] = 99
    raw = json.dumps(data).encode()

    # Act
    env = decode(raw)

    # Assert
    assert env.payload == stubs.tick()


@pytest.mark.parametrize(
    "raw", [b"", b"not json", b"\xff\xfe\x00", b"[1, 2]", b'{"no_schema_name": 1}', b"null"]
)
def test_decode_when_garbage_raises_decode_error(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(raw)


def test_decode_when_schema_unknown_names_it() -> None:
    # Arrange
    data = json.loads(encode(stubs.envelope(stubs.tick())))
    data["schema_name"] = "md.nonexistent"

    # Act / Assert
    with pytest.raises(DecodeError, match=r"unknown schema 'md\.nonexistent'"):
        decode(json.dumps(data).encode())


def test_decode_when_header_names_unknown_schema_raises() -> None:
    with pytest.raises(DecodeError, match="unknown schema"):
        decode(encode(stubs.envelope(stubs.tick())), "nope")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("price", "abc"),
        ("price", "NaN"),
        ("price", [1]),
        ("ts_event", "yesterday"),
        ("kind", "AUCTION"),
        ("instrument_id", None),
    ],
)
def test_decode_when_payload_field_has_wrong_type_raises(field: str, value: object) -> None:
    # Arrange
    data = json.loads(encode(stubs.envelope(stubs.tick())))
    data["payload"][field] = value

    # Act / Assert
    with pytest.raises(DecodeError, match="invalid envelope"):
        decode(json.dumps(data).encode())


def test_decode_when_payload_is_another_schema_raises() -> None:
    # Arrange: header says bar, body is a tick
    raw = encode(stubs.envelope(stubs.tick()))

    # Act / Assert
    with pytest.raises(DecodeError, match="invalid envelope"):
        decode(raw, "md.bar")


def test_decode_when_envelope_field_missing_raises() -> None:
    # Arrange
    data = json.loads(encode(stubs.envelope(stubs.tick())))
    del data["event_id"]

    # Act / Assert
    with pytest.raises(DecodeError, match="event_id"):
        decode(json.dumps(data).encode())


def test_decode_error_when_caught_is_a_value_error() -> None:
    # Act
    with pytest.raises(ValueError, match="unknown schema") as info:
        decode(b'{"schema_name": "x"}')

    # Assert
    assert isinstance(info.value, DecodeError)


def test_encode_when_decimal_prices_writes_strings() -> None:
    # Act
    data = json.loads(encode(stubs.envelope(stubs.tick())))

    # Assert
    assert data["payload"]["price"] == "50000.10"
    assert data["payload"]["size"] == "0.5"
    assert isinstance(decode(json.dumps(data).encode()).payload, Tick)


def test_decode_when_compact_body_without_header_reads_name_from_it() -> None:
    # Arrange: bytes exactly as encode writes them, and no header name
    env = stubs.envelope(stubs.execution_report())
    raw = encode(env)

    # Act
    decoded = decode(raw)

    # Assert
    assert raw.startswith(b'{"schema_name":"exec.report",')
    assert decoded == env
    assert type(decoded) is schemas.envelope_type("exec.report")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'"price":"50000.10"', b'"price":"-1"'),
        (b'"price":"50000.10"', b'"price":"Infinity"'),
        (b'"kind":"TRADE"', b'"kind":"AUCTION"'),
        (b'"venue":"SIM"', b'"venue":"BINANCE"'),
        (b'"schema_version":1', b'"schema_version":0'),
    ],
)
def test_decode_when_compact_body_has_invalid_field_raises(old: bytes, new: bytes) -> None:
    # Arrange: the fast path (name read from the body) must validate as strictly as the probe
    raw = encode(stubs.envelope(stubs.tick()))
    assert old in raw

    # Act / Assert
    with pytest.raises(DecodeError, match="invalid envelope"):
        decode(raw.replace(old, new))


@pytest.mark.parametrize(
    "raw",
    [
        b'{"schema_name":"md.tick',
        b'{"schema_name":"md.tick"',
        b'{"schema_name":"md.tick","schema_version":1}',
        b'{"schema_name":"md.nonexistent","payload":{}}',
        b'{"schema_name":""}',
    ],
)
def test_decode_when_compact_body_is_truncated_or_unknown_raises(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(raw)


def test_decode_when_compact_body_is_cut_short_raises() -> None:
    # Arrange
    raw = encode(stubs.envelope(stubs.tick()))

    # Act / Assert
    with pytest.raises(DecodeError, match="invalid envelope"):
        decode(raw[:-1])


def test_decode_when_schema_name_needs_json_escapes_finds_it_by_parsing() -> None:
    # Arrange: a name JSON writes with escapes cannot be matched on the raw bytes
    class Quoted(Event):
        SCHEMA_NAME = 'qmtest.envelope."quoted"\\name'
        n: int

    schemas.register(Quoted)
    env = Envelope.wrap(Quoted(n=7), source="s", ts_event=1, ts_init=1)
    raw = encode(env)

    # Act
    decoded = decode(raw)

    # Assert
    assert raw.startswith(b'{"schema_name":"qmtest.envelope.\\"quoted\\"\\\\name"')
    assert decoded.payload == Quoted(n=7)
    assert decoded.schema_name == 'qmtest.envelope."quoted"\\name'


def test_peek_ts_init_when_given_an_encoded_tick_reads_the_envelope_ts_init() -> None:
    # The payload has a ts_init of its own (stubs: TS + 1 ms); the envelope's is the one read.
    t0 = 1_700_000_000_000_000_000
    envelope = Envelope.wrap(stubs.tick(), source="marketdata", ts_event=t0, ts_init=t0 + 7)

    assert peek_ts_init(encode(envelope)) == t0 + 7
    assert peek_ts_init(b"not an envelope") is None
    assert peek_ts_init(b'{"ts_init":"x","payload":{}}') is None
