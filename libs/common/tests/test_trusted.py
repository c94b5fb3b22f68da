"""Events built without validating again: the same objects validation and model_copy build."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.messages import Order, OrderStatus, Tick
from quantmesh_common.testing import stubs
from quantmesh_common.trusted import build, copy_with


def _same(built: Any, validated: Any) -> None:
    """Equal values, equal JSON, the same field order and the same fields set."""
    assert built == validated
    assert built.model_dump_json() == validated.model_dump_json()
    assert list(built.__dict__) == list(validated.__dict__)
    assert built.model_fields_set == validated.model_fields_set


@pytest.mark.parametrize("sample", stubs.all_samples(), ids=lambda s: type(s).__name__)
def test_build_when_given_a_validated_events_fields_equals_validation(sample: Any) -> None:
    # Arrange: every field's value, as a stage holds them from events it validated
    cls = type(sample)
    values = dict(sample.__dict__)

    # Act
    built = build(cls, dict(values))

    # Assert
    _same(built, cls.model_validate(values))


def test_build_when_a_field_is_missing_raises_naming_it() -> None:
    values = dict(stubs.order().__dict__)
    del values["tag"]

    with pytest.raises(ValueError, match=r"missing \['tag'\]"):
        build(Order, values)


def test_build_when_a_key_is_not_a_field_raises_naming_it() -> None:
    values = dict(stubs.tick().__dict__)
    del values["bid"]
    values["bid_price"] = Decimal(1)  # the same count of keys, one of them wrong

    with pytest.raises(ValueError, match=r"missing \['bid'\], unknown \['bid_price'\]"):
        build(Tick, values)


def test_build_when_two_instances_are_made_gives_each_its_own_fields_set() -> None:
    first = build(Tick, dict(stubs.tick().__dict__))
    second = build(Tick, dict(stubs.tick().__dict__))

    assert first.model_fields_set is not second.model_fields_set


def test_copy_with_when_fields_change_equals_model_copy() -> None:
    # Arrange
    order = stubs.order()
    changes: dict[str, Any] = {
        "status": OrderStatus.PARTIALLY_FILLED,
        "filled_quantity": Decimal("0.04"),
        "avg_fill_price": Decimal("48999.5"),
    }

    # Act
    copied = copy_with(order, changes)

    # Assert
    _same(copied, order.model_copy(update=changes))
    assert order.status is OrderStatus.ACCEPTED  # the original is left as it was
