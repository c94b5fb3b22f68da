"""Events built from values that already passed validation, without validating them again.

Every stage builds several events per order out of the fields of events it has already
validated (an order from a risk decision, a report from a command). Validating those values a
second time is most of what such a construction costs. These helpers make the same object
pydantic would (equal, serialised the same, the same fields set), for values that are valid
by construction: never for input from outside the process, which goes through validation.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

_M = TypeVar("_M", bound=BaseModel)

_new = object.__new__
_set = object.__setattr__
# BaseModel's slots, set through their descriptors (as pydantic's own copy does).
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__
#: Per model class, the names of all its fields (a frozenset: instances get their own copy).
_ALL_FIELDS: dict[type[BaseModel], frozenset[str]] = {}


def build(cls: type[_M], values: dict[str, Any]) -> _M:
    """Return an instance of `cls` holding `values`: every field, in declaration order.

    Only for values taken from validated models (or constants) that the model's own checks
    would pass as they are: nothing is validated or converted. Equal (`==`) to the validated
    construction from the same values, and serialised the same. A key that is not a field,
    or a field without a value, raises ValueError naming them (they would otherwise surface
    only when read).
    """
    names = _ALL_FIELDS.get(cls)
    if names is None:
        names = _ALL_FIELDS[cls] = frozenset(cls.model_fields)
    if values.keys() != names:
        missing, unknown = sorted(names - values.keys()), sorted(values.keys() - names)
        raise ValueError(f"{cls.__name__} needs every field: missing {missing}, unknown {unknown}")
    new = _new(cls)
    _set(new, "__dict__", values)
    _set_fields_set(new, set(names))
    _set_extra(new, None)
    _set_private(new, None)
    return new


def copy_with(model: _M, changes: dict[str, Any]) -> _M:
    """Return `model.model_copy(update=changes)`: the same object pydantic's copy makes.

    Only for changes whose values are already valid for their fields (they come from
    validated models, or from a state machine that refuses what would be invalid): like
    `model_copy`, nothing is validated. Without pydantic's generic copy (a `copy.copy` of
    each of four slots) it costs a fifth as much, on every change of every order.
    """
    new = _new(type(model))
    values = model.__dict__.copy()
    values.update(changes)
    _set(new, "__dict__", values)
    _set_fields_set(new, model.__pydantic_fields_set__ | changes.keys())
    _set_extra(new, None)
    _set_private(new, None)
    return new
