"""Tests that committed JSON Schemas match the models, and of the breaking-change detector."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import Field

from quantmesh_common import schema_export as se
from quantmesh_common.envelope import Event, Money, SchemaRegistry, schemas
from quantmesh_common.messages import Side

# --- the committed files --------------------------------------------------------------------


def test_committed_schemas_when_compared_with_models_are_up_to_date() -> None:
    # Act
    result = se.check(se.DEFAULT_DIR)

    # Assert
    assert result.ok, (
        "libs/common/schemas/ is out of date with the models:\n"
        f"{result.report()}\n"
        f"Run `{se.WRITE_COMMAND}` (from the repo root, with .venv/bin/python) and commit."
    )


def test_platform_models_when_listed_are_every_model_in_messages() -> None:
    # Act
    models = se.platform_models()

    # Assert
    assert len(models) == 20
    assert all(m.__module__ == "quantmesh_common.messages" for m in models.values())
    assert all(schemas.model(name) is m for name, m in models.items())


def test_committed_schemas_when_listed_cover_every_registered_model() -> None:
    # Arrange
    committed = set(se.load_dir(se.DEFAULT_DIR))

    # Act
    expected = {se.file_name(n, m.SCHEMA_VERSION) for n, m in se.platform_models().items()}

    # Assert
    assert expected <= committed


def test_committed_schema_when_read_describes_decimals_as_strings() -> None:
    # Arrange
    tick = se.load_dir(se.DEFAULT_DIR)["md.tick.v1.json"]

    # Act
    price = tick["$defs"]["Tick"]["properties"]["price"]

    # Assert
    assert price["type"] == "string"
    assert "price" in tick["$defs"]["Tick"]["required"]


# --- the detector on synthetic schemas --------------------------------------------------------

BASE: dict[str, Any] = {
    "$defs": {
        "Side": {"enum": ["BUY", "SELL"], "type": "string"},
        "Leg": {
            "properties": {"qty": {"type": "string"}},
            "required": ["qty"],
            "type": "object",
        },
    },
    "properties": {
        "name": {"type": "string"},
        "count": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None},
        "side": {"$ref": "#/$defs/Side"},
        "legs": {"items": {"$ref": "#/$defs/Leg"}, "type": "array"},
        "tags": {"additionalProperties": {"type": "string"}, "type": "object"},
    },
    "required": ["name", "side"],
    "type": "object",
}


def _changed(edit: Any) -> dict[str, Any]:
    new = copy.deepcopy(BASE)
    edit(new)
    return new


def test_breaking_changes_when_identical_finds_none() -> None:
    assert se.breaking_changes(BASE, copy.deepcopy(BASE)) == []


def test_breaking_changes_when_field_removed_is_breaking() -> None:
    # Arrange
    new = _changed(lambda s: s["properties"].pop("count"))

    # Act
    problems = se.breaking_changes(BASE, new)

    # Assert
    assert problems == ["count: field removed"]


def test_breaking_changes_when_field_retyped_is_breaking() -> None:
    # Arrange
    new = _changed(lambda s: s["properties"].update(name={"type": "integer"}))

    # Act
    problems = se.breaking_changes(BASE, new)

    # Assert
    assert problems == ["name: type changed from string to integer"]


def test_breaking_changes_when_new_required_field_is_breaking() -> None:
    # Arrange
    def edit(s: dict[str, Any]) -> None:
        s["properties"]["venue"] = {"type": "string"}
        s["required"].append("venue")

    # Act
    problems = se.breaking_changes(BASE, _changed(edit))

    # Assert
    assert problems == ["venue: new required field"]


def test_breaking_changes_when_new_optional_field_is_fine() -> None:
    # Arrange
    new = _changed(lambda s: s["properties"].update(venue={"type": "string", "default": "X"}))

    # Act / Assert
    assert se.breaking_changes(BASE, new) == []


def test_breaking_changes_when_optional_field_becomes_required_is_breaking() -> None:
    # Arrange
    new = _changed(lambda s: s["required"].append("count"))

    # Act / Assert
    assert se.breaking_changes(BASE, new) == ["count: field became required"]


def test_breaking_changes_when_field_becomes_nullable_is_breaking() -> None:
    # Arrange: old readers of `name` never expected null
    new = _changed(
        lambda s: s["properties"].update(name={"anyOf": [{"type": "string"}, {"type": "null"}]})
    )

    # Act / Assert
    assert se.breaking_changes(BASE, new) == ["name: type changed from string to null|string"]


def test_breaking_changes_when_enum_value_removed_is_breaking() -> None:
    # Arrange
    new = _changed(lambda s: s["$defs"]["Side"].update(enum=["BUY"]))

    # Act / Assert
    assert se.breaking_changes(BASE, new) == ['side: enum value "SELL" removed']


def test_breaking_changes_when_enum_value_added_is_fine() -> None:
    # Arrange
    new = _changed(lambda s: s["$defs"]["Side"].update(enum=["BUY", "SELL", "SHORT_SELL"]))

    # Act / Assert
    assert se.breaking_changes(BASE, new) == []


def test_breaking_changes_when_nested_field_removed_names_its_path() -> None:
    # Arrange
    new = _changed(lambda s: s["$defs"]["Leg"]["properties"].pop("qty"))

    # Act / Assert
    assert se.breaking_changes(BASE, new) == ["legs[].qty: field removed"]


def test_breaking_changes_when_map_value_retyped_is_breaking() -> None:
    # Arrange
    new = _changed(
        lambda s: s["properties"]["tags"].update(additionalProperties={"type": "number"})
    )

    # Act / Assert
    assert se.breaking_changes(BASE, new) == ["tags{}: type changed from string to number"]


def test_breaking_changes_when_only_docs_or_def_names_change_is_fine() -> None:
    # Arrange: a renamed class and a new description do not change the wire
    def edit(s: dict[str, Any]) -> None:
        s["$defs"]["OrderSide"] = s["$defs"].pop("Side")
        s["properties"]["side"] = {"$ref": "#/$defs/OrderSide", "description": "who"}
        s["properties"]["name"]["title"] = "Name"

    # Act / Assert
    assert se.breaking_changes(BASE, _changed(edit)) == []


# --- the detector on real pydantic models -------------------------------------------------------


def _registry_with(model: type[Event]) -> dict[str, se.JsonSchema]:
    reg = SchemaRegistry()
    reg.register(model)
    return se.current_schemas(reg)


class _FillV1(Event):
    SCHEMA_NAME: ClassVar[str] = "test.fill"
    price: Money
    side: Side
    note: str | None = None


class _FillDropsField(Event):
    SCHEMA_NAME: ClassVar[str] = "test.fill"
    price: Money
    note: str | None = None


class _FillAddsOptional(Event):
    SCHEMA_NAME: ClassVar[str] = "test.fill"
    price: Money
    side: Side
    note: str | None = None
    venue: str = Field(default="SIM", description="added later")


class _FillPriceAsFloat(Event):
    SCHEMA_NAME: ClassVar[str] = "test.fill"
    price: float
    side: Side
    note: str | None = None


def test_check_when_model_drops_field_reports_breaking_and_what_to_do(tmp_path: Path) -> None:
    # Arrange
    se.export(tmp_path, _registry_with(_FillV1))

    # Act
    result = se.check(tmp_path, _registry_with(_FillDropsField))

    # Assert
    assert not result.ok
    assert result.breaking == {"test.fill.v1.json": ["payload.side: field removed"]}
    assert "SCHEMA_VERSION" in result.report()


def test_check_when_model_retypes_decimal_to_float_reports_breaking(tmp_path: Path) -> None:
    # Arrange
    se.export(tmp_path, _registry_with(_FillV1))

    # Act
    result = se.check(tmp_path, _registry_with(_FillPriceAsFloat))

    # Assert
    assert result.breaking == {
        "test.fill.v1.json": ["payload.price: type changed from string to number"]
    }


def test_check_when_model_adds_optional_field_is_stale_not_breaking(tmp_path: Path) -> None:
    # Arrange
    se.export(tmp_path, _registry_with(_FillV1))

    # Act
    result = se.check(tmp_path, _registry_with(_FillAddsOptional))

    # Assert
    assert result.breaking == {}
    assert result.stale == ["test.fill.v1.json"]
    assert se.WRITE_COMMAND in result.report()


def test_check_when_schema_not_committed_reports_missing(tmp_path: Path) -> None:
    # Act
    result = se.check(tmp_path, _registry_with(_FillV1))

    # Assert
    assert result.missing == ["test.fill.v1.json"]
    assert se.WRITE_COMMAND in result.report()


def test_check_when_model_removed_reports_removed_schema(tmp_path: Path) -> None:
    # Arrange
    se.export(tmp_path, _registry_with(_FillV1))

    # Act
    result = se.check(tmp_path, {})

    # Assert
    assert result.removed == ["test.fill.v1.json"]
    assert "BREAKING" in result.report()


def test_check_when_older_version_of_live_schema_committed_accepts_it(tmp_path: Path) -> None:
    # Arrange: v1 stays committed after a deliberate bump to v2
    current = _registry_with(_FillV1)
    se.export(tmp_path, current)
    (tmp_path / "test.fill.v0.json").write_text(se.render({"type": "object"}), encoding="utf-8")

    # Act
    result = se.check(tmp_path, current)

    # Assert
    assert result.ok, result.report()


def test_export_when_run_twice_writes_identical_canonical_text(tmp_path: Path) -> None:
    # Arrange
    first = se.export(tmp_path)
    text = (tmp_path / "md.tick.v1.json").read_text(encoding="utf-8")

    # Act
    second = se.export(tmp_path)

    # Assert
    assert len(first) == len(se.platform_models())
    assert second == []
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_main_when_check_on_empty_dir_fails_then_write_fixes_it(tmp_path: Path) -> None:
    # Act
    before = se.main(["--check", "--dir", str(tmp_path)])
    wrote = se.main(["--write", "--dir", str(tmp_path)])
    after = se.main(["--check", "--dir", str(tmp_path)])

    # Assert
    assert (before, wrote, after) == (1, 0, 0)


def test_main_when_write_would_break_refuses_without_force(tmp_path: Path) -> None:
    # Arrange: a committed schema with a field the current model lacks
    se.export(tmp_path)
    path = tmp_path / "md.tick.v1.json"
    schema = json.loads(path.read_text(encoding="utf-8"))
    schema["$defs"]["Tick"]["properties"]["old_field"] = {"type": "string"}
    path.write_text(se.render(schema), encoding="utf-8")

    # Act
    refused = se.main(["--write", "--dir", str(tmp_path)])
    still_there = "old_field" in path.read_text(encoding="utf-8")
    forced = se.main(["--write", "--force", "--dir", str(tmp_path)])

    # Assert
    assert (refused, still_there, forced) == (1, True, 0)
    assert "old_field" not in path.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(se.platform_models()))
def test_file_name_when_built_matches_the_loader_pattern(name: str) -> None:
    # Act
    file = se.file_name(name, schemas.model(name).SCHEMA_VERSION)

    # Assert
    assert se._FILE_RE.match(file) is not None
