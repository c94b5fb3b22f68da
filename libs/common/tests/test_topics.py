"""Tests of the topic registry: models, keys, partitions and dead-letter twins."""

from __future__ import annotations

import pytest

from quantmesh_common.envelope import Event, schemas
from quantmesh_common.messages import Alert, Tick
from quantmesh_common.testing import stubs
from quantmesh_common.topics import DLQ_SUFFIX, Topic, TopicRegistry, TopicSpec, dlq, registry

SPECS = list(registry())
SAMPLES: dict[type[Event], Event] = {type(s): s for s in stubs.all_samples()}


def _topic_constants() -> list[str]:
    return [v for k, v in vars(Topic).items() if k.isupper() and isinstance(v, str)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_topic_when_registered_carries_a_registered_model(spec: TopicSpec) -> None:
    # Act
    model = schemas.model(spec.model.SCHEMA_NAME)

    # Assert
    assert model is spec.model


@pytest.mark.parametrize("spec", [s for s in SPECS if s.key_field], ids=lambda s: s.name)
def test_topic_when_keyed_key_field_is_a_model_field(spec: TopicSpec) -> None:
    # Arrange
    sample = SAMPLES[spec.model]

    # Act
    key = spec.key_of(sample)

    # Assert
    assert spec.key_field in spec.model.model_fields
    assert key == getattr(sample, str(spec.key_field))
    assert key


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_topic_when_registered_has_partitions(spec: TopicSpec) -> None:
    assert spec.partitions > 0
    assert registry().partitions(spec.name) == spec.partitions
    assert registry().partitions(dlq(spec.name)) == spec.partitions


@pytest.mark.parametrize(
    ("topic", "key"),
    [
        (Topic.MD_TICKS, "instrument_id"),
        (Topic.MD_BARS, "instrument_id"),
        (Topic.MD_BOOKS, "instrument_id"),
        (Topic.SIGNALS, "instrument_id"),
        (Topic.ORDERS_INTENTS, "account_id"),
        (Topic.ORDERS_APPROVED, "account_id"),
        (Topic.ORDERS_REJECTED, "account_id"),
        (Topic.ORDERS_COMMANDS, "account_id"),
        (Topic.ORDERS_UPDATES, "account_id"),
        (Topic.EXEC_REPORTS, "account_id"),
        (Topic.PORTFOLIO_UPDATES, "account_id"),
        (Topic.PORTFOLIO_SNAPSHOTS, "account_id"),
        (Topic.ALERTS, "source_service"),
    ],
)
def test_topic_when_order_matters_is_keyed_by_design(topic: str, key: str) -> None:
    assert registry()[topic].key_field == key


def test_control_topic_when_registered_is_unkeyed_single_partition() -> None:
    # Act
    spec = registry()[Topic.CONTROL]

    # Assert
    assert spec.key_field is None
    assert spec.partitions == 1
    assert spec.key_of(stubs.control_command()) is None


def test_topic_constants_when_listed_are_all_registered() -> None:
    # Act
    constants = _topic_constants()

    # Assert
    assert sorted(constants) == sorted(s.name for s in SPECS)


def test_dlq_when_applied_appends_suffix_once() -> None:
    assert dlq("md.ticks") == "md.ticks" + DLQ_SUFFIX == "md.ticks.dlq"
    assert dlq(dlq("md.ticks")) == "md.ticks.dlq"


def test_registry_when_dlq_twin_looked_up_resolves_to_source_spec() -> None:
    # Act
    twin = registry()["exec.reports.dlq"]

    # Assert
    assert twin is registry()[Topic.EXEC_REPORTS]
    assert "exec.reports.dlq" in registry()


def test_all_topic_names_when_listed_pairs_each_topic_with_its_twin() -> None:
    # Act
    names = registry().all_topic_names()

    # Assert
    assert len(names) == 2 * len(SPECS)
    for spec in SPECS:
        assert spec.name in names
        assert dlq(spec.name) in names


def test_registry_when_dlq_registered_explicitly_refuses() -> None:
    with pytest.raises(ValueError, match="implied"):
        TopicRegistry([TopicSpec("x.dlq", Tick, "instrument_id")])


def test_registry_when_name_registered_twice_differently_refuses() -> None:
    # Arrange
    reg = TopicRegistry([TopicSpec("x", Tick, "instrument_id")])

    # Act / Assert
    with pytest.raises(ValueError, match="already registered differently"):
        reg.register(TopicSpec("x", Alert, "source_service"))


def test_registry_when_topic_unknown_raises_and_defaults_to_one_partition() -> None:
    # Act / Assert
    with pytest.raises(KeyError, match="unknown topic"):
        registry()["nope"]
    assert registry().partitions("nope") == 1
    assert "nope" not in registry()


def test_registry_prefixed_when_given_names_renames_them_and_keeps_their_specs() -> None:
    # Act
    prefixed = registry().prefixed("qmtest.x.", [Topic.MD_TICKS, Topic.STRATEGIES])

    # Assert
    assert [spec.name for spec in prefixed] == ["qmtest.x.md.ticks", "qmtest.x.strategies"]
    original = registry()[Topic.STRATEGIES]
    renamed = prefixed["qmtest.x.strategies"]
    assert (renamed.model, renamed.key_field, renamed.partitions, renamed.config) == (
        original.model,
        original.key_field,
        original.partitions,
        original.config,
    )
    assert renamed.config.get("cleanup.policy") == "compact"
