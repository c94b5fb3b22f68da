"""Events built from values that already passed validation, without validating them again."""

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
#: Per model class, one set of the names of all its fields, shared by every instance `build`
#: makes: the models are frozen, so nothing adds to it (`model_copy` copies it first).
#: (The oms has the same helper: each service stands on quantmesh_common alone.)
_ALL_FIELDS: dict[type[BaseModel], set[str]] = {}


def build(cls: type[_M], values: dict[str, Any]) -> _M:
    """Return an instance of `cls` holding `values` (every field, in declaration order).

    Only for values taken from validated models (or constants) that the model's own checks
    would pass as they are: nothing is validated or converted. Equal (`==`) to the validated
    construction from the same values, and serialised the same.
    """
    names = _ALL_FIELDS.get(cls)
    if names is None:
        names = _ALL_FIELDS[cls] = set(cls.model_fields)
    # A missing field would surface only when read: refuse it here (the keys are the fields').
    if len(values) != len(names):
        raise ValueError(f"{cls.__name__} needs every field: missing {sorted(names - set(values))}")
    new = _new(cls)
    _set(new, "__dict__", values)
    _set_fields_set(new, names)
    _set_extra(new, None)
    _set_private(new, None)
    return new
