"""The message envelope: every event travels inside one, with its identity and lineage."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from quantmesh_common.ids import event_id as _event_id

#: Money, prices and quantities: exact decimals, serialised as strings, never NaN or infinite.
Money = Annotated[Decimal, Field(allow_inf_nan=False)]
#: UTC nanoseconds since the Unix epoch.
TimestampNs = Annotated[int, Field(ge=0)]


class Event(BaseModel):
    """Base of every message payload.

    Subclasses set `SCHEMA_NAME` and `SCHEMA_VERSION`. Unknown fields are ignored so a consumer
    keeps reading messages from a producer that has added fields (schemas evolve additively).
    """

    model_config = ConfigDict(frozen=True, extra="ignore", ser_json_inf_nan="strings")

    SCHEMA_NAME: ClassVar[str] = ""
    SCHEMA_VERSION: ClassVar[int] = 1


E = TypeVar("E", bound=Event)
#: A child's payload type, independent of its parent's (a Signal begets an OrderIntent).
C = TypeVar("C", bound=Event)


class Envelope(BaseModel, Generic[E]):
    """An event with its identity, timing and lineage, as it travels on the bus.

    `ts_event` is when the thing happened (venue time for market data); `ts_init` is when
    quantmesh created this envelope. `correlation_id` follows a whole flow (one signal through
    risk, oms, execution and portfolio); `causation_id` is the event id of the direct parent.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_name: str
    schema_version: int = Field(ge=1)
    event_id: str
    ts_event: TimestampNs
    ts_init: TimestampNs
    correlation_id: str
    causation_id: str | None = None
    source: str
    payload: E

    @classmethod
    def wrap(
        cls,
        payload: E,
        *,
        source: str,
        ts_event: int,
        ts_init: int,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        event_id: str | None = None,
    ) -> Envelope[E]:
        """Wrap `payload`; a new flow starts (correlation = own event id) unless one is given."""
        eid = event_id or _event_id()
        # What pydantic's `model_construct` does, minus its per-field default handling and
        # inline: wrapping is on every hop's hot path and the payload is an already-validated
        # model. The envelope class, name and version of the payload's type are looked up once.
        try:
            env_type, name, version = _wrap_types[type(payload)]
        except KeyError:
            env_type, name, version = schemas.wrap_type(type(payload))
        env = _new(env_type)
        _set(
            env,
            "__dict__",
            {
                "schema_name": name,
                "schema_version": version,
                "event_id": eid,
                "ts_event": ts_event,
                "ts_init": ts_init,
                "correlation_id": correlation_id or eid,
                "causation_id": causation_id,
                "source": source,
                "payload": payload,
            },
        )
        _set_fields_set(env, set(_ENVELOPE_FIELDS))
        _set_extra(env, None)
        _set_private(env, None)
        return env

    def child(self, payload: C, *, source: str, ts_event: int, ts_init: int) -> Envelope[C]:
        """Wrap `payload` as caused by this envelope, in the same correlation flow."""
        return Envelope.wrap(
            payload,
            source=source,
            ts_event=ts_event,
            ts_init=ts_init,
            correlation_id=self.correlation_id,
            causation_id=self.event_id,
        )


_set = object.__setattr__
_new = object.__new__
# BaseModel's slots, set through their descriptors: cheaper than object.__setattr__ by name.
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__
_ENVELOPE_FIELDS = frozenset(
    (
        "schema_name",
        "schema_version",
        "event_id",
        "ts_event",
        "ts_init",
        "correlation_id",
        "causation_id",
        "source",
        "payload",
    )
)


class SchemaRegistry:
    """Maps schema names to event models, and builds their typed envelope classes once."""

    def __init__(self) -> None:
        self._models: dict[str, type[Event]] = {}
        self._envelopes: dict[str, type[Envelope[Any]]] = {}
        # Each envelope class's JSON validator, by schema name as text and as the bytes that
        # `encode` writes at the start of every message (so decode needs no parse to find it).
        self._validators: dict[str | bytes, Callable[[bytes], Envelope[Any]]] = {}
        # Per payload class: what `Envelope.wrap` needs of it (see `wrap_type`).
        self._wrap_types: dict[type[Event], tuple[type[Envelope[Any]], str, int]] = {}

    def register(self, model: type[E]) -> type[E]:
        """Register an event model (usable as a class decorator)."""
        name = model.SCHEMA_NAME
        if not name:
            raise ValueError(f"{model.__name__} has no SCHEMA_NAME")
        existing = self._models.get(name)
        if existing is not None and existing is not model:
            raise ValueError(f"schema name {name!r} already registered by {existing.__name__}")
        self._models[name] = model
        self._envelopes[name] = Envelope[model]  # type: ignore[valid-type]
        self._wrap_types.clear()  # a name may now resolve to another class
        self._validators.pop(name, None)
        self._validators.pop(name.encode(), None)
        return model

    def model(self, schema_name: str) -> type[Event]:
        """Return the model registered under `schema_name`; KeyError if unknown."""
        return self._models[schema_name]

    def envelope_type(self, schema_name: str) -> type[Envelope[Any]]:
        """Return the typed envelope class for `schema_name`; KeyError if unknown."""
        return self._envelopes[schema_name]

    def envelope_type_or_none(self, schema_name: str) -> type[Envelope[Any]] | None:
        """Return the typed envelope class for `schema_name`, or None if unknown."""
        return self._envelopes.get(schema_name)

    def wrap_type(self, model: type[Event]) -> tuple[type[Envelope[Any]], str, int]:
        """The envelope class, schema name and version that `Envelope.wrap` gives a `model`.

        The class registered under the model's schema name (a typed envelope of an
        unregistered model otherwise); remembered per model until the next `register`.
        """
        name = model.SCHEMA_NAME
        env_type = self._envelopes.get(name) or Envelope[model]  # type: ignore[valid-type]
        found = self._wrap_types[model] = (env_type, name, model.SCHEMA_VERSION)
        return found

    def validator(self, schema_name: str) -> Callable[[bytes], Envelope[Any]]:
        """Return the JSON validator of `schema_name`'s envelope class; KeyError if unknown."""
        validate = self._validators.get(schema_name)
        if validate is None:
            # Looked up on first use, when the class is complete (its schema built).
            validate = self._envelopes[schema_name].__pydantic_validator__.validate_json
            self._validators[schema_name] = validate
            if schema_name.isprintable() and '"' not in schema_name and "\\" not in schema_name:
                # JSON writes such a name as it is, so these are the bytes `encode` writes.
                self._validators[schema_name.encode()] = validate
        return validate

    def models(self) -> dict[str, type[Event]]:
        """Return all registered models by schema name."""
        return dict(self._models)


#: The process-wide registry that `quantmesh_common.messages` fills.
schemas = SchemaRegistry()
_wrap_types = schemas._wrap_types


class DecodeError(ValueError):
    """Raised when bytes on the wire are not a valid envelope of a known schema."""


def encode(envelope: Envelope[Any]) -> bytes:
    """Serialise an envelope to JSON bytes (Decimals as strings, exact)."""
    return envelope.__pydantic_serializer__.to_json(envelope)


#: How every encoded envelope starts: its schema name is the first field.
_NAME_PREFIX = b'{"schema_name":"'
_NAME_START = len(_NAME_PREFIX)


def decode(raw: bytes, schema_name: str | None = None) -> Envelope[Any]:
    """Parse JSON bytes into a typed envelope, validating every field of it and its payload.

    `schema_name` (from the message headers) picks the model; without it the name is read
    from the start of the JSON (where `encode` puts it), and only other JSON is parsed twice.
    Raises DecodeError with the reason on any failure.
    """
    # The payload class is chosen first and the bytes validated once, in pydantic-core,
    # against exactly that envelope class: no generic pass, no Python-level JSON parse.
    validators = schemas._validators
    try:
        if schema_name is None:
            if raw.startswith(_NAME_PREFIX):
                end = raw.find(b'"', _NAME_START)
                validate = validators.get(raw[_NAME_START:end]) if end > 0 else None
                if validate is not None:
                    return validate(raw)
            schema_name = _SchemaProbe.model_validate_json(raw).schema_name
        validate = validators.get(schema_name)
        if validate is None:
            try:
                validate = schemas.validator(schema_name)
            except KeyError:
                raise DecodeError(f"unknown schema {schema_name!r}") from None
        return validate(raw)
    except DecodeError:
        raise
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise DecodeError(f"invalid envelope: {exc}") from exc


#: The envelope's own `ts_init`: `encode` writes the envelope's fields before its payload
#: (which may hold a field of the same name), so the first occurrence is the envelope's.
_TS_INIT = b'"ts_init":'


def peek_ts_init(raw: bytes) -> int | None:
    """The `ts_init` of an encoded envelope, read without decoding or validating it.

    For readers that only need when a message was published, at a rate where decoding
    every message would cost more than their work (alerts' stale-market-data check). None
    when the bytes carry no integer there.
    """
    start = raw.find(_TS_INIT)
    if start < 0:
        return None
    start += len(_TS_INIT)
    end = raw.find(b",", start)
    try:
        return int(raw[start:end] if end > 0 else raw[start:])
    except ValueError:
        return None


class _SchemaProbe(BaseModel):
    model_config = ConfigDict(extra="ignore")
    schema_name: str
