"""The message envelope: every event travels inside one, with its identity and lineage."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from quantmesh_common.ids import new_id

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
        eid = event_id or new_id()
        env_type = schemas._envelopes.get(payload.SCHEMA_NAME) or _envelope_of(type(payload))
        return _construct(
            env_type,
            {
                "schema_name": payload.SCHEMA_NAME,
                "schema_version": payload.SCHEMA_VERSION,
                "event_id": eid,
                "ts_event": ts_event,
                "ts_init": ts_init,
                "correlation_id": correlation_id or eid,
                "causation_id": causation_id,
                "source": source,
                "payload": payload,
            },
        )

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


def _envelope_of(model: type[Event]) -> type[Envelope[Any]]:
    return Envelope[model]  # type: ignore[valid-type]


def _construct(env_type: type[Envelope[Any]], values: dict[str, Any]) -> Envelope[Any]:
    """Build an envelope from trusted, complete values without validation.

    What pydantic's `model_construct` does, minus its per-field default handling: wrapping is
    on every hop's hot path and the payload is an already-validated model.
    """
    env = _new(env_type)
    _set(env, "__dict__", values)
    _set_fields_set(env, set(_ENVELOPE_FIELDS))
    _set_extra(env, None)
    _set_private(env, None)
    return env


class SchemaRegistry:
    """Maps schema names to event models, and builds their typed envelope classes once."""

    def __init__(self) -> None:
        self._models: dict[str, type[Event]] = {}
        self._envelopes: dict[str, type[Envelope[Any]]] = {}

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

    def models(self) -> dict[str, type[Event]]:
        """Return all registered models by schema name."""
        return dict(self._models)


#: The process-wide registry that `quantmesh_common.messages` fills.
schemas = SchemaRegistry()


class DecodeError(ValueError):
    """Raised when bytes on the wire are not a valid envelope of a known schema."""


def encode(envelope: Envelope[Any]) -> bytes:
    """Serialise an envelope to JSON bytes (Decimals as strings, exact)."""
    return envelope.__pydantic_serializer__.to_json(envelope)


def decode(raw: bytes, schema_name: str | None = None) -> Envelope[Any]:
    """Parse JSON bytes into a typed envelope.

    `schema_name` (from the message headers) saves a parse; without it the name is read
    from the JSON itself. Raises DecodeError with the reason on any failure.
    """
    try:
        if schema_name is None:
            probe = _SchemaProbe.model_validate_json(raw)
            schema_name = probe.schema_name
        try:
            env_type = schemas.envelope_type(schema_name)
        except KeyError:
            raise DecodeError(f"unknown schema {schema_name!r}") from None
        return env_type.model_validate_json(raw)
    except DecodeError:
        raise
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise DecodeError(f"invalid envelope: {exc}") from exc


class _SchemaProbe(BaseModel):
    model_config = ConfigDict(extra="ignore")
    schema_name: str
