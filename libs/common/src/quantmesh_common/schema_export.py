"""Export every event's JSON Schema and refuse breaking changes against the committed copies.

One file per registered model, `<schema_name>.v<version>.json`, holding the JSON Schema of the
model's envelope as it is serialised on the wire (serialization mode: Decimals are strings).
Schemas evolve additively within one version: adding an optional field, an enum value or a new
schema is fine; removing a field, changing a field's type, adding a required field or removing
an enum value is breaking and needs a new SCHEMA_VERSION (a new file beside the old one).

    python -m quantmesh_common.schema_export --write   # re-export after changing a model
    python -m quantmesh_common.schema_export --check   # what CI runs
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from quantmesh_common.envelope import Event, SchemaRegistry, schemas

#: The committed schema files, in the source tree (libs/common/schemas).
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "schemas"
#: The command that regenerates the committed files.
WRITE_COMMAND = "python -m quantmesh_common.schema_export --write"
#: The JSON Schema mode used for every export: what producers put on the wire.
#: The modules whose registered models make up the wire contract.
SCHEMA_MODULES: Final = ("quantmesh_common.messages",)
MODE: Final[Literal["serialization"]] = "serialization"

_FILE_RE = re.compile(r"^(?P<name>[a-z0-9_.]+)\.v(?P<version>[0-9]+)\.json$")

JsonSchema = dict[str, Any]


def file_name(schema_name: str, version: int) -> str:
    """Return the file name of one schema version, e.g. `md.tick.v1.json`."""
    return f"{schema_name}.v{version}.json"


def render(schema: JsonSchema) -> str:
    """Return the canonical text of a schema: two-space indent, sorted keys, trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def platform_models() -> dict[str, type[Event]]:
    """Return the platform's event models by schema name: those defined in SCHEMA_MODULES.

    Tests may register throwaway models in the process-wide registry; they are not part of the
    wire contract and are left out.
    """
    for module in SCHEMA_MODULES:
        importlib.import_module(module)  # importing registers the models
    return {
        name: model
        for name, model in schemas.models().items()
        if model.__module__ in SCHEMA_MODULES
    }


def current_schemas(registry: SchemaRegistry | None = None) -> dict[str, JsonSchema]:
    """Return the JSON Schema of each model's envelope, by file name.

    Without `registry`, the platform's models (see `platform_models`); with one, all of its.
    """
    models = platform_models() if registry is None else registry.models()
    registry = schemas if registry is None else registry
    out: dict[str, JsonSchema] = {}
    for name, model in sorted(models.items()):
        env_type = registry.envelope_type(name)
        out[file_name(name, model.SCHEMA_VERSION)] = env_type.model_json_schema(mode=MODE)
    return out


def load_dir(directory: Path) -> dict[str, JsonSchema]:
    """Return the committed schemas in `directory`, by file name."""
    if not directory.is_dir():
        return {}
    return {
        p.name: json.loads(p.read_text(encoding="utf-8"))
        for p in sorted(directory.glob("*.json"))
        if _FILE_RE.match(p.name)
    }


# --------------------------------------------------------------------------------------------
# Breaking-change detection
# --------------------------------------------------------------------------------------------


def _resolve(schema: JsonSchema, root: JsonSchema) -> JsonSchema:
    """Follow `$ref`s (and single-element allOf wrappers) to the schema they point at."""
    seen = 0
    while True:
        if "$ref" in schema:
            ref = schema["$ref"]
            if not ref.startswith("#/$defs/"):
                raise ValueError(f"unsupported $ref {ref!r}")
            schema = root.get("$defs", {})[ref.removeprefix("#/$defs/")]
        elif "allOf" in schema and len(schema["allOf"]) == 1:
            schema = schema["allOf"][0]
        else:
            return schema
        seen += 1
        if seen > 100:
            raise ValueError("$ref cycle")


def _branches(schema: JsonSchema, root: JsonSchema) -> list[JsonSchema]:
    """Flatten anyOf/oneOf (nested too) into resolved alternatives."""
    schema = _resolve(schema, root)
    alts = schema.get("anyOf") or schema.get("oneOf")
    if alts is None:
        if isinstance(schema.get("type"), list):
            return [{**schema, "type": t} for t in schema["type"]]
        return [schema]
    out: list[JsonSchema] = []
    for alt in alts:
        out += _branches(alt, root)
    return out


def _kind(schema: JsonSchema) -> str:
    """Return the wire shape of one resolved alternative: its JSON type, or object vs map."""
    if "const" in schema or "enum" in schema:
        values = schema.get("enum", [schema.get("const")])
        types = sorted({type(v).__name__ for v in values})
        return schema.get("type") or "enum:" + ",".join(types)
    kind = schema.get("type")
    if kind == "object" and "properties" not in schema and "additionalProperties" in schema:
        return "map"
    if kind is None:
        return "any"
    return str(kind)


def _enum_values(schema: JsonSchema) -> set[str] | None:
    if "enum" in schema:
        return {json.dumps(v, sort_keys=True) for v in schema["enum"]}
    if "const" in schema:
        return {json.dumps(schema["const"], sort_keys=True)}
    return None


@dataclass
class _Walk:
    old_root: JsonSchema
    new_root: JsonSchema
    problems: list[str] = field(default_factory=list)
    seen: set[tuple[int, int]] = field(default_factory=set)

    def compare(self, old: JsonSchema, new: JsonSchema, path: str) -> None:
        old_alts = _branches(old, self.old_root)
        new_alts = _branches(new, self.new_root)
        old_kinds = sorted(_kind(s) for s in old_alts)
        new_kinds = sorted(_kind(s) for s in new_alts)
        if old_kinds != new_kinds:
            self.problems.append(
                f"{path}: type changed from {'|'.join(old_kinds)} to {'|'.join(new_kinds)}"
            )
            return
        old_by_kind: dict[str, list[JsonSchema]] = {}
        new_by_kind: dict[str, list[JsonSchema]] = {}
        for s in old_alts:
            old_by_kind.setdefault(_kind(s), []).append(s)
        for s in new_alts:
            new_by_kind.setdefault(_kind(s), []).append(s)
        for kind, olds in old_by_kind.items():
            for o, n in zip(olds, new_by_kind[kind], strict=True):
                self._compare_same_kind(o, n, kind, path)

    def _compare_same_kind(self, old: JsonSchema, new: JsonSchema, kind: str, path: str) -> None:
        key = (id(old), id(new))
        if key in self.seen:  # recursive models
            return
        self.seen.add(key)
        old_values, new_values = _enum_values(old), _enum_values(new)
        if old_values is not None:
            removed = old_values - (new_values if new_values is not None else old_values)
            for value in sorted(removed):
                self.problems.append(f"{path}: enum value {value} removed")
        if kind == "object":
            self._compare_object(old, new, path)
        elif kind == "array" and "items" in old and "items" in new:
            self.compare(old["items"], new["items"], f"{path}[]")
        elif kind == "map":
            old_v, new_v = old.get("additionalProperties"), new.get("additionalProperties")
            if isinstance(old_v, dict) and isinstance(new_v, dict):
                self.compare(old_v, new_v, f"{path}{{}}")

    def _compare_object(self, old: JsonSchema, new: JsonSchema, path: str) -> None:
        old_props: dict[str, JsonSchema] = old.get("properties", {})
        new_props: dict[str, JsonSchema] = new.get("properties", {})
        prefix = f"{path}." if path else ""
        for name in sorted(old_props):
            if name not in new_props:
                self.problems.append(f"{prefix}{name}: field removed")
            else:
                self.compare(old_props[name], new_props[name], f"{prefix}{name}")
        newly_required = set(new.get("required", [])) - set(old.get("required", []))
        for name in sorted(newly_required):
            what = "new required field" if name not in old_props else "field became required"
            self.problems.append(f"{prefix}{name}: {what}")


def breaking_changes(old: JsonSchema, new: JsonSchema) -> list[str]:
    """Return the breaking changes from schema `old` to schema `new` (empty if compatible).

    Breaking: a removed field, a field whose type changed (including gaining or losing null), a
    new required field (or an optional one made required), a removed enum value. Additive and
    fine: a new optional field, a new enum value, new descriptions or titles.
    """
    walk = _Walk(old, new)
    walk.compare(old, new, "")
    return walk.problems


@dataclass
class CheckResult:
    """The outcome of comparing the exported schemas with the committed ones."""

    breaking: dict[str, list[str]] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Return True if the committed files are exactly the current export."""
        return not (self.breaking or self.stale or self.missing or self.removed)

    def report(self) -> str:
        """Return a human-readable report naming what to do."""
        lines: list[str] = []
        for name, problems in sorted(self.breaking.items()):
            lines.append(f"BREAKING {name}:")
            lines += [f"  - {p}" for p in problems]
        for name in self.removed:
            lines.append(f"BREAKING {name}: schema no longer registered (its model was removed)")
        if self.breaking or self.removed:
            lines.append(
                "Schemas may only change additively within a version. Restore the field/value, "
                "make the new field optional with a default, or bump the model's SCHEMA_VERSION "
                "(the old file stays committed)."
            )
        for name in self.missing:
            lines.append(f"NEW {name}: not committed yet")
        for name in self.stale:
            lines.append(f"CHANGED {name}: committed file differs from the export (additive)")
        if self.missing or self.stale:
            lines.append(f"Run `{WRITE_COMMAND}` and commit libs/common/schemas/.")
        return "\n".join(lines) if lines else "schemas: up to date"


def check(
    directory: Path = DEFAULT_DIR, current: dict[str, JsonSchema] | None = None
) -> CheckResult:
    """Compare the current export with the files committed in `directory`."""
    now = current_schemas() if current is None else current
    committed = load_dir(directory)
    result = CheckResult()
    for name, schema in now.items():
        old = committed.get(name)
        if old is None:
            result.missing.append(name)
            continue
        problems = breaking_changes(old, schema)
        if problems:
            result.breaking[name] = problems
        elif render(old) != render(schema):
            result.stale.append(name)
    live_names = {_FILE_RE.match(n).group("name") for n in now}  # type: ignore[union-attr]
    for name in committed:
        match = _FILE_RE.match(name)
        # An older version of a live schema stays committed on purpose; a schema whose model
        # is gone breaks every consumer still reading it.
        if name not in now and match is not None and match.group("name") not in live_names:
            result.removed.append(name)
    return result


def export(
    directory: Path = DEFAULT_DIR, current: dict[str, JsonSchema] | None = None
) -> list[Path]:
    """Write every current schema into `directory`; return the files whose content changed."""
    now = current_schemas() if current is None else current
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, schema in now.items():
        path = directory / name
        text = render(schema)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """`--write` re-exports the schemas (refusing breaking changes unless --force); `--check`
    exits non-zero if the committed schemas are stale or a change is breaking."""
    parser = argparse.ArgumentParser(prog="quantmesh-schemas", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="write libs/common/schemas/*.json")
    action.add_argument("--check", action="store_true", help="compare with the committed files")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"default: {DEFAULT_DIR}")
    parser.add_argument("--force", action="store_true", help="write even breaking changes")
    args = parser.parse_args(argv)
    result = check(args.dir)
    if args.check:
        stream = sys.stdout if result.ok else sys.stderr
        stream.write(result.report() + "\n")
        return 0 if result.ok else 1
    if (result.breaking or result.removed) and not args.force:
        sys.stderr.write(result.report() + "\nNot written; --force overrides.\n")
        return 1
    written = export(args.dir)
    sys.stdout.write(f"schemas: {len(written)} written to {args.dir}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
